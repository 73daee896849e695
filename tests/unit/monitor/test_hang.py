"""Decision tests for the hang detector: given last progress and now, expect findings."""

from __future__ import annotations

import math

import pytest

from hpt.monitor.detectors.hang import HangConfig, check_hang, hang_deadline_s
from hpt.monitor.records import FindingKind

CFG = HangConfig()
NODES = {0: "node-a", 1: "node-a", 2: "node-b", 3: "node-b"}


def check(progress: dict[int, float], median_step_s: float | None, now: float, cfg=CFG):
    return check_hang(progress, median_step_s, now, cfg, job_id="j", attempt=2, nodes_by_rank=NODES)


def test_deadline_is_ten_median_steps_when_that_exceeds_the_floor():
    assert hang_deadline_s(2.0, CFG) == 20.0


def test_deadline_is_the_floor_for_fast_steps():
    assert hang_deadline_s(0.1, CFG) == 5.0
    assert hang_deadline_s(0.0, CFG) == 5.0


def test_deadline_before_the_first_step_is_the_startup_deadline():
    assert hang_deadline_s(None, CFG) == 300.0


def test_deadline_follows_the_config():
    assert hang_deadline_s(1.0, HangConfig(factor=3.0, min_s=1.0, startup_s=60.0)) == 3.0


def test_rank_silent_past_the_deadline_is_named_with_its_node():
    result = check({0: 100.0, 1: 100.0, 2: 70.0, 3: 100.0}, median_step_s=2.0, now=101.0)
    assert [(f.kind, f.rank, f.node, f.job_id, f.attempt) for f in result.findings] == [
        (FindingKind.HANG, 2, "node-b", "j", 2)
    ]
    f = result.findings[0]
    assert f.detected_at_s == 101.0
    assert f.evidence == {
        "silent_s": 31.0,
        "deadline_s": 20.0,
        "phase": "steady",
        "median_step_s": 2.0,
    }
    assert "rank 2 (node-b) made no progress for 31.0 s" in f.message
    assert "rank(s) 2 hung" in result.reason


def test_ranks_within_the_deadline_give_no_findings_and_a_reason():
    result = check({0: 90.0, 1: 95.0}, median_step_s=2.0, now=100.0)
    assert result.findings == ()
    assert "longest silence 10.0 s (rank 0)" in result.reason


def test_silence_exactly_at_the_deadline_is_not_yet_a_hang():
    assert check({0: 80.0}, median_step_s=2.0, now=100.0).findings == ()


def test_hung_ranks_are_listed_longest_silent_first():
    result = check({0: 50.0, 1: 10.0, 2: 30.0, 3: 99.0}, median_step_s=1.0, now=100.0)
    assert [f.rank for f in result.findings] == [1, 2, 0]


def test_before_the_first_step_the_startup_deadline_applies():
    launched = {r: 0.0 for r in range(4)}
    assert check(launched, median_step_s=None, now=299.0).findings == ()
    result = check(launched, median_step_s=None, now=301.0)
    assert [f.rank for f in result.findings] == [0, 1, 2, 3]
    assert result.findings[0].evidence["phase"] == "startup"
    assert "median_step_s" not in result.findings[0].evidence
    assert "startup deadline" in result.reason


def test_rank_with_unknown_node_gets_an_empty_node():
    result = check_hang({7: 0.0}, 1.0, 100.0, CFG, job_id="j", attempt=0)
    assert [(f.rank, f.node) for f in result.findings] == [(7, "")]


def test_no_ranks_give_no_findings():
    assert check({}, median_step_s=1.0, now=10.0).reason == "job j attempt 2: no ranks to check"


def test_progress_reported_after_now_is_not_a_hang():
    assert check({0: 200.0}, median_step_s=1.0, now=100.0).findings == ()


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_invalid_median_step_is_refused(bad):
    with pytest.raises(ValueError, match="median_step_s"):
        hang_deadline_s(bad, CFG)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"factor": 0.5}, "factor (0.5) must be >= 1"),
        ({"min_s": 0.0}, "min_s (0.0) must be > 0"),
        ({"startup_s": 1.0}, "startup_s (1.0) must be >= min_s (5.0)"),
    ],
)
def test_invalid_config_is_refused_naming_field_value_and_rule(kwargs, message):
    with pytest.raises(ValueError) as err:
        HangConfig(**kwargs)
    assert str(err.value) == message


def test_the_jobs_hang_timeout_replaces_the_derived_deadline_but_not_a_longer_startup():
    from hpt.monitor.detectors.hang import HangConfig, hang_deadline_s

    cfg = HangConfig(min_s=5.0, startup_s=300.0, timeout_s=42.0)
    assert hang_deadline_s(0.01, cfg) == 42.0  # the derived one would be 5 s
    assert hang_deadline_s(None, cfg) == 300.0
    assert hang_deadline_s(None, HangConfig(min_s=5.0, startup_s=10.0, timeout_s=42.0)) == 42.0


def test_a_rank_with_its_own_deadline_is_judged_by_it():
    from hpt.monitor.detectors.hang import HangConfig, check_hang

    det = check_hang({0: 0.0, 1: 0.0}, 0.01, 20.0, HangConfig(min_s=5.0), job_id="j", attempt=1,
                     own_deadlines={1: (30.0, "section 'eval' timeout 30 s")})
    assert [f.rank for f in det.findings] == [0]


def test_a_rank_with_no_step_of_its_own_keeps_the_startup_deadline_while_peers_step():
    progress = {0: 0.0, 1: 99.0}  # rank 1 steps fast; rank 0 is still importing torch
    result = check_hang(progress, 0.1, 100.0, CFG, job_id="j", attempt=2, starting=[0])
    assert result.findings == ()
    (finding,) = check_hang(progress | {1: 300.5}, 0.1, 301.0, CFG, job_id="j", attempt=2,
                            starting=[0]).findings
    assert finding.rank == 0 and finding.evidence["phase"] == "startup"
    assert "startup deadline 300.0 s" in finding.message
