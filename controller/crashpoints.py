"""Named points where the fault suite kills the controller between two store writes.

``HPT_CRASH_AT=<point>[:<n>]`` in the controller's environment makes the ``n``-th pass (default
the first) through ``crash_point(<point>)`` end the process at once with ``os._exit(86)``, as a
``kill -9`` there would. Unset (always, outside tests), ``crash_point`` is one comparison.

Points:
- ``launch-persisted``: the job record holding a new attempt is in the store; no launch command
  has left yet.
- ``launch-sent``: the launch commands were handed to the agents' streams; the
  ``attempt_launched`` event is not written yet.
- ``fault-recorded``: an attempt's fault and stop decision are in memory and the stop commands
  are queued; the job record is not written yet.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

POINTS = frozenset({"launch-persisted", "launch-sent", "fault-recorded"})
EXIT_CODE = 86


def _parse(value: str) -> tuple[str, int]:
    name, _, count = value.partition(":")
    if name not in POINTS:
        raise ValueError(f"HPT_CRASH_AT ({value!r}) must name one of {sorted(POINTS)}")
    return name, int(count) if count else 1


_ARMED, _AT_HIT = _parse(os.environ["HPT_CRASH_AT"]) if os.environ.get("HPT_CRASH_AT") else ("", 0)
_hits = 0


def crash_point(name: str) -> None:
    """End the process here when the fault suite armed ``name`` (see the module docstring)."""
    global _hits
    if name != _ARMED:
        return
    _hits += 1
    if _hits == _AT_HIT:
        log.critical("crash point %s reached (HPT_CRASH_AT): exiting now", name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_CODE)
