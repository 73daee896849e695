"""The goodput model (monitor/goodput.py): formulas, defaults, and agreement with the
discrete-event simulation of the same cluster (monitor/goodput_sim.py)."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest

from hpt.monitor import goodput as gp
from hpt.monitor.goodput_sim import simulate, simulate_many

DAYS = 54 * gp.DAY_S

# -- formulas -------------------------------------------------------------------------------


def test_young_daly_is_sqrt_2cm_to_first_order() -> None:
    c, m = 1.0, 1e6
    assert gp.young_daly(c, m) == pytest.approx(math.sqrt(2 * c * m), rel=1e-3)


def test_young_daly_daly_terms_and_limits() -> None:
    c, m = 60.0, 3600.0
    x = c / (2 * m)
    assert gp.young_daly(c, m) == pytest.approx(
        math.sqrt(2 * c * m) * (1 + math.sqrt(x) / 3 + x / 9) - c)
    assert gp.young_daly(0.0, m) == 0.0
    assert gp.young_daly(3 * m, m) == m  # checkpointing costs more than 2 MTBF: once per MTBF
    assert gp.young_daly(c, math.inf) == math.inf
    with pytest.raises(ValueError, match="mtbf_s"):
        gp.young_daly(c, 0.0)


def test_expected_lost_is_half_the_interval_plus_latency_when_failures_are_rare() -> None:
    assert gp.expected_lost(100.0, 1e-9, 5.0) == pytest.approx(55.0)


def test_expected_lost_matches_monte_carlo_of_x_mod_tau() -> None:
    rng = random.Random(1)
    rate, tau = 1 / 300.0, 200.0
    samples = [rng.expovariate(rate) % tau for _ in range(200_000)]
    assert gp.expected_lost(tau, rate) == pytest.approx(sum(samples) / len(samples), rel=0.01)


def test_group_overflow_probability() -> None:
    assert gp.group_overflow_probability(8, 0, 1e-6, 300) == 1.0
    p = -math.expm1(-1e-6 * 300)
    # at least one of the other 8 nodes of an 8+1 group within the window: 1 - (1-p)^8
    assert gp.group_overflow_probability(8, 1, 1e-6, 300) == pytest.approx(1 - (1 - p) ** 8)
    assert gp.group_overflow_probability(8, 2, 1e-6, 300) < \
        gp.group_overflow_probability(8, 1, 1e-6, 300)


def test_recommended_redundancy_has_the_least_overhead_within_budget() -> None:
    inputs = gp.Inputs()
    k, m = gp.recommend_redundancy(inputs, node_loss_rate=1e-4, extra_cost_s=1800.0)
    assert (k, m) == (16, 1)  # rare node losses: one parity node per 16
    k2, m2 = gp.recommend_redundancy(inputs, node_loss_rate=0.01, extra_cost_s=1800.0)
    assert m2 >= 2 and m2 / k2 > m / k  # a node lost every 100 s needs more parity
    per_node = 0.01 / inputs.nodes
    assert 0.01 * 1800 * gp.group_overflow_probability(k2, m2, per_node, inputs.regroup_s) \
        <= 1e-4


# -- defaults -------------------------------------------------------------------------------


def test_llama3_defaults_are_the_reports_419_interruptions_in_54_days() -> None:
    assert sum(fc.count for fc in gp.LLAMA3_FAILURES) == 419
    assert (gp.LLAMA3_GPUS, gp.LLAMA3_DAYS) == (16_384, 54.0)
    assert gp.plan(gp.Inputs()).failures_per_day == pytest.approx(419 / 54)
    assert gp.plan(gp.Inputs(gpus=8_192)).failures_per_day == pytest.approx(419 / 54 / 2)


def test_hpt_costs_reach_97_percent_at_16k_gpus_and_beat_the_torchrun_baseline() -> None:
    hpt = gp.plan(gp.Inputs())
    torchrun = gp.plan(gp.Inputs(costs=gp.torchrun_costs(), memory_tier=False,
                                 persist_interval_s=1800.0))
    assert hpt.ettr >= 0.97
    assert torchrun.ettr < hpt.ettr
    assert torchrun.breakdown["lost_work"] > 10 * hpt.breakdown["lost_work"]


def test_breakdown_sums_to_one_and_no_failures_leave_only_overhead() -> None:
    p = gp.plan(gp.Inputs())
    assert sum(p.breakdown.values()) == pytest.approx(1.0, abs=1e-3)
    quiet = gp.plan(gp.Inputs(failures=(), snapshot_interval_s=100.0, persist_interval_s=1000.0))
    c = gp.Costs()
    assert quiet.snapshot_interval_s == pytest.approx(100.0, abs=c.step_s)  # whole steps
    overhead = (c.snapshot_stall_s + c.protect_overhead_s) / quiet.snapshot_interval_s \
        + c.persist_overhead_s / quiet.persist_interval_s
    assert quiet.ettr == pytest.approx(1 - overhead)


def test_more_failures_mean_lower_ettr_and_shorter_cadence() -> None:
    base = gp.plan(gp.Inputs())
    worse = gp.plan(gp.Inputs(reference_days=5.4))  # ten times the rate
    assert worse.ettr < base.ettr
    assert worse.snapshot_interval_s < base.snapshot_interval_s


# -- inputs ---------------------------------------------------------------------------------


def test_inputs_from_mapping_overrides_costs_failures_and_cluster() -> None:
    inputs = gp.inputs_from_mapping({
        "gpus": 1024, "costs": {"restart_s": 30.0, "detect_s": {"hang": 60.0}},
        "failures": {"faulty_gpu": 0, "cosmic_ray": {"count": 10, "detect": "silent",
                                                      "tier": "disk"}},
        "redundancy": {"k": 4, "m": 2}})
    assert inputs.gpus == 1024 and inputs.costs.restart_s == 30.0
    assert inputs.costs.detect_s["hang"] == 60.0 and inputs.costs.detect_s["rank_exit"] == 0.08
    names = {fc.name for fc in inputs.failures}
    assert "faulty_gpu" not in names and "cosmic_ray" in names
    assert gp.plan(inputs).redundancy == (4, 2)


@pytest.mark.parametrize(("data", "needle"), [
    ({"gpu": 8}, "unknown plan input key"),
    ({"costs": {"restart_s": -1}}, r"costs.restart_s \(-1\) must be a number >= 0"),
    ({"costs": {"detect_s": {"oops": 1}}}, "costs.detect_s: unknown key"),
    ({"failures": {"new": 3}}, "failures.new: a new class needs"),
    ({"failures": {"nic": {"tier": "tape"}}}, "failures.nic"),
    ({"gpus": 100, "gpus_per_node": 8}, "gpus_per_node"),
])
def test_bad_inputs_name_the_field(data, needle) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=needle):
        gp.inputs_from_mapping(data)


# -- model vs simulation --------------------------------------------------------------------

# (inputs, simulated days): runs of ~400-4,000 failures per seed
SCENARIOS = {
    "hpt_llama3_16k": (gp.Inputs(), 54),
    "torchrun_30min": (gp.Inputs(costs=gp.torchrun_costs(), memory_tier=False,
                                 persist_interval_s=1800.0), 54),
    "hpt_ten_times_the_failures": (gp.Inputs(reference_days=5.4), 10),
    # a hundred times the failures (no silent ones: an hour to detect each would stall the
    # run), in 2+1 groups slow to re-protect: many losses fall back to disk
    "hpt_one_parity_node_in_small_groups": (
        gp.inputs_from_mapping({"failures": {"silent_data_corruption": 0}, "regroup_s": 3600.0,
                                "reference_days": 0.54, "redundancy": {"k": 2, "m": 1}}), 1),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_model_and_simulation_agree(name: str) -> None:
    inputs, days = SCENARIOS[name]
    model = gp.plan(inputs).ettr
    mean, stderr = simulate_many(inputs, days * gp.DAY_S, seeds=16)
    assert abs(model - mean) <= max(0.005, 4 * stderr), (model, mean, stderr)


def test_simulation_without_failures_is_one_minus_overhead() -> None:
    inputs = gp.Inputs(failures=(), snapshot_interval_s=100.0, persist_interval_s=1000.0)
    assert simulate(inputs, DAYS, seed=0).ettr == pytest.approx(gp.plan(inputs).ettr)


def test_simulation_counts_disk_fallbacks_when_groups_overflow() -> None:
    inputs = replace(SCENARIOS["hpt_one_parity_node_in_small_groups"][0], gpus=64)
    result = simulate(inputs, 5 * gp.DAY_S, seed=0)
    assert result.disk_fallbacks > 0
    assert result.failures > result.disk_fallbacks
