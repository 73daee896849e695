"""Decide what to do with one job: ``decide(job, view, now) -> list[Decision]``. Pure.

Each pass of the control loop (``reconcile.py``) first applies what agents and users reported
(observations), then builds a :class:`View` of what the job record does not hold (free capacity,
the fault the detectors settled on, the stops in flight), asks :func:`decide`, and hands the
decisions, in order, to its one executor, which changes state only through ``set_state``. This
is the shape of torch.elastic's rendezvous ops (``_RendezvousJoinOp`` returns an action, the
executor runs it) and of Ray's autoscaler v2 reconciler.

Nothing here reads a clock, a lock or a socket: ``now`` (wall) and ``view.mono`` (this
process's monotonic clock) are passed in, so every decision is tested as "given X at T, expect
Y" (``tests/unit/controller/test_decide.py``).

Decisions, in the order a pass may return them for one job::

    EndAttempt   a stopping attempt's ranks all ended: FAILED (it had a fault) or STOPPED
    Stop         stop an attempt everywhere (fault, cancel, resize), or again without grace
    ExcludeNode  the straggler policy takes a node off the job
    Restart      a fault ended the attempt and restarts remain: RECOVERING
    Fail         no restarts left, or no placement before the node-wait deadline
    Cancel       the user cancelled and every rank stopped: CANCELLED
    Succeed      every rank exited 0
    Grow         nodes came back: stop to relaunch on more of them
    Launch       first placement, or a relaunch on as many nodes as before (or more)
    Shrink       a relaunch on fewer nodes than the attempt before (within min_nodes)
    WaitForNodes too few healthy nodes: wait until the deadline
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from hpt.controller import elastic, policy
from hpt.controller.catalog import complete_steps
from hpt.controller.model import (
    Attempt,
    AttemptState,
    Fault,
    FaultKind,
    Job,
    JobState,
    RankState,
    StopCause,
)
from hpt.controller.scheduler import Capacity

RESEND_STOP_AFTER_S = 5.0
"""A stop not confirmed within its grace plus this is sent again, without grace."""


class Why(str, Enum):  # noqa: UP042 (STYLE: (str, Enum) for logged values)
    """The reason a decision was taken (its message says it in words, with the numbers)."""

    FAULT = "fault"
    CANCELLED = "cancelled"
    NODES_RETURNED = "nodes_returned"
    STOP_NOT_CONFIRMED = "stop_not_confirmed"
    EVERY_RANK_ENDED = "every_rank_ended"
    EVERY_RANK_SUCCEEDED = "every_rank_succeeded"
    STRAGGLER_POLICY = "straggler_policy"
    MAX_RESTARTS_REACHED = "max_restarts_reached"
    NO_PLACEMENT = "no_placement"
    PLACED = "placed"
    WAITING_FOR_NODES = "waiting_for_nodes"


@dataclass(frozen=True, kw_only=True, slots=True)
class EndAttempt:
    attempt: int
    why: Why = Why.EVERY_RANK_ENDED


@dataclass(frozen=True, kw_only=True, slots=True)
class Stop:
    """Stop ``attempt`` on its nodes. ``fault`` is recorded as its cause first (when set);
    ``resend`` stops again only the nodes still running ranks, keeping the first grace."""

    attempt: int
    grace_s: float
    cause: StopCause
    message: str
    why: Why
    fault: Fault | None = None
    resend: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class ExcludeNode:
    node: str
    message: str
    why: Why = Why.STRAGGLER_POLICY


@dataclass(frozen=True, kw_only=True, slots=True)
class Restart:
    fault: Fault
    message: str
    why: Why = Why.FAULT


@dataclass(frozen=True, kw_only=True, slots=True)
class Fail:
    message: str
    why: Why


@dataclass(frozen=True, kw_only=True, slots=True)
class Cancel:
    message: str
    why: Why = Why.CANCELLED


@dataclass(frozen=True, kw_only=True, slots=True)
class Succeed:
    attempt: int
    why: Why = Why.EVERY_RANK_SUCCEEDED


@dataclass(frozen=True, kw_only=True, slots=True)
class Grow:
    attempt: int
    message: str
    why: Why = Why.NODES_RETURNED


@dataclass(frozen=True, kw_only=True, slots=True)
class Launch:
    nodes: tuple[str, ...]
    message: str
    why: Why = Why.PLACED


@dataclass(frozen=True, kw_only=True, slots=True)
class Shrink:
    nodes: tuple[str, ...]
    message: str
    why: Why = Why.PLACED


@dataclass(frozen=True, kw_only=True, slots=True)
class WaitForNodes:
    deadline_at: float
    message: str
    why: Why = Why.WAITING_FOR_NODES


Decision = (EndAttempt | Stop | ExcludeNode | Restart | Fail | Cancel | Succeed | Grow | Launch
            | Shrink | WaitForNodes)


@dataclass(frozen=True, slots=True)
class StopSent:
    """The last stop sent for an attempt."""

    at: float
    """This process's monotonic clock."""
    grace_s: float


@dataclass(frozen=True, kw_only=True, slots=True)
class View:
    """What one pass observed about a job beyond its record."""

    mono: float
    """This process's monotonic clock now (stops in flight are timed on it)."""
    capacity: tuple[Capacity, ...] = ()
    """READY, connected nodes with their free slots (placement)."""
    fault: Fault | None = None
    """The fault of the running attempt: from its ranks (``faults.earliest_fault``), else a
    settled hang or a straggler the policy acts on (``detect.py``), else a launch timeout."""
    stops: Mapping[int, StopSent] = field(default_factory=dict)
    """attempt number -> the last stop sent for it."""
    free_since: Mapping[str, float] = field(default_factory=dict)
    """Nodes with room for the job that it does not run on -> since when (wall clock)."""
    grow_hysteresis_s: float = elastic.GROW_HYSTERESIS_S
    cancel_grace_s: float | None = None
    """The grace a cancel asked for (None: the job's ``stop_grace_s``)."""


def decide(job: Job, view: View, now: float) -> list[Decision]:
    """What to do with ``job`` now, in order. Empty: nothing to do this pass."""
    out: list[Decision] = []
    ending: set[int] = set()
    for attempt in job.attempts:
        if attempt.state == AttemptState.STOPPING:
            if attempt.all_ended:
                out.append(EndAttempt(attempt=attempt.number))
                ending.add(attempt.number)
            else:
                out += _stop_again(job, attempt, view)
    if job.state.is_terminal:
        return out
    current = job.current
    ended = current is None or current.state.is_terminal or current.number in ending
    if job.cancel_requested:
        if ended:
            out.append(Cancel(message="cancelled by the user; every rank stopped"))
        elif current is not None and current.state != AttemptState.STOPPING:
            grace = job.spec.stop_grace_s if view.cancel_grace_s is None else view.cancel_grace_s
            out.append(Stop(attempt=current.number, grace_s=grace, cause=StopCause.CANCELLED,
                            message="cancelled by the user", why=Why.CANCELLED))
        return out
    if job.state == JobState.PENDING:
        out += _place(job, view, now)
    elif job.state == JobState.RUNNING and current is not None:
        out += _running(job, current, view, now)
    elif job.state == JobState.RECOVERING and ended:
        if current is not None:
            ended_at = current.ended_at if current.state.is_terminal else now
            if now < ended_at + policy.restart_backoff_s(job):
                return out  # a crash loop backs off; the loop's period brings us back
        out += _place(job, view, now)
    return out


def _stop_again(job: Job, attempt: Attempt, view: View) -> list[Decision]:
    sent = view.stops.get(attempt.number)
    grace = job.spec.stop_grace_s if sent is None else sent.grace_s
    if sent is not None and view.mono - sent.at <= grace + RESEND_STOP_AFTER_S:
        return []
    return [Stop(attempt=attempt.number, grace_s=grace, cause=StopCause.UNCONFIRMED,
                 message="stop not confirmed", why=Why.STOP_NOT_CONFIRMED, resend=True)]


def _running(job: Job, attempt: Attempt, view: View, now: float) -> list[Decision]:
    if all(r.state == RankState.SUCCEEDED for r in attempt.ranks):
        return [Succeed(attempt=attempt.number)]
    fault = view.fault
    if fault is None:
        # complete_steps is O(ranks): only a shrunk attempt can grow
        complete = set(complete_steps(attempt)) if len(attempt.nodes) < job.spec.nodes else set()
        reason = elastic.decide_grow(job, attempt, view.free_since, complete, now,
                                     view.grow_hysteresis_s)
        return [] if reason is None else [Grow(attempt=attempt.number, message=reason)]
    out: list[Decision] = []
    if fault.kind == FaultKind.STRAGGLER and fault.node not in job.excluded_nodes:
        out.append(ExcludeNode(
            node=fault.node,
            message=f"straggler policy: job no longer runs on {fault.node} "
            f"(straggler_restart_after={job.spec.straggler_restart_after})"))
    # A hung attempt gets no grace: its ranks are stopped or stuck, SIGTERM would only wait
    # (their snapshots live in the agents' memory, not in the ranks).
    grace = 0.0 if fault.kind == FaultKind.HANG else job.spec.stop_grace_s
    out.append(Stop(attempt=attempt.number, grace_s=grace, cause=StopCause.FAULT,
                    message=f"fault: {fault.kind.value} of {fault.where()}", why=Why.FAULT,
                    fault=fault))
    limit = job.spec.max_restarts
    if job.restarts >= limit:
        out.append(Fail(why=Why.MAX_RESTARTS_REACHED,
                        message=f"max_restarts ({limit}) reached; root cause: "
                        f"{fault.kind.value} of {fault.where()}: {fault.message}"))
        return out
    message = (f"restart {job.restarts + 1}/{limit} after {fault.kind.value} of "
               f"{fault.where()}: {fault.message}")
    backoff = policy.restart_backoff_s(job, ending=attempt)
    if backoff:
        message += (f"; next attempt {backoff:g} s after this one stops (crash loop: "
                    f"{policy.crash_loop(job, ending=attempt)} attempt(s) in a row ended "
                    "before a step)")
    out.append(Restart(fault=fault, message=message))
    return out


def _place(job: Job, view: View, now: float) -> list[Decision]:
    placed = policy.decide_placement(job, list(view.capacity), now)
    if placed.action == policy.Action.RESTART:
        previous = job.current
        if previous is not None and len(placed.nodes) < len(previous.nodes):
            return [Shrink(nodes=placed.nodes, message=placed.reason)]
        return [Launch(nodes=placed.nodes, message=placed.reason)]
    if placed.action == policy.Action.FAIL:
        return [Fail(message=placed.reason, why=Why.NO_PLACEMENT)]
    if job.deadline_at != placed.deadline_at:
        return [WaitForNodes(deadline_at=placed.deadline_at, message=placed.reason)]
    return []
