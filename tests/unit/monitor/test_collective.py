"""Decision tests for the C4-style collective detector."""

from __future__ import annotations

import random

import pytest

from hpt.monitor.detectors.collective import CollectiveConfig, CollectiveDetector
from hpt.monitor.records import CollectiveRecord, FindingKind

JOB = "job-c"


def node_of(rank: int) -> str:
    return f"node-{rank // 4}"


def rec(
    rank: int,
    seq: int,
    enter: float,
    exit_s: float | None,
    op: str = "all_reduce",
    attempt: int = 0,
) -> CollectiveRecord:
    return CollectiveRecord(
        job_id=JOB,
        attempt=attempt,
        rank=rank,
        node=node_of(rank),
        seq=seq,
        op=op,
        nbytes=4096,
        enter_s=enter,
        exit_s=exit_s,
    )


def collectives(
    num_ranks: int,
    seqs: range,
    *,
    late: dict[int, float] | None = None,
    jitter_s: float = 0.002,
    seed: int = 0,
    clock_offset_s: dict[int, float] | None = None,
    attempt: int = 0,
) -> list[CollectiveRecord]:
    """Blocking collectives: every rank exits when the last one has entered (+ transfer).

    ``late`` delays a rank's entry by that many seconds; ``clock_offset_s`` shifts the
    timestamps a rank reports (its node's monotonic clock), which must not matter.
    """
    rng = random.Random(seed)
    late = late or {}
    offset = clock_offset_s or {}
    out: list[CollectiveRecord] = []
    for seq in seqs:
        base = seq * 1.0
        enter = {r: base + rng.uniform(0, jitter_s) + late.get(r, 0.0) for r in range(num_ranks)}
        done = max(enter.values()) + 0.0005
        for r in range(num_ranks):
            o = offset.get(r, 0.0)
            out.append(rec(r, seq, enter[r] + o, done + o, attempt=attempt))
    return out


def test_rank_that_always_enters_last_is_named_laggard_after_a_full_window():
    det = CollectiveDetector()
    recs = collectives(8, range(40), late={5: 0.050})
    early = det.observe(recs[: 8 * 19], now=10.0)
    assert early.findings == ()
    assert "19 of 20 collectives" in early.reason
    result = det.observe(recs[8 * 19 :], now=11.0)
    assert len(result.findings) == 1
    f = result.findings[0]
    assert (f.kind, f.job_id, f.attempt, f.rank, f.node) == (
        FindingKind.COLLECTIVE_LAGGARD,
        JOB,
        0,
        5,
        "node-1",
    )
    assert f.evidence["op"] == "all_reduce"
    assert f.evidence["seq"] == 39
    assert f.evidence["last_count"] == 20
    assert f.evidence["median_lateness_s"] == pytest.approx(0.050, abs=0.003)
    assert "rank 5 (node-1) entered all_reduce last in 20 of the last 20" in f.message
    assert det.laggards(JOB) == frozenset({5})


def test_laggard_is_reported_once_while_it_stays_last():
    det = CollectiveDetector()
    found = []
    recs = collectives(4, range(100), late={1: 0.02})
    for i in range(0, len(recs), 4):
        found += det.observe(recs[i : i + 4], now=float(i)).findings
    assert [(f.kind, f.rank) for f in found] == [(FindingKind.COLLECTIVE_LAGGARD, 1)]


@pytest.mark.parametrize("seed", range(5))
def test_random_arrival_order_names_no_laggard(seed):
    det = CollectiveDetector()
    result = det.observe(collectives(8, range(200), jitter_s=0.02, seed=seed), now=1.0)
    assert result.findings == ()


def test_rank_last_in_only_70_percent_of_the_window_is_not_a_laggard():
    recs = []
    for seq in range(20):
        late = {3: 0.05} if seq % 10 < 7 else {0: 0.05}
        recs += collectives(4, range(seq, seq + 1), late=late, seed=seq)
    result = CollectiveDetector().observe(recs, now=1.0)
    assert result.findings == ()
    assert "rank 3 last in 14 of 20 collectives (need 16" in result.reason


def test_being_last_by_less_than_the_floor_does_not_count():
    recs = collectives(4, range(30), late={2: 0.0005}, jitter_s=0.0)
    assert CollectiveDetector(CollectiveConfig(min_lag_s=0.001)).observe(recs, 1.0).findings == ()
    lax = CollectiveDetector(CollectiveConfig(min_lag_s=0.0001))
    assert [f.rank for f in lax.observe(recs, 1.0).findings] == [2]


def test_laggard_is_found_whatever_each_node_clock_reads():
    offsets = {r: 1000.0 * r for r in range(8)}
    recs = collectives(8, range(30), late={6: 0.03}, clock_offset_s=offsets)
    assert [f.rank for f in CollectiveDetector().observe(recs, now=5.0).findings] == [6]


def test_seq_is_judged_only_once_every_declared_rank_completed_it():
    det = CollectiveDetector(CollectiveConfig(window=1, laggard_fraction=1.0))
    det.expect_ranks(JOB, 0, {r: node_of(r) for r in range(3)})
    recs = collectives(3, range(1), late={2: 0.05})
    partial = det.observe([r for r in recs if r.rank != 2], now=1.0)
    assert partial.findings == ()
    assert "0 of 1 collectives" in partial.reason
    done = det.observe([r for r in recs if r.rank == 2], now=2.0)
    assert [f.rank for f in done.findings] == [2]


def stuck_scenario(det: CollectiveDetector, now: float) -> None:
    """Ranks 0, 1 and 3 are inside all_reduce seq 5; rank 2 finished seq 4 and never entered 5."""
    recs = collectives(4, range(5))
    recs += [rec(r, 5, 10.0, None) for r in (0, 1, 3)]
    det.observe(recs, now=now)


def test_rank_missing_from_a_stuck_collective_is_named_culprit():
    det = CollectiveDetector(CollectiveConfig(stuck_s=30.0))
    stuck_scenario(det, now=100.0)
    result = det.observe([], now=130.0)
    assert len(result.findings) == 1
    f = result.findings[0]
    assert (f.kind, f.job_id, f.attempt, f.rank, f.node) == (
        FindingKind.COLLECTIVE_MISSING,
        JOB,
        0,
        2,
        "node-0",
    )
    assert f.evidence == {
        "op": "all_reduce",
        "seq": 5,
        "rank_last_seq": 4,
        "num_waiting": 3,
        "stuck_for_s": 30.0,
    }
    assert f.message == (
        "rank 2 (node-0) never entered all_reduce seq 5, which 3 rank(s) have been waiting in "
        "for 30.0 s (its last seq: 4)"
    )


def test_collective_in_flight_for_less_than_stuck_seconds_names_nobody():
    det = CollectiveDetector(CollectiveConfig(stuck_s=30.0))
    stuck_scenario(det, now=100.0)
    result = det.observe([], now=129.9)
    assert result.findings == ()
    assert "3 collective(s) in flight, none stuck" in result.reason


def test_missing_rank_is_reported_once_per_stuck_collective():
    det = CollectiveDetector(CollectiveConfig(stuck_s=30.0))
    stuck_scenario(det, now=0.0)
    assert len(det.observe([], now=31.0).findings) == 1
    # The waiting ranks report their in-flight records again: still the same finding.
    assert det.observe([rec(r, 5, 10.0, None) for r in (0, 1, 3)], now=60.0).findings == ()


def test_age_of_an_in_flight_collective_is_measured_from_when_the_observer_first_saw_it():
    det = CollectiveDetector(CollectiveConfig(stuck_s=30.0))
    # enter_s is on the rank's clock, far in the past of the observer's clock: irrelevant.
    stuck_scenario(det, now=5000.0)
    assert det.observe([], now=5010.0).findings == ()
    assert [f.rank for f in det.observe([], now=5030.0).findings] == [2]


def test_collective_that_completes_is_no_longer_in_flight():
    det = CollectiveDetector(CollectiveConfig(stuck_s=30.0))
    stuck_scenario(det, now=0.0)
    det.observe([rec(r, 5, 10.0, 10.5) for r in (0, 1, 3)], now=1.0)
    assert det.observe([], now=100.0).findings == ()


def test_stuck_collective_with_every_rank_inside_names_no_missing_rank():
    det = CollectiveDetector(CollectiveConfig(stuck_s=30.0))
    det.observe(collectives(3, range(2)) + [rec(r, 2, 5.0, None) for r in range(3)], now=0.0)
    result = det.observe([], now=40.0)
    assert result.findings == ()
    assert "seq 2 stuck 40.0 s with every rank inside" in result.reason


def test_declared_rank_that_never_reported_is_named_missing_with_its_node():
    det = CollectiveDetector(CollectiveConfig(stuck_s=10.0))
    det.expect_ranks(JOB, 0, {0: "node-x", 1: "node-y", 2: "node-z"})
    det.observe([rec(0, 0, 1.0, None), rec(1, 0, 1.0, None)], now=0.0)
    result = det.observe([], now=10.0)
    assert [(f.rank, f.node, f.evidence["rank_last_seq"]) for f in result.findings] == [
        (2, "node-z", -1)
    ]


def test_records_of_an_older_attempt_are_ignored_and_a_newer_attempt_resets():
    det = CollectiveDetector()
    assert [
        f.rank
        for f in det.observe(collectives(4, range(30), late={0: 0.05}, attempt=1), now=0.0).findings
    ] == [0]
    assert (
        det.observe(collectives(4, range(30, 60), late={1: 0.05}, attempt=0), now=1.0).findings
        == ()
    )
    det.observe(collectives(4, range(5), attempt=2), now=2.0)
    assert det.laggards(JOB) == frozenset()


def test_collectives_on_other_groups_are_ignored():
    recs = [rec(r, -1, 0.0, None) for r in range(4)]
    det = CollectiveDetector(CollectiveConfig(stuck_s=1.0))
    det.observe(recs, now=0.0)
    assert det.observe([], now=100.0).findings == ()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": 0}, "window (0) must be >= 1"),
        (
            {"laggard_fraction": 0.5},
            "laggard_fraction (0.5) must be > 0.5 and <= 1 "
            "(a majority, so only one rank can hold it)",
        ),
        ({"stuck_s": 0}, "stuck_s (0) must be > 0"),
        ({"min_lag_s": -1.0}, "min_lag_s (-1.0) must be >= 0"),
    ],
)
def test_invalid_config_is_refused_naming_field_value_and_rule(kwargs, message):
    with pytest.raises(ValueError) as err:
        CollectiveConfig(**kwargs)
    assert str(err.value) == message
