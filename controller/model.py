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

import re
from dataclasses import dataclass, field
from enum import Enum

from hpt.controller.elastic import ProtectionPlan, parse_redundancy

MAX_NODES = 1024
MAX_PROCS_PER_NODE = 64
MAX_RESTARTS = 1000
MAX_COMMAND_ARGS = 256
MAX_ARG_BYTES = 16 * 1024
MAX_ENV_VARS = 256
MAX_ENV_VALUE_BYTES = 32 * 1024
MAX_SPEC_BYTES = 1024 * 1024
"""One size budget for the whole spec (command, env, paths): a spec within it fits every hop
(submit, the stored record, the launch command on each agent's stream, a page of ``ls``) with
the channels' 16 MiB limits to spare, however many restarts the job goes through."""
MAX_NODE_WAIT_S = 7 * 24 * 3600.0
MAX_GRACE_S = 3600.0
MAX_HANG_TIMEOUT_S = 7 * 24 * 3600.0
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED_ENV = frozenset(
    {
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "NODE_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "TORCHELASTIC_RESTART_COUNT",
    }
)
RESERVED_ENV_PREFIX = "HPT_"
FAULT_ENV_PREFIX = "HPT_FAULT_"
"""Fault-injection knobs (hpt/_faults.py) are the one HPT_ family a job may set."""


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


@dataclass(frozen=True, kw_only=True, slots=True)
class JobSpec:
    """What a user asked to run; validated on construction, stored unchanged."""

    command: tuple[str, ...]
    """argv of every rank; ``python`` resolves to the agent's interpreter."""
    nodes: int = 1
    """Nodes wanted (the maximum when elastic)."""
    procs_per_node: int = 1
    """Ranks per node."""
    min_nodes: int = 0
    """Fewest nodes the job may shrink to after a fault; 0 means ``nodes`` (not elastic)."""
    max_restarts: int = 3
    """Attempts after the first before the job fails."""
    env: tuple[tuple[str, str], ...] = ()
    """Extra environment for every rank, sorted by name."""
    name: str = ""
    """DNS-1123 label; empty means one is derived from the job id."""
    workdir: str = ""
    """Working directory of the ranks on every node; empty means the agent's."""
    node_wait_timeout_s: float = 300.0
    """How long a job waits for enough healthy nodes before it fails."""
    stop_grace_s: float = 5.0
    """Seconds between SIGTERM and SIGKILL when ranks are stopped."""
    persist_dir: str = ""
    """Directory (local or shared) the agents persist snapshots to; empty: never persist."""
    persist_every: int = 0
    """Persist every Nth complete snapshot (by step number); 0: never."""
    keep_persisted: int = 3
    """Persisted checkpoints kept per rank (older ones are deleted)."""
    straggler_restart_after: int = 0
    """0: stragglers are reported only. N: once a rank was flagged as a straggler for N of its
    steps, the attempt restarts without that rank's node (within min_nodes)."""
    hang_timeout_s: float = 0.0
    """0: the automatic hang deadline, applied once the script reports steps (``hpt.step``).
    S: no progress (step, section end) for S seconds is a hang once the attempt stepped, and
    for max(S, the start-up deadline) before; also for a script without hooks. A
    ``hpt.section(timeout=)`` overrides both."""
    redundancy: str = ""
    """Snapshot protection across nodes: "K+M" (Reed-Solomon, k data + m parity nodes per
    group), "" (m = 1, k from the node count; 2 nodes: a mirror) or "off"."""

    def __post_init__(self) -> None:
        if not self.command:
            raise ValueError("command must not be empty")
        if len(self.command) > MAX_COMMAND_ARGS:
            raise ValueError(f"command has {len(self.command)} args, at most {MAX_COMMAND_ARGS}")
        for i, arg in enumerate(self.command):
            if "\x00" in arg or len(arg.encode()) > MAX_ARG_BYTES:
                raise ValueError(f"command[{i}] must be <= {MAX_ARG_BYTES} bytes without NUL")
        if not self.command[0]:
            raise ValueError("command[0] must not be empty")
        if not 1 <= self.nodes <= MAX_NODES:
            raise ValueError(f"nodes ({self.nodes}) must be in 1..{MAX_NODES}")
        if not 1 <= self.procs_per_node <= MAX_PROCS_PER_NODE:
            raise ValueError(
                f"procs_per_node ({self.procs_per_node}) must be in 1..{MAX_PROCS_PER_NODE}"
            )
        if not 0 <= self.min_nodes <= self.nodes:
            raise ValueError(f"min_nodes ({self.min_nodes}) must be in 0..nodes ({self.nodes})")
        if not 0 <= self.max_restarts <= MAX_RESTARTS:
            raise ValueError(f"max_restarts ({self.max_restarts}) must be in 0..{MAX_RESTARTS}")
        if len(self.env) > MAX_ENV_VARS:
            raise ValueError(f"env has {len(self.env)} variables, at most {MAX_ENV_VARS}")
        for key, value in self.env:
            if not _ENV_NAME.match(key):
                raise ValueError(f"env name {key!r} must match [A-Za-z_][A-Za-z0-9_]*")
            if key in RESERVED_ENV or (
                key.startswith(RESERVED_ENV_PREFIX) and not key.startswith(FAULT_ENV_PREFIX)
            ):
                raise ValueError(f"env name {key!r} is reserved: hpt sets it for every rank")
            if "\x00" in value or len(value.encode()) > MAX_ENV_VALUE_BYTES:
                raise ValueError(f"env[{key}] must be <= {MAX_ENV_VALUE_BYTES} bytes without NUL")
        sizes = {
            "command": sum(len(arg.encode()) for arg in self.command),
            "env": sum(len(k) + len(v.encode()) for k, v in self.env),
            "workdir": len(self.workdir.encode()),
            "persist_dir": len(self.persist_dir.encode()),
        }
        if sum(sizes.values()) > MAX_SPEC_BYTES:
            biggest = max(sizes, key=lambda k: sizes[k])
            raise ValueError(
                f"{biggest} ({sizes[biggest]} bytes) makes the spec {sum(sizes.values())} bytes; "
                f"a spec must be <= {MAX_SPEC_BYTES} bytes in all (command, env and paths)"
            )
        if self.name and not _DNS1123.match(self.name):
            raise ValueError(
                f"name ({self.name!r}) must be a DNS-1123 label: lowercase letters, digits "
                "and '-', at most 63, starting and ending with a letter or digit"
            )
        if self.workdir and (not self.workdir.startswith("/") or "\x00" in self.workdir):
            raise ValueError(f"workdir ({self.workdir!r}) must be an absolute path")
        if not 0 < self.node_wait_timeout_s <= MAX_NODE_WAIT_S:
            raise ValueError(
                f"node_wait_timeout_s ({self.node_wait_timeout_s}) must be in (0, {MAX_NODE_WAIT_S}]"
            )
        if not 0 <= self.stop_grace_s <= MAX_GRACE_S:
            raise ValueError(f"stop_grace_s ({self.stop_grace_s}) must be in 0..{MAX_GRACE_S}")
        if self.persist_dir and (not self.persist_dir.startswith("/") or "\x00" in self.persist_dir):
            raise ValueError(f"persist_dir ({self.persist_dir!r}) must be an absolute path")
        if not 0 <= self.persist_every <= 1_000_000:
            raise ValueError(f"persist_every ({self.persist_every}) must be in 0..1000000")
        if self.persist_every and not self.persist_dir:
            raise ValueError(f"persist_every ({self.persist_every}) needs persist_dir")
        if not 1 <= self.keep_persisted <= 1000:
            raise ValueError(f"keep_persisted ({self.keep_persisted}) must be in 1..1000")
        if not 0 <= self.straggler_restart_after <= 100_000:
            raise ValueError(
                f"straggler_restart_after ({self.straggler_restart_after}) must be in 0..100000"
            )
        if not (0 <= self.hang_timeout_s <= MAX_HANG_TIMEOUT_S):  # also refuses NaN
            raise ValueError(
                f"hang_timeout_s ({self.hang_timeout_s}) must be in 0..{MAX_HANG_TIMEOUT_S:g}"
            )

        parse_redundancy(self.redundancy, self.nodes)

    @property
    def effective_min_nodes(self) -> int:
        return self.min_nodes or self.nodes


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
    end_cause: RankEndCause = RankEndCause.NONE
    """Set when the controller ended the rank itself (``exit_reason`` says it in words)."""

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

    def set_state(self, new: AttemptState, reason: str, now: float) -> AttemptState:
        return _transition(self, ATTEMPT_TRANSITIONS, new, reason, now)

    def ranks_on(self, node: str) -> list[Rank]:
        return [r for r in self.ranks if r.node == node]

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
class LaunchCommand:
    job_id: str
    attempt: int
    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    ranks: tuple[tuple[int, int], ...]
    """(rank, local_rank) pairs this node runs."""
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    workdir: str
    node_rank: int
    num_nodes: int
    restore_step: int = 0
    """Newest snapshot complete on every rank (0: start fresh)."""
    persist_dir: str = ""
    persist_every: int = 0
    keep_persisted: int = 3
    hang_timeout_s: float = 0.0
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
class RankReport:
    """What an agent says about one rank of one (job, attempt)."""

    job_id: str
    attempt: int
    rank: Rank
