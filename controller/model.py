"""The controller's view of the world: jobs, attempts, ranks, nodes and faults.

Plain dataclasses mutated only by the reconciler (``reconcile.py``) under its lock; ``convert.py``
is the one place that maps them to and from the wire/storage protobufs. Every job and attempt
state change goes through ``set_state``, which refuses edges missing from the transition tables
and appends ``(state, at, reason)`` to the record's history: that history is the fault record
``hptctl describe`` shows.

Job states::

    PENDING ──► RUNNING ──► SUCCEEDED
       │          │  ▲
       │          ▼  │
       │       RECOVERING
       │          │
       └──────────┴──► FAILED / CANCELLED
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum

from hpt.controller.elastic import ProtectionPlan
from hpt.jobspec import JobSpec, Placement  # the spec is defined once, shared with agent and CLI


class IllegalTransitionError(RuntimeError):
    """A state change that the transition table does not allow (a bug in the caller)."""


class JobState(str, Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    RECOVERING = "RECOVERING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


JOB_TRANSITIONS: dict[JobState, dict[JobState, str]] = {
    JobState.PENDING: {
        JobState.RUNNING: "placed on enough nodes; first attempt launched",
        JobState.FAILED: "no placement before the node-wait deadline",
        JobState.CANCELLED: "cancelled by the user before it ran",
    },
    JobState.RUNNING: {
        JobState.SUCCEEDED: "every rank of the current attempt exited 0",
        JobState.RECOVERING: "a fault ended the attempt; restarts remain",
        JobState.FAILED: "a fault with no restarts left, or an unrecoverable one",
        JobState.CANCELLED: "cancelled by the user; ranks stopped",
    },
    JobState.RECOVERING: {
        JobState.RUNNING: "old attempt stopped everywhere; next attempt launched",
        JobState.FAILED: "not enough healthy nodes before the deadline",
        JobState.CANCELLED: "cancelled by the user while recovering",
    },
    JobState.SUCCEEDED: {},
    JobState.FAILED: {},
    JobState.CANCELLED: {},
}


class AttemptState(str, Enum):
    LAUNCHING = "LAUNCHING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"

    @property
    def is_terminal(self) -> bool:
        return self in (AttemptState.SUCCEEDED, AttemptState.FAILED, AttemptState.STOPPED)


ATTEMPT_TRANSITIONS: dict[AttemptState, dict[AttemptState, str]] = {
    AttemptState.LAUNCHING: {
        AttemptState.RUNNING: "every rank reported running",
        AttemptState.STOPPING: "a fault or cancel before every rank started",
        AttemptState.SUCCEEDED: "ranks finished before all were seen running",
    },
    AttemptState.RUNNING: {
        AttemptState.SUCCEEDED: "every rank exited 0",
        AttemptState.STOPPING: "a fault or cancel: stop sent to every node",
    },
    AttemptState.STOPPING: {
        AttemptState.FAILED: "every rank ended; the attempt ended by a fault",
        AttemptState.STOPPED: "every rank ended; the attempt was cancelled",
    },
    AttemptState.SUCCEEDED: {},
    AttemptState.FAILED: {},
    AttemptState.STOPPED: {},
}


class RankState(str, Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"
    LOST = "LOST"

    @property
    def is_terminal(self) -> bool:
        return self not in (RankState.PENDING, RankState.RUNNING)


RANK_TRANSITIONS: dict[RankState, dict[RankState, str]] = {
    RankState.PENDING: {
        RankState.PENDING: "its agent reports it starting (a new pid)",
        RankState.RUNNING: "its agent started it",
        RankState.SUCCEEDED: "it exited 0 before it was seen running",
        RankState.FAILED: "it failed before it was seen running",
        RankState.STOPPED: "a stop reached its agent (or its launch never left) before it started",
        RankState.LOST: "its node was lost, its agent forgot it, or it never started in time",
    },
    RankState.RUNNING: {
        RankState.RUNNING: "its agent reports it again under a new pid",
        RankState.SUCCEEDED: "it exited 0",
        RankState.FAILED: "it exited non-zero or was killed by a signal",
        RankState.STOPPED: "it was stopped (its attempt ends, or its agent self-fenced)",
        RankState.LOST: "its node was lost or its agent re-registered without it",
    },
    # terminal: a rank reported alive after it was given up on is fenced, not revived
    RankState.SUCCEEDED: {},
    RankState.FAILED: {},
    RankState.STOPPED: {},
    RankState.LOST: {},
}


class NodeState(str, Enum):
    """A node's agent as the controller sees it::

        (register) ──► READY ◄──► LOST
                        │  ▲        │
                        ▼  │        ▼
                    QUARANTINED ◄───┘        UNKNOWN (after a controller restart) ──► any
    """

    READY = "READY"
    LOST = "LOST"
    QUARANTINED = "QUARANTINED"
    UNKNOWN = "UNKNOWN"
    """Known from the store after a controller restart, not yet re-registered."""


NODE_TRANSITIONS: dict[NodeState, dict[NodeState, str]] = {
    NodeState.READY: {
        NodeState.READY: "its agent registered again",
        NodeState.LOST: "no heartbeat within the timeout, or its stream closed for good",
        NodeState.QUARANTINED: "it registered again and its health check failed",
        NodeState.UNKNOWN: "the controller restarted; waiting for the agent to register again",
    },
    NodeState.LOST: {
        NodeState.READY: "it heartbeats again, or its agent registered again",
        NodeState.QUARANTINED: "its agent registered again and its health check failed",
    },
    NodeState.QUARANTINED: {
        NodeState.READY: "its agent registered again and passed its health check",
        NodeState.QUARANTINED: "its agent registered again and failed its health check again",
        NodeState.UNKNOWN: "the controller restarted",
    },
    NodeState.UNKNOWN: {
        NodeState.UNKNOWN: "the controller restarted again",
        NodeState.READY: "its agent registered again",
        NodeState.LOST: "its agent did not register again in time",
        NodeState.QUARANTINED: "its agent registered again and its health check failed",
    },
}


class FaultKind(str, Enum):
    RANK_EXIT = "rank_exit"
    NODE_LOST = "node_lost"
    RANK_LOST = "rank_lost"
    HANG = "hang"
    STRAGGLER = "straggler"
    """Ranks alive but without progress past the hang deadline (found by their agent)."""
    LAUNCH_TIMEOUT = "launch_timeout"
    """A rank still pending long after its launch command left: it will never start."""


class RankEndCause(str, Enum):
    """Why the controller ended a rank it did not see exit; NONE when its agent reported how
    it ended. Decisions read this, never ``Rank.exit_reason`` (display text)."""

    NONE = "NONE"
    NODE_LOST = "NODE_LOST"
    """Its node stopped heartbeating (or its stream closed) past the timeout."""
    AGENT_FORGOT = "AGENT_FORGOT"
    """Its agent re-registered without it."""
    NEVER_STARTED = "NEVER_STARTED"
    """Still pending ``launch_timeout_s`` after its launch left."""
    STOPPED_BEFORE_START = "STOPPED_BEFORE_START"
    """A stop reached its agent before the rank started (the agent refuses the launch now)."""
    STOPPED_BEFORE_LAUNCH = "STOPPED_BEFORE_LAUNCH"
    """Its attempt was stopped before its launch left the controller."""
    STOPPED = "STOPPED"
    """Its attempt was stopping and the re-registered agent no longer had it."""


class StopCause(str, Enum):
    """Why the controller stops ranks (``StopCommand.cause``); the agent acts on it."""

    CANCELLED = "CANCELLED"
    """The user cancelled the job: the agent persists the newest snapshot within the grace."""
    FAULT = "FAULT"
    RESIZE = "RESIZE"
    """The job grows back onto returning nodes."""
    UNCONFIRMED = "UNCONFIRMED"
    """An earlier stop was not confirmed in time: again, without grace."""
    UNKNOWN_ATTEMPT = "UNKNOWN_ATTEMPT"
    """An agent reported a rank of a job or attempt this controller does not know."""
    DECLARED_LOST = "DECLARED_LOST"
    """A rank the controller gave up on (its node was lost) runs again: fence it."""


class HangCulprit(str, Enum):
    """Why an agent named a rank as the culprit of a hang on its node."""

    UNSPECIFIED = "UNSPECIFIED"
    STOPPED = "STOPPED"
    """Its process is stopped (state T: SIGSTOP or a debugger): infra, not the script."""
    OUTSIDE_COLLECTIVE = "OUTSIDE_COLLECTIVE"
    """It is in no collective while its peers on the node wait in one."""
    SILENT_LONGEST = "SILENT_LONGEST"


class EventKind(str, Enum):
    """What an event records. The value is the name ``hptctl events`` shows."""

    JOB_SUBMITTED = "job_submitted"
    CANCEL_REQUESTED = "cancel_requested"
    JOB_CANCELLED = "job_cancelled"
    JOB_SUCCEEDED = "job_succeeded"
    JOB_FAILED = "job_failed"
    WAITING_FOR_NODES = "waiting_for_nodes"
    ATTEMPT_LAUNCHED = "attempt_launched"
    RESTORE_SOURCE = "restore_source"
    FIRST_STEP = "first_step"
    RANK_EXITED = "rank_exited"
    FAULT = "fault"
    RECOVERING = "recovering"
    RESIZE_REQUESTED = "resize_requested"
    NODE_EXCLUDED = "node_excluded"
    NODE_REGISTERED = "node_registered"
    NODE_QUARANTINED = "node_quarantined"
    NODE_REJOINED = "node_rejoined"
    NODE_LOST = "node_lost"
    # detectors (monitor.records.FindingKind and the agents' hang reports)
    HANG = "hang"
    STACKS = "stacks"
    STRAGGLER = "straggler"
    STRAGGLER_CLEARED = "straggler_cleared"
    COLLECTIVE_LAGGARD = "collective_laggard"
    COLLECTIVE_MISSING = "collective_missing"
    # raised by agents and ranks
    CHECKPOINT_SKIPPED = "checkpoint_skipped"
    RESTORED = "restored"
    TEARDOWN_CRASH = "teardown_crash"
    RESTORE_FAILED = "restore_failed"
    SNAPSHOT_REBUILT = "snapshot_rebuilt"
    PERSIST_FAILED = "persist_failed"
    # the controller's own
    CADENCE_CHANGED = "cadence_changed"


class FaultClass(str, Enum):
    USER = "user"
    """The script: an exception it raised, an exit code it chose."""
    PLATFORM = "platform"
    """hpt or the software under the script: a crash signal, a checkpoint it cannot read back."""
    INFRA = "infra"
    """Nodes, processes killed from outside, hangs of stopped processes, self-fencing."""
    OOM = "oom"
    """The kernel's OOM killer ended a rank (out of memory)."""


PLATFORM_ERRORS = frozenset({"CorruptCheckpointError", "RestoreError", "DecodeError"})
"""Exceptions of hpt's checkpoint path (``hpt.ckpt.errors``): the platform failed, not the user."""
OOM_ERROR = "OutOfMemory"
"""``ExitInfo.error_type`` of a rank the agent saw killed by the OOM killer."""


@dataclass(kw_only=True, slots=True)
class ExitInfo:
    exit_code: int
    signal: str = ""
    error_type: str = ""
    error_message: str = ""
    traceback: str = ""
    ended_at: float = 0.0

    def describe(self) -> str:
        how = f"killed by {self.signal}" if self.signal else f"exited with code {self.exit_code}"
        if self.error_type:
            return f"{how}: {self.error_type}: {self.error_message}".rstrip(": ")
        return how


@dataclass(kw_only=True, slots=True)
class Fault:
    kind: FaultKind
    attempt: int
    node: str = ""
    rank: int = -1
    message: str = ""
    detected_at: float = 0.0
    occurred_at: float = 0.0
    classification: FaultClass = FaultClass.INFRA
    steps_lost: int = -1
    """Completed steps redone: progress before the fault minus the step the next attempt
    restored; -1 until the next attempt launches."""

    def where(self) -> str:
        return f"rank {self.rank} on {self.node}" if self.rank >= 0 else f"node {self.node}"


@dataclass(frozen=True, slots=True)
class StateChange:
    state: str
    at: float
    reason: str


@dataclass(kw_only=True, slots=True)
class Rank:
    rank: int
    local_rank: int
    node: str
    pid: int = 0
    state: RankState = RankState.PENDING
    exit: ExitInfo | None = None
    step: int = -1
    step_at: float = 0.0
    first_step_at: float = 0.0
    exit_reason: str = ""
    snapshot_steps: tuple[int, ...] = ()
    """Complete in-memory snapshots the rank's agent holds for it (newest reports win)."""
    persisted_steps: tuple[int, ...] = ()
    snapshot_bytes: int = 0
    persist_s: float = 0.0
    """Seconds the rank's newest persist took (copy-out to verified manifest); 0: none yet."""
    snapshot_replicated: bool = False
    """Every tensor of the rank's snapshots is whole: a data-parallel replica (any replica of
    the job may stand in for it after a resize)."""
    snapshot_blocked_s: float = 0.0
    """Seconds one snapshot holds the rank's training thread, as its agent measured (0: not
    yet): the snapshot cost the cadence weighs."""
    snapshot_split: str = ""
    """How its sharded tensors are cut (``hpt.ckpt.sources.EvenSplit.encode``; "": not an
    even split on one dim, replicated, or not known): which old ranks a resize reads."""
    end_cause: RankEndCause = RankEndCause.NONE
    """Set when the controller ended the rank itself (``exit_reason`` says it in words)."""
    wire: tuple[tuple[object, ...], bytes] | None = field(default=None, repr=False,
                                                          compare=False)
    """The rank's serialized record and the field values it was made from
    (``convert.job_to_bytes``): a job's record is written with every rank of every attempt,
    and most ranks did not change since the last write."""

    def set_state(self, new: RankState, exit_reason: str = "",
                  cause: RankEndCause = RankEndCause.NONE) -> RankState:
        """Move along ``RANK_TRANSITIONS`` (raises ``IllegalTransitionError`` off it); a rank
        that ends records why (``exit_reason`` in words, ``cause`` when the controller ended
        it itself). Ranks keep no history: their attempt's is the record."""
        previous = self.state
        if new not in RANK_TRANSITIONS[previous]:
            raise IllegalTransitionError(f"Rank {self.rank} {previous.value} -> {new.value} is "
                                         f"not allowed ({exit_reason})")
        self.state = new
        if new.is_terminal:
            self.exit_reason, self.end_cause = exit_reason, cause
        return previous


@dataclass(kw_only=True, slots=True)
class Attempt:
    number: int
    nodes: list[str]
    master_addr: str
    master_port: int
    world_size: int
    ranks: list[Rank]
    state: AttemptState = AttemptState.LAUNCHING
    history: list[StateChange] = field(default_factory=list)
    started_at: float = 0.0
    first_step_at: float = 0.0
    ended_at: float = 0.0
    cause: Fault | None = None
    restore_step: int = 0
    """The snapshot step this attempt restored (0: none)."""

    @property
    def progress(self) -> int:
        """Steps completed by the rank furthest ahead (-1: none reported)."""
        return max((r.step for r in self.ranks), default=-1)
    protected_steps: tuple[int, ...] = ()
    """Steps whose every protection piece is reported verified by its holder (newest report)."""
    redundancy: str = ""
    """Effective protection of this attempt ("2+1", "mirror"; "" when unprotected)."""
    parity_bytes: int = 0
    """Protection bytes of the newest protected step, all nodes together (the memory the
    protection of one snapshot generation costs; m/k of the state when balanced)."""
    _by_node: dict[str, list[Rank]] | None = field(default=None, init=False, repr=False,
                                                   compare=False)  # see ranks_on
    _started_through: int = field(default=0, init=False, repr=False, compare=False)

    def set_state(self, new: AttemptState, reason: str, now: float) -> AttemptState:
        return _transition(self, ATTEMPT_TRANSITIONS, new, reason, now)

    def ranks_on(self, node: str) -> list[Rank]:
        """The attempt's ranks on ``node``, from an index built on the first call: callers ask
        for each node of the attempt in turn (stop, loss, reports), which scanning every rank
        made O(nodes x ranks) per pass: 10,000 nodes, 800 million comparisons. An attempt's
        ranks and their nodes are fixed when it is made."""
        by_node = self._by_node
        if by_node is None:
            by_node = {}
            for r in self.ranks:
                by_node.setdefault(r.node, []).append(r)
            self._by_node = by_node
        return list(by_node.get(node, ()))

    def none_pending(self) -> bool:
        """Whether every rank left PENDING. No rank goes back to it, so the scan resumes where
        the last one stopped: O(ranks) over a whole launch, where asking every report scanned
        from the start (16,000 ranks: 8 s to launch 2,000 nodes, a quarter of the CPU)."""
        ranks = self.ranks
        i = self._started_through
        while i < len(ranks) and ranks[i].state != RankState.PENDING:
            i += 1
        self._started_through = i
        return i == len(ranks)

    @property
    def all_ended(self) -> bool:
        return all(r.state.is_terminal for r in self.ranks)


@dataclass(kw_only=True, slots=True)
class Job:
    id: str
    spec: JobSpec
    state: JobState = JobState.PENDING
    attempts: list[Attempt] = field(default_factory=list)
    history: list[StateChange] = field(default_factory=list)
    created_at: float = 0.0
    reason: str = ""
    root_cause: Fault | None = None
    restarts: int = 0
    deadline_at: float = 0.0
    cancel_requested: bool = False
    excluded_nodes: list[str] = field(default_factory=list)
    """Nodes the straggler policy took this job off; the scheduler skips them."""
    persist_every: int = 0
    """The persist cadence the controller set (``spec.adapt_cadence``, ``cadence.py``); 0: the
    spec's. The spec itself stays as submitted."""
    snapshot_every: int = 0
    """The snapshot cadence the controller set; 0: the spec's (or the script's)."""

    @property
    def launch_spec(self) -> JobSpec:
        """The spec the job's launches carry: the submitted one with the cadences in force."""
        changed = {name: value for name, value in (("persist_every", self.persist_every),
                                                   ("snapshot_every", self.snapshot_every))
                   if value and value != getattr(self.spec, name)}
        return replace(self.spec, **changed) if changed else self.spec

    @property
    def current(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    def set_state(self, new: JobState, reason: str, now: float) -> JobState:
        previous = _transition(self, JOB_TRANSITIONS, new, reason, now)
        self.reason = reason
        return previous


@dataclass(kw_only=True, slots=True)
class Node:
    name: str
    address: str
    slots: int
    state: NodeState = NodeState.READY
    last_seen_at: float = 0.0
    reason: str = ""
    hostname: str = ""
    warm_ready: int = 0
    peer_address: str = ""
    """host:port of the agent's PeerService (snapshot protection traffic)."""

    def set_state(self, new: NodeState, reason: str) -> NodeState:
        """Move along ``NODE_TRANSITIONS`` (raises ``IllegalTransitionError`` off it)."""
        previous = self.state
        if new not in NODE_TRANSITIONS[previous]:
            raise IllegalTransitionError(
                f"Node {self.name} {previous.value} -> {new.value} is not allowed ({reason})")
        self.state, self.reason = new, reason
        return previous


def _transition(record, table, new, reason: str, now: float):  # type: ignore[no-untyped-def]
    previous = record.state
    if new not in table[previous]:
        raise IllegalTransitionError(
            f"{type(record).__name__} {previous.value} -> {new.value} is not allowed ({reason})"
        )
    record.state = new
    record.history.append(StateChange(new.value, now, reason))
    return previous


@dataclass(frozen=True, kw_only=True, slots=True)
class Event:
    """One line of the event log: every attempt, fault, decision and node change."""

    kind: EventKind
    at: float
    message: str
    job_id: str = ""
    attempt: int = 0
    node: str = ""
    rank: int = -1
    seq: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class LaunchCommand(Placement):
    """What one node runs of one attempt: the job's spec, whole, and this node's placement."""

    spec: JobSpec
    protection: ProtectionPlan | None = None
    """How this attempt's snapshots are protected across its nodes."""
    restore: RestoreCommand | None = None
    """What the node materialises before its ranks start (with restore_step > 0)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RestoreCommand:
    step: int
    attempt: int
    world_size: int
    layout: ProtectionPlan
    lost: tuple[int, ...]
    need_ranks: tuple[int, ...]
    replicated: bool = False
    """Every old rank reported data-parallel state (see ``elastic.choose_restore``)."""
    any_replica: bool = False
    """Same world size, yet the new ranks read surviving replicas as after a resize
    (``elastic.RestoreChoice.any_replica``)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ProtectCommand:
    """The protection rounds of a node now, sent as soon as a round of one of its attempts
    completed (otherwise each heartbeat's ack carries them): (job, attempt, step, newest
    protected step), the node's complete list."""

    targets: tuple[tuple[str, int, int, int], ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class ReleaseCommand:
    """The job ended: the agent frees what it holds for it (snapshot memory)."""

    job_id: str


@dataclass(frozen=True, kw_only=True, slots=True)
class StopCommand:
    job_id: str
    attempt: int
    """Stop every rank of the job whose attempt is <= this one."""
    grace_s: float
    reason: str
    """For logs only; the agent acts on ``cause``."""
    cause: StopCause


@dataclass(frozen=True, kw_only=True, slots=True)
class CadenceCommand:
    """New cadences for the job's running attempt (its later launches carry them in their
    spec); 0: unchanged."""

    job_id: str
    attempt: int
    persist_every: int
    reason: str
    snapshot_every: int = 0
    snapshot_from: int = 0
    """The step from which the ranks snapshot at ``snapshot_every`` (ahead of them all)."""
    snapshot_before: int = 0
    """The cadence until then: the one the controller or the spec set (0: the script's)."""


Command = LaunchCommand | StopCommand | ReleaseCommand | ProtectCommand | CadenceCommand
"""What the controller sends down an agent's stream."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RankReport:
    """What an agent says about one rank of one (job, attempt)."""

    job_id: str
    attempt: int
    rank: Rank
