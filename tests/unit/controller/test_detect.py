"""Decision tests of the controller's detection hub: which rank a hang names, and when."""

from __future__ import annotations

import time

from hpt._proto import agent_pb2
from hpt.agent import convert as agent_convert
from hpt.controller.detect import Detection, DetectionConfig, health_problem
from hpt.controller.model import FaultClass, FaultKind
from hpt.monitor.records import CollectiveRecord, StepRecord

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


# ---- the aggregated path: columnar summaries name the same culprits as records --------------

WIDE = {r: f"node-{r // 4}" for r in range(8)}


def _wide() -> tuple[Detection, list]:
    events: list = []
    return Detection(events.append, lambda job, attempt: WIDE if job == "j" else None), events


def _steps(slow_rank: int, num_steps: int) -> list[StepRecord]:
    return [StepRecord(job_id="j", attempt=1, rank=r, node=WIDE[r], step=s, start_s=float(s),
                       end_s=s + 1.0, data_wait_s=0.01,
                       compute_s=(0.66 if r == slow_rank else 0.5) + 0.001 * ((r * 7 + s) % 5))
            for s in range(1, num_steps + 1) for r in range(8)]


def _collectives(late_rank: int, num: int) -> list[CollectiveRecord]:
    # the rank that enters last waits least: its duration is the shortest
    return [CollectiveRecord(job_id="j", attempt=1, rank=r, node=WIDE[r], seq=q, op="all_reduce",
                             nbytes=1 << 20, enter_s=float(q), exit_s=q + (0.001 if r == late_rank
                                                                          else 0.05 + 0.001 * r))
            for q in range(num) for r in range(8)]


def _feed(det: Detection, steps: list, colls: list, *, columns: bool) -> None:
    """One heartbeat per node per step, as an agent sends them: records or columns."""
    for s in sorted({r.step for r in steps} | {c.seq for c in colls}):
        for node in ("node-0", "node-1"):
            mine = [r for r in steps if r.step == s and r.node == node]
            done = [c for c in colls if c.seq == s and c.node == node]
            hb = agent_pb2.Heartbeat()
            if columns:
                hb.step_columns.extend(agent_convert.step_columns(mine))
                hb.collective_columns.extend(agent_convert.collective_columns(done))
            else:
                for r in mine:
                    hb.steps.add(job_id=r.job_id, attempt=r.attempt, rank=r.rank, step=r.step,
                                 start_s=r.start_s, end_s=r.end_s, data_wait_s=r.data_wait_s,
                                 compute_s=r.compute_s)
                for c in done:
                    hb.collectives.add(job_id=c.job_id, attempt=c.attempt, rank=c.rank,
                                       seq=c.seq, op=c.op, nbytes=c.nbytes, enter_s=c.enter_s,
                                       exit_s=c.exit_s)
            det.on_heartbeat(node, hb)


def _named(events: list) -> list[tuple[str, int, str, str]]:
    return [(e.kind.value, e.rank, e.node, e.message) for e in events]


def test_a_straggler_and_a_collective_laggard_are_named_alike_from_columns_and_from_records():
    by_records, ev_records = _wide()
    by_columns, ev_columns = _wide()
    steps, colls = _steps(slow_rank=6, num_steps=12), _collectives(late_rank=2, num=25)
    _feed(by_records, steps, colls, columns=False)
    _feed(by_columns, steps, colls, columns=True)
    named = _named(ev_columns)
    assert ("straggler", 6, "node-1") in [n[:3] for n in named]
    assert ("collective_laggard", 2, "node-0") in [n[:3] for n in named]
    assert named == _named(ev_records)  # same findings, same words
    assert by_columns.num_records == by_records.num_records == len(steps) + len(colls)
    assert by_columns.scores("j") == by_records.scores("j")


def test_the_rank_missing_from_a_stuck_collective_is_named_when_completions_come_in_columns():
    det, _ = _wide()
    done = [c for c in _collectives(late_rank=0, num=5) if c.seq == 4]
    for node in ("node-0", "node-1"):
        hb = agent_pb2.Heartbeat(collective_columns=agent_convert.collective_columns(
            [c for c in done if c.node == node]))
        for r in range(8):  # every rank but 7 waits in seq 5
            if WIDE[r] == node and r != 7:
                hb.collectives.add(job_id="j", attempt=1, rank=r, seq=5, op="all_reduce",
                                   enter_s=9.0, in_flight=True)
        det.on_heartbeat(node, hb)
    det.on_heartbeat("node-0", beat(hang(0, "node-0", "it has been silent longest")))
    fault = det.pending_fault("j", 1, {"node-0"}, now=time.time())
    assert fault is not None and (fault.rank, fault.node) == (7, "node-1")
    assert "never entered all_reduce seq 5" in fault.message


def test_a_collective_completed_in_the_same_heartbeat_as_its_in_flight_report_is_not_in_flight():
    det, _ = _wide()
    hb = agent_pb2.Heartbeat(collective_columns=agent_convert.collective_columns(
        [c for c in _collectives(late_rank=0, num=6) if c.seq == 5 and c.node == "node-0"]))
    hb.collectives.add(job_id="j", attempt=1, rank=1, seq=5, op="all_reduce", enter_s=5.0,
                       in_flight=True)
    det.on_heartbeat("node-0", hb)
    det.on_heartbeat("node-1", beat(hang(4, "node-1", "it has been silent longest")))
    fault = det.pending_fault("j", 1, {"node-1"}, now=time.time())
    assert fault is not None and "never entered" not in fault.message


def test_invalid_summary_entries_are_dropped_and_a_malformed_summary_whole():
    det, _ = _wide()
    hb = agent_pb2.Heartbeat()
    hb.step_columns.add(job_id="j", attempt=1, rank=[0, 1, 2], step=[1, 1, -1],
                        step_s=[1.0, float("nan"), 1.0], data_wait_s=[0.0] * 3,
                        compute_s=[0.5] * 3)
    hb.step_columns.add(job_id="j", attempt=1, rank=[0, 1], step=[2], step_s=[1.0],
                        data_wait_s=[0.0], compute_s=[0.5])  # columns of unequal length
    hb.collective_columns.add(job_id="j", attempt=1, ops=["all_reduce"], rank=[0, 1],
                              seq=[1, 1], op_index=[0, 3], duration_s=[0.1, 0.1])
    det.on_heartbeat("node-0", hb)
    assert det.num_records == 2  # step 1 of rank 0 and rank 0's collective


def test_a_packed_summary_cut_short_is_dropped_alone_and_packed_reads_as_unpacked() -> None:
    from hpt.monitor.columns import pack_steps

    det, _ = _wide()
    hb = agent_pb2.Heartbeat()
    cols = ([0, 1], [1, 1], [1.0, 1.0], [0.0, 0.0], [0.5, 0.5])
    hb.step_columns.add(job_id="j", attempt=1, packed=pack_steps(*cols)[:-3])  # cut short
    hb.step_columns.add(job_id="j", attempt=1, packed=pack_steps(*cols))
    hb.step_columns.add(job_id="j", attempt=1, rank=cols[0], step=cols[1], step_s=cols[2],
                        data_wait_s=cols[3], compute_s=cols[4])
    det.on_heartbeat("node-0", hb)
    assert det.num_records == 4  # both whole summaries, nothing of the cut one
    pending = det.straggler._jobs["j"].pending[1]
    assert pending == {0: (0.5, 1.0), 1: (0.5, 1.0)}


def test_a_strided_world_counts_each_entry_of_a_flagged_rank_as_its_steps() -> None:
    # past TIMING_RANKS ranks an entry is the mean of `stride` steps: the straggler policy's
    # "flagged for N steps" counts them all
    from hpt.monitor.columns import pack_steps
    from hpt.monitor.records import TIMING_RANKS, timing_stride

    world = 2 * TIMING_RANKS + 1
    stride = timing_stride(world)
    assert stride == 3
    nodes = {r: f"node-{r // 8}" for r in range(world)}
    det = Detection(lambda e: None, lambda job, attempt: nodes if job == "j" else None)
    slow = 5
    for window in range(12):
        step = window * stride + stride - 1
        for lo in range(0, world, 8000):
            ranks = list(range(lo, min(lo + 8000, world)))
            compute = [0.8 if r == slow else 0.5 + 0.0001 * (r % 7) for r in ranks]
            hb = agent_pb2.Heartbeat()
            hb.step_columns.add(job_id="j", attempt=1, packed=pack_steps(
                ranks, [step] * len(ranks), [1.0] * len(ranks), [0.0] * len(ranks), compute))
            det.on_heartbeat("node-0", hb)
    assert det.straggler.flagged("j") == {slow}
    flagged = det._views[("j", 1)].flagged_steps[slow]
    assert flagged % stride == 0 and flagged >= stride * 2
    fault = det.pending_fault("j", 1, {"node-0"}, time.time(), straggler_after=flagged)
    assert fault is not None and f"straggler for {flagged} steps" in fault.message
