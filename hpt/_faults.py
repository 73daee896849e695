"""Fault injection knobs read from the environment, for the fault matrix and the demo.

``HPT_FAULT_COMMIT_DELAY=RANK:STEP:SECONDS`` holds the commit of rank RANK's snapshot of step
STEP for SECONDS (the copy is done, the snapshot not yet complete), so a test can kill the rank
while its snapshot is in flight. It fires in the job's first attempt only (``HPT_ATTEMPT``), so
the restarted attempt runs clean. Unset in production; parsing errors are ignored with a warning
(a typo must not break training).
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)


def commit_delay(rank: int, step: int) -> float:
    raw = os.environ.get("HPT_FAULT_COMMIT_DELAY", "")
    if not raw or os.environ.get("HPT_ATTEMPT", "1") != "1":
        return 0.0
    try:
        want_rank, want_step, seconds = raw.split(":")
        if int(want_rank) == rank and int(want_step) == step:
            return float(seconds)
    except ValueError:
        log.warning("ignoring HPT_FAULT_COMMIT_DELAY=%r: expected RANK:STEP:SECONDS", raw)
    return 0.0


def hold(seconds: float) -> None:
    """Block the calling thread for ``seconds`` (the injected fault itself)."""
    threading.Event().wait(seconds)
