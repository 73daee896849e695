"""The persist cadence of a running job, retuned from the failures it sees (``adapt_persist``).

A persisted checkpoint is what a restore falls back to when memory cannot serve it: a
redundancy group lost more than its ``m`` nodes before it was protected again, or the state was
corrupted silently. How often to persist is a Young/Daly trade between the cost of one persist
and the mean time between *those* failures (``monitor.goodput``, the model ``hptctl plan``
prints). So the controller estimates that rate for each such job while it runs, and moves the
job's cadence when the optimum moved far enough to matter.

Rates. Three classes: failures memory restores (a rank's exit, a hang, a straggler restart),
node losses, and silent corruption (which hpt does not detect: its prior stands). Each
estimate is a gamma posterior mean; the prior is the Llama 3 interruption mix scaled to the job's GPUs and
weighs as much as one failure, the evidence is the faults that ended the job's attempts over
the time since its first launch::

    rate_c = (n_c + w * prior_c / prior) / (T + w / prior)

so a large job's own history outweighs the prior within hours, and a small job is not moved by
a few crashes of its script. The rate of failures that need disk is then what ``goodput.plan``
derives from these: silent corruption, plus node losses times the probability that the lost
node's group loses ``m`` more before it is protected again (no redundancy: every node loss).

Costs. A persist runs on the agent beside training; what it costs training is the interference
of copying the snapshot out and writing it. Agents measure each persist (``Rank.persist_s``,
copy-out to verified manifest); the cost is that time times the share of it the model's
defaults count as interference (``Costs.persist_overhead_s / Costs.persist_latency_s``, an
estimate), the model's default until a persist was measured.

Bounds. The interval is at least 1.5 persists long (a persist still writing when the next is
due skips that one), at most an hour (failures outside the model, a whole cluster's power or an
operator's mistake, still find a recent checkpoint), and a whole multiple of the snapshot
cadence (an agent persists the complete snapshots of steps divisible by it). The cadence moves
when the new one is at least 1.5x away from the one in force: Young/Daly's waste is flat near
its optimum (1.5x off wastes 8 % more than the optimum's own small waste), so smaller moves buy
nothing and would churn with every new measurement of the step time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hpt.controller.metrics import mean_step_s
from hpt.controller.model import Attempt, AttemptState, FaultKind, Job, JobState
from hpt.controller.rounds import survey
from hpt.monitor import goodput
from hpt.monitor.goodput import DAY_S, Detect, FailureClass, Tier

PRIOR_WEIGHT = 1.0
"""How many failures' worth of evidence the prior rates weigh."""
RETUNE_RATIO = 1.5
"""The cadence moves when the recommended one is this far (either way) from the one in force."""
MAX_INTERVAL_S = 3600.0
MIN_PERSISTS_APART = 1.5
"""The interval is at least this many measured persists long."""
MIN_STEPS = 3
"""Steps the running attempt makes before its step time is trusted."""

UNOBSERVED = frozenset({"silent"})
"""Classes no fault record names: silent corruption is not detected by hpt."""
_NODE_FAULTS = frozenset({FaultKind.NODE_LOST, FaultKind.RANK_LOST})
_CLASSES = {  # what each class becomes in the model
    "memory": (Detect.RANK_EXIT, Tier.MEMORY, False),
    "node_lost": (Detect.NODE_LOST, Tier.PEER, True),
    "silent": (Detect.SILENT, Tier.DISK, False),
}


def _class_of(fc: FailureClass) -> str:
    if fc.loses_node:
        return "node_lost"
    return "silent" if fc.tier == Tier.DISK else "memory"


def prior_per_day(gpus: int) -> dict[str, float]:
    """Failures per day of each class on ``gpus`` GPUs, from the Llama 3 mix."""
    inputs = goodput.Inputs(gpus=gpus, gpus_per_node=1)
    out = dict.fromkeys(_CLASSES, 0.0)
    for fc in inputs.failures:
        out[_class_of(fc)] += inputs.rate(fc) * DAY_S
    return out


def observed(job: Job) -> dict[str, int]:
    """Faults that ended the job's attempts, by class (a resize or a cancel is none)."""
    counts = dict.fromkeys(_CLASSES, 0)
    for attempt in job.attempts:
        if attempt.cause is not None:
            counts["node_lost" if attempt.cause.kind in _NODE_FAULTS else "memory"] += 1
    return counts


def posterior_per_day(prior: dict[str, float], counts: dict[str, int],
                      exposure_s: float) -> dict[str, float]:
    """The gamma posterior mean of each class's rate (per day), see the module doc; a class
    hpt cannot observe (``UNOBSERVED``) keeps its prior: time without seeing one is no
    evidence that there was none."""
    seen = [c for c in prior if c not in UNOBSERVED]
    out = {c: prior[c] for c in prior if c in UNOBSERVED}
    total = sum(prior[c] for c in seen)
    days = exposure_s / DAY_S
    if total <= 0:
        return {**out, **{c: counts.get(c, 0) / max(days, 1 / DAY_S) for c in seen}}
    prior_days = PRIOR_WEIGHT / total
    return {**out, **{c: (counts.get(c, 0) + PRIOR_WEIGHT * prior[c] / total)
                      / (days + prior_days) for c in seen}}


def redundancy_of(attempt: Attempt) -> tuple[int, int]:
    """(k, m) protecting the attempt's snapshots: its protection, or data-parallel replicas on
    every node ((1, nodes - 1): any one survives), else none ((1, 0))."""
    label = attempt.redundancy
    if label == "mirror":
        return 1, 1
    if "+" in label:
        k, m = label.split("+", 1)
        return int(k), int(m)
    if len(attempt.nodes) > 1 and attempt.ranks and all(
            r.snapshot_replicated for r in attempt.ranks):
        return 1, len(attempt.nodes) - 1
    return 1, 0


@dataclass(frozen=True, slots=True)
class Estimate:
    """What the cadence of one job is derived from, and the cadence."""

    exposure_s: float
    counts: dict[str, int]
    per_day: dict[str, float]
    disk_per_day: float
    """Failures per day that only a persisted checkpoint restores."""
    redundancy: tuple[int, int]
    step_s: float
    snapshot_every: int
    persist_s: float
    """Slowest rank's newest measured persist (0: none measured yet)."""
    persist_cost_s: float
    interval_s: float
    persist_every: int
    """Steps between persists: the interval in steps, a multiple of ``snapshot_every``."""

    def reason(self, current: int) -> str:
        k, m = self.redundancy
        return (f"persist every {current or 'never'} -> {self.persist_every} steps "
                f"({self.interval_s:.0f} s): {self.disk_per_day:.3g} disk-restore failures/day "
                f"expected ({self.counts['node_lost']} node losses and "
                f"{self.counts['memory']} other faults in {self.exposure_s / 3600:.2g} h, "
                f"redundancy {k}+{m}), persist {self.persist_s:.2f} s measured "
                f"(cost {self.persist_cost_s:.2f} s), step {self.step_s:.3g} s")


def estimate(job: Job, now: float) -> Estimate | None:
    """The recommended cadence of ``job``'s running attempt; None until it is known (the
    attempt has not run ``MIN_STEPS`` steps yet)."""
    attempt = job.current
    if attempt is None or not job.attempts[0].started_at:
        return None
    step_s = mean_step_s(attempt)
    if attempt.progress - attempt.restore_step < MIN_STEPS or step_s <= 0:
        return None
    gpus = attempt.world_size
    per_node = max(1, gpus // max(1, len(attempt.nodes)))
    exposure = max(0.0, now - job.attempts[0].started_at)
    counts = observed(job)
    per_day = posterior_per_day(prior_per_day(gpus), counts, exposure)
    _, _, snapshot_every = survey(attempt)
    persist_s = max((r.persist_s for r in attempt.ranks), default=0.0)
    defaults = goodput.Costs()
    cost = (persist_s * defaults.persist_overhead_s / defaults.persist_latency_s
            if persist_s else defaults.persist_overhead_s)
    k, m = redundancy_of(attempt)
    failures = tuple(
        FailureClass(name=c, count=per_day[c], detect=detect, tier=tier, loses_node=loses)
        for c, (detect, tier, loses) in _CLASSES.items())
    inputs = goodput.Inputs(
        gpus=per_node * len(attempt.nodes), gpus_per_node=per_node, failures=failures,
        reference_gpus=per_node * len(attempt.nodes), reference_days=1.0,
        costs=goodput.Costs(step_s=step_s, persist_overhead_s=cost,
                            persist_latency_s=persist_s or defaults.persist_latency_s),
        snapshot_interval_s=snapshot_every * step_s, redundancy=(k, m))
    plan = goodput.plan(inputs)
    interval = plan.persist_interval_s
    disk_per_day = per_day["silent"] + plan.disk_fallback_per_day
    snap_s = snapshot_every * step_s
    lowest = MIN_PERSISTS_APART * persist_s
    n = max(1, round(min(interval, MAX_INTERVAL_S) / snap_s))
    if n > 1 and n * snap_s > MAX_INTERVAL_S:  # rounded past the hour
        n -= 1
    if n * snap_s < lowest:  # the bound wins over the hour: a persist must finish first
        n = math.ceil(lowest / snap_s)
    every = snapshot_every * n
    return Estimate(
        exposure_s=exposure, counts=counts, per_day=per_day, disk_per_day=disk_per_day,
        redundancy=(k, m), step_s=step_s, snapshot_every=snapshot_every, persist_s=persist_s,
        persist_cost_s=cost, interval_s=every * step_s, persist_every=every)


def retune(job: Job, now: float) -> Estimate | None:
    """The estimate to apply to ``job`` now, or None: it does not adapt its cadence, it is not
    running, the cadence is not known yet, or the one in force is within ``RETUNE_RATIO``."""
    attempt = job.current
    if (not job.spec.adapt_persist or job.state != JobState.RUNNING or attempt is None
            or attempt.state != AttemptState.RUNNING):
        return None
    est = estimate(job, now)
    if est is None:
        return None
    current = job.persist_every or job.spec.persist_every
    if current and max(current, est.persist_every) < RETUNE_RATIO * min(
            current, est.persist_every):
        return None
    return est
