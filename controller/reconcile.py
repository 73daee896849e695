"""The control loop: observe what agents and users report, decide, act on every job.

Three parts, the shape of torch.elastic's rendezvous ops and Ray's autoscaler v2:

1. Inputs. RPC handlers queue observations (``observations.py``: ``submit``, ``cancel``,
   ``agent_events``, ``held_pieces``, ``restore_failed``, ``disconnect``) and wake the loop;
   ``submit`` waits, with a deadline, for the pass that stored its job (or could not). Registrations and heartbeats apply
   their rank reports under the lock on arrival (the passive sync of ``observe.py``): they
   carry the liveness a pass judges, and a heartbeat tells its caller whether a pass is due.
2. Each pass (``reconcile_once``) applies the queued observations, marks nodes whose heartbeats
   stopped LOST (``observe.py``), then per job builds a view and asks the pure
   ``decide.decide(job, view, now)`` for decisions (``execute.py``).
3. One executor (``execute.py``) applies them through ``set_state``; the job's events come from
   its transitions. The repository (``repository.py``) writes what changed with
   compare-and-set; a conflict means another controller leads, and this one steps down.

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
from dataclasses import dataclass, replace
from typing import Protocol

from hpt.controller import cadence, catalog, convert, detect, elastic, retention
from hpt.controller.config import ControllerConfig
from hpt.controller.crashpoints import crash_point
from hpt.controller.execute import Execute, _StopSent
from hpt.controller.model import (
    Attempt,
    AttemptState,
    CadenceCommand,
    Command,
    Event,
    EventKind,
    Job,
    JobSpec,
    JobState,
    LaunchCommand,
    Node,
    NodeState,
    ProtectCommand,
    Rank,
    RankReport,
    ReleaseCommand,
    RestoreCommand,
)
from hpt.controller.observations import (
    AgentEvents,
    CancelRequested,
    Disconnected,
    Inbox,
    RestoreFailed,
    SubmitRequested,
)
from hpt.controller.observe import Observe
from hpt.controller.pieces import PieceBook
from hpt.controller.repository import Repository, SteppedDownError
from hpt.controller.stall import StallDetector
from hpt.controller.store import FencedError, Store, StoreUnavailableError
from hpt.controller.store.retrying import RetryingStore, StoreHealth
from hpt.controller.streams import EventLog, LogBuffer

log = logging.getLogger(__name__)

_RETENTION_PERIOD_S = 1.0
_CADENCE_PERIOD_S = 5.0
"""How often the persist cadence of adapting jobs is re-estimated (``cadence.py``)."""
_QUIET_PASS_S = 1.0
"""A running job nothing happened to is decided at least this often (``_quiet``)."""
_SUBMIT_WAIT_S = 30.0
"""How long ``submit`` waits for a pass to take its job (a pass blocked on a slow store)."""


class DuplicateNodeError(Exception):
    """Another live agent is registered under this node name."""


_PUSH_S_PER_NODE = 0.0005
"""Protection targets pushed to an attempt's nodes at most once per this x its nodes."""
MIN_ROUND_S = 0.5
"""Protection targets pushed to an attempt's nodes at most this often (a round that completes
sooner is pushed by a later pass). Rounds pushed back to back took 8-17 % of the step time of
a 3-node job stepping every 35 ms on two cores, against 2-5 % paced by heartbeats; at 0.5 s,
5-6.5 %, and a sharded shrink still lost 2 steps at 0.05 s steps (docs/benchmarks.md)."""


class AgentLink(Protocol):
    """The command half of one agent's stream; implemented by the gRPC servicer."""

    def send(self, command: Command) -> None:
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


class Reconciler(Observe, Execute):
    def __init__(
        self, cfg: ControllerConfig, store: Store, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.cfg = cfg
        self.store = store if isinstance(store, RetryingStore) else RetryingStore(store)
        self._store_recovered = threading.Event()
        self.store.on_recovered = self._store_recovered.set
        self.repository = Repository(self.store)
        self._deposed: SteppedDownError | None = None  # a conflict met outside the loop
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
        self._next_cadence = 0.0
        self._clock = clock
        self._dirty_jobs: set[str] = set()
        self._fenced: dict[tuple[str, str, int], float] = {}  # (node, job, attempt) -> mono
        self._stepped: dict[str, tuple[float, float]] = {}  # job -> (mono, wall) it was decided
        self._rounds_done: set[tuple[str, int]] = set()  # (job, attempt) protected a new step
        self._rounds_pushed: dict[str, float] = {}  # job -> monotonic time of the last push
        self._stripes: dict[tuple[str, int], elastic.ProtectionPlan | None] = {}
        self.rounds_version = 0
        """Bumped when nodes were told new protection targets (``rounds_pushed``): the
        intake's cue to take those for its acks."""
        self.rounds_pushed: list[tuple[str, int, int, int, frozenset[str]]] = []
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
        self.inbox = Inbox()  # observations RPC handlers queued for the next pass
        self._cancel_grace: dict[str, float | None] = {}  # job -> the grace its cancel asked
        self.observers: list[Callable[[Job, JobState, JobState, str], None]] = [self._job_event]
        """Called after every job transition: (job, previous, new, reason)."""

    # ---------------------------------------------------------------- lifecycle

    def load(self) -> None:
        """Rebuild state from the store; called once before the loop and the server start."""
        now_mono = time.monotonic()
        with self.lock:
            for value in self.repository.load("jobs/").values():
                job = convert.job_from_bytes(value)
                self.jobs[job.id] = job
            for value in self.repository.load("nodes/").values():
                node = convert.node_from_bytes(value)
                if node.state in (NodeState.READY, NodeState.UNKNOWN):
                    node.set_state(NodeState.UNKNOWN,
                                   "controller restarted; waiting for the agent to re-register")
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
        except FencedError as exc:  # another controller leads (a lost lease or a CAS conflict)
            log.error("another controller leads; stepping down: %s", exc)
            self.crashed = exc
            self.on_crash(exc)
        except BaseException as exc:  # the loop is the controller: die loudly, never limp on
            log.critical("control loop crashed", exc_info=True)
            self.crashed = exc
            self.on_crash(exc)

    def reconcile_once(self) -> None:
        """One pass: passive node checks, then every job's active step, then persist."""
        self.fence()
        if self._deposed is not None:
            raise self._deposed
        now, mono = self._clock(), time.monotonic()
        self._apply_observations(now)
        if self._deposed is not None:  # a submit met another controller's record
            raise self._deposed
        self._push_rounds(mono)  # rounds that completed sooner than MIN_ROUND_S after the last
        self.stall.observe(mono)
        if self.stall.may_judge(mono):
            self._sync_nodes(mono, now)
        nodes_changed = bool(self._dirty_nodes)  # capacity: growing and placing read it
        for job in list(self.jobs.values()):
            if nodes_changed or not self._quiet(job, mono, now):
                self._stepped[job.id] = (mono, now)
                self._step(job, now)
        if mono >= self._next_cadence:
            self._next_cadence = mono + _CADENCE_PERIOD_S
            self._retune(now)
        self._flush()
        if mono >= self._next_retention:
            self._next_retention = mono + _RETENTION_PERIOD_S
            self._drop_expired(now)

    def _quiet(self, job: Job, mono: float, now: float) -> bool:
        """A running attempt that nothing happened to since the last pass that decided it, less
        than ``_QUIET_PASS_S`` ago: decide would find nothing to do, and it costs O(ranks) (at
        80,000 ranks and ten passes a second, most of a core). Everything decide reads for such
        an attempt changes through a path that marks the job dirty (a rank's state, a lost node,
        a cancel), a node (every job is decided in a pass that saw a node change) or the
        detectors (``needs_pass``); what only time changes (the grow hysteresis running out)
        waits at most ``_QUIET_PASS_S`` more."""
        current = job.current
        if (job.state != JobState.RUNNING or job.cancel_requested or current is None
                or current.state != AttemptState.RUNNING or job.id in self._dirty_jobs
                or self.detection.needs_pass(job.id, current.number)):
            return False
        last = self._stepped.get(job.id)
        return (last is not None and 0 <= mono - last[0] < _QUIET_PASS_S
                and 0 <= now - last[1] < _QUIET_PASS_S)

    def store_health(self) -> StoreHealth:
        return self.store.health

    # ---------------------------------------------------------------- inputs (RPC threads)

    def submit(self, spec: JobSpec) -> str:
        """Queue a new job and wait (``submit_wait_s``) for the pass that stores it.

        Raises:
            StoreUnavailableError: it could not be stored (nothing was: never acknowledged).
            FencedError: another controller leads (``SteppedDownError``: it created the record).
        """
        job_id = f"{spec.name or 'job'}-{secrets.token_hex(4)}"
        job = Job(id=job_id, spec=spec, created_at=self._clock(), reason="submitted")
        queued = self.inbox.queue(SubmitRequested(job=job))
        if self._thread is None:  # no loop runs (driven pass by pass): apply the inbox here
            with self.lock:
                self._apply_observations(self._clock())
        else:
            self.wake()
            deadline = time.monotonic() + _SUBMIT_WAIT_S
            while not queued.applied.wait(0.5):
                loop_ended = self._thread is None or not self._thread.is_alive()
                if not loop_ended and time.monotonic() <= deadline:
                    continue
                if self.inbox.withdraw(queued) or loop_ended:  # maybe stored: never acknowledged
                    raise StoreUnavailableError(
                        "the control loop ended" if loop_ended else
                        f"no reconcile pass took the job within {_SUBMIT_WAIT_S:g}s")
                # else a pass took it: it stores it or refuses, and then says so
        if queued.error is not None:
            raise queued.error
        return job_id

    def cancel(self, job_id: str, grace_s: float | None) -> threading.Event:
        """Queue a user's cancel; returns the event the pass that applied it sets (the caller
        answers once it is set, or at its own deadline)."""
        applied = self.inbox.put(CancelRequested(job_id=job_id, grace_s=grace_s))
        self.wake()
        return applied

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
                node.state, node.reason = NodeState.READY, "registered"  # its first state
            else:
                node.state, node.reason = runtime.node.state, runtime.node.reason
                runtime.node = node
                node.set_state(NodeState.READY, "registered")
            if health_problem:  # not placed; `hptctl nodes` shows why
                node.set_state(NodeState.QUARANTINED, health_problem)
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
                    kind=EventKind.NODE_REGISTERED,
                    at=self._clock(),
                    node=node.name,
                    message=f"{node.slots} slots at {node.address}"
                    + (f" (was {previous_state.value})" if previous_state else ""),
                )
            )
            if health_problem:
                self.events.emit(Event(kind=EventKind.NODE_QUARANTINED, at=self._clock(), node=node.name,
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
                runtime.node.set_state(NodeState.READY,
                                       f"heartbeating again after: {runtime.node.reason}")
                self._dirty_nodes.add(node)
                self.events.emit(Event(kind=EventKind.NODE_REJOINED, at=self._clock(), node=node,
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
        """Events an agent or its ranks raised (persist failures, skipped checkpoints...);
        the next pass records them."""
        self.inbox.put(AgentEvents(node=node, events=tuple(events)))

    def held_pieces(self, reports: list[tuple[str, list[tuple[str, int, int, int, int]]]],
                    ) -> None:
        """The verified protection pieces some nodes hold now: (node, [(job, attempt, stripe,
        step, bytes)]) for each node whose list changed, applied at once (the heartbeat intake
        calls it once per batch): each attempt's protected steps follow, and when a round
        completed the attempt's nodes are told the next one now (``_push_rounds``), not at
        the next pass."""
        if not reports:
            return
        with self.lock:
            self._apply_pieces(reports)
            self._push_rounds(time.monotonic())

    def protect_targets(self) -> list[tuple[str, int, int, int, frozenset[str]]]:
        """(job, attempt, step, newest protected step, nodes) of every protection round now:
        each node in ``nodes`` is told the step with its heartbeat ack (controller/rounds.py).
        The intake asks once per batch of heartbeats."""
        with self.lock:
            mono = time.monotonic()
            return self.pieces.rounds.all_targets(self.jobs.values(), mono,
                                                  self.stall.may_judge(mono))

    def restore_failed(self, job_id: str, step: int) -> None:
        """An agent could not put ``step`` in place: never choose it again for this job."""
        self.inbox.put(RestoreFailed(job_id=job_id, step=step))

    def disconnect(self, node: str, link: AgentLink) -> None:
        self.inbox.put(Disconnected(node=node, link=link, at=time.monotonic()))
        self.wake()

    # ---------------------------------------------------------------- launch

    def _stripes_of(self, job: Job, attempt: Attempt) -> elastic.ProtectionPlan | None:
        """The attempt's protection layout for judging pieces (its nodes and stripes, which
        never change during an attempt: built once per attempt, not per report)."""
        key = (job.id, attempt.number)
        if key not in self._stripes:
            self._stripes[key] = self._plan_of(job, attempt)
        return self._stripes[key]

    def _plan_of(self, job: Job, attempt: Attempt) -> elastic.ProtectionPlan | None:
        """The attempt's protection layout, with the peer addresses agents have now."""
        ranks: dict[str, list[int]] = {}
        for r in attempt.ranks:
            ranks.setdefault(r.node, []).append(r.rank)
        peers = {n: rt.node.peer_address for n, rt in self.nodes.items()}
        return elastic.protection_plan(job.spec.redundancy, attempt.nodes, ranks, peers)


    def _launch(self, job: Job, nodes: list[str], now: float, reason: str) -> None:
        spec = job.spec
        number = len(job.attempts) + 1
        previous = job.current
        if previous is not None:
            nodes = elastic.order_nodes(previous.nodes, nodes)  # survivors keep their ranks
            if len(nodes) != len(previous.nodes):
                reason = f"resize {len(previous.nodes)} -> {len(nodes)} nodes; {reason}"
        master = self.nodes[nodes[0]]
        # The master's agent serves the rendezvous store on this port (agent/launcher.py): one
        # port per attempt. The port an agent reports is used once (a second launch before its
        # next heartbeat would get the same one), and never one a live attempt on that node or
        # this job's previous attempt holds.
        taken = {a.master_port for j in self.jobs.values() for a in j.attempts[-2:]
                 if a.nodes and a.nodes[0] == nodes[0] and not a.state.is_terminal}
        if job.current:
            taken.add(job.current.master_port)
        port, master.free_port = master.free_port, 0
        while not port or port in taken:
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
            replicas = elastic.replicated(previous)
            resize = previous.world_size != attempt.world_size
            alive = elastic.surviving_ranks(previous, choice.lost) \
                if replicas and (resize or choice.any_replica) else None
            split = elastic.even_split(previous) if resize and not replicas else None
            for node in nodes:
                here = [r.rank for r in attempt.ranks_on(node)]
                restores[node] = RestoreCommand(
                    step=restore, attempt=previous.number, world_size=previous.world_size,
                    layout=old_plan, lost=choice.lost,
                    need_ranks=tuple(elastic.need_ranks(previous, here, attempt.world_size,
                                                        node, alive, split)),
                    replicated=replicas, any_replica=choice.any_replica)
        # sent by ``_flush`` once this attempt is in the store (a controller that dies before
        # then relaunches the same attempt from the store, never a second one beside it)
        self._unsent[job.id] = sorted(self._launch_commands(job, attempt, restore, restores).items())
        self._set_job_state(job, JobState.RUNNING, f"attempt {number} launched: {reason}", now)
        restored = f"restores step {restore} from memory" if restore else "starts from scratch or disk"
        self._emit(EventKind.ATTEMPT_LAUNCHED, job, attempt=number,
                   message=f"world size {attempt.world_size}; {restored}; {reason}")
        if previous is not None:
            persisted = catalog.persisted_steps(previous) if spec.persist_dir else []
            fallback = "" if restore else (
                f"; falls back to the persisted checkpoint (newest on every rank: step "
                f"{persisted[0]}; ranks verify it and agree on the newest good one)"
                if persisted else "; falls back to scratch: no checkpoint persisted on every "
                "rank" + ("" if spec.persist_dir else " (no persist_dir)"))
            self._emit(EventKind.RESTORE_SOURCE, job, attempt=number, message=choice.source + fallback)

    def _restore_choice(self, job: Job, previous: Attempt | None,
                        ranks: list[Rank]) -> elastic.RestoreChoice:
        if previous is None:
            return elastic.RestoreChoice(0, (), "first attempt")
        alive = {n for n, rt in self.nodes.items()
                 if rt.node.state == NodeState.READY and rt.link is not None}
        choice = elastic.choose_restore(previous, self._plan_of(job, previous),
                                        self.pieces.held((job.id, previous.number)), alive,
                                        exclude=self._bad_steps.get(job.id, set()),
                                        world_size=len(ranks))
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
        spec = job.launch_spec  # the cadence in force, if the controller retuned it
        plan = self._plan_of(job, attempt)
        if restore is None:
            restore = catalog.restore_step(job.attempts[: attempt.number - 1],
                                           [(r.rank, r.node) for r in attempt.ranks])
        by_node: dict[str, list[tuple[int, int]]] = {}  # one scan, not one per node
        for r in attempt.ranks:
            by_node.setdefault(r.node, []).append((r.rank, r.local_rank))
        return {
            node: LaunchCommand(
                job_id=job.id,
                attempt=attempt.number,
                spec=spec,
                ranks=tuple(by_node.get(node, ())),
                world_size=attempt.world_size,
                local_world_size=spec.procs_per_node,
                master_addr=attempt.master_addr,
                master_port=attempt.master_port,
                node_rank=i,
                num_nodes=len(attempt.nodes),
                restore_step=restore,
                protection=plan,
                restore=(restores or {}).get(node),
            )
            for i, node in enumerate(attempt.nodes)
        }

    # ---------------------------------------------------------------- helpers

    def _push_rounds(self, mono: float) -> None:
        """Tell the nodes of every attempt whose round just completed its next round now.

        Otherwise a node learns it from the ack of its next heartbeat: the holders that built
        their pieces before the last one did wait up to a heartbeat period, while the ranks
        make steps a node loss would cost. An attempt is pushed to at most every
        ``MIN_ROUND_S`` (rounds cost the ranks CPU), and at most once per
        ``_PUSH_S_PER_NODE`` x its nodes (one message per node); a round that completes
        sooner waits here for a later pass."""
        if not self._rounds_done:
            return
        done, self._rounds_done = self._rounds_done, set()
        nodes: set[str] = set()
        for job_id, number in done:
            job = self.jobs.get(job_id)
            if job is None or job.current is None or job.current.number != number:
                continue
            members = job.current.nodes
            wait = max(MIN_ROUND_S, _PUSH_S_PER_NODE * len(members))
            if mono - self._rounds_pushed.get(job_id, -1e9) < wait:
                self._rounds_done.add((job_id, number))  # a later pass pushes it
                continue
            self._rounds_pushed[job_id] = mono
            nodes.update(members)
        if not nodes:
            return
        targets = self.pieces.rounds.all_targets(self.jobs.values(), mono,
                                                 self.stall.may_judge(mono))
        self.rounds_pushed = targets
        self.rounds_version += 1
        for node in sorted(nodes):
            self._send(node, ProtectCommand(targets=tuple(
                (j, a, s, p) for j, a, s, p, members in targets if node in members)))

    def _send(self, node: str, command: Command) -> bool:
        runtime = self.nodes.get(node)
        if runtime is None or runtime.link is None:
            return False
        runtime.link.send(command)
        return True

    def _emit(self, kind: EventKind, job: Job, *, attempt: int = 0, node: str = "", rank: int = -1,
              message: str) -> None:
        self.events.emit(Event(kind=kind, at=self._clock(), job_id=job.id,
                               attempt=attempt or (job.current.number if job.current else 0),
                               node=node, rank=rank, message=message))

    def _retune(self, now: float) -> None:
        """Move the cadences of every adapting job whose recommended ones moved far enough:
        the job's record keeps them (its later launches carry them), and the nodes of its
        running attempt apply them at once (a new snapshot cadence from a step ahead of every
        rank); the attempt goes on."""
        for job in self.jobs.values():
            est = cadence.retune(job, now, self.cfg.max_snapshot_interval_s)
            if est is None:
                continue
            attempt = job.current
            assert attempt is not None
            reason = est.reason()
            command = CadenceCommand(job_id=job.id, attempt=attempt.number,
                                     persist_every=est.persist_every if est.persist_changed
                                     else 0, reason=reason)
            if est.snapshot_changed:
                command = replace(command, snapshot_every=est.snapshot_every,
                                  snapshot_from=est.snapshot_from,
                                  snapshot_before=job.snapshot_every or job.spec.snapshot_every)
                job.snapshot_every = est.snapshot_every
            if est.persist_changed:
                job.persist_every = est.persist_every
            self._dirty_jobs.add(job.id)
            self._emit(EventKind.CADENCE_CHANGED, job, attempt=attempt.number, message=reason)
            log.info("[%s/%d/-/-] %s", job.id, attempt.number, reason)
            for node in attempt.nodes:
                self._send(node, command)

    def _release(self, job: Job) -> None:
        """A terminal job's agents free its snapshot memory."""
        for node in {n for attempt in job.attempts for n in attempt.nodes}:
            self._send(node, ReleaseCommand(job_id=job.id))
        self.pieces.forget(job.id)

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
            if not self.repository.save(f"jobs/{job_id}", convert.job_to_bytes(job)):
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
            if not self.repository.save(f"nodes/{name}",
                                        convert.node_to_bytes(self.nodes[name].node)):
                return
            self._dirty_nodes.discard(name)

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
            if not self.repository.delete(key):
                return
            job = self.jobs.pop(job_id)
            self._released.discard(job_id)
            for attempt in job.attempts:
                self._stops.pop((job_id, attempt.number), None)
                self._launch_sent.pop((job_id, attempt.number), None)
                self._stripes.pop((job_id, attempt.number), None)
            self.logs.forget(job_id)
            self._cancel_grace.pop(job_id, None)
            self._stepped.pop(job_id, None)
            self._rounds_pushed.pop(job_id, None)
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
