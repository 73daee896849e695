"""A discrete-event simulation of the cluster ``monitor.goodput.plan`` models, to check it.

Same inputs, no formula shared: failures are drawn class by class from exponential
inter-arrival times; training advances at ``1 - overhead`` of wall time; snapshots sit at
progress multiples of the snapshot interval and persists at multiples of the persist interval
(so a rollback to a snapshot keeps the persist phase, as step-numbered persists do); a failure
rolls back to the newest snapshot its tier can read at that instant (a peer-tier snapshot only
once ``protect_latency_s`` has passed, a persisted one after ``persist_latency_s``); a
node-losing failure lands on a random redundancy group, and when that group already lost ``m``
nodes within ``regroup_s`` it falls back to disk; a failure during a recovery starts a new one.
ETTR is net progress over wall time.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import deque
from dataclasses import dataclass

from hpt.monitor.goodput import Detect, Inputs, Tier, plan, resolved


@dataclass(frozen=True, kw_only=True, slots=True)
class SimResult:
    ettr: float
    failures: int
    disk_fallbacks: int


def simulate(inputs: Inputs, horizon_s: float, seed: int) -> SimResult:
    """One run of ``horizon_s`` wall seconds. Cadences and redundancy unset in ``inputs`` take
    the plan's recommendation."""
    if not horizon_s > 0:
        raise ValueError(f"horizon_s ({horizon_s}) must be > 0")
    p = plan(inputs)
    inputs = resolved(inputs, p)
    c = inputs.costs
    rng = random.Random(seed)
    classes = list(inputs.failures)
    rates = [inputs.rate(fc) for fc in classes]
    total = sum(rates)
    k, m = p.redundancy
    groups = max(1, inputs.nodes // (k + m))
    snap = inputs.snapshot_interval_s if inputs.memory_tier and inputs.snapshot_interval_s \
        else math.inf
    persist = inputs.persist_interval_s or math.inf
    overhead = 0.0
    if math.isfinite(snap):
        overhead += (c.snapshot_stall_s + c.protect_overhead_s) / snap
    if math.isfinite(persist):
        overhead += (c.persist_overhead_s + (0.0 if inputs.memory_tier else c.snapshot_stall_s)) \
            / persist
    r = 1.0 - min(overhead, 1.0)
    snap_p, persist_p = snap * r, persist * r  # intervals in progress units
    history: dict[int, deque[float]] = {}

    t = 0.0
    p0 = 0.0  # progress at the start of the current run
    durable = 0.0  # newest persisted progress usable so far (before the current run)
    failures = fallbacks = 0
    running_since: float | None = 0.0
    restore_point = 0.0
    recover_until = 0.0
    recovering = 0.0  # downtime of the recovery in progress, 0 while running

    def floor_to(x: float, step: float) -> float:
        return math.floor(x / step + 1e-9) * step if math.isfinite(step) else -math.inf

    while True:
        nxt = t + rng.expovariate(total) if total else math.inf
        if running_since is None and recover_until <= min(nxt, horizon_s):
            running_since, p0 = recover_until, restore_point  # recovery finished first
            recovering = 0.0
        if nxt >= horizon_s:
            if running_since is not None:
                return SimResult(ettr=(p0 + (horizon_s - running_since) * r) / horizon_s,
                                 failures=failures, disk_fallbacks=fallbacks)
            return SimResult(ettr=restore_point / horizon_s, failures=failures,
                             disk_fallbacks=fallbacks)
        t = nxt
        failures += 1
        fc = rng.choices(classes, weights=rates)[0]
        tier = Tier(fc.tier) if inputs.memory_tier else Tier.DISK
        if fc.loses_node and tier == Tier.PEER:
            seen = history.setdefault(rng.randrange(groups), deque())
            while seen and seen[0] < t - inputs.regroup_s:
                seen.popleft()
            if len(seen) >= m:
                tier, fallbacks = Tier.DISK, fallbacks + 1
            seen.append(t)
        if running_since is not None:
            progress = p0 + (t - running_since) * r
            # persists finished during this run
            in_run = floor_to(progress - c.persist_latency_s * r, persist_p)
            if in_run >= p0:
                durable = max(durable, in_run)
            if tier == Tier.MEMORY:
                point = max(p0, floor_to(progress, snap_p))
            elif tier == Tier.PEER:
                point = max(p0, floor_to(progress - c.protect_latency_s * r, snap_p))
            else:
                point = durable
            restore_point = point
            running_since = None
            recovering = 0.0
        elif tier == Tier.DISK:
            restore_point = min(restore_point, durable)
        down = c.detect_s[Detect(fc.detect).value] + c.restart_s + c.restore_s[tier.value]
        if recovering:
            down = max(down, recovering)  # the interrupted recovery starts over
        recover_until, recovering = t + down, down


def simulate_many(inputs: Inputs, horizon_s: float, seeds: int) -> tuple[float, float]:
    """Mean ETTR over ``seeds`` runs and its standard error."""
    if seeds < 1:
        raise ValueError(f"seeds ({seeds}) must be >= 1")
    values = [simulate(inputs, horizon_s, seed).ettr for seed in range(seeds)]
    err = statistics.stdev(values) / math.sqrt(seeds) if seeds > 1 else math.nan
    return statistics.fmean(values), err
