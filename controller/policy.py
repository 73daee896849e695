"""Failure and scaling policy: what to do with a job after a fault. Pure functions.

``decide.py`` asks; these answer with a ``Decision`` carrying a one-line reason that goes into
the job's history and the event log. Nothing here reads a clock: ``now`` is passed in. (What a
fault does to a job, restart or fail, is decided in ``decide.py`` itself.)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from hpt.controller.model import Attempt, Job
from hpt.controller.scheduler import Capacity, place

CRASH_LOOP_BACKOFF_FIRST_S = 0.5
CRASH_LOOP_BACKOFF_CAP_S = 60.0


def crash_loop(job: Job, ending: Attempt | None = None) -> int:
    """How many of the job's latest attempts in a row ended (or are ending) before their first
    step: a crash loop (a bad script, a bad node, a missing file). ``ending``: an attempt a
    fault is ending now (its cause is not recorded yet)."""
    n = 0
    for attempt in reversed(job.attempts):
        if attempt.first_step_at or not (
            attempt.state.is_terminal or attempt.cause is not None or attempt is ending
        ):
            break
        n += 1
    return n


def restart_backoff_s(job: Job, ending: Attempt | None = None) -> float:
    """Seconds between the end of the last attempt and the launch of the next: none after an
    attempt that made progress (a fault mid-training restarts at once), else 0.5 s doubling
    per attempt of the crash loop, capped at 60 s."""
    n = crash_loop(job, ending)
    if n == 0:
        return 0.0
    return min(CRASH_LOOP_BACKOFF_CAP_S, CRASH_LOOP_BACKOFF_FIRST_S * 2 ** (n - 1))


class Action(str, Enum):
    RESTART = "RESTART"
    """Launch the next attempt on ``Decision.nodes``."""
    WAIT_FOR_NODES = "WAIT_FOR_NODES"
    """Too few healthy nodes; wait until ``Decision.deadline_at``."""
    FAIL = "FAIL"
    """Give up; the job ends FAILED with ``Decision.reason``."""


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: str
    nodes: tuple[str, ...] = ()
    deadline_at: float = 0.0


def decide_placement(job: Job, capacity: list[Capacity], now: float) -> Decision:
    """Called while a job is PENDING or RECOVERING with its previous attempt fully stopped."""
    spec = job.spec
    if job.excluded_nodes:
        capacity = [c for c in capacity if c.node not in job.excluded_nodes]
    nodes = place(
        capacity,
        procs_per_node=spec.procs_per_node,
        min_nodes=spec.effective_min_nodes,
        max_nodes=spec.nodes,
    )
    if nodes is not None:
        shrink = "" if len(nodes) == spec.nodes else f" (shrunk from {spec.nodes})"
        return Decision(
            Action.RESTART,
            f"placed on {len(nodes)} node(s){shrink}: {', '.join(nodes)}",
            nodes=tuple(nodes),
        )
    usable = sum(1 for c in capacity if c.free_slots >= spec.procs_per_node)
    deadline = job.deadline_at or now + spec.node_wait_timeout_s
    if now >= deadline:
        return Decision(
            Action.FAIL,
            f"only {usable} node(s) with {spec.procs_per_node} free slots, min_nodes is "
            f"{spec.effective_min_nodes}; gave up after node_wait_timeout_s "
            f"({spec.node_wait_timeout_s:g})",
        )
    return Decision(
        Action.WAIT_FOR_NODES,
        f"waiting for nodes: {usable} usable, {spec.effective_min_nodes} needed",
        deadline_at=deadline,
    )
