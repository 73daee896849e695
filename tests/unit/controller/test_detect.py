"""Decision tests of the controller's detection hub: which rank a hang names, and when."""

from __future__ import annotations

import time

from hpt._proto import agent_pb2
from hpt.controller.detect import Detection, DetectionConfig, health_problem
from hpt.controller.model import FaultClass, FaultKind

NODES = {0: "node-0", 1: "node-0", 2: "node-1", 3: "node-1"}


def make(settle_s: float = 0.0) -> tuple[Detection, list]:
    events: list = []
    det = Detection(
        events.append,
        lambda job, attempt: NODES if job == "j" else None,
        DetectionConfig(settle_s=settle_s),
    )
    return det, events


def hang(rank: int, node: str, reason: str, states: str = "",
         culprit: int = agent_pb2.HANG_CULPRIT_SILENT_LONGEST) -> agent_pb2.Finding:
    """An agent's hang report; the controller reads ``culprit``, the evidence is for people."""
    return agent_pb2.Finding(
        culprit=culprit,
        kind="hang",
        job_id="j",
        attempt=1,
        rank=rank,
        node=node,
        message=f"rank {rank} ({node}) made no progress",
        evidence={"culprit_reason": reason, "proc_states": states},
        silent_since=time.time() - 6,
        detected_at=time.time(),
        stacks=[agent_pb2.RankStack(rank=rank, pid=1, text="File x")],
    )


def beat(*findings: agent_pb2.Finding, colls=()) -> agent_pb2.Heartbeat:  # type: ignore[no-untyped-def]
    hb = agent_pb2.Heartbeat(findings=list(findings))
    for rank, seq, in_flight in colls:
        hb.collectives.add(
            job_id="j",
            attempt=1,
            rank=rank,
            seq=seq,
            op="all_reduce",
            enter_s=1.0,
            exit_s=0.0 if in_flight else 1.5,
            in_flight=in_flight,
        )
    return hb


def test_a_stopped_rank_reported_by_one_node_wins_over_the_other_nodes_guess():
    det, events = make()
    det.on_heartbeat("node-0", beat(hang(0, "node-0", "it has been silent longest")))
    det.on_heartbeat("node-1", beat(hang(2, "node-1", "its process is stopped", "2:T,3:S",
                                              agent_pb2.HANG_CULPRIT_STOPPED)))
    fault = det.pending_fault("j", 1, {"node-0", "node-1"}, now=time.time())
    assert fault is not None and fault.kind is FaultKind.HANG
    assert (fault.rank, fault.node, fault.classification) == (2, "node-1", FaultClass.INFRA)
    assert [e.kind for e in events].count("hang") == 2
    assert [e.kind for e in events].count("stacks") == 2


def test_the_rank_missing_from_the_stuck_collective_is_the_culprit():
    det, _ = make()
    colls = [(r, 4, False) for r in range(4)] + [(0, 5, True), (1, 5, True), (2, 5, True)]
    det.on_heartbeat("node-0", beat(colls=colls))
    det.on_heartbeat("node-0", beat(hang(0, "node-0", "it has been silent longest")))
    det.on_heartbeat("node-1", beat(hang(2, "node-1", "it has been silent longest")))
    fault = det.pending_fault("j", 1, {"node-0", "node-1"}, now=time.time())
    assert fault is not None and fault.rank == 3 and fault.node == "node-1"
    assert "never entered all_reduce seq 5" in fault.message


def test_the_fault_waits_for_every_running_node_until_the_settle_time_and_is_taken_once():
    det, _ = make(settle_s=60.0)
    det.on_heartbeat("node-0", beat(hang(1, "node-0", "it is in no collective while ...",
                                              culprit=agent_pb2.HANG_CULPRIT_OUTSIDE_COLLECTIVE)))
    assert det.pending_fault("j", 1, {"node-0", "node-1"}, now=time.time()) is None
    fault = det.pending_fault("j", 1, {"node-0"}, now=time.time())
    assert fault is not None and fault.rank == 1
    assert det.pending_fault("j", 1, {"node-0"}, now=time.time()) is None


def test_findings_of_an_unknown_job_are_ignored():
    det, events = make()
    f = hang(0, "node-0", "x")
    f.job_id = "other"
    det.on_heartbeat("node-0", beat(f))
    assert events == [] and det.pending_fault("other", 1, {"node-0"}, time.time()) is None


def test_invalid_records_are_dropped_not_fed_to_the_detectors():
    det, _ = make()
    hb = agent_pb2.Heartbeat()
    hb.steps.add(job_id="j", attempt=1, rank=0, step=1, start_s=2.0, end_s=1.0)
    hb.steps.add(job_id="j", attempt=1, rank=0, step=2, start_s=1.0, end_s=float("nan"))
    det.on_heartbeat("node-0", hb)
    assert det.num_records == 0


def test_a_failed_health_check_quarantines_and_a_skipped_one_does_not():
    reg = agent_pb2.Register(health=agent_pb2.HealthReport(ran=True, ok=False, reason="gpu0: bad"))
    assert health_problem(reg) == "health check failed: gpu0: bad"
    assert health_problem(agent_pb2.Register()) == ""
    ok = agent_pb2.Register(health=agent_pb2.HealthReport(ran=True, ok=True, reason="healthy"))
    assert health_problem(ok) == ""
