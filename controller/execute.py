"""The active phase of a reconcile pass: build a job's view, ``decide``, execute the decisions.

``Reconciler`` (``reconcile.py``) mixes this in. For each job, ``_view`` gathers what the record
does not hold (capacity, the fault of the running attempt from its ranks and the detectors, the
stops in flight), ``decide.decide`` returns the decisions, and ``_execute``, the one executor,
applies them in order. Job transitions go through ``_set_job_state``, whose observers emit the
job's events; attempts, ranks and nodes through their ``set_state``. Commands to agents leave
through ``_send`` (a launch only once its attempt is stored: ``Reconciler._flush``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from hpt.controller import faults
from hpt.controller.crashpoints import crash_point
from hpt.controller.decide import (
    Cancel,
    Decision,
    EndAttempt,
    ExcludeNode,
    Fail,
    Grow,
    Launch,
    Restart,
    Shrink,
    Stop,
    StopSent,
    Succeed,
    View,
    WaitForNodes,
    decide,
)
from hpt.controller.model import (
    Attempt,
    AttemptState,
    EventKind,
    Fault,
    FaultClass,
    FaultKind,
    Job,
    JobState,
    NodeState,
    RankEndCause,
    RankState,
    StopCause,
    StopCommand,
)
from hpt.controller.scheduler import Capacity

log = logging.getLogger("hpt.controller.reconcile")


@dataclass(slots=True)
class _StopSent:
    """A stop sent for one attempt (the nodes it reached)."""

    at: float  # monotonic
    grace_s: float = 0.0  # the grace this stop gave the ranks (a cancel's own, if it had one)
    nodes: set[str] = field(default_factory=set)


class Execute:
    """The active phase; a mixin of ``Reconciler``, called with its lock held."""

    def _step(self, job: Job, now: float) -> None:
        """Observe what the job's record lacks, decide, then execute each decision in order."""
        for decision in decide(job, self._view(job, now), now):
            self._execute(job, decision, now)

    def _view(self, job: Job, now: float) -> View:
        """What ``decide`` needs beyond the record. Taking a detector's fault consumes it (once
        per attempt); a launch that timed out marks its pending ranks LOST here."""
        mono = time.monotonic()
        stops = {a.number: StopSent(sent.at, sent.grace_s) for a in job.attempts
                 if (sent := self._stops.get((job.id, a.number))) is not None}
        if job.state.is_terminal:
            return View(mono=mono, stops=stops)
        current = job.current
        fault: Fault | None = None
        free_since: dict[str, float] = {}
        if (job.state == JobState.RUNNING and not job.cancel_requested and current is not None
                and not all(r.state == RankState.SUCCEEDED for r in current.ranks)):
            fault = faults.earliest_fault(current, now) or self.detection.pending_fault(
                job.id, current.number, {r.node for r in current.ranks if not r.state.is_terminal},
                now, straggler_after=job.spec.straggler_restart_after,
            ) or self._launch_timeout(job, current, now)
            if fault is None and len(current.nodes) < job.spec.nodes:
                free_since = self._free_since_for(job, current, now)
        placing = not job.cancel_requested and job.state in (JobState.PENDING, JobState.RECOVERING)
        return View(mono=mono, capacity=tuple(self._capacity()) if placing else (), fault=fault,
                    stops=stops, free_since=free_since,
                    grow_hysteresis_s=self.cfg.grow_hysteresis_s,
                    cancel_grace_s=self._cancel_grace.get(job.id))

    def _free_since_for(self, job: Job, attempt: Attempt, now: float) -> dict[str, float]:
        free = {c.node for c in self._capacity()
                if c.free_slots >= job.spec.procs_per_node and c.node not in attempt.nodes}
        for name in list(self._free_since):
            if name not in free:
                del self._free_since[name]
        for name in free:
            self._free_since.setdefault(name, now)
        return {n: self._free_since[n] for n in free}

    def _execute(self, job: Job, d: Decision, now: float) -> None:
        """The one executor: every change it makes to a job or attempt goes through
        ``_set_job_state`` / ``Attempt.set_state``; the job's events come from those."""
        log.info("[%s/%s/-/-] decided %s (%s): %s", job.id,
                 job.current.number if job.current else "-", type(d).__name__, d.why.value,
                 getattr(d, "message", ""))
        if isinstance(d, EndAttempt):
            self._end_attempt(job, job.attempts[d.attempt - 1], now)
        elif isinstance(d, Stop):
            attempt = job.attempts[d.attempt - 1]
            if d.resend:
                self._stops[(job.id, attempt.number)] = _StopSent(time.monotonic(), d.grace_s)
                for node in {r.node for r in attempt.ranks if not r.state.is_terminal}:
                    self._send(node, StopCommand(job_id=job.id, attempt=attempt.number,
                                                 grace_s=0.0, reason=d.message, cause=d.cause))
                return
            if d.fault is not None:
                self._record_fault(job, attempt, d.fault)
            self._stop_attempt(job, attempt, d.message, now, d.grace_s, d.cause)
        elif isinstance(d, ExcludeNode):
            if d.node not in job.excluded_nodes:
                job.excluded_nodes.append(d.node)
                self._dirty_jobs.add(job.id)
                self._emit(EventKind.NODE_EXCLUDED, job, node=d.node, message=d.message)
        elif isinstance(d, Restart):
            job.restarts += 1
            self._set_job_state(job, JobState.RECOVERING, d.message, now)
        elif isinstance(d, Fail):
            self._set_job_state(job, JobState.FAILED, d.message, now)
        elif isinstance(d, Cancel):
            self._set_job_state(job, JobState.CANCELLED, d.message, now)
            self._cancel_grace.pop(job.id, None)
        elif isinstance(d, Succeed):
            attempt = job.attempts[d.attempt - 1]
            attempt.set_state(AttemptState.SUCCEEDED, "every rank exited 0", now)
            attempt.ended_at = now
            self._set_job_state(job, JobState.SUCCEEDED, f"attempt {attempt.number} finished",
                                now)
        elif isinstance(d, Grow):
            self._stop_attempt(job, job.attempts[d.attempt - 1], d.message, now,
                               job.spec.stop_grace_s, StopCause.RESIZE)
            self._set_job_state(job, JobState.RECOVERING, d.message, now)
        elif isinstance(d, Launch | Shrink):
            self._launch(job, list(d.nodes), now, d.message)
        else:
            assert isinstance(d, WaitForNodes), d
            job.deadline_at = d.deadline_at
            self._dirty_jobs.add(job.id)
            self._emit(EventKind.WAITING_FOR_NODES, job, message=d.message)

    def _set_job_state(self, job: Job, new: JobState, reason: str, now: float) -> None:
        previous = job.set_state(new, reason, now)
        self._dirty_jobs.add(job.id)
        for observer in self.observers:
            observer(job, previous, new, reason)

    def _job_event(self, job: Job, previous: JobState, new: JobState, reason: str) -> None:
        """The event of a job's transition (an observer of ``_set_job_state``)."""
        if new == JobState.SUCCEEDED:
            self._emit(EventKind.JOB_SUCCEEDED, job, message=f"after {job.restarts} restart(s)")
        elif new == JobState.FAILED:
            self._emit(EventKind.JOB_FAILED, job, message=reason)
        elif new == JobState.CANCELLED:
            self._emit(EventKind.JOB_CANCELLED, job, message="every rank stopped")
        elif new == JobState.RECOVERING:
            current = job.current
            grown = current is not None and current.cause is None
            self._emit(EventKind.RESIZE_REQUESTED if grown else EventKind.RECOVERING, job,
                       message=reason)

    def _record_fault(self, job: Job, attempt: Attempt, fault: Fault) -> None:
        attempt.cause = fault
        job.root_cause = fault
        self._dirty_jobs.add(job.id)
        self._emit(EventKind.FAULT, job, attempt=attempt.number, node=fault.node, rank=fault.rank,
                   message=f"{fault.kind.value} ({fault.classification.value}): {fault.message}")
        crash_point("fault-recorded")

    def _capacity(self) -> list[Capacity]:
        used: dict[str, int] = {}
        for job in self.jobs.values():
            for attempt in job.attempts:
                if attempt.state.is_terminal:
                    continue
                for rank in attempt.ranks:
                    if not rank.state.is_terminal:
                        used[rank.node] = used.get(rank.node, 0) + 1
        return [
            Capacity(name, rt.node.slots - used.get(name, 0))
            for name, rt in sorted(self.nodes.items())
            if rt.node.state == NodeState.READY and rt.link is not None
        ]

    def _launch_timeout(self, job: Job, attempt: Attempt, now: float) -> Fault | None:
        """A rank still PENDING ``launch_timeout_s`` after its launch left: it never starts."""
        sent = self._launch_sent.get((job.id, attempt.number))
        if attempt.state != AttemptState.LAUNCHING or sent is None:
            return None
        waited = time.monotonic() - sent
        if waited <= self.cfg.launch_timeout_s:
            return None
        pending = [r for r in attempt.ranks if r.state == RankState.PENDING]
        for rank in pending:
            rank.set_state(RankState.LOST, f"never started within "
                           f"{self.cfg.launch_timeout_s:g}s of its launch",
                           RankEndCause.NEVER_STARTED)
        self._dirty_jobs.add(job.id)
        first = pending[0]
        return Fault(kind=FaultKind.LAUNCH_TIMEOUT, attempt=attempt.number, node=first.node,
                     rank=first.rank, detected_at=now, occurred_at=now,
                     classification=FaultClass.INFRA,
                     message=f"{len(pending)} rank(s) still pending {waited:.1f}s after the launch "
                     f"(launch_timeout_s={self.cfg.launch_timeout_s:g})")

    def _stop_attempt(
        self, job: Job, attempt: Attempt, reason: str, now: float, grace_s: float,
        cause: StopCause,
    ) -> None:
        attempt.set_state(AttemptState.STOPPING, reason, now)
        unsent = self._unsent.pop(job.id, None)
        sent = self._stops[(job.id, attempt.number)] = _StopSent(time.monotonic(), grace_s)
        for node in attempt.nodes:
            if self._send(node, StopCommand(job_id=job.id, attempt=attempt.number,
                                            grace_s=grace_s, reason=reason, cause=cause)):
                sent.nodes.add(node)
                # the agent now refuses this attempt's launch: a rank that has not started never
                # will (a late one reports RUNNING and is fenced by ``_apply_report``)
                for rank in attempt.ranks_on(node):
                    if rank.state == RankState.PENDING:
                        rank.set_state(RankState.STOPPED, "stopped before it started",
                                       RankEndCause.STOPPED_BEFORE_START)
            elif unsent is not None:  # never launched anywhere: nothing can be running
                for rank in attempt.ranks_on(node):
                    if rank.state == RankState.PENDING:
                        rank.set_state(RankState.STOPPED, "stopped before launch",
                                       RankEndCause.STOPPED_BEFORE_LAUNCH)
        self._dirty_jobs.add(job.id)
        if attempt.all_ended:
            self._end_attempt(job, attempt, now)

    def _end_attempt(self, job: Job, attempt: Attempt, now: float) -> None:
        """Every rank of a stopping attempt ended: FAILED by its fault, or STOPPED."""
        self._stops.pop((job.id, attempt.number), None)
        if attempt.cause is not None:
            refined = faults.earliest_fault(attempt, now, include_stopped=False)
            if refined is not None and refined.occurred_at < attempt.cause.occurred_at:
                attempt.cause = refined
                job.root_cause = refined
            attempt.set_state(AttemptState.FAILED, f"ended by {attempt.cause.kind.value}", now)
        else:
            attempt.set_state(AttemptState.STOPPED, "every rank stopped", now)
        attempt.ended_at = now
        self._dirty_jobs.add(job.id)
