"""Collective analysis after C4: find the slow rank and the rank missing from a stuck collective.

Collectives in data-parallel training are periodic and homogeneous: every rank issues the same
sequence, so the n-th collective (``seq``) of every rank is the same operation. Two signals
follow.

**Laggard.** A blocking collective completes on all ranks at (nearly) the same moment, so a
rank's time inside it, ``exit_s - enter_s``, is how long it waited for the others: the rank that
entered *last* waited least. Its lateness is ``median(wait) - its wait``. This compares durations
measured on each rank's own clock, so node clocks need not agree. Over the last ``window``
completed seqs, a rank that was last (with lateness > ``min_lag_s``) in >= ``laggard_fraction``
of them is a COLLECTIVE_LAGGARD. It is reported once, and again only after it fell below the
fraction in between.

**Missing.** When some ranks have been inside seq ``s`` for longer than ``stuck_s`` and other
ranks never entered ``s`` (the highest seq they entered is below ``s``), those others are the
culprits: COLLECTIVE_MISSING, once per (seq, rank). How long a collective has been in flight is
measured on the *observer's* clock, from the first :meth:`CollectiveDetector.observe` call that
saw it in flight, so detection is late by at most the reporting interval but never depends on a
rank's clock. Ranks report in-flight collectives with ``exit_s = None``.

A seq is final once every member rank reported a completed collective at or after it (records
of one rank arrive in order). Members are the ranks declared with
:meth:`CollectiveDetector.expect_ranks`, else every rank seen in the attempt; only declared
members that never reported can be named as missing.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from hpt.monitor.detectors._common import LowWatermark, is_finite, median, median_sorted, require
from hpt.monitor.records import CollectiveRecord, CollectiveSummary, Detection, Finding, FindingKind

__all__ = ["CollectiveConfig", "CollectiveDetector"]


@dataclass(frozen=True, kw_only=True, slots=True)
class CollectiveConfig:
    """Tuning of :class:`CollectiveDetector`."""

    window: int = 20
    """How many of the most recent completed collectives the laggard vote runs over."""
    laggard_fraction: float = 0.8
    """Fraction of the window in which one rank must be last to be named a laggard."""
    min_lag_s: float = 0.001
    """The last rank counts only when it entered this much later than the median rank."""
    stuck_s: float = 30.0
    """A collective in flight this long (observer clock) is stuck."""
    min_ranks: int = 2
    """Ranks a collective needs to be compared."""
    max_pending_seqs: int = 256
    """Collectives buffered while waiting for late ranks; beyond this the oldest is judged
    with the ranks that did report."""

    def __post_init__(self) -> None:
        require(self.window >= 1, "window", self.window, "be >= 1")
        require(
            is_finite(self.laggard_fraction) and 0.5 < self.laggard_fraction <= 1.0,
            "laggard_fraction",
            self.laggard_fraction,
            "be > 0.5 and <= 1 (a majority, so only one rank can hold it)",
        )
        require(
            is_finite(self.min_lag_s) and self.min_lag_s >= 0.0,
            "min_lag_s",
            self.min_lag_s,
            "be >= 0",
        )
        require(is_finite(self.stuck_s) and self.stuck_s > 0.0, "stuck_s", self.stuck_s, "be > 0")
        require(self.min_ranks >= 2, "min_ranks", self.min_ranks, "be >= 2")
        require(self.max_pending_seqs >= 1, "max_pending_seqs", self.max_pending_seqs, "be >= 1")


@dataclass(slots=True)
class _Last:
    seq: int
    rank: int | None
    op: str
    lateness_s: float


@dataclass(slots=True)
class _Job:
    attempt: int
    expected: frozenset[int] | None = None
    nodes: dict[int, str] = field(default_factory=dict)
    entered: dict[int, int] = field(default_factory=dict)  # rank -> highest seq entered
    done: dict[int, int] = field(default_factory=dict)  # rank -> highest seq completed
    pending: dict[int, dict[int, tuple[float, str]]] = field(default_factory=dict)
    inflight: dict[tuple[int, int], tuple[str, float]] = field(default_factory=dict)
    finalized_through: int = -1
    recent: deque[_Last] = field(default_factory=deque)
    laggards: set[int] = field(default_factory=set)
    missing_reported: set[tuple[int, int]] = field(default_factory=set)
    watermark: LowWatermark = field(default_factory=LowWatermark)  # min done seq of members


class CollectiveDetector:
    """Stateful C4-style detector for any number of jobs; one instance per controller.

    Records of a newer attempt reset the job; records of an older attempt are ignored.
    """

    def __init__(self, cfg: CollectiveConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else CollectiveConfig()
        self._jobs: dict[str, _Job] = {}

    def expect_ranks(self, job_id: str, attempt: int, nodes_by_rank: Mapping[int, str]) -> None:
        """Declare the ranks of an attempt and their nodes, e.g. when it launches."""
        job = self._job_for(job_id, attempt)
        if job is None:
            return
        job.expected = frozenset(nodes_by_rank)
        job.watermark.invalidate()
        job.nodes.update(nodes_by_rank)

    def forget(self, job_id: str) -> None:
        """Drop all state of a job (it ended)."""
        self._jobs.pop(job_id, None)

    def laggards(self, job_id: str) -> frozenset[int]:
        """Ranks currently named as laggards."""
        job = self._jobs.get(job_id)
        return frozenset(job.laggards) if job is not None else frozenset()

    def entered(self, job_id: str, attempt: int) -> Mapping[int, int]:
        """Per rank, the highest seq it entered in ``attempt`` (empty for another attempt)."""
        job = self._jobs.get(job_id)
        return job.entered if job is not None and job.attempt == attempt else {}

    def observe(self, records: Iterable[object], now: float) -> Detection:
        """Feed a batch of records (non-collective records are ignored), then judge.

        Args:
            records: :class:`CollectiveRecord` and :class:`CollectiveSummary` (completed
                collectives column by column) in any order, from any ranks and jobs; in-flight
                collectives carry ``exit_s=None`` and may be reported again while still in
                flight.
            now: the caller's monotonic clock; ages of in-flight collectives are measured on it.

        Returns:
            COLLECTIVE_LAGGARD / COLLECTIVE_MISSING findings and a one-line reason.
        """
        require(is_finite(now), "now", now, "be a finite number")
        for rec in records:
            if isinstance(rec, CollectiveSummary):
                job = self._job_for(rec.job_id, rec.attempt)
                if job is None:
                    continue
                self._ingest_columns(job, rec)
            elif isinstance(rec, CollectiveRecord) and rec.seq >= 0:
                job = self._job_for(rec.job_id, rec.attempt)
                if job is not None:
                    self._ingest(job, rec, now)

        findings: list[Finding] = []
        reasons: list[str] = []
        for job_id, job in self._jobs.items():
            n_before = len(findings)
            head = f"job {job_id} attempt {job.attempt}"
            lag = self._finalize(job_id, job, now, findings)
            stuck = self._check_stuck(job_id, job, now, findings)
            new = [
                f"rank {f.rank} {f.kind.value} (seq {f.evidence['seq']})"
                for f in findings[n_before:]
            ]
            reasons.append(f"{head}: {lag}; {stuck}" + (f"; {', '.join(new)}" if new else ""))
        return Detection(tuple(findings), "; ".join(reasons) if reasons else "no jobs")

    # -- internals ------------------------------------------------------------------------------

    def _job_for(self, job_id: str, attempt: int) -> _Job | None:
        job = self._jobs.get(job_id)
        if job is None or attempt > job.attempt:
            job = _Job(attempt=attempt, recent=deque(maxlen=self.cfg.window))
            self._jobs[job_id] = job
        elif attempt < job.attempt:
            return None
        return job

    def _ingest_columns(self, job: _Job, rec: CollectiveSummary) -> None:
        """A summary's completed collectives: :meth:`_entered` and :meth:`_completed` of each
        entry, inlined (this loop runs once per rank and collective of the whole cluster)."""
        if rec.node:
            job.nodes.update(dict.fromkeys(rec.rank, rec.node))
        ops = rec.ops
        entered = job.entered
        done = job.done
        pending = job.pending
        inflight = job.inflight
        expected = job.expected
        watermark = job.watermark
        through = job.finalized_through
        for rank, seq, op, duration in zip(
            rec.rank, rec.seq, rec.op_index, rec.duration_s, strict=True
        ):
            if seq < 0:
                continue
            last = entered.get(rank)
            if last is None:
                watermark.invalidate()  # a new member (when no ranks were declared)
                entered[rank] = seq
            elif seq > last:
                entered[rank] = seq
            if inflight:
                inflight.pop((rank, seq), None)
            last = done.get(rank, -1)
            if seq > last:
                if expected is None or rank in expected:
                    watermark.raised(last, seq)
                done[rank] = seq
            if seq > through:
                entries = pending.get(seq)
                if entries is None:
                    entries = pending[seq] = {}
                entries[rank] = (duration, ops[op])

    def _ingest(self, job: _Job, rec: CollectiveRecord, now: float) -> None:
        rank, seq = rec.rank, rec.seq
        self._entered(job, rank, rec.node, seq)
        if rec.exit_s is None:
            if seq > job.done.get(rank, -1):
                job.inflight.setdefault((rank, seq), (rec.op, now))
            return
        self._completed(job, rank, seq, rec.exit_s - rec.enter_s, rec.op)

    def _entered(self, job: _Job, rank: int, node: str, seq: int) -> None:
        if node:
            job.nodes[rank] = node
        entered = job.entered.get(rank)
        if entered is None:
            job.watermark.invalidate()  # a new member (when no ranks were declared)
            job.entered[rank] = seq
        elif seq > entered:
            job.entered[rank] = seq

    def _completed(self, job: _Job, rank: int, seq: int, duration_s: float, op: str) -> None:
        """``rank`` left collective ``seq`` after waiting ``duration_s`` in it."""
        if job.inflight:
            job.inflight.pop((rank, seq), None)
        done = job.done.get(rank, -1)
        if seq > done:
            if job.expected is None or rank in job.expected:
                job.watermark.raised(done, seq)
            job.done[rank] = seq
        if seq > job.finalized_through:
            pending = job.pending.get(seq)
            if pending is None:
                pending = job.pending[seq] = {}
            pending[rank] = (duration_s, op)

    def _members(self, job: _Job) -> Iterable[int]:
        return job.expected if job.expected is not None else job.entered.keys()

    def _finalize(self, job_id: str, job: _Job, now: float, out: list[Finding]) -> str:
        cfg = self.cfg
        watermark = job.watermark.get(lambda: (job.done.get(r, -1) for r in self._members(job)))
        ready = sorted(s for s in job.pending if s <= watermark)
        overflow = len(job.pending) - len(ready) - cfg.max_pending_seqs
        if overflow > 0:
            ready = sorted(ready + sorted(s for s in job.pending if s > watermark)[:overflow])
        for seq in ready:
            entries = job.pending.pop(seq)
            job.finalized_through = max(job.finalized_through, seq)
            if len(entries) < cfg.min_ranks:
                continue
            waits = sorted([w for w, _ in entries.values()])
            med = median_sorted(waits)
            last = min(r for r, (w, _) in entries.items() if w == waits[0])
            lateness = med - entries[last][0]
            op = entries[last][1]
            job.recent.append(_Last(seq, last if lateness > cfg.min_lag_s else None, op, lateness))

        n = len(job.recent)
        if n < cfg.window:
            return f"{n} of {cfg.window} collectives for the laggard vote"
        counts = Counter(x.rank for x in job.recent if x.rank is not None)
        need = math.ceil(cfg.laggard_fraction * cfg.window - 1e-9)
        job.laggards &= {r for r, c in counts.items() if c >= need}
        if not counts:
            return f"no rank last by more than {cfg.min_lag_s * 1e3:g} ms in {n} collectives"
        top, top_count = counts.most_common(1)[0]
        summary = (
            f"rank {top} last in {top_count} of {n} collectives (need {need}, "
            f"seq {job.recent[0].seq}..{job.recent[-1].seq})"
        )
        if top_count >= need and top not in job.laggards:
            job.laggards.add(top)
            late = [x for x in job.recent if x.rank == top]
            op = Counter(x.op for x in late).most_common(1)[0][0]
            lateness = median([x.lateness_s for x in late])
            node = job.nodes.get(top, "")
            who = f"rank {top} ({node})" if node else f"rank {top}"
            out.append(
                Finding(
                    kind=FindingKind.COLLECTIVE_LAGGARD,
                    job_id=job_id,
                    attempt=job.attempt,
                    rank=top,
                    node=node,
                    message=(
                        f"{who} entered {op} last in {top_count} of the last {n} collectives "
                        f"(seq {job.recent[0].seq}..{job.recent[-1].seq}), a median "
                        f"{lateness * 1e3:.1f} ms after the median rank"
                    ),
                    detected_at_s=now,
                    evidence={
                        "op": op,
                        "seq": late[-1].seq,
                        "first_seq": job.recent[0].seq,
                        "last_count": top_count,
                        "window": n,
                        "fraction": round(top_count / n, 4),
                        "median_lateness_s": lateness,
                    },
                )
            )
        return summary

    def _check_stuck(self, job_id: str, job: _Job, now: float, out: list[Finding]) -> str:
        cfg = self.cfg
        # A rank that completed a later seq is past anything it reported in flight earlier.
        for key in [k for k in job.inflight if k[1] <= job.done.get(k[0], -1)]:
            del job.inflight[key]
        stuck: dict[int, tuple[str, float, list[int]]] = {}
        for (rank, seq), (op, first_seen) in job.inflight.items():
            age = now - first_seen
            if age >= cfg.stuck_s:
                prev = stuck.get(seq)
                waiting = (prev[2] if prev else []) + [rank]
                stuck[seq] = (op, max(age, prev[1] if prev else 0.0), waiting)
        if not stuck:
            return f"{len(job.inflight)} collective(s) in flight, none stuck"
        parts: list[str] = []
        for seq in sorted(stuck):
            op, age, waiting = stuck[seq]
            missing = sorted(r for r in self._members(job) if job.entered.get(r, -1) < seq)
            if not missing:
                parts.append(f"{op} seq {seq} stuck {age:.1f} s with every rank inside")
                continue
            parts.append(f"{op} seq {seq} stuck {age:.1f} s, rank(s) {missing} never entered")
            for rank in missing:
                if (seq, rank) in job.missing_reported:
                    continue
                job.missing_reported.add((seq, rank))
                node = job.nodes.get(rank, "")
                who = f"rank {rank} ({node})" if node else f"rank {rank}"
                last = job.entered.get(rank, -1)
                out.append(
                    Finding(
                        kind=FindingKind.COLLECTIVE_MISSING,
                        job_id=job_id,
                        attempt=job.attempt,
                        rank=rank,
                        node=node,
                        message=(
                            f"{who} never entered {op} seq {seq}, which {len(waiting)} rank(s) "
                            f"have been waiting in for {age:.1f} s (its last seq: {last})"
                        ),
                        detected_at_s=now,
                        evidence={
                            "op": op,
                            "seq": seq,
                            "rank_last_seq": last,
                            "num_waiting": len(waiting),
                            "stuck_for_s": round(age, 3),
                        },
                    )
                )
        return "; ".join(parts)
