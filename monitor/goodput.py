"""Goodput planning: what effective training time a cluster gets from hpt's measured costs.

``plan(inputs)`` is a closed-form model (``hptctl plan`` prints it); ``monitor.goodput_sim``
simulates the same cluster event by event to check it. Everything here is a pure function of
its inputs: no clock, no I/O.

The model. Failures of class ``i`` arrive as a Poisson process of rate ``lambda_i`` (per second,
for the whole cluster). Training runs between failures; every ``snapshot_interval_s`` it takes an
in-memory snapshot (costing ``snapshot_stall_s + protect_overhead_s`` of training time) and
every ``persist_every``-th snapshot is persisted (``persist_overhead_s`` more). A failure of
class ``i`` rolls training back to the newest snapshot its restore *tier* can still read and
then costs ``D_i = detection_s + restart_s + restore_s[tier]`` of downtime; a failure during a
recovery starts a new recovery. With ``lambda = sum(lambda_i)``, a renewal argument over
"run until a failure, then recover" cycles gives

    ETTR = (1 - overhead) * (1 - sum_i lambda_i * L_i) / (1 + sum_i (lambda_i/lambda) (e^{lambda D_i} - 1))

where ``overhead`` is the fraction of training time spent in snapshot and persist costs and
``L_i`` the expected work lost, ``E[X mod tau] + latency`` for an exponential run time ``X``,
the tier's snapshot interval ``tau`` and the time ``latency`` until a snapshot is usable at that
tier (protected across nodes, or on disk). A node-losing failure whose redundancy group of
``k+m`` nodes lost more than ``m`` nodes within ``regroup_s`` falls back to disk.

Cadences follow Young/Daly per tier: ``tau = sqrt(2 C M)`` refined by Daly's higher-order
terms, with ``C`` the tier's per-checkpoint cost and ``M`` the mean time between the failures
that restore from that tier.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

DAY_S = 86_400.0
HOUR_S = 3_600.0


class Tier(str, enum.Enum):
    """Where a class of failure restores from."""

    MEMORY = "memory"
    """The failed node's host memory survives (a GPU or a rank died, not the host): its agent
    serves the newest complete snapshot."""
    PEER = "peer"
    """The node is gone or unreachable: its snapshot shards come from replicas or parity on other
    nodes, so only snapshots already protected count."""
    DISK = "disk"
    """Memory cannot be trusted or reached: the newest persisted checkpoint."""


class Detect(str, enum.Enum):
    """How hpt notices a class of failure (each maps to a detection time in ``Costs``)."""

    RANK_EXIT = "rank_exit"
    NODE_LOST = "node_lost"
    HANG = "hang"
    SILENT = "silent"


@dataclass(frozen=True, kw_only=True, slots=True)
class FailureClass:
    name: str
    count: float
    """Interruptions of this class observed in the reference run (``Inputs.reference_*``)."""
    detect: Detect
    tier: Tier
    loses_node: bool = False
    """The node leaves the redundancy group (counts toward losing more than ``m``)."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("failure class name must be non-empty")
        if not (math.isfinite(self.count) and self.count >= 0):
            raise ValueError(f"failures.{self.name}.count ({self.count}) must be >= 0")


# Llama 3 405B pre-training, "The Llama 3 Herd of Models" (Meta, 2024), Table 5: root causes of
# the 419 unexpected interruptions (466 in all, 47 planned) during a 54-day snapshot of training
# on 16,384 H100 GPUs. The counts below are the report's. (The report prints 30.1 % for the 148
# faulty-GPU interruptions; 148 of 419 is 35.3 %: the counts are what we use.) How hpt detects
# each class and which tier it restores from is our mapping, not the report's.
LLAMA3_GPUS = 16_384
LLAMA3_DAYS = 54.0
LLAMA3_FAILURES: tuple[FailureClass, ...] = (
    FailureClass(name="faulty_gpu", count=148, detect=Detect.RANK_EXIT, tier=Tier.MEMORY),
    FailureClass(name="gpu_hbm3_memory", count=72, detect=Detect.RANK_EXIT, tier=Tier.MEMORY),
    FailureClass(name="software_bug", count=54, detect=Detect.RANK_EXIT, tier=Tier.MEMORY),
    FailureClass(name="network_switch_cable", count=35, detect=Detect.NODE_LOST, tier=Tier.PEER,
                 loses_node=True),
    FailureClass(name="host_maintenance", count=32, detect=Detect.NODE_LOST, tier=Tier.PEER,
                 loses_node=True),
    FailureClass(name="gpu_sram_memory", count=19, detect=Detect.RANK_EXIT, tier=Tier.MEMORY),
    FailureClass(name="gpu_system_processor", count=17, detect=Detect.RANK_EXIT,
                 tier=Tier.MEMORY),
    FailureClass(name="nic", count=7, detect=Detect.NODE_LOST, tier=Tier.PEER, loses_node=True),
    FailureClass(name="nccl_watchdog_timeout", count=7, detect=Detect.HANG, tier=Tier.MEMORY),
    FailureClass(name="silent_data_corruption", count=6, detect=Detect.SILENT, tier=Tier.DISK),
    FailureClass(name="gpu_thermal_interface_sensor", count=6, detect=Detect.RANK_EXIT,
                 tier=Tier.MEMORY),
    FailureClass(name="ssd", count=3, detect=Detect.NODE_LOST, tier=Tier.PEER, loses_node=True),
    FailureClass(name="power_supply", count=3, detect=Detect.NODE_LOST, tier=Tier.PEER,
                 loses_node=True),
    FailureClass(name="server_chassis", count=2, detect=Detect.NODE_LOST, tier=Tier.PEER,
                 loses_node=True),
    FailureClass(name="io_expansion_board", count=2, detect=Detect.NODE_LOST, tier=Tier.PEER,
                 loses_node=True),
    FailureClass(name="dependency", count=2, detect=Detect.RANK_EXIT, tier=Tier.MEMORY),
    FailureClass(name="cpu", count=2, detect=Detect.NODE_LOST, tier=Tier.PEER, loses_node=True),
    FailureClass(name="system_memory", count=2, detect=Detect.NODE_LOST, tier=Tier.PEER,
                 loses_node=True),
)


@dataclass(frozen=True, kw_only=True, slots=True)
class Costs:
    """Measured costs, in seconds. Defaults: docs/benchmarks.md (2-core CPU host, 320M-parameter
    model + Adam = 3.88 GB per node, close to one node's share of a 405B model on 2,048 nodes),
    with the estimates marked as such."""

    snapshot_stall_s: float = 0.015
    """Training blocked per snapshot: 10-15 ms per save at 3.88 GB (bench_snapshot)."""
    protect_overhead_s: float = 0.075
    """Training slowed per snapshot by the background copy, checksum and protection: +2.9 % of
    a step with a save every step (bench_snapshot, 50M), taken on a 2.57 s step."""
    protect_latency_s: float = 1.0
    """Snapshot taken -> protected on other nodes (estimate: copy 0.31 s + Reed-Solomon encode
    of 3.88 GB at 11.6 GB/s + sending the parity)."""
    persist_overhead_s: float = 1.0
    """Training slowed per persisted snapshot (estimate: the background write shares the host)."""
    persist_latency_s: float = 5.7
    """Snapshot -> verified on disk: 3.88 GB at 0.68 GB/s (bench_persist, low end)."""
    detect_s: Mapping[str, float] = field(default_factory=lambda: {
        Detect.RANK_EXIT.value: 0.08,  # rank exit seen by its agent: 50-80 ms (bench_recovery)
        Detect.NODE_LOST.value: 2.0,   # the node lease at the 0.5 s heartbeat (2.5 s at 1 s;
                                       # 0.61 s when the stream closes); bench_scale measures it
        Detect.HANG.value: 5.34,       # SIGSTOP -> hang fault (bench_detection)
        Detect.SILENT.value: 3600.0,   # not detected by hpt; assume a loss spike within an hour
    })
    restart_s: float = 0.75
    """Fault handled -> first step of the next attempt: 0.59 s warm after a rank kill, 0.75 s
    after a node loss (bench_recovery, 4 ranks: NCCL initialisation at scale is not included)."""
    restore_s: Mapping[str, float] = field(default_factory=lambda: {
        Tier.MEMORY.value: 0.67,  # restore of 3.88 GB from shared memory (bench_snapshot)
        Tier.PEER.value: 1.0,     # estimate: decode at 12 GB/s + transfer of one node's state
        Tier.DISK.value: 6.5,     # load_verified 0.6 GB/s of 3.88 GB (bench_persist)
    })
    step_s: float = 2.57
    """Training step; cadences are rounded to whole steps (>= 1)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            items = value.items() if isinstance(value, Mapping) else [("", value)]
            for key, v in items:
                name = f"{f.name}.{key}" if key else f.name
                if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                    raise ValueError(f"costs.{name} ({v!r}) must be a number >= 0")
        missing = [d.value for d in Detect if d.value not in self.detect_s]
        missing += [t.value for t in Tier if t.value not in self.restore_s]
        if missing:
            raise ValueError(f"costs: missing detect_s/restore_s entries {missing}")
        if self.step_s <= 0:
            raise ValueError(f"costs.step_s ({self.step_s}) must be > 0")


def torchrun_costs(*, persist_minutes: float = 30.0) -> Costs:
    """A baseline without in-memory snapshots: every failure restarts from disk (torch.save every
    ``persist_minutes``), detected as torchrun + NCCL would.

    torch.save of the same 3.88 GB blocks 4.9 s (bench_snapshot); torchrun launch -> first step
    5.06 s (bench_recovery); a hang waits for the NCCL watchdog (10 min default); a lost node
    for the rendezvous/keep-alive timeout (assume 30 s).
    """
    return Costs(
        snapshot_stall_s=4.9, protect_overhead_s=0.0, protect_latency_s=0.0,
        persist_overhead_s=0.0, persist_latency_s=0.0,
        detect_s={Detect.RANK_EXIT.value: 0.1, Detect.NODE_LOST.value: 30.0,
                  Detect.HANG.value: 600.0, Detect.SILENT.value: 3600.0},
        restart_s=5.06,
        restore_s={Tier.MEMORY.value: 6.5, Tier.PEER.value: 6.5, Tier.DISK.value: 6.5},
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class Inputs:
    gpus: int = LLAMA3_GPUS
    gpus_per_node: int = 8
    failures: tuple[FailureClass, ...] = LLAMA3_FAILURES
    reference_gpus: int = LLAMA3_GPUS
    """Rates scale linearly with GPUs from the reference run's counts."""
    reference_days: float = LLAMA3_DAYS
    costs: Costs = field(default_factory=Costs)
    memory_tier: bool = True
    """False: no in-memory snapshots; every failure restores from disk (the baseline)."""
    snapshot_interval_s: float | None = None
    """None: the recommended (Young/Daly) interval."""
    persist_interval_s: float | None = None
    redundancy: tuple[int, int] | None = None
    """(k, m) of the redundancy groups; None: the recommended one."""
    regroup_s: float = 300.0
    """After a node loss, the time until its group is protected again (a new node joined and the
    snapshots were re-encoded); more than ``m`` losses in one group within it fall back to disk."""

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise ValueError(f"gpus ({self.gpus}) must be >= 1")
        if self.gpus_per_node < 1 or self.gpus % self.gpus_per_node:
            raise ValueError(f"gpus_per_node ({self.gpus_per_node}) must be >= 1 and divide "
                             f"gpus ({self.gpus})")
        if self.reference_gpus < 1 or not self.reference_days > 0:
            raise ValueError("reference_gpus and reference_days must be > 0")
        for name in ("snapshot_interval_s", "persist_interval_s"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} ({v}) must be > 0")
        if self.redundancy is not None:
            k, m = self.redundancy
            if k < 1 or m < 0:
                raise ValueError(f"redundancy ({k}+{m}) needs k >= 1 and m >= 0")
        names = [f.name for f in self.failures]
        if len(set(names)) != len(names):
            raise ValueError("failures: class names must be unique")

    @property
    def nodes(self) -> int:
        return self.gpus // self.gpus_per_node

    def rate(self, fc: FailureClass) -> float:
        """Failures of ``fc`` per second on this cluster."""
        return fc.count / (self.reference_days * DAY_S) * self.gpus / self.reference_gpus


@dataclass(frozen=True, kw_only=True, slots=True)
class ClassCost:
    name: str
    rate_per_day: float
    tier: str
    detection_s: float
    restart_s: float
    restore_s: float
    lost_work_s: float
    downtime_fraction: float
    lost_work_fraction: float


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    ettr: float
    snapshot_interval_s: float
    snapshot_every_steps: int
    persist_interval_s: float
    persist_every_snapshots: int
    redundancy: tuple[int, int]
    disk_fallback_per_day: float
    """Node-losing failures per day whose group lost more than ``m`` nodes (restore from disk)."""
    failures_per_day: float
    mtbf_s: float
    breakdown: dict[str, float]
    """Fraction of wall time per cause; with ``productive`` they sum to 1."""
    classes: tuple[ClassCost, ...]

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["classes"] = [{f.name: getattr(c, f.name) for f in fields(c)} for c in self.classes]
        out["redundancy"] = {"k": self.redundancy[0], "m": self.redundancy[1]}
        return out


# ---------------------------------------------------------------------------- formulas


def young_daly(cost_s: float, mtbf_s: float) -> float:
    """Optimal checkpoint interval for a per-checkpoint cost and a mean time between failures.

    Daly (2006), higher-order: ``sqrt(2 C M) [1 + sqrt(C/2M)/3 + (C/2M)/9] - C`` for ``C < 2M``,
    else ``M``. ``C`` 0 gives 0 (checkpoint as often as possible); ``M`` infinite gives inf.
    """
    if cost_s < 0 or mtbf_s <= 0:
        raise ValueError(f"cost_s ({cost_s}) must be >= 0 and mtbf_s ({mtbf_s}) > 0")
    if math.isinf(mtbf_s):
        return math.inf
    if cost_s >= 2 * mtbf_s:
        return mtbf_s
    x = cost_s / (2 * mtbf_s)
    return math.sqrt(2 * cost_s * mtbf_s) * (1 + math.sqrt(x) / 3 + x / 9) - cost_s


def expected_lost(interval_s: float, rate: float, latency_s: float = 0.0) -> float:
    """Expected work lost by a failure after an exponential run time (rate ``rate``) with a
    checkpoint every ``interval_s`` usable ``latency_s`` after it is taken:
    ``E[X mod tau] + latency`` with ``E[X mod tau] = 1/rate - tau / (e^{rate tau} - 1)``
    (``tau/2`` when ``rate tau`` is small)."""
    if interval_s <= 0 or math.isinf(interval_s):
        return (1.0 / rate if rate > 0 else math.inf) if interval_s else latency_s
    if rate <= 0:
        return interval_s / 2 + latency_s
    x = rate * interval_s
    if x < 1e-6:
        return interval_s / 2 + latency_s
    return 1.0 / rate - interval_s / math.expm1(x) + latency_s


def group_overflow_probability(k: int, m: int, node_rate_s: float, window_s: float) -> float:
    """Probability that, given one node of a ``k+m`` group was just lost, at least ``m`` more of
    the group's other ``k+m-1`` nodes are lost within ``window_s`` (each at ``node_rate_s``
    per second): the loss is then beyond what parity recovers."""
    if m == 0:
        return 1.0
    others = k + m - 1
    p = -math.expm1(-node_rate_s * window_s)
    below = sum(math.comb(others, j) * p**j * (1 - p) ** (others - j) for j in range(m))
    return max(0.0, 1.0 - below)


def recommend_redundancy(inputs: Inputs, node_loss_rate: float, extra_cost_s: float,
                         budget: float = 1e-4) -> tuple[int, int]:
    """Smallest memory overhead ``m/k`` whose disk fallbacks cost under ``budget`` of the time
    (when none does: the one whose fallbacks cost least).

    Candidates: ``k`` in 2, 4, 8, 16 (at most the node count less ``m``), ``m`` in 1..4; ties
    go to the smaller group (cheaper decode)."""
    nodes = inputs.nodes
    per_node = node_loss_rate / nodes if nodes else 0.0
    within: list[tuple[float, int, int]] = []
    beyond: list[tuple[float, float, int, int]] = []
    for m in range(1, 5):
        for k in (2, 4, 8, 16):
            if k + m > nodes:
                continue
            cost = node_loss_rate * extra_cost_s * group_overflow_probability(
                k, m, per_node, inputs.regroup_s)
            if cost <= budget:
                within.append((m / k, k, m))
            else:
                beyond.append((cost, m / k, k, m))
    if within:
        _, k, m = min(within)
        return k, m
    if beyond:
        _, _, k, m = min(beyond)
        return k, m
    return (1, 0)


# ---------------------------------------------------------------------------- the model


def _snap_cost(c: Costs) -> float:
    return c.snapshot_stall_s + c.protect_overhead_s


def plan(inputs: Inputs) -> Plan:
    """The expected ETTR, where the time goes, and the recommended cadences and ``k+m``."""
    c = inputs.costs
    rates = {fc.name: inputs.rate(fc) for fc in inputs.failures}
    total = sum(rates.values())
    node_loss = sum(rates[fc.name] for fc in inputs.failures if fc.loses_node)
    tiers = {fc.name: (Tier(fc.tier) if inputs.memory_tier else Tier.DISK)
             for fc in inputs.failures}
    mem_rate = sum(r for n, r in rates.items() if tiers[n] != Tier.DISK)
    disk_rate_base = total - mem_rate

    # snapshot cadence (memory/peer tiers): Young/Daly on the failures they serve
    if not inputs.memory_tier:
        snap = math.inf
    elif inputs.snapshot_interval_s is not None:
        snap = inputs.snapshot_interval_s
    else:
        snap = young_daly(_snap_cost(c), 1 / mem_rate if mem_rate else math.inf)
    if math.isfinite(snap):
        snap = max(1, round(snap / c.step_s)) * c.step_s

    # redundancy: how often a node-losing failure overflows its group and goes to disk
    extra = c.restore_s[Tier.DISK.value] - c.restore_s[Tier.PEER.value]
    if inputs.redundancy is not None:
        k, m = inputs.redundancy
    elif inputs.memory_tier and node_loss:
        # first guess at the disk cost to weigh fallbacks: an hour of lost work
        k, m = recommend_redundancy(inputs, node_loss, extra + HOUR_S / 2)
    else:
        k, m = (inputs.nodes, 0)
    overflow = group_overflow_probability(k, m, node_loss / inputs.nodes, inputs.regroup_s) \
        if inputs.memory_tier and node_loss else 0.0
    fallback = node_loss * overflow if inputs.memory_tier else 0.0

    # persist cadence: Young/Daly on the failures that need disk
    disk_rate = disk_rate_base + fallback
    if inputs.persist_interval_s is not None:
        persist = inputs.persist_interval_s
    elif disk_rate > 0:
        persist = young_daly(c.persist_overhead_s + (0 if inputs.memory_tier
                                                       else c.snapshot_stall_s),
                             1 / disk_rate)
    else:
        persist = math.inf
    if math.isfinite(snap) and math.isfinite(persist):
        every = max(1, round(persist / snap))
        persist = every * snap
    else:
        every = 0
        if math.isfinite(persist):
            persist = max(1, round(persist / c.step_s)) * c.step_s

    overhead = 0.0
    if math.isfinite(snap):
        overhead += _snap_cost(c) / snap
    if math.isfinite(persist):
        per_persist = c.persist_overhead_s + (0.0 if inputs.memory_tier else c.snapshot_stall_s)
        overhead += per_persist / persist
    overhead = min(overhead, 1.0)

    classes = []
    sum_lost = 0.0
    recovery = 0.0  # sum_i (lambda_i/lambda) (e^{lambda D_i} - 1), the expected recovery * lambda
    parts: dict[str, float] = {"detection": 0.0, "restart": 0.0, "restore": 0.0}
    for fc in inputs.failures:
        r = rates[fc.name]
        tier = tiers[fc.name]
        shares = [(tier, 1.0)]
        if fc.loses_node and tier == Tier.PEER:
            shares = [(Tier.PEER, 1 - overflow), (Tier.DISK, overflow)]
        det = c.detect_s[Detect(fc.detect).value]
        lost = restore = 0.0
        for t, w in shares:
            if t == Tier.DISK and inputs.memory_tier:
                # memory restores do not reset the persist phase: uniform over the interval
                lost += w * (persist / 2 + c.persist_latency_s)
            elif t == Tier.DISK:
                lost += w * expected_lost(persist, total, c.persist_latency_s)
            else:
                lat = c.protect_latency_s if t == Tier.PEER else 0.0
                lost += w * expected_lost(snap, total, lat)
            restore += w * c.restore_s[t.value]
        down = det + c.restart_s + restore
        rec = (r / total) * math.expm1(total * down) if total else 0.0
        recovery += rec
        sum_lost += r * lost
        for key, v in (("detection", det), ("restart", c.restart_s), ("restore", restore)):
            parts[key] += rec * v / down if down else 0.0
        classes.append((fc, r, tier, det, restore, lost, rec))
    run_fraction = 1.0 / (1.0 + recovery)  # of wall time, the job is running (not recovering)
    lost_fraction = run_fraction * min(sum_lost, 1.0)
    ettr = run_fraction * (1 - min(sum_lost, 1.0)) * (1 - overhead)
    breakdown = {
        "productive": ettr,
        "snapshot_overhead": run_fraction * (1 - min(sum_lost, 1.0)) * overhead,
        "lost_work": lost_fraction,
        **{k: v / (1.0 + recovery) for k, v in parts.items()},
    }
    class_costs = tuple(
        ClassCost(name=fc.name, rate_per_day=r * DAY_S, tier=tier.value, detection_s=det,
                  restart_s=c.restart_s, restore_s=restore, lost_work_s=lost,
                  downtime_fraction=rec / (1.0 + recovery),
                  lost_work_fraction=run_fraction * r * lost)
        for fc, r, tier, det, restore, lost, rec in classes
    )
    return Plan(
        ettr=ettr, snapshot_interval_s=snap,
        snapshot_every_steps=round(snap / c.step_s) if math.isfinite(snap) else 0,
        persist_interval_s=persist, persist_every_snapshots=every, redundancy=(k, m),
        disk_fallback_per_day=fallback * DAY_S, failures_per_day=total * DAY_S,
        mtbf_s=1 / total if total else math.inf, breakdown=breakdown, classes=class_costs,
    )


def resolved(inputs: Inputs, p: Plan) -> Inputs:
    """``inputs`` with the plan's cadences and redundancy filled in (what the simulation runs)."""
    return replace(inputs,
                   snapshot_interval_s=p.snapshot_interval_s if math.isfinite(
                       p.snapshot_interval_s) else None,
                   persist_interval_s=p.persist_interval_s if math.isfinite(
                       p.persist_interval_s) else None,
                   redundancy=p.redundancy)


def inputs_from_mapping(data: Mapping[str, Any], base: Inputs | None = None) -> Inputs:
    """Overrides from a JSON/YAML document onto ``base``; unknown keys raise naming the key.

    Accepted keys: ``gpus``, ``gpus_per_node``, ``reference_gpus``, ``reference_days``,
    ``regroup_s``, ``snapshot_interval_s``, ``persist_interval_s``, ``redundancy: {k, m}``,
    ``costs: {field: value, detect_s: {...}, restore_s: {...}}``, and ``failures: {name:
    count | {count, detect, tier, loses_node}}`` (a new name adds a class; count 0 drops one).
    """
    base = base or Inputs()
    if not isinstance(data, Mapping):
        raise ValueError("plan input must be a mapping")
    scalars = {"gpus", "gpus_per_node", "reference_gpus", "reference_days", "regroup_s",
               "snapshot_interval_s", "persist_interval_s"}
    known = scalars | {"costs", "failures", "redundancy"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown plan input key(s) {unknown}; known: {sorted(known)}")
    kw: dict[str, Any] = {k: data[k] for k in scalars & set(data)}
    if "redundancy" in data:
        red = data["redundancy"]
        if not isinstance(red, Mapping) or set(red) != {"k", "m"}:
            raise ValueError("redundancy must be a mapping with k and m")
        kw["redundancy"] = (int(red["k"]), int(red["m"]))
    if "costs" in data:
        kw["costs"] = costs_from_mapping(data["costs"], base.costs)
    if "failures" in data:
        kw["failures"] = failures_from_mapping(data["failures"], base.failures)
    return replace(base, **kw)


def costs_from_mapping(data: Any, base: Costs) -> Costs:
    if not isinstance(data, Mapping):
        raise ValueError("costs must be a mapping")
    names = {f.name for f in fields(Costs)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown costs key(s) {unknown}; known: {sorted(names)}")
    kw: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("detect_s", "restore_s"):
            if not isinstance(value, Mapping):
                raise ValueError(f"costs.{key} must be a mapping")
            allowed = {d.value for d in Detect} if key == "detect_s" else {t.value for t in Tier}
            bad = sorted(set(value) - allowed)
            if bad:
                raise ValueError(f"costs.{key}: unknown key(s) {bad}; known: {sorted(allowed)}")
            kw[key] = {**getattr(base, key), **value}
        else:
            kw[key] = value
    return replace(base, **kw)


def failures_from_mapping(data: Any, base: tuple[FailureClass, ...]) -> tuple[FailureClass, ...]:
    if not isinstance(data, Mapping):
        raise ValueError("failures must be a mapping of class name -> count or {count, ...}")
    by_name = {fc.name: fc for fc in base}
    for name, spec in data.items():
        if isinstance(spec, int | float) and not isinstance(spec, bool):
            if name not in by_name:
                raise ValueError(f"failures.{name}: a new class needs count, detect and tier")
            by_name[name] = replace(by_name[name], count=float(spec))
            continue
        if not isinstance(spec, Mapping):
            raise ValueError(f"failures.{name} must be a number or a mapping")
        old = by_name.get(name)
        try:
            by_name[name] = FailureClass(
                name=name, count=float(spec.get("count", old.count if old else -1)),
                detect=Detect(spec.get("detect", old.detect if old else "")),
                tier=Tier(spec.get("tier", old.tier if old else "")),
                loses_node=bool(spec.get("loses_node", old.loses_node if old else False)))
        except ValueError as e:
            raise ValueError(f"failures.{name}: {e}") from None
    return tuple(fc for fc in by_name.values() if fc.count > 0)
