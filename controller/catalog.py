"""The snapshot catalog: which step a new attempt restores. Pure functions over the job record.

Agents report, per rank, the steps of the complete in-memory snapshots they hold for it (at most
two generations) and the steps persisted to disk. A snapshot of step s is usable for a new
attempt only if every rank of the new attempt finds s on the node it will run on: the newest
such step wins. Anything older than the newest report of a (rank, node) pair is stale (the
generation may have been overwritten since), so only that newest report counts.
"""

from __future__ import annotations

from hpt.controller.model import Attempt


def held_steps(attempts: list[Attempt], rank: int, node: str) -> set[int]:
    """Steps the agent on ``node`` holds for ``rank``, from the newest attempt that ran it there."""
    for attempt in reversed(attempts):
        for r in attempt.ranks:
            if r.rank == rank and r.node == node:
                return set(r.snapshot_steps)
    return set()


def restore_step(attempts: list[Attempt], placement: list[tuple[int, str]]) -> int:
    """Newest step complete in memory for every ``(rank, node)`` of ``placement``; 0 if none.

    Only a restart at the same world size can restore from memory: a new world size needs the
    snapshot resharded, which the in-memory tier does not do (yet), so it starts from disk.
    """
    if not attempts or not placement:
        return 0
    previous = attempts[-1]
    if previous.world_size != len(placement):
        return 0
    common: set[int] | None = None
    for rank, node in placement:
        steps = held_steps(attempts, rank, node)
        common = steps if common is None else common & steps
        if not common:
            return 0
    return max(common) if common else 0


def complete_steps(attempt: Attempt) -> list[int]:
    """Steps complete in memory on every rank of ``attempt``, newest first (for hptctl)."""
    sets = [set(r.snapshot_steps) for r in attempt.ranks]
    if not sets:
        return []
    return sorted(set.intersection(*sets), reverse=True)


def persisted_steps(attempt: Attempt) -> list[int]:
    """Steps persisted for every rank of ``attempt``, newest first."""
    sets = [set(r.persisted_steps) for r in attempt.ranks]
    if not sets:
        return []
    return sorted(set.intersection(*sets), reverse=True)
