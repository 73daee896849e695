"""Decision tests for the straggler detector: given step records and now, expect findings."""

from __future__ import annotations

import random

import pytest

from hpt.monitor.detectors.straggler import StepMetric, StragglerConfig, StragglerDetector
from hpt.monitor.records import FindingKind, StepRecord

JOB = "job-1"


def node_of(rank: int) -> str:
    return f"node-{rank // 2}"


def make_steps(
    num_ranks: int,
    steps: range,
    *,
    base_s: float = 0.100,
    jitter: float = 0.03,
    slow: dict[int, float] | None = None,
    slow_vs_max: dict[int, float] | None = None,
    seed: int = 0,
    attempt: int = 0,
    data_wait_s: float = 0.0,
) -> list[StepRecord]:
    """Records of a synchronous job: compute time per rank with uniform +-jitter.

    ``slow`` multiplies a rank's own (jittered) compute time; ``slow_vs_max`` makes a rank that
    much slower than the slowest of its peers at every step. Every rank's step ends when the
    slowest one does, as in synchronous training.
    """
    rng = random.Random(seed)
    slow = slow or {}
    slow_vs_max = slow_vs_max or {}
    out: list[StepRecord] = []
    for step in steps:
        compute = {r: base_s * (1 + rng.uniform(-jitter, jitter)) for r in range(num_ranks)}
        for r, f in slow.items():
            compute[r] *= f
        peers_max = max(v for r, v in compute.items() if r not in slow_vs_max)
        for r, f in slow_vs_max.items():
            compute[r] = peers_max * f
        start = step * 1.0
        end = start + data_wait_s + max(compute.values())
        for r in range(num_ranks):
            out.append(
                StepRecord(
                    job_id=JOB,
                    attempt=attempt,
                    rank=r,
                    node=node_of(r),
                    step=step,
                    start_s=start,
                    end_s=end,
                    data_wait_s=data_wait_s,
                    compute_s=compute[r],
                )
            )
    return out


def feed_by_step(det: StragglerDetector, records: list[StepRecord]) -> list[tuple[int, object]]:
    """Observe one step at a time; return (step, finding) for every finding."""
    by_step: dict[int, list[StepRecord]] = {}
    for rec in records:
        by_step.setdefault(rec.step, []).append(rec)
    found = []
    for step in sorted(by_step):
        result = det.observe(by_step[step], now=float(step))
        assert result.reason
        found += [(step, f) for f in result.findings]
    return found


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("num_ranks", [2, 8, 64])
def test_clean_data_with_seeded_jitter_of_a_few_percent_gives_no_findings(seed, num_ranks):
    det = StragglerDetector()
    found = feed_by_step(det, make_steps(num_ranks, range(150), jitter=0.04, seed=seed))
    assert found == []
    assert det.flagged(JOB) == frozenset()
    assert all(0.9 < s < 1.1 for s in det.scores(JOB).values())


def test_clean_gaussian_noise_of_3_percent_over_many_steps_gives_no_findings():
    rng = random.Random(7)
    det = StragglerDetector()
    recs = [
        StepRecord(
            job_id=JOB,
            attempt=0,
            rank=r,
            node=node_of(r),
            step=s,
            start_s=float(s),
            end_s=s + 0.2,
            data_wait_s=0.0,
            compute_s=0.1 * (1 + rng.gauss(0, 0.03)),
        )
        for s in range(300)
        for r in range(16)
    ]
    assert feed_by_step(det, recs) == []


def test_rank_10_percent_slower_than_every_peer_is_flagged_within_10_steps_and_named():
    det = StragglerDetector()
    recs = make_steps(8, range(10, 40), slow_vs_max={5: 1.10}, seed=1)
    found = feed_by_step(det, recs)
    assert len(found) == 1
    step, f = found[0]
    assert f.kind is FindingKind.STRAGGLER
    assert (f.job_id, f.attempt, f.rank, f.node) == (JOB, 0, 5, "node-2")
    assert step < 10 + 10
    assert "rank 5 (node-2)" in f.message
    assert f.evidence["score"] >= 1.10


@pytest.mark.parametrize("slowdown", [1.30, 2.00])
def test_rank_30_or_100_percent_slow_with_jitter_is_flagged_within_10_steps(slowdown):
    det = StragglerDetector()
    clean = make_steps(8, range(0, 20), seed=2)
    slow = make_steps(8, range(20, 60), slow={3: slowdown}, seed=3)
    found = feed_by_step(det, clean + slow)
    assert [(f.kind, f.rank) for _, f in found] == [(FindingKind.STRAGGLER, 3)]
    step, f = found[0]
    assert step < 20 + 10
    # Flagged after `persistence` slow steps: the earliest possible.
    assert step == 20 + StragglerConfig().persistence - 1
    assert f.evidence["score"] == pytest.approx(slowdown, rel=0.08)
    assert f.node == "node-1"


def test_straggler_is_reported_once_while_it_stays_slow():
    det = StragglerDetector()
    found = feed_by_step(det, make_steps(4, range(100), slow={1: 1.5}))
    assert [f.kind for _, f in found] == [FindingKind.STRAGGLER]
    assert det.flagged(JOB) == frozenset({1})


def test_flagged_rank_is_cleared_after_clear_after_steps_back_in_line():
    det = StragglerDetector()
    slow = make_steps(8, range(0, 20), slow={6: 1.4}, seed=4)
    recovered = make_steps(8, range(20, 50), seed=5)
    found = feed_by_step(det, slow + recovered)
    assert [(f.kind, f.rank) for _, f in found] == [
        (FindingKind.STRAGGLER, 6),
        (FindingKind.STRAGGLER_CLEARED, 6),
    ]
    cleared_step = found[1][0]
    assert cleared_step == 20 + StragglerConfig().clear_after - 1
    assert det.flagged(JOB) == frozenset()


def test_cleared_rank_that_slows_again_is_flagged_again_only_after_new_slow_steps():
    det = StragglerDetector()
    clear = StragglerConfig().clear_after
    recs = (
        make_steps(4, range(0, 10), slow={2: 1.5})
        + make_steps(4, range(10, 10 + clear))
        + make_steps(4, range(10 + clear, 25 + clear), slow={2: 1.5})
    )
    found = feed_by_step(det, recs)
    kinds = [(s, f.kind) for s, f in found]
    persistence = StragglerConfig().persistence
    assert kinds == [
        (persistence - 1, FindingKind.STRAGGLER),
        (10 + clear - 1, FindingKind.STRAGGLER_CLEARED),
        (10 + clear + persistence - 1, FindingKind.STRAGGLER),
    ]


def test_a_rank_slow_in_bursts_is_flagged_once_instead_of_flapping():
    # bursts of 5 slow steps, then 6 in line, four times over (a loaded node)
    det = StragglerDetector()
    recs = []
    for burst in range(4):
        base = burst * 11
        recs += make_steps(4, range(base, base + 5), slow={3: 1.5}, seed=burst)
        recs += make_steps(4, range(base + 5, base + 11), seed=100 + burst)
    found = feed_by_step(det, recs)
    assert [(f.kind, f.rank) for _, f in found] == [(FindingKind.STRAGGLER, 3)]


def test_identical_timings_do_not_divide_by_zero_and_flag_nobody():
    det = StragglerDetector()
    found = feed_by_step(det, make_steps(4, range(30), jitter=0.0))
    assert found == []
    assert det.scores(JOB) == {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}


def test_with_identical_peers_a_rank_exactly_at_threshold_is_flagged():
    det = StragglerDetector()
    found = feed_by_step(det, make_steps(4, range(10), jitter=0.0, slow={0: 1.10}))
    assert [(s, f.rank) for s, f in found] == [(4, 0)]


def test_rank_just_below_threshold_is_not_flagged():
    det = StragglerDetector()
    assert feed_by_step(det, make_steps(4, range(50), jitter=0.0, slow={0: 1.07})) == []


def test_two_rank_job_names_the_slower_rank():
    det = StragglerDetector()
    found = feed_by_step(det, make_steps(2, range(20), slow={1: 1.3}))
    assert [(f.kind, f.rank) for _, f in found] == [(FindingKind.STRAGGLER, 1)]


def test_in_a_very_noisy_cluster_a_rank_within_the_noise_is_not_flagged():
    # 25% jitter: being 10-20% slower than the median is within 2 robust sigmas.
    det = StragglerDetector()
    found = feed_by_step(det, make_steps(16, range(200), jitter=0.25, seed=11))
    assert found == []


def test_slow_data_loading_is_caught_by_busy_time_but_not_by_compute_time():
    recs = make_steps(4, range(20), jitter=0.0)
    slow_data = [
        StepRecord(
            **{
                **{k: getattr(r, k) for k in StepRecord.__slots__},
                "data_wait_s": 0.08 if r.rank == 2 else 0.0,
            }
        )
        for r in recs
    ]
    busy = StragglerDetector(StragglerConfig(metric=StepMetric.BUSY))
    compute = StragglerDetector(StragglerConfig(metric=StepMetric.COMPUTE))
    assert [f.rank for _, f in feed_by_step(busy, slow_data)] == [2]
    assert feed_by_step(compute, slow_data) == []


def test_a_step_is_judged_only_once_every_rank_seen_in_the_attempt_reported_it():
    det = StragglerDetector(StragglerConfig(persistence=1, window=1))
    det.observe(make_steps(4, range(1), jitter=0.0), now=0.0)
    recs = make_steps(4, range(1, 2), jitter=0.0, slow={3: 2.0})
    first = det.observe([r for r in recs if r.rank != 0], now=1.0)
    assert first.findings == ()
    assert "no step ready" in first.reason
    second = det.observe([r for r in recs if r.rank == 0], now=2.0)
    assert [(f.rank, f.detected_at_s, f.evidence["step"]) for f in second.findings] == [(3, 2.0, 1)]


def test_declared_rank_that_never_reports_holds_steps_until_the_pending_buffer_is_full():
    cfg = StragglerConfig(max_pending_steps=8)
    det = StragglerDetector(cfg)
    det.expect_ranks(JOB, 0, {r: node_of(r) for r in range(5)})
    recs = make_steps(4, range(20), jitter=0.0, slow={1: 1.5})
    found = feed_by_step(det, recs)
    # Steps wait for rank 4 until more than 8 are pending; then the oldest is judged without
    # it at each new step, so the 5th slow step (step 4) is judged when step 12 arrives.
    assert [(s, f.rank, f.evidence["step"]) for s, f in found] == [
        (cfg.max_pending_steps + cfg.persistence - 1, 1, cfg.persistence - 1)
    ]


def test_records_of_an_older_attempt_are_ignored_and_a_newer_attempt_resets_the_job():
    det = StragglerDetector()
    feed_by_step(det, make_steps(4, range(20), slow={0: 1.5}, attempt=1))
    assert det.flagged(JOB) == frozenset({0})
    assert feed_by_step(det, make_steps(4, range(20, 40), slow={0: 1.5}, attempt=0)) == []
    feed_by_step(det, make_steps(4, range(0, 3), attempt=2))
    assert det.flagged(JOB) == frozenset()


def test_late_records_of_an_already_judged_step_are_ignored():
    det = StragglerDetector(StragglerConfig(persistence=1, window=1))
    recs = make_steps(3, range(2), jitter=0.0)
    det.observe(recs, now=0.0)
    again = det.observe(make_steps(3, range(2), jitter=0.0, slow={0: 3.0}), now=1.0)
    assert again.findings == ()


def test_score_is_the_window_median_of_the_ratio_to_the_peer_median():
    det = StragglerDetector()
    feed_by_step(det, make_steps(5, range(10), jitter=0.0, slow={4: 1.25}))
    scores = det.scores(JOB)
    assert scores[4] == pytest.approx(1.25)
    assert scores[0] == pytest.approx(1.0)


def test_median_step_seconds_is_none_before_the_first_step_then_the_median_wall_step():
    det = StragglerDetector()
    assert det.median_step_s(JOB) is None
    feed_by_step(det, make_steps(3, range(5), jitter=0.0, base_s=0.25))
    assert det.median_step_s(JOB) == pytest.approx(0.25)


def test_non_step_records_are_ignored():
    assert StragglerDetector().observe([object(), "x"], now=0.0).findings == ()


def test_forget_drops_the_job():
    det = StragglerDetector()
    feed_by_step(det, make_steps(3, range(10), slow={0: 2.0}))
    det.forget(JOB)
    assert det.flagged(JOB) == frozenset()
    assert det.scores(JOB) == {}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 1.0}, "threshold (1.0) must be > 1.0"),
        ({"window": 0}, "window (0) must be >= 1"),
        ({"persistence": 11}, "persistence (11) must be between 1 and window (10)"),
        ({"min_ranks": 1}, "min_ranks (1) must be >= 2"),
        ({"noise_floor_s": 0.0}, "noise_floor_s (0.0) must be > 0"),
        ({"metric": "wall"}, "metric ('wall') must be one of step, busy, compute"),
    ],
)
def test_invalid_config_is_refused_naming_field_value_and_rule(kwargs, message):
    with pytest.raises(ValueError) as err:
        StragglerConfig(**kwargs)
    assert str(err.value) == message


def test_a_rank_slower_only_on_a_sliver_of_a_long_step_is_not_a_straggler():
    # compute is 2 ms of a 50 ms step (the rest: collectives, pacing): 30 % slower compute on
    # one rank lags by 0.6 ms = 1.2 % of the step, below min_step_fraction (5 %)
    records = []
    for rec in make_steps(4, range(30), base_s=0.002, jitter=0.01, slow={1: 1.3}):
        records.append(StepRecord(job_id=rec.job_id, attempt=rec.attempt, rank=rec.rank,
                                  node=rec.node, step=rec.step, start_s=rec.start_s,
                                  end_s=rec.start_s + 0.050, data_wait_s=rec.data_wait_s,
                                  compute_s=rec.compute_s))
    det = StragglerDetector(StragglerConfig())
    assert det.observe(records, now=100.0).findings == ()


def test_the_same_slowdown_on_a_compute_bound_step_is_flagged():
    det = StragglerDetector(StragglerConfig())
    found = det.observe(make_steps(4, range(30), base_s=0.050, jitter=0.01, slow={1: 1.3}),
                        now=100.0).findings
    assert [(f.kind, f.rank) for f in found] == [(FindingKind.STRAGGLER, 1)]


def _reference_verdicts(cfg: StragglerConfig, entries: dict[int, tuple[float, float]]
                        ) -> dict[int, tuple[float, bool]]:
    """Per rank (ratio, slow) by the definition, the slow way: the median of every other rank,
    then the MAD of those others around it."""
    from hpt.monitor.detectors._common import MAD_TO_SIGMA, median

    step_s = median([e[1] for e in entries.values()])
    out = {}
    for rank, (v, _) in entries.items():
        peers = [e[0] for r, e in entries.items() if r != rank]
        med = median(peers)
        ratio = v / max(med, cfg.noise_floor_s)
        mad = median([abs(p - med) for p in peers])
        sigma = max(MAD_TO_SIGMA * mad, cfg.noise_floor * med, cfg.noise_floor_s)
        slow = (ratio >= cfg.threshold - 1e-9 and (v - med) / sigma >= cfg.min_z - 1e-9
                and v - med >= cfg.min_step_fraction * step_s - 1e-9)
        out[rank] = (ratio, slow)
    return out


@pytest.mark.parametrize("seed", range(40))
def test_verdicts_of_the_ranks_that_can_change_state_match_the_definition(seed: int) -> None:
    # The detector judges only the ranks at or above the threshold (a suffix of the sorted
    # values) and the flagged ones, with leave-one-out medians in O(1): the same verdicts as
    # recomputing every rank's peers, for odd and even worlds, ties and heavy tails.
    from hpt.monitor.detectors.straggler import _Job

    rng = random.Random(seed)
    n = rng.choice([2, 3, 4, 5, 8, 9, 16, 33])
    cfg = StragglerConfig(threshold=rng.choice([1.02, 1.08, 1.3]))
    det = StragglerDetector(cfg)
    base = [0.1, 0.1, 0.1, 0.2, 0.3]  # some ties
    entries = {r: (rng.choice(base) if rng.random() < 0.3 else rng.uniform(0.05, 0.4),
                   rng.uniform(0.9, 1.1)) for r in range(n)}
    job = _Job(attempt=1, flagged=set(rng.sample(range(n), k=min(2, n))))
    verdicts, top = det._judge(job, entries)
    want = _reference_verdicts(cfg, entries)
    above = {r for r, (ratio, _) in want.items() if ratio >= cfg.threshold - 1e-9}
    assert {v.rank for v in verdicts} == above | job.flagged
    for v in verdicts:
        assert v.ratio == pytest.approx(want[v.rank][0], rel=1e-12)
        assert v.slow == want[v.rank][1], (v, want[v.rank])
    assert top.ratio == pytest.approx(max(r for r, _ in want.values()), rel=1e-12)
    # scores are recomputed from the kept step, not stored per rank
    assert det._score(job, 0) == pytest.approx(want[0][0], rel=1e-12)
