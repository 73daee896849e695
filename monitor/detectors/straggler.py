"""Straggler detection: a rank persistently slower than the median of its peers.

Per step, each rank's time (see :class:`StepMetric`) is compared with the median of the *other*
ranks' times for that step. The rank is *slow at that step* when both

- its ratio to the peer median is >= ``threshold`` (1.10 = 10% slower), and
- its distance from the peer median, in robust standard deviations (MAD of the peers scaled by
  1.4826, floored at ``noise_floor`` x median and ``noise_floor_s`` so identical timings do not
  divide by zero), is >= ``min_z``. This keeps a cluster whose timings are all very noisy from
  flagging whoever happened to be slow.

A rank slow in >= ``persistence`` of its last ``window`` evaluated steps is flagged
(:attr:`FindingKind.STRAGGLER`, emitted once); a flagged rank that is not slow for
``clear_after`` consecutive steps is cleared (:attr:`FindingKind.STRAGGLER_CLEARED`). Clearing
takes more evidence than flagging (hysteresis): on a loaded node a rank slow every few steps
would otherwise be flagged and cleared over and over.

A step is evaluated once every member rank has reported it or a later step (records of one rank
arrive in order), so batches may arrive late and out of step across ranks. Members are the ranks
declared with :meth:`StragglerDetector.expect_ranks`, else every rank seen in the attempt. Only
durations measured on one rank's clock are compared, so node clocks need not agree.

The per-rank *score* is the median ratio to the peer median over the rank's last ``persistence``
steps: the value of the ``hpt_straggler_score`` gauge.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from hpt.monitor.detectors._common import (
    MAD_TO_SIGMA,
    LowWatermark,
    median,
    require,
)
from hpt.monitor.records import Detection, Finding, FindingKind, StepRecord, StepSummary

__all__ = ["StepMetric", "StragglerConfig", "StragglerDetector", "step_value", "summary_values"]

_EPS = 1e-9


class StepMetric(str, Enum):  # noqa: UP042 (STYLE: (str, Enum) for logged values)
    """Which duration of a step the straggler detector compares across ranks."""

    STEP = "step"
    """``end_s - start_s``. In synchronous training this includes waiting for peers in
    collectives, so every rank shows the slow rank's time: use it only without collectives."""
    BUSY = "busy"
    """``data_wait_s + compute_s``: the rank's own work, excluding time blocked on peers."""
    COMPUTE = "compute"
    """``compute_s`` only: ignores slow input pipelines."""


def summary_values(summary: StepSummary, metric: StepMetric) -> Sequence[float]:
    """The column of durations ``metric`` names in ``summary``, in seconds."""
    if metric is StepMetric.STEP:
        return summary.step_s
    if metric is StepMetric.COMPUTE:
        return summary.compute_s
    return [w + c for w, c in zip(summary.data_wait_s, summary.compute_s, strict=True)]


def step_value(rec: StepRecord, metric: StepMetric) -> float:
    """The duration of ``rec`` that ``metric`` names, in seconds."""
    if metric is StepMetric.STEP:
        return rec.end_s - rec.start_s
    if metric is StepMetric.COMPUTE:
        return rec.compute_s
    return rec.data_wait_s + rec.compute_s


@dataclass(frozen=True, kw_only=True, slots=True)
class StragglerConfig:
    """Tuning of :class:`StragglerDetector`."""

    threshold: float = 1.08
    """Ratio to the peer median at or above which a step counts as slow. Below the 10% the
    product promises: fixed per-step costs (bookkeeping, the collective) dilute a 10%
    slowdown of a rank's work to ~1.09 measured, which 1.10 missed in most runs."""
    window: int = 10
    """How many of the rank's most recent evaluated steps are considered."""
    persistence: int = 5
    """Slow steps within the window that flag a rank; consecutive fine steps that clear it."""
    min_z: float = 2.0
    """Robust z-score (distance from the peer median in MAD-scaled sigmas) a slow step needs."""
    noise_floor: float = 0.02
    """Lower bound of the peers' sigma as a fraction of their median."""
    noise_floor_s: float = 1e-4
    """Lower bound of the peers' sigma and of the median, in seconds."""
    clear_after: int = 20
    """Consecutive steps in line with its peers that clear a flagged rank; twice the window by
    default, so that a rank slow in bursts stays flagged instead of flapping (measured: 9 of 31
    events of a clean demo on a loaded 2-core machine were flag/clear pairs with 5)."""
    min_step_fraction: float = 0.08
    """A slow step must also lag the peer median by this fraction of the median step time
    (just under the 10% the product names): a rank 20% slower on 2 ms of compute inside a
    50 ms step costs the job nothing (measured: clean runs of examples/train.py, 2 ms of
    compute per 100 ms step, were flagged all the time without it)."""
    min_ranks: int = 2
    """Ranks a step needs to be compared at all."""
    metric: StepMetric = StepMetric.BUSY
    """Which duration is compared."""
    max_pending_steps: int = 64
    """Steps buffered while waiting for late ranks; beyond this the oldest is evaluated with
    the ranks that did report (a dead rank must not stop detection for the others)."""

    def __post_init__(self) -> None:
        require(self.threshold > 1.0, "threshold", self.threshold, "be > 1.0")
        require(self.window >= 1, "window", self.window, "be >= 1")
        require(
            1 <= self.persistence <= self.window,
            "persistence",
            self.persistence,
            f"be between 1 and window ({self.window})",
        )
        require(self.min_z >= 0.0, "min_z", self.min_z, "be >= 0")
        require(self.noise_floor >= 0.0, "noise_floor", self.noise_floor, "be >= 0")
        require(self.noise_floor_s > 0.0, "noise_floor_s", self.noise_floor_s, "be > 0")
        require(self.min_ranks >= 2, "min_ranks", self.min_ranks, "be >= 2")
        require(
            self.clear_after >= self.persistence,
            "clear_after",
            self.clear_after,
            f"be >= persistence ({self.persistence})",
        )
        require(
            0.0 <= self.min_step_fraction < 1.0,
            "min_step_fraction",
            self.min_step_fraction,
            "be in [0, 1)",
        )
        require(
            isinstance(self.metric, StepMetric),
            "metric",
            self.metric,
            f"be one of {', '.join(m.value for m in StepMetric)}",
        )
        require(self.max_pending_steps >= 1, "max_pending_steps", self.max_pending_steps, "be >= 1")


@dataclass(slots=True)
class _Rank:
    node: str
    last_step: int = -1
    since: int = 0
    """Ordinal of the first evaluated step of its window (its first step, or the step after it
    was cleared)."""
    slow_at: deque[int] = field(default_factory=deque)
    """Ordinals of the evaluated steps it was slow at, newest last (only the window's)."""
    flagged: bool = False
    fine_run: int = 0


@dataclass(slots=True)
class _Step:
    """One evaluated step: each rank's compared value and the step's sorted values, from which
    any rank's ratio to its peers' median is recomputed on demand (for scores and evidence),
    instead of being stored per rank per step."""

    entries: dict[int, tuple[float, float]]
    vals: list[float]

    def ratio(self, rank: int, floor_s: float) -> float | None:
        e = self.entries.get(rank)
        if e is None:
            return None
        v = e[0]
        return v / max(_loo_median(self.vals, bisect_left(self.vals, v)), floor_s)


@dataclass(slots=True)
class _Job:
    attempt: int
    expected: frozenset[int] | None = None
    ranks: dict[int, _Rank] = field(default_factory=dict)
    # step -> rank -> (compared value, step_s)
    pending: dict[int, dict[int, tuple[float, float]]] = field(default_factory=dict)
    evaluated_through: int = -1
    num_evaluated: int = 0  # the next evaluated step's ordinal
    recent: deque[_Step] = field(default_factory=deque)  # the last `persistence` evaluated
    step_medians: deque[float] = field(default_factory=lambda: deque(maxlen=32))
    watermark: LowWatermark = field(default_factory=LowWatermark)  # min last_step of members
    flagged: set[int] = field(default_factory=set)  # ranks whose _Rank.flagged is set


@dataclass(slots=True)
class _Verdict:
    rank: int
    value: float
    peer_median: float
    ratio: float
    z: float
    slow: bool


def _loo_median(vals: Sequence[float], i: int) -> float:
    """Median of the sorted ``vals`` without its entry ``i``, in O(1): removing any of equal
    values leaves the same multiset, so ``i`` may be any index of that value."""
    m = len(vals) - 1
    h = m // 2
    if m % 2:
        return vals[h] if h < i else vals[h + 1]
    if i <= h - 1:
        return (vals[h] + vals[h + 1]) / 2.0
    if i == h:
        return (vals[h - 1] + vals[h + 1]) / 2.0
    return (vals[h - 1] + vals[h]) / 2.0


def _value(item: tuple[int, tuple[float, float]]) -> float:
    return item[1][0]


class StragglerDetector:
    """Stateful straggler detector for any number of jobs; one instance per controller.

    State is kept per job; records of a newer attempt reset the job, records of an older
    attempt are ignored (they are late reports from ranks already stopped).
    """

    def __init__(self, cfg: StragglerConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else StragglerConfig()
        self._jobs: dict[str, _Job] = {}

    # -- inputs -------------------------------------------------------------------------------

    def expect_ranks(self, job_id: str, attempt: int, nodes_by_rank: Mapping[int, str]) -> None:
        """Declare the ranks of an attempt (and their nodes), e.g. when it launches.

        Steps are then evaluated only once all these ranks reported them (or the buffer of
        pending steps is full), instead of once all ranks *seen so far* did.
        """
        job = self._job_for(job_id, attempt)
        if job is None:
            return
        job.expected = frozenset(nodes_by_rank)
        job.watermark.invalidate()
        for rank, node in nodes_by_rank.items():
            self._rank(job, rank, node)

    def observe(self, records: Iterable[object], now: float) -> Detection:
        """Feed a batch of records (non-step records are ignored) and evaluate ready steps.

        Args:
            records: :class:`StepRecord` and :class:`StepSummary` (the same steps, column by
                column) in any order, from any ranks and jobs.
            now: the caller's monotonic clock; stamped on findings as ``detected_at_s``.

        Returns:
            STRAGGLER / STRAGGLER_CLEARED findings and a one-line reason.
        """
        touched: dict[str, _Job] = {}
        for rec in records:
            if isinstance(rec, StepSummary):
                job = self._job_for(rec.job_id, rec.attempt)
                if job is not None:
                    self._ingest(job, rec.node, rec.rank, rec.step,
                                 summary_values(rec, self.cfg.metric), rec.step_s)
                    touched[rec.job_id] = job
            elif isinstance(rec, StepRecord):
                job = self._job_for(rec.job_id, rec.attempt)
                if job is not None:
                    self._ingest(job, rec.node, (rec.rank,), (rec.step,),
                                 (step_value(rec, self.cfg.metric),), (rec.end_s - rec.start_s,))
                    touched[rec.job_id] = job
        findings: list[Finding] = []
        reasons: list[str] = []
        for job_id, job in touched.items():
            reasons.append(self._evaluate_ready(job_id, job, now, findings))
        reason = "; ".join(reasons) if reasons else "no step records"
        return Detection(tuple(findings), reason)

    def _ingest(self, job: _Job, node: str, ranks: Sequence[int], steps: Sequence[int],
                values: Sequence[float], step_s: Sequence[float]) -> None:
        """Steps of one node's ranks, from a summary's columns or one record alike. The loop
        runs once per rank and step of the whole cluster (80,000 ranks: 80,000 times a second
        at a step a second): no call, no object beyond the entry, in the common case."""
        through = job.evaluated_through
        known = job.ranks
        pending = job.pending
        expected = job.expected
        watermark = job.watermark
        for rank, step, value, took in zip(ranks, steps, values, step_s, strict=True):
            if step <= through:
                continue
            r = known.get(rank)
            if r is None or r.node != node:
                r = self._rank(job, rank, node)
            if step > r.last_step:
                if expected is None or rank in expected:
                    watermark.raised(r.last_step, step)
                r.last_step = step
            entries = pending.get(step)
            if entries is None:
                entries = pending[step] = {}
            entries[rank] = (value, took)

    def forget(self, job_id: str) -> None:
        """Drop all state of a job (it ended)."""
        self._jobs.pop(job_id, None)

    # -- outputs for metrics and the hang detector ----------------------------------------------

    def scores(self, job_id: str) -> dict[int, float]:
        """Per rank: median ratio to the peer median over the job's last ``persistence``
        evaluated steps it took part in.

        1.0 is in line with the peers; 1.3 is 30% slower.
        """
        job = self._jobs.get(job_id)
        if job is None:
            return {}
        ranks = set().union(*(st.entries for st in job.recent))
        return {rank: score for rank in ranks if (score := self._score(job, rank)) is not None}

    def flagged(self, job_id: str) -> frozenset[int]:
        """Ranks currently flagged as stragglers."""
        job = self._jobs.get(job_id)
        if job is None:
            return frozenset()
        return frozenset(job.flagged)

    def median_step_s(self, job_id: str) -> float | None:
        """Median wall step time over recent evaluated steps, None before the first one.

        This is what :func:`hpt.monitor.detectors.hang.check_hang` takes.
        """
        job = self._jobs.get(job_id)
        if job is None or not job.step_medians:
            return None
        return median(job.step_medians)

    # -- internals ------------------------------------------------------------------------------

    def _job_for(self, job_id: str, attempt: int) -> _Job | None:
        job = self._jobs.get(job_id)
        if job is None or attempt > job.attempt:
            job = _Job(attempt=attempt)
            self._jobs[job_id] = job
        elif attempt < job.attempt:
            return None
        return job

    def _rank(self, job: _Job, rank: int, node: str) -> _Rank:
        r = job.ranks.get(rank)
        if r is None:
            r = _Rank(node=node, since=job.num_evaluated)
            job.ranks[rank] = r
            job.watermark.invalidate()
        elif node:
            r.node = node
        return r

    def _evaluate_ready(self, job_id: str, job: _Job, now: float, out: list[Finding]) -> str:
        members = job.expected if job.expected is not None else job.ranks.keys()
        watermark = job.watermark.get(lambda: (job.ranks[m].last_step for m in members))
        ready = sorted(s for s in job.pending if s <= watermark)
        overflow = len(job.pending) - len(ready) - self.cfg.max_pending_steps
        if overflow > 0:
            waiting = sorted(s for s in job.pending if s > watermark)
            ready = sorted(ready + waiting[:overflow])
        n_before = len(out)
        evaluated: list[int] = []
        top: _Verdict | None = None
        for step in ready:
            entries = job.pending.pop(step)
            job.evaluated_through = max(job.evaluated_through, step)
            if len(entries) < self.cfg.min_ranks:
                continue
            evaluated.append(step)
            job.step_medians.append(median([e[1] for e in entries.values()]))
            verdicts, top_here = self._judge(job, entries)
            if top is None or top_here.ratio > top.ratio:
                top = top_here
            for v in verdicts:
                self._update(job_id, job, step, v, now, out)
            job.num_evaluated += 1
        head = f"job {job_id} attempt {job.attempt}"
        if not evaluated:
            return f"{head}: no step ready (all ranks reported through step {watermark})"
        span = (
            f"step {evaluated[0]}"
            if len(evaluated) == 1
            else f"steps {evaluated[0]}..{evaluated[-1]}"
        )
        new = [f"rank {f.rank} {f.kind.value}" for f in out[n_before:]]
        worst = f"max ratio {top.ratio:.2f} (rank {top.rank})" if top is not None else ""
        return (
            f"{head}: {span} over {len(job.ranks)} ranks, {self.cfg.metric.value} time vs "
            f"threshold {self.cfg.threshold:.2f}: {worst}"
            + (f"; {', '.join(new)}" if new else "; no change")
        )

    def _judge(
        self, job: _Job, entries: dict[int, tuple[float, float]]
    ) -> tuple[list[_Verdict], _Verdict]:
        """Verdicts of the step's ranks that can change state (at or above the threshold, or
        flagged), and the verdict of the rank with the highest ratio.

        A rank's ratio to its peers' median does not decrease with its rank in the sorted
        values (its value grows, the median of the others can only shrink), so the ranks at or
        above the threshold are a suffix of the order, found from the top. The rest are
        neither slow nor able to become flagged: only flagged ranks among them are judged (a
        clear needs their run of fine steps). Nothing is stored per rank and step."""
        cfg = self.cfg
        items = sorted(entries.items(), key=_value)
        vals = [e[1][0] for e in items]
        step_s = median([e[1] for e in entries.values()])
        min_lag = cfg.min_step_fraction * step_s
        floor_s = cfg.noise_floor_s
        n = len(vals)
        job.recent.append(_Step(entries, vals))
        while len(job.recent) > cfg.persistence:
            job.recent.popleft()
        devs: dict[float, list[float]] = {}  # peer median -> every value's distance, sorted

        def verdict(i: int) -> _Verdict:
            v = vals[i]
            med = _loo_median(vals, i)
            ratio = v / max(med, floor_s)
            z = 0.0
            slow = False
            if ratio >= cfg.threshold - _EPS:
                # Only candidates pay for the peers' MAD: the median distance to `med` of every
                # value but this one, again a leave-one-out median of one sorted list per `med`.
                d = devs.get(med)
                if d is None:
                    d = devs[med] = sorted(abs(x - med) for x in vals)
                mad = _loo_median(d, bisect_left(d, abs(v - med)))
                sigma = max(MAD_TO_SIGMA * mad, cfg.noise_floor * med, floor_s)
                z = (v - med) / sigma
                slow = z >= cfg.min_z - _EPS and v - med >= min_lag - _EPS
            return _Verdict(items[i][0], v, med, ratio, z, slow)

        out: list[_Verdict] = []
        judged: set[int] = set()
        top = verdict(n - 1)
        i = n - 1
        while i >= 0:
            v = top if i == n - 1 else verdict(i)
            if v.ratio < cfg.threshold - _EPS:
                break
            out.append(v)
            judged.add(v.rank)
            i -= 1
        first = bisect_left(vals, vals[-1])  # the first of equal highest values
        if first < n - 1:
            top = verdict(first)
        if job.flagged:
            index = {rank: k for k, (rank, _) in enumerate(items)}
            out += [verdict(index[rank]) for rank in job.flagged
                    if rank in entries and rank not in judged]
        out.sort(key=lambda v: bisect_left(vals, v.value))  # judged in the order of values
        return out, top

    def _score(self, job: _Job, rank: int) -> float | None:
        floor_s = self.cfg.noise_floor_s
        ratios = [x for st in job.recent if (x := st.ratio(rank, floor_s)) is not None]
        return median(ratios) if ratios else None

    def _update(
        self, job_id: str, job: _Job, step: int, v: _Verdict, now: float, out: list[Finding]
    ) -> None:
        cfg = self.cfg
        r = job.ranks[v.rank]
        k = job.num_evaluated
        if v.slow:
            r.slow_at.append(k)
        while r.slow_at and r.slow_at[0] <= k - cfg.window:
            r.slow_at.popleft()
        num_slow = len(r.slow_at)
        window = min(cfg.window, k - r.since + 1)

        def evidence() -> dict[str, float | int | str]:  # built only for a finding: 80,000 ranks
            return {
                "step": step,
                "score": round(self._score(job, v.rank) or v.ratio, 4),
                "ratio": round(v.ratio, 4),
                "z": round(v.z, 2),
                "value_s": v.value,
                "peer_median_s": v.peer_median,
                "slow_steps": num_slow,
                "window": window,
                "threshold": cfg.threshold,
                "metric": cfg.metric.value,
            }

        who = f"rank {v.rank} ({r.node})" if r.node else f"rank {v.rank}"
        if not r.flagged:
            if num_slow >= cfg.persistence:
                r.flagged = True
                job.flagged.add(v.rank)
                r.fine_run = 0
                out.append(
                    Finding(
                        kind=FindingKind.STRAGGLER,
                        job_id=job_id,
                        attempt=job.attempt,
                        rank=v.rank,
                        node=r.node,
                        message=(
                            f"{who} is a straggler: {cfg.metric.value} time "
                            f"{self._score(job, v.rank) or v.ratio:.2f}x the peer median, slow "
                            f"in {num_slow} of its last {window} steps (threshold "
                            f"{cfg.threshold:.2f}, persistence {cfg.persistence}) at step {step}"
                        ),
                        detected_at_s=now,
                        evidence=evidence(),
                    )
                )
            return
        r.fine_run = 0 if v.slow else r.fine_run + 1
        if r.fine_run >= cfg.clear_after:
            r.flagged = False
            job.flagged.discard(v.rank)
            r.fine_run = 0
            cleared_evidence = evidence()
            # Start the window afresh so old slow steps cannot re-flag the rank at once.
            r.slow_at.clear()
            r.since = k + 1
            out.append(
                Finding(
                    kind=FindingKind.STRAGGLER_CLEARED,
                    job_id=job_id,
                    attempt=job.attempt,
                    rank=v.rank,
                    node=r.node,
                    message=(
                        f"{who} is no longer a straggler: in line with its peers for "
                        f"{cfg.clear_after} consecutive steps (ratio {v.ratio:.2f} at step {step})"
                    ),
                    detected_at_s=now,
                    evidence=cleared_evidence,
                )
            )
