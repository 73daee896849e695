"""The control loop: observe what agents report, then act on every job.

Agent streams and RPC handlers feed observations in (``register``, ``heartbeat``,
``disconnect``, ``submit``, ``cancel``) under one lock and wake the loop. Each pass of the loop
runs two phases (Ray's reconciler pattern): passive transitions first (nodes whose heartbeats
stopped are LOST, their ranks with them), then active ones per job (launch, detect the fault,
stop the attempt everywhere, decide with ``policy``, relaunch). Every state change is persisted
as protobuf bytes with compare-and-set, and every attempt, fault and decision is an event.

A restarted controller builds the same state from the store (``load``) and agent
re-registration: ranks an agent still runs for the current attempt simply carry on.

The control plane survives its own faults: a pass that comes long after the previous one (the
controller was paused or starved, ``stall.py``) re-observes heartbeats before judging nodes; a
LOST node that heartbeats again rejoins; the store is wrapped in bounded retries
(``store/retrying.py``) and a pass that cannot write keeps its changes for the next one; launch
commands leave only once the attempt they start is in the store, so a controller killed between
two writes relaunches the same attempt, never a second one beside it.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from hpt.controller import catalog, convert, detect, elastic, policy, retention
from hpt.controller.config import ControllerConfig
from hpt.controller.crashpoints import crash_point
from hpt.controller.model import (
    OOM_ERROR,
    PLATFORM_ERRORS,
    Attempt,
    AttemptState,
    Event,
    Fault,
    FaultClass,
    FaultKind,
    Job,
    JobSpec,
    JobState,
    LaunchCommand,
    Node,
    NodeState,
    Rank,
    RankReport,
    RankState,
    ReleaseCommand,
    RestoreCommand,
    StopCommand,
)
from hpt.controller.pieces import PieceBook
from hpt.controller.scheduler import Capacity
from hpt.controller.stall import StallDetector
from hpt.controller.store import ConflictError, Store, StoreUnavailableError
from hpt.controller.store.retrying import RetryingStore, StoreHealth
from hpt.controller.streams import EventLog, LogBuffer

log = logging.getLogger(__name__)

_RESEND_STOP_AFTER_S = 5.0
_RETENTION_PERIOD_S = 1.0


class DuplicateNodeError(Exception):
    """Another live agent is registered under this node name."""


class AgentLink(Protocol):
    """The command half of one agent's stream; implemented by the gRPC servicer."""

    def send(self, command: LaunchCommand | StopCommand | ReleaseCommand) -> None:
        """Queue a command; never blocks. Called by the loop under the reconciler's lock."""

    def close(self) -> None:
        """End the stream (a newer registration of the same node replaced it)."""


@dataclass(slots=True)
class _NodeRuntime:
    node: Node
    link: AgentLink | None = None
    last_heartbeat: float = 0.0  # monotonic
    disconnected_at: float = 0.0  # monotonic, 0 while connected
    free_port: int = 0
    instance_id: str = ""  # the registered agent process (a restarted agent gets a new one)


@dataclass(slots=True)
class _StopSent:
    at: float  # monotonic
    grace_s: float = 0.0  # the grace this stop gave the ranks (a cancel's own, if it had one)
    nodes: set[str] = field(default_factory=set)


class Reconciler:
    def __init__(
        self, cfg: ControllerConfig, store: Store, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.cfg = cfg
        self.store = store if isinstance(store, RetryingStore) else RetryingStore(store)
        self._store_recovered = threading.Event()
        self.store.on_recovered = self._store_recovered.set
        self.lock = threading.RLock()
        self.jobs: dict[str, Job] = {}
        self.nodes: dict[str, _NodeRuntime] = {}
        self.events = EventLog(self.store)
        self.logs = LogBuffer(cfg.log_lines_per_rank, cfg.log_bytes_per_rank)
        self.stall = StallDetector(max_gap_s=max(1.0, 2 * cfg.heartbeat_period_s),
                                   grace_s=cfg.heartbeat_timeout_s)
        self._unsent: dict[str, list[tuple[str, LaunchCommand]]] = {}  # job -> (node, launch)
        self._launch_sent: dict[tuple[str, int], float] = {}  # (job, attempt) -> monotonic
        self._next_retention = 0.0
        self._clock = clock
        self._versions: dict[str, int] = {}
        self._dirty_jobs: set[str] = set()
        self._dirty_nodes: set[str] = set()
        self._progress_jobs: set[str] = set()  # only step/snapshot progress changed
        self._progress_flushed = 0.0  # monotonic
        self._stops: dict[tuple[str, int], _StopSent] = {}
        self._released: set[str] = set()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.crashed: BaseException | None = None
        self.on_crash: Callable[[BaseException], None] = lambda exc: None
        # raises FencedError when another controller leads now (set by leader election)
        self.fence: Callable[[], None] = lambda: None
        self.detection = detect.attach(self)  # hangs, stragglers, collectives (monitoring)
        self.pieces = PieceBook()  # protection pieces agents hold (snapshot protection)
        self._free_since: dict[str, float] = {}  # node -> since when it could grow a job
        self._bad_steps: dict[str, set[int]] = {}  # job -> steps an agent failed to rebuild

    # ---------------------------------------------------------------- lifecycle

    def load(self) -> None:
        """Rebuild state from the store; called once before the loop and the server start."""
        now_mono = time.monotonic()
        with self.lock:
            for key, item in self.store.scan("jobs/").items():
                job = convert.job_from_bytes(item.value)
                self.jobs[job.id] = job
                self._versions[key] = item.version
            for key, item in self.store.scan("nodes/").items():
                node = convert.node_from_bytes(item.value)
                self._versions[key] = item.version
                if node.state in (NodeState.READY, NodeState.UNKNOWN):
                    node.state = NodeState.UNKNOWN
                    node.reason = "controller restarted; waiting for the agent to re-register"
                self.nodes[node.name] = _NodeRuntime(node, last_heartbeat=now_mono)
            for job in self.jobs.values():
                if job.current is not None and job.current.state == AttemptState.LAUNCHING:
                    self._launch_sent[(job.id, job.current.number)] = now_mono
        active = sum(1 for j in self.jobs.values() if not j.state.is_terminal)
        if self.jobs or self.nodes:
            log.info(
                "loaded %d job(s) (%d active) and %d node(s) from the store",
                len(self.jobs),
                active,
                len(self.nodes),
            )

    def start(self) -> None:
        # Nodes known from the store get a full heartbeat timeout more than usual, counted from
        # now (the server is up), to reconnect: their agents back off up to 1 s between tries.
        grace_until = time.monotonic() + self.cfg.heartbeat_timeout_s
        with self.lock:
            for runtime in self.nodes.values():
                if runtime.node.state == NodeState.UNKNOWN:
                    runtime.last_heartbeat = grace_until
        self._thread = threading.Thread(target=self._run, name="hpt-reconcile", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
        with self.lock:
            self._flush()

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._wake.wait(self.cfg.reconcile_period_s)
                self._wake.clear()
                with self.lock:
                    self.reconcile_once()
        except BaseException as exc:  # the loop is the controller: die loudly, never limp on
            log.critical("control loop crashed", exc_info=True)
            self.crashed = exc
            self.on_crash(exc)

    def reconcile_once(self) -> None:
        """One pass: passive node checks, then every job's active step, then persist."""
        self.fence()
        now, mono = self._clock(), time.monotonic()
        self.stall.observe(mono)
        if self.stall.may_judge(mono):
            self._sync_nodes(mono, now)
        for job in list(self.jobs.values()):
            self._step(job, now)
        self._flush()
        if mono >= self._next_retention:
            self._next_retention = mono + _RETENTION_PERIOD_S
            self._drop_expired(now)

    def store_health(self) -> StoreHealth:
        return self.store.health

    # ---------------------------------------------------------------- inputs (RPC threads)

    def submit(self, spec: JobSpec) -> str:
        now = self._clock()
        with self.lock:
            job_id = f"{spec.name or 'job'}-{secrets.token_hex(4)}"
            job = Job(id=job_id, spec=spec, created_at=now, reason="submitted")
            self.store.put(f"jobs/{job_id}", convert.job_to_bytes(job), expected_version=0)
            self._versions[f"jobs/{job_id}"] = 1
            self.jobs[job_id] = job
            self._emit("job_submitted", job, message=f"{spec.nodes}x{spec.procs_per_node} ranks: "
                       f"{' '.join(spec.command)}")
        self.wake()
        return job_id

    def cancel(self, job_id: str, grace_s: float | None) -> Job:
        with self.lock:
            job = self.jobs[job_id]
            if not job.state.is_terminal and not job.cancel_requested:
                job.cancel_requested = True
                self._emit("cancel_requested", job, message="cancel requested by the user")
                self._dirty_jobs.add(job.id)
                self._step(job, self._clock(), cancel_grace_s=grace_s)
        self.wake()
        return job

    def register(
        self, node: Node, link: AgentLink, reports: list[RankReport], free_port: int,
        health_problem: str = "", instance_id: str = "",
    ) -> None:
        """Raises DuplicateNodeError while another live agent process holds ``node.name``."""
        mono = time.monotonic()
        with self.lock:
            runtime = self.nodes.get(node.name)
            if (runtime is not None and runtime.link is not None and runtime.link is not link
                    and instance_id and runtime.instance_id and runtime.instance_id != instance_id
                    and runtime.node.state != NodeState.LOST
                    and mono - runtime.last_heartbeat <= self.cfg.heartbeat_timeout_s):
                raise DuplicateNodeError(
                    f"node ({node.name!r}) is registered by another live agent (last heartbeat "
                    f"{mono - runtime.last_heartbeat:.1f}s ago); names must be unique")
            previous_state = runtime.node.state if runtime else None
            if runtime is not None and runtime.link is not None and runtime.link is not link:
                runtime.link.close()
            if runtime is None:
                runtime = self.nodes[node.name] = _NodeRuntime(node)
            else:
                runtime.node = node
            node.state = NodeState.READY
            node.reason = "registered"
            if health_problem:  # not placed; `hptctl nodes` shows why
                node.state, node.reason = NodeState.QUARANTINED, health_problem
            node.last_seen_at = self._clock()
            runtime.link = link
            if runtime.instance_id and instance_id and runtime.instance_id != instance_id:
                self._forget_memory(node.name)  # a new agent process: the old one's memory died
            runtime.instance_id = instance_id
            runtime.last_heartbeat = mono
            runtime.disconnected_at = 0.0
            runtime.free_port = free_port
            self._dirty_nodes.add(node.name)
            self.events.emit(
                Event(
                    kind="node_registered",
                    at=self._clock(),
                    node=node.name,
                    message=f"{node.slots} slots at {node.address}"
                    + (f" (was {previous_state.value})" if previous_state else ""),
                )
            )
            if health_problem:
                self.events.emit(Event(kind="node_quarantined", at=self._clock(), node=node.name,
                                       message=health_problem))
            reported = {(r.job_id, r.attempt, r.rank.rank) for r in reports}
            self._forget_unreported(node.name, reported)
            for report in reports:
                self._apply_report(node.name, report)
        self.wake()

    def heartbeat(
        self,
        node: str,
        reports: list[RankReport],
        logs: list[tuple[str, int, int, str, str]],
        free_port: int,
        warm_ready: int = 0,
        *,
        wake: bool = True,
    ) -> bool:
        """Apply one heartbeat; True when a rank changed state (the loop has work to do).

        With ``wake`` False the caller wakes the loop itself (once per batch of heartbeats):
        step progress alone needs no pass of the loop."""
        changed = False
        with self.lock:
            runtime = self.nodes.get(node)
            if runtime is None or runtime.link is None:
                return False
            runtime.last_heartbeat = time.monotonic()
            runtime.node.last_seen_at = self._clock()
            if runtime.node.state == NodeState.LOST:
                # it was silent (or we were), not dead: usable again; its ranks of the attempt we
                # gave up on are fenced by their reports (``_apply_report`` stops them)
                runtime.node.state = NodeState.READY
                runtime.node.reason = f"heartbeating again after: {runtime.node.reason}"
                self._dirty_nodes.add(node)
                self.events.emit(Event(kind="node_rejoined", at=self._clock(), node=node,
                                       message=runtime.node.reason))
                changed = True
            if runtime.node.warm_ready != warm_ready:
                runtime.node.warm_ready = warm_ready
                self._dirty_nodes.add(node)
            if free_port:
                runtime.free_port = free_port
            for report in reports:
                changed |= self._apply_report(node, report)
        for job_id, attempt, rank, stream, text in logs:
            self.logs.append(job_id, attempt, rank, stream, text)
        if wake and changed:
            self.wake()
        return changed

    def agent_events(self, node: str, events: list[Event]) -> None:
        """Events an agent or its ranks raised (persist failures, skipped checkpoints...)."""
        now = self._clock()
        for event in events:
            if event.at <= 0 or event.at > now + 60:
                event = replace(event, at=now)
            self.events.emit(event)

    def held_pieces(self, node: str, pieces: list[tuple[str, int, int, int, int]]) -> None:
        """The verified protection pieces ``node`` holds now: (job, attempt, stripe, step,
        bytes). Updates each attempt's protected steps."""
        with self.lock:
            for job_id, number in self.pieces.update(node, pieces):
                job = self.jobs.get(job_id)
                if job is None or not 1 <= number <= len(job.attempts):
                    continue
                attempt = job.attempts[number - 1]
                plan = self._plan_of(job, attempt)
                steps = tuple(sorted(elastic.protected_steps(
                    plan, self.pieces.held((job_id, number))))) if plan else ()
                parity = self.pieces.parity_bytes((job_id, number), steps[-1]) if steps else 0
                if (steps, parity) != (attempt.protected_steps, attempt.parity_bytes):
                    attempt.protected_steps, attempt.parity_bytes = steps, parity
                    self._dirty_jobs.add(job_id)

    def protect_targets(self, node: str) -> list[tuple[str, int, int]]:
        """(job, attempt, step) each protection round ``node`` takes part in builds now; sent
        with every heartbeat ack (controller/rounds.py)."""
        with self.lock:
            return self.pieces.rounds.targets(self.jobs.values(), node)

    def _forget_memory(self, node: str) -> None:
        """The snapshots an earlier agent process of ``node`` reported are gone with it."""
        for job in self.jobs.values():
            for attempt in job.attempts:
                for rank in attempt.ranks_on(node):
                    if rank.snapshot_steps:
                        rank.snapshot_steps = ()
                        self._dirty_jobs.add(job.id)

    def restore_failed(self, job_id: str, step: int) -> None:
        """An agent could not put ``step`` in place: never choose it again for this job."""
        with self.lock:
            if job_id in self.jobs:
                self._bad_steps.setdefault(job_id, set()).add(step)

    def _plan_of(self, job: Job, attempt: Attempt) -> elastic.ProtectionPlan | None:
        """The attempt's protection layout, with the peer addresses agents have now."""
        ranks: dict[str, list[int]] = {}
        for r in attempt.ranks:
            ranks.setdefault(r.node, []).append(r.rank)
        peers = {n: rt.node.peer_address for n, rt in self.nodes.items()}
        return elastic.protection_plan(job.spec.redundancy, attempt.nodes, ranks, peers)

    def disconnect(self, node: str, link: AgentLink) -> None:
        with self.lock:
            runtime = self.nodes.get(node)
            if runtime is not None and runtime.link is link:
                runtime.link = None
                runtime.disconnected_at = time.monotonic()
        self.wake()

    # ---------------------------------------------------------------- passive phase

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
            self._send(node, StopCommand(job_id=report.job_id, attempt=report.attempt,
                                         grace_s=0.0, reason="unknown job or attempt"))
            return True
        rank = attempt.ranks[seen.rank]
        if rank.node != node:
            log.warning("[%s/%s/%s/%s] report from a node that does not host this rank",
                        report.job_id, report.attempt, node, seen.rank)
            return False
        assert job is not None
        if (seen.snapshot_steps, seen.persisted_steps) != (rank.snapshot_steps,
                                                           rank.persisted_steps):
            rank.snapshot_steps, rank.persisted_steps = seen.snapshot_steps, seen.persisted_steps
            rank.snapshot_bytes = seen.snapshot_bytes
            self._progress_jobs.add(job.id)
        if seen.step > rank.step:
            rank.step, rank.step_at = seen.step, seen.step_at
            rank.first_step_at = seen.first_step_at or seen.step_at
            if not attempt.first_step_at:
                attempt.first_step_at = rank.first_step_at
                self._emit("first_step", job, attempt=attempt.number,
                           message=f"first step of attempt {attempt.number}")
                self._dirty_jobs.add(job.id)
            self._progress_jobs.add(job.id)
        if rank.state.is_terminal or seen.state == rank.state and seen.pid == rank.pid:
            if seen.state == RankState.RUNNING and rank.state.is_terminal:
                # a rank we gave up on (node declared lost) is alive again: fence it
                self._send(node, StopCommand(job_id=job.id, attempt=attempt.number, grace_s=0.0,
                                             reason="rank was declared lost"))
                return True
            return False
        rank.pid = seen.pid or rank.pid
        rank.state = seen.state
        self._dirty_jobs.add(job.id)
        if seen.state.is_terminal:
            rank.exit = seen.exit
            rank.exit_reason = seen.exit_reason or (seen.exit.describe() if seen.exit else "")
            self._emit("rank_exited", job, attempt=attempt.number, node=node, rank=rank.rank,
                       message=f"{seen.state.value}: {rank.exit_reason}")
        if attempt.state == AttemptState.LAUNCHING and all(
            r.state != RankState.PENDING for r in attempt.ranks
        ):
            attempt.set_state(AttemptState.RUNNING, "every rank started", self._clock())
        return True

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
                        rank.state, rank.exit_reason = RankState.STOPPED, "stopped"
                    else:
                        rank.state = RankState.LOST
                        rank.exit_reason = "agent re-registered without this rank"
                    self._dirty_jobs.add(job.id)

    def _sync_nodes(self, mono: float, now: float) -> None:
        timeout = self.cfg.heartbeat_timeout_s
        for runtime in self.nodes.values():
            node = runtime.node
            if node.state not in (NodeState.READY, NodeState.UNKNOWN):
                continue
            silent = mono - runtime.last_heartbeat
            if runtime.disconnected_at and mono - runtime.disconnected_at > self.cfg.heartbeat_period_s:
                reason = "stream closed and not re-established"
            elif silent > timeout:
                reason = f"no heartbeat for {silent:.1f}s (timeout {timeout:g}s)"
            else:
                continue
            node.state, node.reason = NodeState.LOST, reason
            self._dirty_nodes.add(node.name)
            self.events.emit(Event(kind="node_lost", at=now, node=node.name, message=reason))
            self._lose_ranks_on(node.name, now, reason)

    def _lose_ranks_on(self, node: str, now: float, reason: str) -> None:
        for job in self.jobs.values():
            for attempt in job.attempts:
                for rank in attempt.ranks_on(node):
                    if not rank.state.is_terminal:
                        rank.state = RankState.LOST
                        rank.exit_reason = f"node lost: {reason}"
                        rank.exit = None
                        self._dirty_jobs.add(job.id)

    # ---------------------------------------------------------------- active phase

    def _step(self, job: Job, now: float, cancel_grace_s: float | None = None) -> None:
        for attempt in job.attempts:
            if attempt.state == AttemptState.STOPPING:
                self._finish_stopping(job, attempt, now)
        if job.state.is_terminal:
            return
        current = job.current
        if job.cancel_requested:
            self._step_cancel(job, current, now, cancel_grace_s)
            return
        if job.state == JobState.PENDING:
            self._try_place(job, now)
        elif job.state == JobState.RUNNING and current is not None:
            self._step_running(job, current, now)
        elif job.state == JobState.RECOVERING and (current is None or current.state.is_terminal):
            if current is not None and now < current.ended_at + policy.restart_backoff_s(job):
                return  # a crash loop backs off; the loop's period brings us back
            self._try_place(job, now)

    def _step_cancel(
        self, job: Job, current: Attempt | None, now: float, grace_s: float | None
    ) -> None:
        if current is not None and not current.state.is_terminal:
            if current.state != AttemptState.STOPPING:
                grace = job.spec.stop_grace_s if grace_s is None else grace_s
                self._stop_attempt(job, current, "cancelled by the user", now, grace)
            return
        job.set_state(JobState.CANCELLED, "cancelled by the user; every rank stopped", now)
        self._dirty_jobs.add(job.id)
        self._emit("job_cancelled", job, message="every rank stopped")

    def _step_running(self, job: Job, attempt: Attempt, now: float) -> None:
        if all(r.state == RankState.SUCCEEDED for r in attempt.ranks):
            attempt.set_state(AttemptState.SUCCEEDED, "every rank exited 0", now)
            attempt.ended_at = now
            job.set_state(JobState.SUCCEEDED, f"attempt {attempt.number} finished", now)
            self._dirty_jobs.add(job.id)
            self._emit("job_succeeded", job, attempt=attempt.number,
                       message=f"after {job.restarts} restart(s)")
            return
        fault = _earliest_fault(attempt, now) or self.detection.pending_fault(
            job.id, attempt.number, {r.node for r in attempt.ranks if not r.state.is_terminal}, now,
            straggler_after=job.spec.straggler_restart_after,
        ) or self._launch_timeout(job, attempt, now)
        if fault is None:
            self._maybe_grow(job, attempt, now)
            return
        attempt.cause = fault
        job.root_cause = fault
        if fault.kind == FaultKind.STRAGGLER and fault.node not in job.excluded_nodes:
            job.excluded_nodes.append(fault.node)
            self._emit("node_excluded", job, attempt=attempt.number, node=fault.node,
                       message=f"straggler policy: job no longer runs on {fault.node} "
                       f"(straggler_restart_after={job.spec.straggler_restart_after})")
        self._emit("fault", job, attempt=attempt.number, node=fault.node, rank=fault.rank,
                   message=f"{fault.kind.value} ({fault.classification.value}): {fault.message}")
        crash_point("fault-recorded")
        decision = policy.decide_after_fault(job, fault)
        # A hung attempt gets no grace: its ranks are stopped or stuck, SIGTERM would only wait
        # (their snapshots live in the agents' memory, not in the ranks).
        grace = 0.0 if fault.kind == FaultKind.HANG else job.spec.stop_grace_s
        self._stop_attempt(job, attempt, f"fault: {fault.kind.value} of {fault.where()}", now,
                           grace)
        if decision is not None:
            job.set_state(JobState.FAILED, decision.reason, now)
            self._emit("job_failed", job, attempt=attempt.number, message=decision.reason)
            return
        job.restarts += 1
        reason = (f"restart {job.restarts}/{job.spec.max_restarts} after {fault.kind.value} of "
                  f"{fault.where()}: {fault.message}")
        backoff = policy.restart_backoff_s(job)
        if backoff:
            reason += (f"; next attempt {backoff:g} s after this one stops (crash loop: "
                       f"{policy.crash_loop(job)} attempt(s) in a row ended before a step)")
        job.set_state(JobState.RECOVERING, reason, now)
        self._emit("recovering", job, attempt=attempt.number, message=reason)

    def _maybe_grow(self, job: Job, attempt: Attempt, now: float) -> None:
        if len(attempt.nodes) >= job.spec.nodes:
            return
        free = {c.node for c in self._capacity()
                if c.free_slots >= job.spec.procs_per_node and c.node not in attempt.nodes}
        for name in list(self._free_since):
            if name not in free:
                del self._free_since[name]
        for name in free:
            self._free_since.setdefault(name, now)
        reason = elastic.decide_grow(job, attempt, {n: self._free_since[n] for n in free},
                                     set(catalog.complete_steps(attempt)), now,
                                     self.cfg.grow_hysteresis_s)
        if reason is None:
            return
        self._stop_attempt(job, attempt, reason, now, job.spec.stop_grace_s)
        job.set_state(JobState.RECOVERING, reason, now)
        self._emit("resize_requested", job, attempt=attempt.number, message=reason)

    def _try_place(self, job: Job, now: float) -> None:
        decision = policy.decide_placement(job, self._capacity(), now)
        if decision.action == policy.Action.RESTART:
            self._launch(job, list(decision.nodes), now, decision.reason)
        elif decision.action == policy.Action.FAIL:
            job.set_state(JobState.FAILED, decision.reason, now)
            self._dirty_jobs.add(job.id)
            self._emit("job_failed", job, message=decision.reason)
        elif job.deadline_at != decision.deadline_at:
            job.deadline_at = decision.deadline_at
            self._dirty_jobs.add(job.id)
            self._emit("waiting_for_nodes", job, message=decision.reason)

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

    def _launch(self, job: Job, nodes: list[str], now: float, reason: str) -> None:
        spec = job.spec
        number = len(job.attempts) + 1
        previous = job.current
        if previous is not None:
            nodes = elastic.order_nodes(previous.nodes, nodes)  # survivors keep their ranks
            if len(nodes) != len(previous.nodes):
                reason = f"resize {len(previous.nodes)} -> {len(nodes)} nodes; {reason}"
        master = self.nodes[nodes[0]]
        previous_port = job.current.master_port if job.current else 0
        port = master.free_port
        if not port or port == previous_port:
            port = random.randint(20000, 59999)
        ppn = spec.procs_per_node
        ranks = [
            Rank(rank=i * ppn + local, local_rank=local, node=node)
            for i, node in enumerate(nodes)
            for local in range(ppn)
        ]
        choice = self._restore_choice(job, previous, ranks)
        restore = choice.step
        attempt = Attempt(
            number=number,
            nodes=nodes,
            master_addr=master.node.address,
            master_port=port,
            world_size=len(ranks),
            ranks=ranks,
            started_at=now,
            restore_step=restore,
        )
        _record_steps_lost(job, restore)
        attempt.history.append(
            _state_change(AttemptState.LAUNCHING.value, now, reason)
        )
        plan = self._plan_of(job, attempt)
        attempt.redundancy = plan.label if plan else ""
        old_plan = None
        if restore and previous is not None:
            old_plan = self._plan_of(job, previous) or elastic.unprotected_plan(previous, {
                n: rt.node.peer_address for n, rt in self.nodes.items()})
        job.attempts.append(attempt)
        job.deadline_at = 0.0
        restores: dict[str, RestoreCommand] = {}
        if old_plan is not None and previous is not None:
            for node in nodes:
                here = [r.rank for r in attempt.ranks_on(node)]
                restores[node] = RestoreCommand(
                    step=restore, attempt=previous.number, world_size=previous.world_size,
                    layout=old_plan, lost=choice.lost,
                    need_ranks=tuple(elastic.need_ranks(previous, here, attempt.world_size)))
        # sent by ``_flush`` once this attempt is in the store (a controller that dies before
        # then relaunches the same attempt from the store, never a second one beside it)
        self._unsent[job.id] = sorted(self._launch_commands(job, attempt, restore, restores).items())
        job.set_state(JobState.RUNNING, f"attempt {number} launched: {reason}", now)
        self._dirty_jobs.add(job.id)
        restored = f"restores step {restore} from memory" if restore else "starts from scratch or disk"
        self._emit("attempt_launched", job, attempt=number,
                   message=f"world size {attempt.world_size}; {restored}; {reason}")
        if previous is not None:
            persisted = catalog.persisted_steps(previous) if spec.persist_dir else []
            fallback = "" if restore else (
                f"; falls back to the persisted checkpoint (newest on every rank: step "
                f"{persisted[0]}; ranks verify it and agree on the newest good one)"
                if persisted else "; falls back to scratch: no checkpoint persisted on every "
                "rank" + ("" if spec.persist_dir else " (no persist_dir)"))
            self._emit("restore_source", job, attempt=number, message=choice.source + fallback)

    def _restore_choice(self, job: Job, previous: Attempt | None,
                        ranks: list[Rank]) -> elastic.RestoreChoice:
        if previous is None:
            return elastic.RestoreChoice(0, (), "first attempt")
        alive = {n for n, rt in self.nodes.items()
                 if rt.node.state == NodeState.READY and rt.link is not None}
        choice = elastic.choose_restore(previous, self._plan_of(job, previous),
                                        self.pieces.held((job.id, previous.number)), alive,
                                        exclude=self._bad_steps.get(job.id, set()))
        if choice.step == 0:
            # the attempt before may have died before saving: older attempts' memory, same ranks
            step = catalog.restore_step(job.attempts, [(r.rank, r.node) for r in ranks])
            if step:
                return elastic.RestoreChoice(step, (), f"step {step} from memory (an earlier "
                                             "attempt's snapshots on the same nodes)")
        return choice

    def _launch_commands(
        self, job: Job, attempt: Attempt, restore: int | None = None,
        restores: dict[str, RestoreCommand] | None = None,
    ) -> dict[str, LaunchCommand]:
        spec = job.spec
        plan = self._plan_of(job, attempt)
        if restore is None:
            restore = catalog.restore_step(job.attempts[: attempt.number - 1],
                                           [(r.rank, r.node) for r in attempt.ranks])
        return {
            node: LaunchCommand(
                job_id=job.id,
                attempt=attempt.number,
                command=spec.command,
                env=spec.env,
                ranks=tuple((r.rank, r.local_rank) for r in attempt.ranks_on(node)),
                world_size=attempt.world_size,
                local_world_size=spec.procs_per_node,
                master_addr=attempt.master_addr,
                master_port=attempt.master_port,
                workdir=spec.workdir,
                node_rank=i,
                num_nodes=len(attempt.nodes),
                restore_step=restore,
                persist_dir=spec.persist_dir,
                persist_every=spec.persist_every,
                keep_persisted=spec.keep_persisted,
                hang_timeout_s=spec.hang_timeout_s,
                protection=plan,
                restore=(restores or {}).get(node),
            )
            for i, node in enumerate(attempt.nodes)
        }

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
            rank.state = RankState.LOST
            rank.exit_reason = f"never started within {self.cfg.launch_timeout_s:g}s of its launch"
        self._dirty_jobs.add(job.id)
        first = pending[0]
        return Fault(kind=FaultKind.LAUNCH_TIMEOUT, attempt=attempt.number, node=first.node,
                     rank=first.rank, detected_at=now, occurred_at=now,
                     classification=FaultClass.INFRA,
                     message=f"{len(pending)} rank(s) still pending {waited:.1f}s after the launch "
                     f"(launch_timeout_s={self.cfg.launch_timeout_s:g})")

    def _stop_attempt(
        self, job: Job, attempt: Attempt, reason: str, now: float, grace_s: float
    ) -> None:
        attempt.set_state(AttemptState.STOPPING, reason, now)
        unsent = self._unsent.pop(job.id, None)
        sent = self._stops[(job.id, attempt.number)] = _StopSent(time.monotonic(), grace_s)
        for node in attempt.nodes:
            if self._send(node, StopCommand(job_id=job.id, attempt=attempt.number,
                                            grace_s=grace_s, reason=reason)):
                sent.nodes.add(node)
                # the agent now refuses this attempt's launch: a rank that has not started never
                # will (a late one reports RUNNING and is fenced by ``_apply_report``)
                for rank in attempt.ranks_on(node):
                    if rank.state == RankState.PENDING:
                        rank.state, rank.exit_reason = RankState.STOPPED, "stopped before it started"
            elif unsent is not None:  # never launched anywhere: nothing can be running
                for rank in attempt.ranks_on(node):
                    if rank.state == RankState.PENDING:
                        rank.state, rank.exit_reason = RankState.STOPPED, "stopped before launch"
        self._dirty_jobs.add(job.id)
        self._finish_stopping(job, attempt, now)

    def _finish_stopping(self, job: Job, attempt: Attempt, now: float) -> None:
        if not attempt.all_ended:
            sent = self._stops.get((job.id, attempt.number))
            grace = job.spec.stop_grace_s if sent is None else sent.grace_s
            if sent is None or time.monotonic() - sent.at > grace + _RESEND_STOP_AFTER_S:
                self._stops[(job.id, attempt.number)] = _StopSent(time.monotonic(), grace)
                for node in {r.node for r in attempt.ranks if not r.state.is_terminal}:
                    self._send(node, StopCommand(job_id=job.id, attempt=attempt.number,
                                                 grace_s=0.0, reason="stop not confirmed"))
            return
        self._stops.pop((job.id, attempt.number), None)
        if attempt.cause is not None:
            refined = _earliest_fault(attempt, now, include_stopped=False)
            if refined is not None and refined.occurred_at < attempt.cause.occurred_at:
                attempt.cause = refined
                job.root_cause = refined
            attempt.set_state(AttemptState.FAILED, f"ended by {attempt.cause.kind.value}", now)
        else:
            attempt.set_state(AttemptState.STOPPED, "every rank stopped", now)
        attempt.ended_at = now
        self._dirty_jobs.add(job.id)

    # ---------------------------------------------------------------- helpers

    def _send(self, node: str, command: LaunchCommand | StopCommand | ReleaseCommand) -> bool:
        runtime = self.nodes.get(node)
        if runtime is None or runtime.link is None:
            return False
        runtime.link.send(command)
        return True

    def _emit(self, kind: str, job: Job, *, attempt: int = 0, node: str = "", rank: int = -1,
              message: str) -> None:
        self.events.emit(Event(kind=kind, at=self._clock(), job_id=job.id,
                               attempt=attempt or (job.current.number if job.current else 0),
                               node=node, rank=rank, message=message))

    def _release(self, job: Job) -> None:
        """A terminal job's agents free its snapshot memory."""
        for node in {n for attempt in job.attempts for n in attempt.nodes}:
            self._send(node, ReleaseCommand(job_id=job.id))

    def _flush(self) -> None:
        # State changes are written on the pass that made them. Progress alone (steps, snapshot
        # steps) changes on nearly every heartbeat of a running job, and a job's record grows
        # with its ranks (80,000 ranks: megabytes): it is written at most every
        # progress_flush_s. Agents re-report progress when they re-register, so a restarted
        # controller loses none of it. What cannot be written (store down) stays dirty for the
        # next pass.
        if self._store_recovered.is_set():
            self._store_recovered.clear()
            # it may have come back empty (restarted without persistence): write everything
            self._dirty_jobs.update(self.jobs)
            self._dirty_nodes.update(self.nodes)
        if self.events.flush_pending():
            return  # events stay in order before any later write
        mono = time.monotonic()
        if self._progress_jobs and (
            self._stopping.is_set() or mono - self._progress_flushed >= self.cfg.progress_flush_s
        ):
            self._dirty_jobs |= self._progress_jobs
            self._progress_jobs.clear()
            self._progress_flushed = mono
        self._progress_jobs -= self._dirty_jobs
        for job_id in sorted(self._dirty_jobs):
            job = self.jobs[job_id]
            if not self._put(f"jobs/{job_id}", convert.job_to_bytes(job)):
                return
            self._dirty_jobs.discard(job_id)
            if job.state.is_terminal and job_id not in self._released and all(
                a.state.is_terminal for a in job.attempts
            ):
                self._released.add(job_id)
                self._release(job)
            unsent = self._unsent.pop(job_id, None)
            if unsent:
                crash_point("launch-persisted")
                for node, command in unsent:
                    self._send(node, command)
                self._launch_sent[(job_id, command.attempt)] = time.monotonic()
        for name in sorted(self._dirty_nodes):
            if not self._put(f"nodes/{name}", convert.node_to_bytes(self.nodes[name].node)):
                return
            self._dirty_nodes.discard(name)

    def _put(self, key: str, value: bytes) -> bool:
        """Write one record; False when the store is down (the caller retries next pass)."""
        try:
            self._versions[key] = self.store.put(
                key, value, expected_version=self._versions.get(key, 0)
            )
        except ConflictError:
            try:
                item = self.store.get(key)
                if item is None:  # the store lost it (restarted empty): write ours again
                    log.warning("store lost %s; writing it again", key)
                    self._versions[key] = self.store.put(key, value, expected_version=0)
                    return True
            except (ConflictError, StoreUnavailableError):
                return False
            # another controller wrote this record: we are not the only leader
            log.error("store conflict on %s: another controller is writing; taking its copy", key)
            self._versions[key] = item.version
        except StoreUnavailableError:
            return False
        return True

    def _drop_expired(self, now: float) -> None:
        """Forget finished jobs past the retention bounds (memory and store)."""
        for job_id in retention.expired(self.jobs.values(), now,
                                        keep_count=self.cfg.keep_finished_jobs,
                                        keep_s=self.cfg.keep_finished_s,
                                        keep_bytes=self.cfg.keep_finished_bytes):
            key = f"jobs/{job_id}"
            if job_id in self._dirty_jobs:
                continue  # its final state is not written yet
            if job_id not in self._released:  # loaded finished from the store
                self._release(self.jobs[job_id])
            try:
                self.store.delete(key, expected_version=self._versions.get(key))
            except ConflictError:
                log.error("store conflict deleting %s: another controller is writing", key)
                continue
            except StoreUnavailableError:
                return
            job = self.jobs.pop(job_id)
            self._versions.pop(key, None)
            self._released.discard(job_id)
            for attempt in job.attempts:
                self._stops.pop((job_id, attempt.number), None)
                self._launch_sent.pop((job_id, attempt.number), None)
            self.logs.forget(job_id)
            self.detection.forget(job_id)


def _record_steps_lost(job: Job, restore: int) -> None:
    """The fault that ended the previous attempt lost the steps completed beyond ``restore``."""
    previous = job.current
    if previous is None or previous.cause is None or previous.cause.steps_lost >= 0:
        return
    done = max((a.progress for a in job.attempts), default=-1)
    previous.cause.steps_lost = max(0, done - restore)
    if job.root_cause is not None and job.root_cause.attempt == previous.cause.attempt:
        job.root_cause.steps_lost = previous.cause.steps_lost


def _state_change(state: str, at: float, reason: str):  # type: ignore[no-untyped-def]
    from hpt.controller.model import StateChange

    return StateChange(state, at, reason)


def _earliest_fault(attempt: Attempt, now: float, include_stopped: bool = True) -> Fault | None:
    """The earliest failure of the attempt: the root cause (later ones are usually its echo)."""
    faults = []
    for rank in attempt.ranks:
        if rank.state == RankState.FAILED:
            exit_ = rank.exit
            classification = FaultClass.USER if exit_ and exit_.error_type else FaultClass.INFRA
            if exit_ and exit_.signal in ("SIGSEGV", "SIGBUS", "SIGILL", "SIGABRT"):
                classification = FaultClass.PLATFORM
            if exit_ and exit_.error_type in PLATFORM_ERRORS:
                classification = FaultClass.PLATFORM
            if exit_ and exit_.error_type == OOM_ERROR:
                classification = FaultClass.OOM
            faults.append(Fault(kind=FaultKind.RANK_EXIT, attempt=attempt.number, node=rank.node,
                                rank=rank.rank, message=rank.exit_reason, detected_at=now,
                                occurred_at=exit_.ended_at if exit_ else now,
                                classification=classification))
        elif rank.state == RankState.LOST:
            kind = FaultKind.NODE_LOST if rank.exit_reason.startswith("node lost") else FaultKind.RANK_LOST
            faults.append(Fault(kind=kind, attempt=attempt.number, node=rank.node, rank=rank.rank,
                                message=rank.exit_reason, detected_at=now, occurred_at=now,
                                classification=FaultClass.INFRA))
        elif rank.state == RankState.STOPPED and include_stopped and attempt.state != AttemptState.STOPPING:
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
