"""Which finished jobs the controller stops keeping: pure, ``now`` passed in.

A controller that keeps every job it ever ran grows without bound (each record carries its spec,
attempts and ranks, and ``hptctl ls`` lists them all). Finished jobs are kept while they are
among the newest ``keep_count`` finished ones, younger than ``keep_s`` seconds since they ended,
and their specs together within ``keep_bytes`` (a spec may take up to 1 MiB); the rest are
dropped from memory and from the store. Running jobs are always kept.
"""

from __future__ import annotations

from collections.abc import Iterable

from hpt.controller.model import Job


def ended_at(job: Job) -> float:
    """When the job reached its terminal state (its last state change)."""
    return job.history[-1].at if job.history else job.created_at


def spec_bytes(job: Job) -> int:
    spec = job.spec
    return (sum(len(a) for a in spec.command) + sum(len(k) + len(v) for k, v in spec.env)
            + len(spec.workdir) + len(spec.persist_dir))


def expired(
    jobs: Iterable[Job], now: float, *, keep_count: int, keep_s: float,
    keep_bytes: int = 1 << 62,
) -> list[str]:
    """Ids of finished jobs to drop, oldest first."""
    finished = sorted((j for j in jobs if j.state.is_terminal), key=lambda j: (ended_at(j), j.id))
    over = max(0, len(finished) - keep_count)
    drop = {j.id for i, j in enumerate(finished) if i < over or now - ended_at(j) > keep_s}
    kept_bytes = 0
    for job in reversed(finished):  # newest first: the oldest go when the budget runs out
        if job.id not in drop:
            kept_bytes += spec_bytes(job)
            if kept_bytes > keep_bytes:
                drop.add(job.id)
    return [j.id for j in finished if j.id in drop]
