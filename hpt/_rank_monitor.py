"""Rank-side monitoring that ``hpt.init()`` switches on: timings, in-flight collectives, stacks.

Every message to the agent is one of :mod:`hpt._rank_protocol` (JSON lines, never pickle).

- :func:`start` installs :mod:`hpt._instrument` with a sink that ships each batch of timing
  records to the agent (``Records``, at most ``MAX_RECORDS`` a message).
- A watchdog thread ships the collectives the rank is blocked in every ``INFLIGHT_PERIOD_S``
  (``InFlight``), so a stuck collective is visible to the
  controller's C4-style detector even though the step never ends. A rank that holds the GIL
  starves this thread too; the agent then sees it from missing progress, not from here.
- ``faulthandler`` is registered on SIGUSR1, writing every thread's stack to the per-rank file
  the launcher names in ``HPT_STACK_FILE``: the agent signals a hung rank and reads the file.
  faulthandler writes from its C signal handler, so it works while the rank holds the GIL.
  The rank then tells the agent which pid registered it (``StackDump``): the
  agent signals no other process (SIGUSR1 kills a process without a handler).
- :func:`section` with a ``timeout`` tells the agent when the section opens and closes
  (``SectionBegin`` / ``SectionEnd``): inside it the rank is hung only past that timeout.

:func:`on_step` is what ``hpt.step(n)`` calls: it ends the step in progress and begins the next.
Nothing here raises into the training loop: failures are logged once and the rank carries on.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import threading
from collections.abc import Iterator
from typing import IO, Any

from hpt._rank import AgentChannel
from hpt._rank_protocol import (
    MAX_NAME_CHARS,
    MAX_RECORDS,
    MAX_SECTION_TIMEOUT_S,
    InFlight,
    Records,
    SectionBegin,
    SectionEnd,
    StackDump,
)

log = logging.getLogger(__name__)

INFLIGHT_PERIOD_S = 1.0
"""How often the watchdog reports in-flight collectives."""


class _State:
    __slots__ = ("channel", "open_step", "stack_file", "stop", "timer", "watchdog")

    def __init__(self) -> None:
        self.timer: Any = None
        self.channel: AgentChannel | None = None
        self.open_step: int | None = None
        self.stop = threading.Event()
        self.watchdog: threading.Thread | None = None
        self.stack_file: IO[str] | None = None


_state = _State()


def start(*, job_id: str, attempt: int, rank: int, node: str, channel: AgentChannel | None) -> None:
    """Switch monitoring on for this rank (idempotent; never raises)."""
    registered = False
    try:
        registered = _register_stack_dump(os.environ.get("HPT_STACK_FILE", ""))
    except Exception as exc:  # never into the training loop
        log.warning("hpt: stack dumps on SIGUSR1 unavailable: %s", exc)
    if channel is not None and registered:
        channel.send(StackDump(pid=os.getpid()))
    if channel is None or _state.timer is not None:
        return
    try:
        from hpt import _instrument

        _state.channel = channel
        if _instrument.installed() is not None:
            _instrument.uninstall(flush=False)
        _state.timer = _instrument.install(job_id, attempt, rank, node, _send_records)
    except Exception as exc:
        log.warning("hpt: timing instrumentation unavailable: %s", exc)
        return
    _state.stop.clear()
    _state.watchdog = threading.Thread(target=_watchdog, name="hpt-watchdog", daemon=True)
    _state.watchdog.start()


def on_step(completed: int) -> None:
    """``hpt.step(completed)``: end the step in progress, begin step ``completed + 1``."""
    timer = _state.timer
    if timer is None:
        return
    try:
        if _state.open_step is not None:
            timer.end_step(_state.open_step)
        _state.open_step = completed + 1
        timer.begin_step(completed + 1)
    except Exception as exc:  # StepTimer latches its own errors; this is belt and braces
        log.debug("hpt: step bookkeeping failed: %s", exc)


@contextlib.contextmanager
def section(name: str, timeout: float | None = None) -> Iterator[None]:
    """Time a named part of the step (``"data"`` counts as data wait); a no-op when off.

    Args:
        name: the section's name (1..200 characters when ``timeout`` is given).
        timeout: seconds this section may take without a step before the rank counts as hung
            (an evaluation, a final save); None: the job's usual hang deadline applies. Enter
            it on every rank that waits for it (a rank blocked in a collective on a peer that
            is evaluating is silent too).

    Raises:
        ValueError: ``timeout`` is not a positive number of seconds, or ``name`` is empty.
    """
    channel = _state.channel
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not (
            0 < timeout <= MAX_SECTION_TIMEOUT_S
        ):
            raise ValueError(f"timeout ({timeout!r}) must be in (0, {MAX_SECTION_TIMEOUT_S:g}] s")
        if not 0 < len(name) <= MAX_NAME_CHARS:
            raise ValueError(f"name ({name!r}) must be 1..{MAX_NAME_CHARS} characters")
        if channel is not None:
            channel.send(SectionBegin(name=name, timeout_s=float(timeout)))
    timer = _state.timer
    try:
        if timer is None:
            yield
        else:
            with timer.section(name):
                yield
    finally:
        if timeout is not None and channel is not None:
            channel.send(SectionEnd(name=name))


def data_ready() -> None:
    """Mark that the step's input is ready (time since the step began is data wait)."""
    timer = _state.timer
    if timer is not None:
        timer.data_ready()


def stop() -> None:
    """Stop the watchdog and the instrumentation (tests; the process exiting does it too)."""
    _state.stop.set()
    if _state.watchdog is not None:
        _state.watchdog.join(timeout=2 * INFLIGHT_PERIOD_S)
        _state.watchdog = None
    if _state.timer is not None:
        from hpt import _instrument

        if _instrument.installed() is _state.timer:
            _instrument.uninstall(flush=True)
        _state.timer = None
    _state.open_step = None


def _send_records(batch: list[dict[str, Any]]) -> None:
    channel = _state.channel
    if channel is None:
        return
    for i in range(0, len(batch), MAX_RECORDS):
        channel.send(Records(records=tuple(batch[i : i + MAX_RECORDS])))


def _watchdog() -> None:
    reported = False
    while not _state.stop.wait(INFLIGHT_PERIOD_S):
        timer, channel = _state.timer, _state.channel
        if timer is None or channel is None:
            return
        try:
            pending = timer.in_flight()
            # An empty report after a non-empty one tells the agent the rank got out.
            if pending or reported:
                channel.send(InFlight(records=tuple(pending[:MAX_RECORDS])))
            reported = bool(pending)
        except Exception as exc:
            log.debug("hpt: in-flight report failed: %s", exc)


def rearm_stack_dump() -> None:
    """Register the SIGUSR1 stack dump again: code that saves and later "restores" Python signal
    handlers (PyTorch Lightning's trainer does, for every signal) puts back SIG_DFL, because
    ``signal.getsignal`` cannot see faulthandler's C handler; SIGUSR1 would then kill the rank."""
    if _state.stack_file is not None:
        faulthandler.register(signal.SIGUSR1, file=_state.stack_file, all_threads=True, chain=False)


def _register_stack_dump(path: str) -> bool:
    """Register the SIGUSR1 dump once; True when this process has it."""
    if not path:
        return False
    if _state.stack_file is not None:
        return True
    # Kept open for the life of the process: faulthandler writes to its file descriptor.
    f = open(path, "w")  # noqa: SIM115
    faulthandler.register(signal.SIGUSR1, file=f, all_threads=True, chain=False)
    _state.stack_file = f
    return True
