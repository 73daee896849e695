"""What ended an attempt, derived from its ranks: the fault and its class. Pure functions.

The reconciler's pass builds its view of a running attempt from here (and from the detectors,
``detect.py``, for hangs and stragglers); ``decide.py`` acts on the result. The earliest failure
is the root cause: the others are usually its echo (a peer's closed connection).
"""

from __future__ import annotations

from hpt.controller.model import (
    OOM_ERROR,
    PLATFORM_ERRORS,
    Attempt,
    AttemptState,
    ExitInfo,
    Fault,
    FaultClass,
    FaultKind,
    RankEndCause,
    RankState,
)

_CRASH_SIGNALS = frozenset({"SIGSEGV", "SIGBUS", "SIGILL", "SIGABRT"})


def classify_exit(exit_: ExitInfo | None) -> FaultClass:
    """Whose failure a rank's exit is: the script's (an exception it raised), the platform's (a
    crash signal, hpt's checkpoint path), the kernel OOM killer's, or else the infra's."""
    if exit_ is None:
        return FaultClass.INFRA
    if exit_.error_type == OOM_ERROR:
        return FaultClass.OOM
    if exit_.signal in _CRASH_SIGNALS or exit_.error_type in PLATFORM_ERRORS:
        return FaultClass.PLATFORM
    return FaultClass.USER if exit_.error_type else FaultClass.INFRA


def earliest_fault(attempt: Attempt, now: float, include_stopped: bool = True) -> Fault | None:
    """The earliest failure of the attempt's ranks, or None.

    Args:
        now: wall clock, stamped as ``detected_at`` (and as ``occurred_at`` when unknown).
        include_stopped: count a rank its agent stopped on its own (self-fencing) while the
            attempt was not being stopped.
    """
    faults = []
    for rank in attempt.ranks:
        if rank.state == RankState.FAILED:
            exit_ = rank.exit
            faults.append(Fault(kind=FaultKind.RANK_EXIT, attempt=attempt.number, node=rank.node,
                                rank=rank.rank, message=rank.exit_reason, detected_at=now,
                                occurred_at=exit_.ended_at if exit_ else now,
                                classification=classify_exit(exit_)))
        elif rank.state == RankState.LOST:
            kind = {RankEndCause.NODE_LOST: FaultKind.NODE_LOST,
                    RankEndCause.NEVER_STARTED: FaultKind.LAUNCH_TIMEOUT}.get(
                        rank.end_cause, FaultKind.RANK_LOST)
            faults.append(Fault(kind=kind, attempt=attempt.number, node=rank.node, rank=rank.rank,
                                message=rank.exit_reason, detected_at=now, occurred_at=now,
                                classification=FaultClass.INFRA))
        elif (rank.state == RankState.STOPPED and include_stopped
              and attempt.state != AttemptState.STOPPING):
            # its agent stopped it (self-fencing): infra, at the time it ended, so that the
            # peers' errors it caused (a closed connection) come after it
            ended = rank.exit.ended_at if rank.exit and rank.exit.ended_at else now
            faults.append(Fault(kind=FaultKind.RANK_LOST, attempt=attempt.number, node=rank.node,
                                rank=rank.rank, message=rank.exit_reason or "stopped by its agent",
                                detected_at=now, occurred_at=min(ended, now),
                                classification=FaultClass.INFRA))
    if not faults:
        return None
    return min(faults, key=lambda f: (f.occurred_at, f.rank))
