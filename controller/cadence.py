"""The cadences of a running job, retuned from the failures it sees (``adapt_cadence``).

Two tiers, each a Young/Daly trade between the cost of one checkpoint and the mean time
between the failures it serves (``monitor.goodput``, the model ``hptctl plan`` prints):

- snapshots, taken by the ranks into their agent's memory and protected across nodes, serve
  every failure memory or peers restore (a rank's exit, a hang, a node loss its group
  survives). Their cost scales with the state: the model's figures (``goodput.Costs``) are for
  3.88 GB a node, and a node's state is its ranks' reported snapshot size.
- persisted checkpoints serve what memory cannot: a redundancy group that lost more than its
  ``m`` nodes before it was protected again, or state corrupted silently.

The controller estimates the rates for each such job while it runs, and moves a cadence when
the optimum moved far enough to matter.

Rates. Three classes: failures memory restores (a rank's exit, a hang, a straggler restart),
node losses, and silent corruption (which hpt does not detect: its prior stands). Each
estimate is a gamma posterior mean; the prior is the Llama 3 interruption mix scaled to the
job's GPUs and weighs as much as one failure, the evidence is the faults that ended the job's
attempts over the time since its first launch::

    rate_c = (n_c + w * prior_c / prior) / (T + w / prior)

so a large job's own history outweighs the prior within hours, and a small job is not moved by
a few crashes of its script. The rate of failures that need disk is then what ``goodput.plan``
derives from these: silent corruption, plus node losses times the probability that the lost
node's group loses ``m`` more before it is protected again (no redundancy: every node loss).

Persist cost. A persist runs on the agent beside training; what it costs training is the
interference of copying the snapshot out and writing it. Agents measure each persist
(``Rank.persist_s``, copy-out to verified manifest); the cost is that time times the share of
it the model's defaults count as interference (``Costs.persist_overhead_s /
Costs.persist_latency_s``, an estimate), the model's default until a persist was measured.

Bounds. Snapshots are at most 5 minutes apart (a crash of the script, which the prior's
hardware mix does not count, loses at most that). Persists are at least 1.5 persists apart (a
persist still writing when the next is due skips that one), at most an hour (failures outside
the model, a whole cluster's power or an operator's mistake, still find a recent checkpoint),
and a whole multiple of the snapshot cadence (an agent persists the complete snapshots of steps
divisible by it). A cadence moves when the new one is at least 1.5x away from the one in force:
Young/Daly's waste is flat near its optimum (1.5x off wastes 8 % more than the optimum's own
small waste), so smaller moves buy nothing and would churn with every new measurement of the
step time. A new snapshot cadence starts at a step ``APPLY_AHEAD_S`` of steps past the ranks'
newest: every rank must switch at the same step, or no step would be complete on all of them
(a rank that heard late only costs the steps until they agree again, never a mixed restore).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

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
MAX_SNAPSHOT_INTERVAL_S = 300.0
"""A crash of the script itself (which the hardware mix of the prior does not count) loses at
most this much of the ranks' work."""
APPLY_AHEAD_S = 3.0
"""How far ahead of the ranks' newest reported step a new snapshot cadence starts: the command
reaches their agents, and every rank reads it at a save, before any of them gets there."""
REFERENCE_NODE_BYTES = 3.88e9
"""A node's state behind the model's default snapshot costs (``goodput.Costs``)."""

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


def _far(a: int, b: int) -> bool:
    """``a`` and ``b`` (both >= 1) are ``RETUNE_RATIO`` or more apart."""
    return max(a, b) >= RETUNE_RATIO * min(a, b)


@dataclass(frozen=True, slots=True)
class Estimate:
    """What the cadences of one job are derived from, and the cadences."""

    exposure_s: float
    counts: dict[str, int]
    per_day: dict[str, float]
    memory_per_day: float
    """Failures per day that memory or peers restore (what the snapshot cadence is for)."""
    disk_per_day: float
    """Failures per day that only a persisted checkpoint restores."""
    redundancy: tuple[int, int]
    step_s: float
    snapshot_cost_s: float
    blocked_s: float
    """Slowest rank's measured blocking per snapshot (0: none measured; the cost then scales
    the model's default by the state's size)."""
    snapshot_now: int
    """Steps between snapshots in force (the controller's, the spec's, or what the ranks do)."""
    snapshot_every: int
    """Steps between snapshots: Young/Daly (at most ``MAX_SNAPSHOT_INTERVAL_S``), or the one
    in force when that is within ``RETUNE_RATIO``."""
    persist_s: float
    """Slowest rank's newest measured persist (0: none measured yet)."""
    persist_cost_s: float
    persist_now: int
    interval_s: float
    """Seconds between persists (0: the job does not persist)."""
    persist_every: int
    """Steps between persists, a multiple of ``snapshot_every`` (0: the job does not persist)."""
    snapshot_from: int = 0
    """The step from which the ranks take ``snapshot_every`` (ahead of them all)."""

    @property
    def snapshot_changed(self) -> bool:
        return self.snapshot_every != self.snapshot_now

    @property
    def persist_changed(self) -> bool:
        return self.persist_every != self.persist_now and (
            not self.persist_now or self.snapshot_changed
            or _far(self.persist_now, self.persist_every))

    def reason(self) -> str:
        k, m = self.redundancy
        parts = []
        if self.snapshot_changed:
            parts.append(
                f"snapshot every {self.snapshot_now} -> {self.snapshot_every} steps from step "
                f"{self.snapshot_from} ({self.snapshot_every * self.step_s:.3g} s): "
                f"{self.memory_per_day:.3g} failures/day that memory or peers restore, "
                f"snapshot cost {self.snapshot_cost_s:.2g} s ("
                + (f"{self.blocked_s * 1e3:.3g} ms blocking measured, the copies' share by "
                   "its size)" if self.blocked_s else "by its size)"))
        if self.persist_changed:
            parts.append(
                f"persist every {self.persist_now or 'never'} -> {self.persist_every} steps "
                f"({self.interval_s:.0f} s): {self.disk_per_day:.3g} disk-restore failures/day "
                f"(redundancy {k}+{m}), persist {self.persist_s:.2f} s measured "
                f"(cost {self.persist_cost_s:.2f} s)")
        return "; ".join(parts) + (
            f"; from {self.counts['node_lost']} node losses and {self.counts['memory']} other "
            f"faults in {self.exposure_s / 3600:.2g} h, step {self.step_s:.3g} s")


def _steps(interval_s: float, step_s: float, most_s: float) -> int:
    """``interval_s`` in whole steps, at least one, at most ``most_s`` worth of steps."""
    cap = max(1, math.floor(most_s / step_s))
    return cap if not math.isfinite(interval_s) else max(1, min(round(interval_s / step_s), cap))


def estimate(job: Job, now: float,
             max_snapshot_s: float = MAX_SNAPSHOT_INTERVAL_S) -> Estimate | None:
    """The recommended cadences of ``job``'s running attempt; None until they are known (the
    attempt has not run ``MIN_STEPS`` steps yet, or its ranks hold no snapshot)."""
    attempt = job.current
    if attempt is None or not job.attempts[0].started_at:
        return None
    step_s = mean_step_s(attempt)
    if attempt.progress - attempt.restore_step < MIN_STEPS or step_s <= 0:
        return None
    held, _, observed_every = survey(attempt)
    if not held and not any(r.snapshot_steps for r in attempt.ranks):
        return None  # the ranks do not snapshot (no hpt Checkpointer): nothing to tune
    gpus = attempt.world_size
    per_node = max(1, gpus // max(1, len(attempt.nodes)))
    exposure = max(0.0, now - job.attempts[0].started_at)
    counts = observed(job)
    per_day = posterior_per_day(prior_per_day(gpus), counts, exposure)
    defaults = goodput.Costs()
    # a snapshot's cost scales with the state: the model's figures are for 3.88 GB a node
    node_bytes = per_node * max((r.snapshot_bytes for r in attempt.ranks), default=0)
    scale = node_bytes / REFERENCE_NODE_BYTES
    # what a snapshot holds the training threads, where the ranks measured it (the slowest
    # rank's: the others wait for it at the next collective)
    blocked = max((r.snapshot_blocked_s for r in attempt.ranks), default=0.0)
    persist_s = max((r.persist_s for r in attempt.ranks), default=0.0)
    persist_cost = (persist_s * defaults.persist_overhead_s / defaults.persist_latency_s
                    if persist_s else defaults.persist_overhead_s)
    k, m = redundancy_of(attempt)
    failures = tuple(
        FailureClass(name=c, count=per_day[c], detect=detect, tier=tier, loses_node=loses)
        for c, (detect, tier, loses) in _CLASSES.items())
    costs = goodput.Costs(
        step_s=step_s, snapshot_stall_s=blocked or defaults.snapshot_stall_s * scale,
        protect_overhead_s=defaults.protect_overhead_s * scale, persist_overhead_s=persist_cost,
        persist_latency_s=persist_s or defaults.persist_latency_s)
    inputs = goodput.Inputs(
        gpus=per_node * len(attempt.nodes), gpus_per_node=per_node, failures=failures,
        reference_gpus=per_node * len(attempt.nodes), reference_days=1.0, costs=costs,
        redundancy=(k, m))
    snapshot_now = job.snapshot_every or job.spec.snapshot_every or observed_every
    snapshot = _steps(goodput.plan(inputs).snapshot_interval_s, step_s, max_snapshot_s)
    if not _far(snapshot, snapshot_now):
        snapshot = snapshot_now
    plan = goodput.plan(replace(inputs, snapshot_interval_s=snapshot * step_s))
    memory_per_day = per_day["memory"] + per_day["node_lost"] - plan.disk_fallback_per_day
    disk_per_day = per_day["silent"] + plan.disk_fallback_per_day
    persist_now = job.persist_every or job.spec.persist_every
    every = interval = 0.0
    if job.spec.persist_dir:
        snap_s = snapshot * step_s
        lowest = MIN_PERSISTS_APART * persist_s
        n = max(1, round(min(plan.persist_interval_s, MAX_INTERVAL_S) / snap_s))
        if n > 1 and n * snap_s > MAX_INTERVAL_S:  # rounded past the hour
            n -= 1
        if n * snap_s < lowest:  # the bound wins over the hour: a persist must finish first
            n = math.ceil(lowest / snap_s)
        every, interval = snapshot * n, snapshot * n * step_s
    start = 0
    if snapshot != snapshot_now:  # a step every rank reaches after it heard of the change
        ahead = attempt.progress + math.ceil(APPLY_AHEAD_S / step_s)
        start = (ahead // snapshot + 1) * snapshot
    return Estimate(
        exposure_s=exposure, counts=counts, per_day=per_day, memory_per_day=memory_per_day,
        disk_per_day=disk_per_day, redundancy=(k, m), step_s=step_s,
        snapshot_cost_s=costs.snapshot_stall_s + costs.protect_overhead_s, blocked_s=blocked,
        snapshot_now=snapshot_now, snapshot_every=snapshot, persist_s=persist_s,
        persist_cost_s=persist_cost, persist_now=persist_now, interval_s=interval,
        persist_every=int(every), snapshot_from=start)


def retune(job: Job, now: float,
           max_snapshot_s: float = MAX_SNAPSHOT_INTERVAL_S) -> Estimate | None:
    """The estimate to apply to ``job`` now, or None: it does not adapt its cadences, it is
    not running, they are not known yet, or those in force are within ``RETUNE_RATIO``."""
    attempt = job.current
    if (not job.spec.adapt_cadence or job.state != JobState.RUNNING or attempt is None
            or attempt.state != AttemptState.RUNNING):
        return None
    est = estimate(job, now, max_snapshot_s)
    if est is None or not (est.snapshot_changed or est.persist_changed):
        return None
    return est
