"""LowWatermark: the detectors' "every rank reached step s" without a scan per batch."""

from __future__ import annotations

import random

from hpt.monitor.detectors._common import LowWatermark
from hpt.monitor.detectors.straggler import StragglerDetector
from hpt.monitor.records import StepRecord


def test_watermark_equals_the_minimum_under_random_growth() -> None:
    rng = random.Random(0)
    values = dict.fromkeys(range(50), -1)
    wm = LowWatermark()
    for _ in range(5000):
        rank = rng.randrange(50)
        new = values[rank] + rng.randint(1, 3)
        wm.raised(values[rank], new)
        values[rank] = new
        assert wm.get(lambda: values.values()) == min(values.values())


def test_watermark_rescans_once_per_step_of_the_slowest_not_once_per_update() -> None:
    ranks = 1000
    values = dict.fromkeys(range(ranks), 0)
    scans = 0

    def scan():  # type: ignore[no-untyped-def]
        nonlocal scans
        scans += 1
        return values.values()

    wm = LowWatermark()
    for step in range(1, 11):
        for rank in range(ranks):
            wm.raised(values[rank], step)
            values[rank] = step
            assert wm.get(scan) == (step if rank == ranks - 1 else step - 1)
    assert scans <= 11  # one per step (plus the first), not 10,000


def test_invalidate_rescans_after_the_member_set_changed() -> None:
    values = {0: 5, 1: 7}
    wm = LowWatermark()
    assert wm.get(lambda: values.values()) == 5
    values[2] = 1
    wm.invalidate()
    assert wm.get(lambda: values.values()) == 1


def test_straggler_detector_evaluates_each_step_once_all_of_many_ranks_reported() -> None:
    det = StragglerDetector()
    ranks = 2000
    det.expect_ranks("j", 1, {r: f"n{r // 8}" for r in range(ranks)})
    for step in range(3):
        for node in range(ranks // 8):  # one batch per node's heartbeat
            det.observe([StepRecord(job_id="j", attempt=1, rank=r, step=step, start_s=0.0,
                                    end_s=1.0, data_wait_s=0.0, compute_s=1.0, node=f"n{node}")
                         for r in range(node * 8, node * 8 + 8)], now=1.0)
        assert det.median_step_s("j") == 1.0
    assert det.flagged("j") == frozenset()
