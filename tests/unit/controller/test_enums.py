"""The closed vocabularies decisions read (fault kinds and classes, rank end causes, stop causes,
hang culprits, event kinds) travel as enums; the text fields beside them are display only."""

from __future__ import annotations

import pytest

from hpt._proto import agent_pb2
from hpt._proto import common_pb2 as pb
from hpt.agent.snapshots import event_kind as agent_event_kind
from hpt.controller import convert
from hpt.controller.model import (
    Event,
    EventKind,
    Fault,
    FaultClass,
    FaultKind,
    HangCulprit,
    Rank,
    RankEndCause,
    RankState,
    StopCause,
    StopCommand,
)
from hpt.monitor.records import FindingKind


@pytest.mark.parametrize("enum,wire,prefix", [
    (FaultKind, pb.FaultKind, "FAULT_KIND_"),
    (FaultClass, pb.FaultClass, "FAULT_CLASS_"),
    (EventKind, pb.EventKind, "EVENT_KIND_"),
    (StopCause, agent_pb2.StopCause, "STOP_CAUSE_"),
    (HangCulprit, agent_pb2.HangCulprit, "HANG_CULPRIT_"),
])
def test_every_member_of_a_decision_enum_has_its_wire_value(enum, wire, prefix):
    wire_names = {n for n in wire.keys() if not n.endswith("UNSPECIFIED")}  # noqa: SIM118
    assert {prefix + m.name for m in enum if m.name != "UNSPECIFIED"} == wire_names


def test_every_rank_end_cause_but_none_has_its_wire_value():
    wire_names = {n for n in pb.RankEndCause.keys() if not n.endswith("UNSPECIFIED")}  # noqa: SIM118
    assert {"RANK_END_CAUSE_" + m.name for m in RankEndCause if m != RankEndCause.NONE} == wire_names


def test_every_finding_of_the_monitor_is_an_event_kind():
    for kind in FindingKind:
        assert EventKind(kind.value).value == kind.value


@pytest.mark.parametrize("kind", list(FaultKind))
def test_a_fault_round_trips_by_its_enum_even_when_its_display_name_is_rewritten(kind):
    fault = Fault(kind=kind, attempt=2, node="n", rank=1, message="m",
                  classification=FaultClass.OOM)
    msg = convert.fault_to_proto(fault)
    msg.kind, msg.classification = "shown differently", "also"
    back = convert.fault_from_proto(msg)
    assert back is not None and (back.kind, back.classification) == (kind, FaultClass.OOM)


def test_a_fault_stored_before_the_enum_fields_reads_its_names():
    back = convert.fault_from_proto(pb.Fault(kind="node_lost", classification="infra", node="n"))
    assert back is not None and (back.kind, back.classification) == (
        FaultKind.NODE_LOST, FaultClass.INFRA)


@pytest.mark.parametrize("cause", list(RankEndCause))
def test_a_ranks_end_cause_round_trips_whatever_its_exit_reason_says(cause):
    rank = Rank(rank=0, local_rank=0, node="n", state=RankState.LOST, end_cause=cause,
                exit_reason="node lost: anything")
    assert convert.rank_from_proto(convert.rank_to_proto(rank)).end_cause == cause


@pytest.mark.parametrize("kind", list(EventKind))
def test_an_event_round_trips_by_its_enum(kind):
    event = Event(kind=kind, at=1.0, message="x", job_id="j")
    msg = convert.event_to_proto(event)
    assert msg.kind == kind.value
    msg.kind = ""
    assert convert.event_from_proto(msg, seq=3).kind == kind


def test_an_event_of_an_unknown_kind_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="no_such_kind"):
        convert.event_kind_from_proto(0, "no_such_kind")
    with pytest.raises(ValueError, match="event_kind"):
        convert.event_kind_from_proto(999, "fault")


@pytest.mark.parametrize("cause", list(StopCause))
def test_a_stop_carries_its_cause_on_the_wire(cause):
    msg = convert.stop_to_proto(StopCommand(job_id="j", attempt=1, grace_s=0.0,
                                            reason="whatever words", cause=cause))
    assert msg.cause == agent_pb2.StopCause.Value(f"STOP_CAUSE_{cause.name}")


def test_the_agents_event_names_map_to_the_wire_enum_and_unknown_ones_are_refused():
    for name in ("restore_failed", "persist_failed", "teardown_crash", "snapshot_rebuilt",
                 "checkpoint_skipped", "restored"):
        assert convert.event_kind_from_proto(agent_event_kind(name), "") == EventKind(name)
    with pytest.raises(ValueError, match="bogus"):
        agent_event_kind("bogus")


def test_an_unknown_hang_culprit_reads_as_unspecified():
    assert convert.hang_culprit_from_proto(agent_pb2.HANG_CULPRIT_STOPPED) == HangCulprit.STOPPED
    assert convert.hang_culprit_from_proto(77) == HangCulprit.UNSPECIFIED


def test_rank_and_node_tables_cover_every_state_and_refuse_edges_off_them():
    from hpt.controller.model import (
        NODE_TRANSITIONS,
        RANK_TRANSITIONS,
        IllegalTransitionError,
        Node,
        NodeState,
    )

    assert set(RANK_TRANSITIONS) == set(RankState) and set(NODE_TRANSITIONS) == set(NodeState)
    assert all(not RANK_TRANSITIONS[s] for s in RankState if s.is_terminal)
    rank = Rank(rank=0, local_rank=0, node="n")
    assert rank.set_state(RankState.LOST, "node lost: x", RankEndCause.NODE_LOST) == RankState.PENDING
    assert (rank.exit_reason, rank.end_cause) == ("node lost: x", RankEndCause.NODE_LOST)
    with pytest.raises(IllegalTransitionError, match="LOST -> RUNNING"):
        rank.set_state(RankState.RUNNING)
    node = Node(name="n", address="h", slots=1, state=NodeState.LOST)
    with pytest.raises(IllegalTransitionError, match="LOST -> UNKNOWN"):
        node.set_state(NodeState.UNKNOWN, "restart")
    assert node.set_state(NodeState.READY, "back") == NodeState.LOST and node.reason == "back"
