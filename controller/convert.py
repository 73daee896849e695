"""Model <-> protobuf, in one place. Generated classes go no further than here and server.py."""

from __future__ import annotations

import dataclasses
import math
import operator
import threading
from collections.abc import Iterable, Mapping

from hpt import jobspec
from hpt._proto import agent_pb2, checkpoint_pb2
from hpt._proto import common_pb2 as pb
from hpt.controller.elastic import ProtectionPlan
from hpt.controller.model import (
    Attempt,
    AttemptState,
    Event,
    EventKind,
    ExitInfo,
    Fault,
    FaultClass,
    FaultKind,
    HangCulprit,
    Job,
    JobSpec,
    JobState,
    LaunchCommand,
    Node,
    NodeState,
    Rank,
    RankEndCause,
    RankState,
    RestoreCommand,
    StateChange,
    StopCause,
    StopCommand,
)

# Wire enums are prefixed (JOB_STATE_RUNNING); the model's values are the bare names.
_JOB = {s: pb.JobState.Value(f"JOB_STATE_{s.value}") for s in JobState}
_ATTEMPT = {s: pb.AttemptState.Value(f"ATTEMPT_STATE_{s.value}") for s in AttemptState}
_RANK = {s: pb.RankState.Value(f"RANK_STATE_{s.value}") for s in RankState}
_NODE = {s: pb.NodeState.Value(f"NODE_STATE_{s.value}") for s in NodeState}
_JOB_BACK = {v: k for k, v in _JOB.items()}
_ATTEMPT_BACK = {v: k for k, v in _ATTEMPT.items()}
_RANK_BACK = {v: k for k, v in _RANK.items()}
_NODE_BACK = {v: k for k, v in _NODE.items()}
# Closed vocabularies that decisions read (the records' text fields are for display only).
_FAULT_KIND = {k: pb.FaultKind.Value(f"FAULT_KIND_{k.name}") for k in FaultKind}
_FAULT_CLASS = {c: pb.FaultClass.Value(f"FAULT_CLASS_{c.name}") for c in FaultClass}
_END_CAUSE = {c: pb.RankEndCause.Value(f"RANK_END_CAUSE_{c.name}") for c in RankEndCause
              if c != RankEndCause.NONE} | {RankEndCause.NONE: pb.RANK_END_CAUSE_UNSPECIFIED}
_EVENT_KIND = {k: pb.EventKind.Value(f"EVENT_KIND_{k.name}") for k in EventKind}
_STOP_CAUSE = {c: agent_pb2.StopCause.Value(f"STOP_CAUSE_{c.name}") for c in StopCause}
_HANG_CULPRIT = {c: agent_pb2.HangCulprit.Value(f"HANG_CULPRIT_{c.name}") for c in HangCulprit}
_FAULT_KIND_BACK = {v: k for k, v in _FAULT_KIND.items()}
_FAULT_CLASS_BACK = {v: k for k, v in _FAULT_CLASS.items()}
_END_CAUSE_BACK = {v: k for k, v in _END_CAUSE.items()}
_EVENT_KIND_BACK = {v: k for k, v in _EVENT_KIND.items()}
_HANG_CULPRIT_BACK = {v: k for k, v in _HANG_CULPRIT.items()}


def event_kind_from_proto(value: int, name: str) -> EventKind:
    """The kind of an event on the wire. ``name`` is read only for records written before the
    enum field existed (their ``event_kind`` is unset). Raises ValueError when unknown."""
    if value:
        try:
            return _EVENT_KIND_BACK[value]
        except KeyError:
            raise ValueError(f"event_kind ({value}) is not a known EventKind") from None
    try:
        return EventKind(name)
    except ValueError:
        raise ValueError(f"event kind ({name[:70]!r}) is not a known EventKind") from None


def hang_culprit_from_proto(value: int) -> HangCulprit:
    """Unknown values (a newer agent) read as UNSPECIFIED: the culprit is then judged from
    the collective records and silence alone."""
    return _HANG_CULPRIT_BACK.get(value, HangCulprit.UNSPECIFIED)


def stop_to_proto(cmd: StopCommand) -> agent_pb2.Stop:
    return agent_pb2.Stop(job_id=cmd.job_id, attempt=cmd.attempt, grace_s=cmd.grace_s,
                          reason=cmd.reason, cause=_STOP_CAUSE[cmd.cause])


def rank_state_from_proto(value: int) -> RankState:
    try:
        return _RANK_BACK[value]
    except KeyError:
        raise ValueError(f"rank state ({value}) is not a known RankState") from None


def spec_from_proto(msg: pb.JobSpec) -> JobSpec:
    """Raises ValueError naming the field when the spec is invalid."""
    return jobspec.from_proto(msg)


def spec_to_proto(spec: JobSpec) -> pb.JobSpec:
    return jobspec.to_proto(spec, pb.JobSpec())


def exit_to_proto(info: ExitInfo) -> pb.ExitInfo:
    return pb.ExitInfo(
        exit_code=info.exit_code,
        signal=info.signal,
        error_type=info.error_type,
        error_message=info.error_message,
        traceback=info.traceback,
        ended_at=info.ended_at,
    )


def exit_from_proto(msg: pb.ExitInfo) -> ExitInfo:
    return ExitInfo(
        exit_code=msg.exit_code,
        signal=msg.signal,
        error_type=msg.error_type,
        error_message=msg.error_message,
        traceback=msg.traceback,
        ended_at=msg.ended_at,
    )


def fault_to_proto(fault: Fault) -> pb.Fault:
    return pb.Fault(
        kind=fault.kind.value,
        fault_kind=_FAULT_KIND[fault.kind],
        fault_class=_FAULT_CLASS[fault.classification],
        node=fault.node,
        rank=fault.rank,
        message=fault.message,
        detected_at=fault.detected_at,
        occurred_at=fault.occurred_at,
        classification=fault.classification.value,
        attempt=fault.attempt,
        steps_lost=fault.steps_lost,
    )


def fault_from_proto(msg: pb.Fault) -> Fault | None:
    if not msg.kind:
        return None
    return Fault(
        # records written before the enum fields existed carry only the names
        kind=_FAULT_KIND_BACK[msg.fault_kind] if msg.fault_kind else FaultKind(msg.kind),
        node=msg.node,
        rank=msg.rank,
        message=msg.message,
        detected_at=msg.detected_at,
        occurred_at=msg.occurred_at,
        classification=(_FAULT_CLASS_BACK[msg.fault_class] if msg.fault_class
                        else FaultClass(msg.classification)),
        attempt=msg.attempt,
        steps_lost=msg.steps_lost,
    )


def _history_to_proto(history: list[StateChange]) -> list[pb.StateChange]:
    return [pb.StateChange(state=h.state, at=h.at, reason=h.reason) for h in history]


def _history_from_proto(history) -> list[StateChange]:  # type: ignore[no-untyped-def]
    return [StateChange(h.state, h.at, h.reason) for h in history]


def rank_to_proto(rank: Rank) -> pb.RankStatus:
    msg = pb.RankStatus(
        rank=rank.rank,
        local_rank=rank.local_rank,
        node=rank.node,
        pid=rank.pid,
        state=_RANK[rank.state],
        step=rank.step,
        step_at=rank.step_at,
        first_step_at=rank.first_step_at,
        exit_reason=rank.exit_reason,
        snapshot_steps=list(rank.snapshot_steps),
        persisted_steps=list(rank.persisted_steps),
        snapshot_bytes=rank.snapshot_bytes,
        persist_s=rank.persist_s,
        snapshot_replicated=rank.snapshot_replicated,
        snapshot_split=rank.snapshot_split,
        snapshot_blocked_s=rank.snapshot_blocked_s,
        end_cause=_END_CAUSE[rank.end_cause],
    )
    if rank.exit is not None:
        msg.exit.CopyFrom(exit_to_proto(rank.exit))
    return msg


def _seconds(value: float) -> float:
    """A duration an agent reported; 0 (not measured) when it is not one (NaN, negative)."""
    return value if math.isfinite(value) and value >= 0 else 0.0


MAX_SPLIT_TEXT = 4096
"""Longest ``RankStatus.snapshot_split`` kept (``EvenSplit.encode`` of at most
``MAX_SPLIT_SIZES`` sizes is shorter)."""


def rank_from_proto(msg: pb.RankStatus) -> Rank:
    return Rank(
        rank=msg.rank,
        local_rank=msg.local_rank,
        node=msg.node,
        pid=msg.pid,
        state=rank_state_from_proto(msg.state),
        exit=exit_from_proto(msg.exit) if msg.HasField("exit") else None,
        step=msg.step,
        step_at=msg.step_at,
        first_step_at=msg.first_step_at,
        exit_reason=msg.exit_reason,
        snapshot_steps=tuple(msg.snapshot_steps),
        persisted_steps=tuple(msg.persisted_steps),
        snapshot_bytes=msg.snapshot_bytes,
        persist_s=msg.persist_s,
        snapshot_replicated=msg.snapshot_replicated,
        # (longer than any split an agent sends: not kept, so one agent cannot bloat the record)
        snapshot_split=msg.snapshot_split if len(msg.snapshot_split) <= MAX_SPLIT_TEXT else "",
        snapshot_blocked_s=_seconds(msg.snapshot_blocked_s),
        end_cause=_END_CAUSE_BACK.get(msg.end_cause, RankEndCause.NONE),
    )


def attempt_to_proto(attempt: Attempt, *, ranks: bool = True) -> pb.Attempt:
    msg = pb.Attempt(
        number=attempt.number,
        state=_ATTEMPT[attempt.state],
        nodes=attempt.nodes,
        master_addr=attempt.master_addr,
        master_port=attempt.master_port,
        world_size=attempt.world_size,
        ranks=[rank_to_proto(r) for r in attempt.ranks] if ranks else [],
        history=_history_to_proto(attempt.history),
        started_at=attempt.started_at,
        first_step_at=attempt.first_step_at,
        ended_at=attempt.ended_at,
        restore_step=attempt.restore_step,
        protected_steps=attempt.protected_steps,
        redundancy=attempt.redundancy,
        parity_bytes=attempt.parity_bytes,
    )
    if attempt.cause is not None:
        msg.cause.CopyFrom(fault_to_proto(attempt.cause))
    return msg


def attempt_from_proto(msg: pb.Attempt) -> Attempt:
    return Attempt(
        number=msg.number,
        state=_ATTEMPT_BACK[msg.state],
        nodes=list(msg.nodes),
        master_addr=msg.master_addr,
        master_port=msg.master_port,
        world_size=msg.world_size,
        ranks=[rank_from_proto(r) for r in msg.ranks],
        history=_history_from_proto(msg.history),
        started_at=msg.started_at,
        first_step_at=msg.first_step_at,
        ended_at=msg.ended_at,
        cause=fault_from_proto(msg.cause),
        restore_step=msg.restore_step,
        protected_steps=tuple(msg.protected_steps),
        redundancy=msg.redundancy,
        parity_bytes=msg.parity_bytes,
    )


def job_to_proto(job: Job, *, attempts: bool = True) -> pb.Job:
    msg = pb.Job(
        id=job.id,
        spec=spec_to_proto(job.spec),
        state=_JOB[job.state],
        attempts=[attempt_to_proto(a) for a in job.attempts] if attempts else [],
        history=_history_to_proto(job.history),
        created_at=job.created_at,
        reason=job.reason,
        restarts=job.restarts,
        deadline_at=job.deadline_at,
        cancel_requested=job.cancel_requested,
        excluded_nodes=job.excluded_nodes,
        persist_every=job.persist_every,
        snapshot_every=job.snapshot_every,
    )
    if job.root_cause is not None:
        msg.root_cause.CopyFrom(fault_to_proto(job.root_cause))
    return msg


def job_from_proto(msg: pb.Job) -> Job:
    return Job(
        id=msg.id,
        spec=spec_from_proto(msg.spec),
        state=_JOB_BACK[msg.state],
        attempts=[attempt_from_proto(a) for a in msg.attempts],
        history=_history_from_proto(msg.history),
        created_at=msg.created_at,
        reason=msg.reason,
        root_cause=fault_from_proto(msg.root_cause),
        restarts=msg.restarts,
        deadline_at=msg.deadline_at,
        cancel_requested=msg.cancel_requested,
        excluded_nodes=list(msg.excluded_nodes),
        persist_every=msg.persist_every,
        snapshot_every=msg.snapshot_every,
    )


def node_to_proto(node: Node) -> pb.Node:
    return pb.Node(
        name=node.name,
        address=node.address,
        state=_NODE[node.state],
        slots=node.slots,
        last_seen_at=node.last_seen_at,
        reason=node.reason,
        hostname=node.hostname,
        warm_ready=node.warm_ready,
        peer_address=node.peer_address,
    )


def node_from_proto(msg: pb.Node) -> Node:
    return Node(
        name=msg.name,
        address=msg.address,
        state=_NODE_BACK[msg.state],
        slots=msg.slots,
        last_seen_at=msg.last_seen_at,
        reason=msg.reason,
        hostname=msg.hostname,
        warm_ready=msg.warm_ready,
        peer_address=msg.peer_address,
    )


def event_to_proto(event: Event) -> pb.Event:
    return pb.Event(
        seq=event.seq,
        at=event.at,
        kind=event.kind.value,
        event_kind=_EVENT_KIND[event.kind],
        job_id=event.job_id,
        attempt=event.attempt,
        node=event.node,
        rank=event.rank,
        message=event.message,
    )


def event_from_proto(msg: pb.Event, seq: int) -> Event:
    return Event(
        seq=seq,
        at=msg.at,
        kind=event_kind_from_proto(msg.event_kind, msg.kind),
        job_id=msg.job_id,
        attempt=msg.attempt,
        node=msg.node,
        rank=msg.rank,
        message=msg.message,
    )


def _tagged(field_number: int, payload: bytes) -> bytes:
    """``payload`` as one occurrence of the length-delimited field ``field_number``."""
    return _varint(field_number << 3 | 2) + _varint(len(payload)) + payload


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_JOB_ATTEMPTS = pb.Job.DESCRIPTOR.fields_by_name["attempts"].number
_ATTEMPT_RANKS = pb.Attempt.DESCRIPTOR.fields_by_name["ranks"].number


_RANK_KEY = operator.attrgetter(*(f.name for f in dataclasses.fields(Rank) if f.name != "wire"))
"""Every field of a Rank but its kept bytes, as one tuple (read in C)."""


def _rank_bytes(rank: Rank) -> bytes:
    """``rank_to_proto(rank)`` serialized, made again only when one of its fields changed
    (ExitInfo is replaced, never changed in place)."""
    key = _RANK_KEY(rank)
    wire = rank.wire
    if wire is None or wire[0] != key:
        wire = rank.wire = (key, rank_to_proto(rank).SerializeToString())
    return wire[1]


def job_to_bytes(job: Job) -> bytes:
    """The job's record as ``job_to_proto(job).SerializeToString()`` parses, built from each
    rank's kept bytes: a repeated field is its occurrences one after the other, so the job
    without its attempts, then each attempt without its ranks, then its ranks, is the same
    message. Building the protos of 16,000 ranks took 44 ms a write (80,000: 0.2 s), a fifth
    of the controller's CPU at 2,000 agents."""
    msg = job_to_proto(job, attempts=False)
    out = [msg.SerializeToString()]
    for attempt in job.attempts:
        head = attempt_to_proto(attempt, ranks=False).SerializeToString()
        out.append(_tagged(_JOB_ATTEMPTS, head + b"".join(
            _tagged(_ATTEMPT_RANKS, _rank_bytes(r)) for r in attempt.ranks)))
    return b"".join(out)


def job_from_bytes(data: bytes) -> Job:
    msg = pb.Job()
    msg.ParseFromString(data)
    return job_from_proto(msg)


def node_to_bytes(node: Node) -> bytes:
    return node_to_proto(node).SerializeToString()


def node_from_bytes(data: bytes) -> Node:
    msg = pb.Node()
    msg.ParseFromString(data)
    return node_from_proto(msg)


def event_to_bytes(event: Event) -> bytes:
    return event_to_proto(event).SerializeToString()


def event_from_bytes(data: bytes, seq: int) -> Event:
    msg = pb.Event()
    msg.ParseFromString(data)
    return event_from_proto(msg, seq)


def protection_to_proto(plan: ProtectionPlan) -> checkpoint_pb2.ProtectionLayout:
    return checkpoint_pb2.ProtectionLayout(
        k=plan.k, m=plan.m,
        nodes=[checkpoint_pb2.GroupNode(node=n.node, peer_address=n.peer_address, ranks=n.ranks)
               for n in plan.nodes],
        stripes=[checkpoint_pb2.Stripe(data=d, parity=p) for d, p in plan.stripes],
    )


REFERENCE_NODES = 8
"""Nodes after its own whose ranks a node may ask for a replica of its ranks' snapshots (the
agent's ``Layout.references``): they are in every node's share of a layout."""


def protection_share_to_proto(plan: ProtectionPlan, index: int | None,
                              stripes_of: Mapping[int, list[int]],
                              rebuilt: Iterable[int] = (), read: Iterable[int] = (),
                              ) -> checkpoint_pb2.ProtectionLayout:
    """The share of ``plan`` a node needs (``ProtectionLayout.num_nodes`` set): for node
    ``index`` (None: a node not in the plan) the stripes it is a member of, the nodes in them
    and the next ``REFERENCE_NODES`` nodes (what a launch needs); for each node in ``rebuilt``
    the same (a restore decodes its blob: its stripes, their members, the replicas its thin
    blob names); and the nodes in ``read`` (a restore reads their ranks' snapshots).
    ``stripes_of``: node index -> the stripes it is a member of.

    Every stripe of a group is among its nodes' stripes (a group's stripes all span the
    group), so a parity holder finds each data member's stripes, and the segment it serves,
    in its share."""
    n = len(plan.nodes)
    members = set(read)
    stripes: set[int] = set()
    for node in ([index] if index is not None else []) + list(rebuilt):
        members.add(node)
        members.update((node + d) % n for d in range(1, min(n, REFERENCE_NODES + 1)))
        stripes.update(stripes_of.get(node, []))
    for j in stripes:
        members.update(plan.stripes[j][0])
        members.update(plan.stripes[j][1])
    return checkpoint_pb2.ProtectionLayout(
        k=plan.k, m=plan.m, num_nodes=n,
        nodes=[checkpoint_pb2.GroupNode(node=plan.nodes[i].node,
                                        peer_address=plan.nodes[i].peer_address,
                                        ranks=plan.nodes[i].ranks, index=i)
               for i in sorted(members)],
        stripes=[checkpoint_pb2.Stripe(data=plan.stripes[j][0], parity=plan.stripes[j][1],
                                       index=j) for j in sorted(stripes)],
    )


class _EncodedLayouts:
    """The serialized layout of the last few plans, by identity: every node of an attempt gets
    the same plan object in its launch, and building the layout anew for each node made a
    launch O(nodes^2) in Python (80 s of CPU for 1,000 nodes, tests/bench/bench_scale.py).
    Merging the bytes parses in C. A launch carries the node's share of it
    (:func:`protection_share_to_proto`; the whole layout to every node was still O(nodes^2)
    bytes: a third of the controller's CPU over a 2,000-node launch, merging and writing
    them), and so does a restore plan (:meth:`restore_share`)."""

    def __init__(self, size: int = 4) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._entries: dict[int, tuple[ProtectionPlan, bytes]] = {}
        self._stripes: dict[int, tuple[ProtectionPlan, dict[str, int], dict[int, list[int]],
                                       dict[int, int]]] = {}

    def get(self, plan: ProtectionPlan) -> bytes:
        with self._lock:
            hit = self._entries.get(id(plan))
            if hit is not None and hit[0] is plan:
                return hit[1]
        data = protection_to_proto(plan).SerializeToString()
        with self._lock:
            if len(self._entries) >= self._size:
                self._entries.pop(next(iter(self._entries)))
            self._entries[id(plan)] = (plan, data)  # holding the plan keeps its id unique
        return data

    def _index(self, plan: ProtectionPlan) -> tuple[dict[str, int], dict[int, list[int]],
                                                    dict[int, int]]:
        """Node name -> index, node index -> its stripes, rank -> its node's index."""
        with self._lock:
            hit = self._stripes.get(id(plan))
        if hit is None or hit[0] is not plan:
            index = {n.node: i for i, n in enumerate(plan.nodes)}
            stripes_of: dict[int, list[int]] = {}
            for j, (data, parity) in enumerate(plan.stripes):
                for i in (*data, *parity):
                    stripes_of.setdefault(i, []).append(j)
            owners = {r: i for i, n in enumerate(plan.nodes) for r in n.ranks}
            hit = (plan, index, stripes_of, owners)
            with self._lock:
                if len(self._stripes) >= self._size:
                    self._stripes.pop(next(iter(self._stripes)))
                self._stripes[id(plan)] = hit
        return hit[1], hit[2], hit[3]

    def share(self, plan: ProtectionPlan, node: str) -> bytes:
        """The serialized share of ``plan`` a launch on ``node`` carries (the whole layout for
        a node that is not in it)."""
        index, stripes_of, _ = self._index(plan)
        i = index.get(node)
        if i is None:
            return self.get(plan)
        return protection_share_to_proto(plan, i, stripes_of).SerializeToString()

    def restore_share(self, plan: ProtectionPlan, node: str, need: Iterable[int]) -> bytes:
        """The serialized share of the old attempt's ``plan`` a restore on ``node`` reads:
        the nodes that ran the old ranks it needs, and what their blobs are decoded from (a
        lost node's; a live one's too when it cannot serve). At the same world size that is
        a node's group and its neighbours; after a resize, which may need every old rank, the
        whole layout."""
        index, stripes_of, owners = self._index(plan)
        read = {owners[r] for r in need if r in owners}
        return protection_share_to_proto(plan, index.get(node), stripes_of, rebuilt=read,
                                         read=read).SerializeToString()


_LAYOUTS = _EncodedLayouts()


def restore_to_proto(cmd: RestoreCommand, into: checkpoint_pb2.RestorePlan | None = None,
                     node: str = "") -> checkpoint_pb2.RestorePlan:
    """``cmd`` as ``node`` receives it: with the share of the old layout its restore reads
    (the whole layout without a node)."""
    msg = into if into is not None else checkpoint_pb2.RestorePlan()
    msg.step, msg.attempt, msg.world_size = cmd.step, cmd.attempt, cmd.world_size
    msg.layout.MergeFromString(
        _LAYOUTS.restore_share(cmd.layout, node, cmd.need_ranks) if node
        else _LAYOUTS.get(cmd.layout))
    msg.lost.extend(cmd.lost)
    msg.need_ranks.extend(cmd.need_ranks)
    msg.replicated = cmd.replicated
    msg.any_replica = cmd.any_replica
    return msg


def launch_to_proto(cmd: LaunchCommand, into: agent_pb2.Launch | None = None,
                    node: str = "") -> agent_pb2.Launch:
    """The spec goes whole: an option only agents use needs nothing here. ``into``: fill this
    message (the launch inside a ``ControllerMessage``) rather than a new one."""
    msg = into if into is not None else agent_pb2.Launch()
    msg.job_id, msg.attempt = cmd.job_id, cmd.attempt
    msg.spec.CopyFrom(spec_to_proto(cmd.spec))
    msg.ranks.extend(agent_pb2.LaunchRank(rank=r, local_rank=lr) for r, lr in cmd.ranks)
    msg.world_size, msg.local_world_size = cmd.world_size, cmd.local_world_size
    msg.master_addr, msg.master_port = cmd.master_addr, cmd.master_port
    msg.node_rank, msg.num_nodes, msg.restore_step = cmd.node_rank, cmd.num_nodes, cmd.restore_step
    if cmd.protection is not None:
        msg.protection.MergeFromString(_LAYOUTS.share(cmd.protection, node) if node
                                       else _LAYOUTS.get(cmd.protection))
    if cmd.restore is not None:
        restore_to_proto(cmd.restore, msg.restore, node)
    return msg
