"""The passive phase of a reconcile pass: what agents and users reported, applied to the state.

``Reconciler`` (``reconcile.py``) mixes this in. Observations queued by RPC handlers
(``observations.py``: a submit, a cancel, an agent's events, held pieces, a failed restore, a
closed stream) are applied at
the start of each pass; rank reports of registrations and heartbeats go through
``_apply_report``; nodes whose heartbeats stopped become LOST with their ranks. Every rank and
node state change follows the transition tables of ``model.py`` (``set_state``). Nothing here
decides what to do about it: that is ``decide.py``, run next.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from hpt.controller import convert, elastic
from hpt.controller.model import (
    RANK_TRANSITIONS,
    AttemptState,
    Event,
    EventKind,
    Job,
    NodeState,
    RankEndCause,
    RankReport,
    RankState,
    StopCause,
    StopCommand,
)
from hpt.controller.observations import (
    AgentEvents,
    CancelRequested,
    RestoreFailed,
    SubmitRequested,
)
from hpt.controller.repository import SteppedDownError
from hpt.controller.store import FencedError, StoreUnavailableError

if TYPE_CHECKING:
    pass

log = logging.getLogger("hpt.controller.reconcile")

_FENCE_AGAIN_S = 1.0


class Observe:
    """The passive phase; a mixin of ``Reconciler``, called with its lock held."""

    def _apply_observations(self, now: float) -> None:
        """Apply what RPC handlers queued since the last pass, in arrival order."""
        for queued in self.inbox.take():
            obs = queued.observation
            if isinstance(obs, SubmitRequested):
                queued.error = self._apply_submit(obs.job)
            elif isinstance(obs, AgentEvents):
                for event in obs.events:
                    if event.at <= 0 or event.at > now + 60:
                        event = replace(event, at=now)
                    self.events.emit(event)
            elif isinstance(obs, CancelRequested):
                self._apply_cancel(obs, now)
            elif isinstance(obs, RestoreFailed):
                if obs.job_id in self.jobs:
                    self._bad_steps.setdefault(obs.job_id, set()).add(obs.step)
            else:
                runtime = self.nodes.get(obs.node)
                if runtime is not None and runtime.link is obs.link:
                    runtime.link = None
                    runtime.disconnected_at = obs.at
            queued.applied.set()

    def _apply_submit(self, job: Job) -> BaseException | None:
        """Store a new job; the refusal, if any, is the submitter's answer (never acknowledged:
        nothing was stored)."""
        try:
            self.repository.create(f"jobs/{job.id}", convert.job_to_bytes(job))
        except SteppedDownError as exc:
            self._deposed = exc  # this pass ends with stepping down
            return exc
        except (StoreUnavailableError, FencedError) as exc:
            return exc
        self.jobs[job.id] = job
        spec = job.spec
        self._emit(EventKind.JOB_SUBMITTED, job, message=f"{spec.nodes}x{spec.procs_per_node} "
                   f"ranks: {' '.join(spec.command)}")
        return None

    def _apply_cancel(self, obs: CancelRequested, now: float) -> None:
        job = self.jobs.get(obs.job_id)
        if job is None or job.state.is_terminal or job.cancel_requested:
            return
        job.cancel_requested = True
        self._cancel_grace[job.id] = obs.grace_s
        self._emit(EventKind.CANCEL_REQUESTED, job, message="cancel requested by the user")
        self._dirty_jobs.add(job.id)

    def _apply_pieces(self, reports: list[tuple[str, list[tuple[str, int, int, int, int]]]],
                      ) -> None:
        """Each node's newest list of pieces; each attempt they changed is judged once (a
        round of a 1,000-node job brings a report from every holder: judged per report, that
        was O(nodes) each, O(nodes^2) a round)."""
        changed: set[tuple[str, int]] = set()
        for node, pieces in reports:
            changed |= self.pieces.update(node, pieces)
        for job_id, number in sorted(changed):
            job = self.jobs.get(job_id)
            if job is None or not 1 <= number <= len(job.attempts):
                continue
            attempt = job.attempts[number - 1]
            plan = self._stripes_of(job, attempt)
            steps = tuple(sorted(elastic.protected_steps(
                plan, self.pieces.held((job_id, number))))) if plan else ()
            parity = self.pieces.parity_bytes((job_id, number), steps[-1]) if steps else 0
            if (steps, parity) != (attempt.protected_steps, attempt.parity_bytes):
                if steps and steps[-1] > max(attempt.protected_steps, default=-1):
                    self._rounds_done.add((job_id, number))  # a round completed
                attempt.protected_steps, attempt.parity_bytes = steps, parity
                self._dirty_jobs.add(job_id)

    def _forget_memory(self, node: str) -> None:
        """The snapshots an earlier agent process of ``node`` reported are gone with it."""
        for job in self.jobs.values():
            for attempt in job.attempts:
                for rank in attempt.ranks_on(node):
                    if rank.snapshot_steps:
                        rank.snapshot_steps = ()
                        self._dirty_jobs.add(job.id)

    def _apply_report(self, node: str, report: RankReport) -> bool:
        """Apply one rank's report; True when the rank changed state or a stop was sent."""
        job = self.jobs.get(report.job_id)
        attempt = None
        if job is not None and 1 <= report.attempt <= len(job.attempts):
            attempt = job.attempts[report.attempt - 1]
        seen = report.rank
        if attempt is None or not 0 <= seen.rank < len(attempt.ranks):
            log.warning(
                "[%s/%s/%s/%s] stale or unknown rank report refused; stopping it",
                report.job_id,
                report.attempt,
                node,
                seen.rank,
            )
            self._fence(node, StopCommand(job_id=report.job_id, attempt=report.attempt,
                                          grace_s=0.0, reason="unknown job or attempt",
                                          cause=StopCause.UNKNOWN_ATTEMPT))
            return True
        rank = attempt.ranks[seen.rank]
        if rank.node != node:
            log.warning("[%s/%s/%s/%s] report from a node that does not host this rank",
                        report.job_id, report.attempt, node, seen.rank)
            return False
        assert job is not None
        # An ended attempt keeps the snapshots it held when the next one was launched (what
        # that launch's restore was chosen from): an agent reports a dead rank's (job, rank)
        # memory until it forgets the rank, and by then the next attempt's ranks write there.
        current = attempt is job.attempts[-1]
        if current and (seen.snapshot_steps, seen.persisted_steps, seen.snapshot_replicated,
                        seen.snapshot_split) != (rank.snapshot_steps, rank.persisted_steps,
                                                 rank.snapshot_replicated, rank.snapshot_split):
            rank.snapshot_steps, rank.persisted_steps = seen.snapshot_steps, seen.persisted_steps
            rank.snapshot_bytes, rank.persist_s = seen.snapshot_bytes, seen.persist_s
            rank.snapshot_replicated = seen.snapshot_replicated
            rank.snapshot_split = seen.snapshot_split
            rank.snapshot_blocked_s = seen.snapshot_blocked_s
            self._progress_jobs.add(job.id)
        if seen.step > rank.step:
            rank.step, rank.step_at = seen.step, seen.step_at
            rank.first_step_at = seen.first_step_at or seen.step_at
            if not attempt.first_step_at:
                attempt.first_step_at = rank.first_step_at
                self._emit(EventKind.FIRST_STEP, job, attempt=attempt.number,
                           message=f"first step of attempt {attempt.number}")
                self._dirty_jobs.add(job.id)
            self._progress_jobs.add(job.id)
        if rank.state.is_terminal or seen.state == rank.state and seen.pid == rank.pid:
            if seen.state == RankState.RUNNING and rank.state.is_terminal:
                # a rank we gave up on (node declared lost) is alive again: fence it
                self._fence(node, StopCommand(job_id=job.id, attempt=attempt.number, grace_s=0.0,
                                             reason="rank was declared lost",
                                             cause=StopCause.DECLARED_LOST))
                return True
            return False
        if seen.state not in RANK_TRANSITIONS[rank.state]:
            log.warning("[%s/%s/%s/%s] report of %s -> %s refused", job.id, attempt.number, node,
                        rank.rank, rank.state.value, seen.state.value)
            return False
        rank.pid = seen.pid or rank.pid
        self._dirty_jobs.add(job.id)
        if seen.state.is_terminal:
            rank.exit = seen.exit
        rank.set_state(seen.state,
                       seen.exit_reason or (seen.exit.describe() if seen.exit else ""))
        if seen.state.is_terminal:
            self._emit(EventKind.RANK_EXITED, job, attempt=attempt.number, node=node, rank=rank.rank,
                       message=f"{seen.state.value}: {rank.exit_reason}")
        if attempt.state == AttemptState.LAUNCHING and attempt.none_pending():
            attempt.set_state(AttemptState.RUNNING, "every rank started", self._clock())
        return True

    def _fence(self, node: str, stop: StopCommand) -> None:
        """Stop ranks a node should not run, at most once a second per (node, job, attempt):
        one Stop covers all of them, and a node declared lost reports 8 ranks a heartbeat (at
        1,000 nodes these repeats were a third of the controller's CPU)."""
        key = (node, stop.job_id, stop.attempt)
        mono = time.monotonic()
        if mono - self._fenced.get(key, -1e9) < _FENCE_AGAIN_S:
            return
        if len(self._fenced) > 100_000:
            self._fenced.clear()
        self._fenced[key] = mono
        self._send(node, stop)

    def _forget_unreported(self, node: str, reported: set[tuple[str, int, int]]) -> None:
        """On registration, ranks placed on ``node`` that its agent no longer knows ended, except
        ranks of a launching attempt that never started: their launch is sent (again)."""
        for job in self.jobs.values():
            current = job.current
            if (current is not None and current.state == AttemptState.LAUNCHING
                    and not job.cancel_requested and not job.state.is_terminal
                    and node in current.nodes and job.id not in self._unsent
                    and all(r.state == RankState.PENDING
                            and (job.id, current.number, r.rank) not in reported
                            for r in current.ranks_on(node))):
                self._send(node, self._launch_commands(job, current)[node])
                self._launch_sent[(job.id, current.number)] = time.monotonic()
                log.info("[%s/%d/%s/-] launch sent again: the agent never started it", job.id,
                         current.number, node)
            for attempt in job.attempts:
                for rank in attempt.ranks_on(node):
                    key = (job.id, attempt.number, rank.rank)
                    if rank.state.is_terminal or key in reported:
                        continue
                    if attempt is current and rank.state == RankState.PENDING and (
                            attempt.state == AttemptState.LAUNCHING and not job.cancel_requested):
                        continue
                    if attempt.state == AttemptState.STOPPING:
                        rank.set_state(RankState.STOPPED, "stopped", RankEndCause.STOPPED)
                    else:
                        rank.set_state(RankState.LOST, "agent re-registered without this rank",
                                       RankEndCause.AGENT_FORGOT)
                    self._dirty_jobs.add(job.id)

    def _sync_nodes(self, mono: float, now: float) -> None:
        timeout = self.cfg.heartbeat_timeout_s
        for runtime in self.nodes.values():
            node = runtime.node
            if node.state not in (NodeState.READY, NodeState.UNKNOWN):
                continue
            # a heartbeat that arrived but waits in the intake's queue counts: the node talks
            silent = mono - max(runtime.last_heartbeat,
                                getattr(runtime.link, "last_received", 0.0))
            if runtime.disconnected_at and mono - runtime.disconnected_at > self.cfg.heartbeat_period_s:
                reason = "stream closed and not re-established"
            elif silent > timeout:
                reason = f"no heartbeat for {silent:.1f}s (timeout {timeout:g}s)"
            else:
                continue
            node.set_state(NodeState.LOST, reason)
            self._dirty_nodes.add(node.name)
            self.events.emit(Event(kind=EventKind.NODE_LOST, at=now, node=node.name, message=reason))
            self._lose_ranks_on(node.name, now, reason)

    def _lose_ranks_on(self, node: str, now: float, reason: str) -> None:
        for job in self.jobs.values():
            for attempt in job.attempts:
                for rank in attempt.ranks_on(node):
                    if not rank.state.is_terminal:
                        rank.set_state(RankState.LOST, f"node lost: {reason}",
                                       RankEndCause.NODE_LOST)
                        rank.exit = None
                        self._dirty_jobs.add(job.id)
