"""Fault detection in the controller: timing records in, findings out as events and faults.

Agents forward their ranks' timing records and their own findings in heartbeats; the gRPC
servicer hands each heartbeat to :meth:`Detection.on_heartbeat` (on its reader thread, outside
the reconciler's lock). Here:

- step records feed the straggler detector and collective records the C4-style collective
  detector of :mod:`hpt.monitor.detectors`; every finding (straggler, straggler cleared,
  collective laggard, collective missing) becomes an event naming job, attempt, rank, node and
  (for collectives) the op and seq. They are report-only: a straggler does not stop a job;
  restarting without the node after N consecutive flags is future work.
- HANG findings come from agents (they see the silence of their ranks and dump stacks). Each is
  an event, each rank's stack another; and the reconciler asks :meth:`Detection.pending_fault`
  on every pass of a running attempt. Once every node running the attempt reported a hang, or
  ``settle_s`` after the first report, the hang becomes a ``Fault(kind=hang)`` whose culprit is,
  in order: a rank whose process is stopped; a rank missing from the collective its peers are
  stuck in (from the in-flight records); a rank that an agent saw outside any collective while
  its peers waited; the rank silent longest. The attempt then restarts through the usual path.

Ranks' times are on their own monotonic clocks, so only durations are compared; ages of stuck
collectives and the hang settle time are measured on this process's monotonic clock.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hpt.controller import convert
from hpt.controller.model import Event, EventKind, Fault, FaultClass, FaultKind, HangCulprit
from hpt.monitor.columns import unpack_collectives, unpack_steps
from hpt.monitor.detectors.collective import CollectiveConfig, CollectiveDetector
from hpt.monitor.detectors.straggler import StragglerConfig, StragglerDetector
from hpt.monitor.records import (
    CollectiveRecord,
    CollectiveSummary,
    Finding,
    FindingKind,
    StepRecord,
    StepSummary,
    timing_stride,
)

log = logging.getLogger(__name__)

_MAX_STACK_EVENT_BYTES = 8 * 1024
_MAX_FINDINGS_PER_BEAT = 64
_MAX_STEPS_PER_BEAT = 10_000
_MAX_COLLECTIVES_PER_BEAT = 40_000


@dataclass(frozen=True, kw_only=True, slots=True)
class DetectionConfig:
    """Tuning of the controller's detectors."""

    straggler: StragglerConfig = field(default_factory=StragglerConfig)
    collective: CollectiveConfig = field(default_factory=lambda: CollectiveConfig(stuck_s=3.0))
    """Collectives in flight for ``stuck_s`` with a rank missing name that rank. Lower than the
    default hang deadline (5 s) so the culprit is named before the attempt is restarted."""
    settle_s: float = 1.0
    """After the first HANG report of an attempt, how long to wait for other nodes' reports
    (they may name a better culprit, e.g. a stopped rank) before declaring the fault."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.settle_s) and self.settle_s >= 0):
            raise ValueError(f"settle_s ({self.settle_s}) must be >= 0")


@dataclass(slots=True)
class _HangReport:
    node: str
    rank: int
    message: str
    evidence: dict[str, str]
    culprit: HangCulprit  # why the agent named this rank
    silent_since: float  # wall clock
    detected_at: float  # wall clock
    received: float  # monotonic


@dataclass(slots=True)
class _AttemptView:
    job_id: str
    attempt: int
    nodes_by_rank: dict[int, str]
    # rank -> its in-flight collectives in its node's latest report (ranks with none left out)
    inflight: dict[int, list[tuple[int, str]]] = field(default_factory=dict)
    hangs: list[_HangReport] = field(default_factory=list)
    fault_taken: bool = False
    flagged_steps: dict[int, int] = field(default_factory=dict)  # rank -> steps while flagged


AttemptLookup = Callable[[str, int], Mapping[int, str] | None]
"""``(job_id, attempt) -> {rank: node}`` of that attempt, None when unknown (stale)."""


class Detection:
    """The controller's detectors and the state they need; thread-safe.

    Args:
        emit: appends an event to the event log (``EventLog.emit``).
        attempt_ranks: looks an attempt's ranks up (takes the reconciler's lock itself).
        cfg: tuning.
        clock: wall clock for events.
    """

    def __init__(
        self,
        emit: Callable[[Event], object],
        attempt_ranks: AttemptLookup,
        cfg: DetectionConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg if cfg is not None else DetectionConfig()
        self._emit = emit
        self._attempt_ranks = attempt_ranks
        self._clock = clock
        self._lock = threading.Lock()
        self.straggler = StragglerDetector(self.cfg.straggler)
        self.collective = CollectiveDetector(self.cfg.collective)
        self._views: dict[tuple[str, int], _AttemptView] = {}
        self._current: dict[str, int] = {}  # job -> newest attempt seen
        self.num_heartbeats: dict[str, int] = {}
        self.num_records = 0
        self.num_dropped_records = 0
        self.findings: deque[Finding] = deque(maxlen=1000)
        """Recent findings of any kind, newest last (for metrics and tests)."""

    # ---------------------------------------------------------------- input (RPC threads)

    def on_heartbeat(self, node: str, hb: Any) -> None:
        """Take the monitoring part of one heartbeat from ``node`` (never raises on bad data:
        bad records are dropped and logged)."""
        self.on_heartbeats([(node, hb)])

    def on_heartbeats(self, beats: list[tuple[str, Any]]) -> None:
        """Take the monitoring part of a batch of heartbeats, ``(node, heartbeat)`` each.

        The detectors see the batch's records at once: each evaluates a job once per batch
        rather than once per heartbeat (the agent-stream intake batches heartbeats)."""
        now = time.monotonic()
        decoded = []
        for node, hb in beats:
            steps, colls = _decode(node, hb)
            summaries = _decode_summaries(node, hb)
            hangs = [f for f in list(hb.findings)[:_MAX_FINDINGS_PER_BEAT] if f.kind == FindingKind.HANG.value]
            decoded.append((node, hb, steps, colls, summaries, hangs))
        keys: set[tuple[str, int]] = set()
        with self._lock:
            for node, hb, steps, colls, summaries, hangs in decoded:
                self.num_heartbeats[node] = self.num_heartbeats.get(node, 0) + 1
                self.num_dropped_records += hb.dropped_records
                self.num_records += len(steps) + len(colls) + sum(len(x) for x in summaries)
                keys |= {(r.job_id, r.attempt) for r in (*steps, *colls, *summaries)}
                keys |= {(f.job_id, f.attempt) for f in hangs}
        views = {k: self._view(k) for k in keys}  # may take the reconciler's lock: not ours
        all_steps: list[StepRecord | StepSummary] = []
        all_colls: list[CollectiveRecord | CollectiveSummary] = []
        with self._lock:
            for _node, _hb, steps, colls, summaries, _hangs in decoded:
                colls = [r for r in colls if views.get((r.job_id, r.attempt)) is not None]
                summaries = [x for x in summaries if views.get((x.job_id, x.attempt)) is not None]
                all_steps += [r for r in steps if views.get((r.job_id, r.attempt)) is not None]
                all_steps += [x for x in summaries if isinstance(x, StepSummary)]
                done = [x for x in summaries if isinstance(x, CollectiveSummary)]
                all_colls += colls
                all_colls += done
                for key, by_rank in _inflight_by_rank(colls, done, views).items():
                    v = views.get(key)
                    if v is not None:
                        for rank, inflight in by_rank.items():
                            if inflight:
                                v.inflight[rank] = inflight
                            else:
                                v.inflight.pop(rank, None)
            found = list(self.straggler.observe(all_steps, now).findings)
            found += self.collective.observe(all_colls, now).findings
            self.findings.extend(found)
            self._count_flagged_steps(all_steps, views)
        for f in found:
            self._emit_finding(f)
        for node, _hb, _steps, _colls, _summaries, hangs in decoded:
            for f in hangs:
                self._on_hang(node, f, views.get((f.job_id, f.attempt)), now)

    def _count_flagged_steps(
        self,
        steps: list[StepRecord | StepSummary],
        views: Mapping[tuple[str, int], _AttemptView | None],
    ) -> None:
        """Per rank, how many of its steps it has been a straggler for (reset when cleared);
        the straggler policy acts on it. Called with the lock held."""
        flagged = {job: self.straggler.flagged(job) for job in {r.job_id for r in steps}}
        for rec in steps:
            v = views.get((rec.job_id, rec.attempt))
            if v is None:
                continue
            job_flagged = flagged[rec.job_id]
            if not job_flagged and not v.flagged_steps:
                continue  # nobody flagged: nothing to count or reset (the common case)
            stride = timing_stride(len(v.nodes_by_rank))  # steps an entry stands for
            for rank in (rec.rank if isinstance(rec, StepSummary) else (rec.rank,)):
                if rank in job_flagged:
                    v.flagged_steps[rank] = v.flagged_steps.get(rank, 0) + stride
                else:
                    v.flagged_steps.pop(rank, None)

    def _view(self, key: tuple[str, int]) -> _AttemptView | None:
        with self._lock:
            v = self._views.get(key)
            if v is not None:
                return v
            if key[1] < self._current.get(key[0], 0):
                return None
        nodes = self._attempt_ranks(*key)
        if nodes is None:
            return None
        with self._lock:
            v = self._views.get(key)
            if v is None:
                v = self._views[key] = _AttemptView(*key, nodes_by_rank=dict(nodes))
                if key[1] > self._current.get(key[0], 0):
                    self._current[key[0]] = key[1]
                    for old in [k for k in self._views if k[0] == key[0] and k[1] < key[1]]:
                        del self._views[old]
                self.straggler.expect_ranks(key[0], key[1], nodes)
                self.collective.expect_ranks(key[0], key[1], nodes)
            return v

    def _on_hang(self, node: str, f: Any, view: _AttemptView | None, now: float) -> None:
        if view is None or f.job_id == "":
            return
        report = _HangReport(
            node=node,
            rank=f.rank,
            message=f.message[:4000],
            evidence=dict(f.evidence),
            culprit=convert.hang_culprit_from_proto(f.culprit),
            silent_since=f.silent_since,
            detected_at=f.detected_at,
            received=now,
        )
        with self._lock:
            view.hangs.append(report)
        self._emit(
            Event(
                kind=EventKind.HANG,
                at=self._clock(),
                job_id=f.job_id,
                attempt=f.attempt,
                node=node,
                rank=f.rank,
                message=f"hang detected by the agent: {report.message}",
            )
        )
        for s in f.stacks:
            text = s.text[:_MAX_STACK_EVENT_BYTES]
            state = f", state {s.proc_state}" if s.proc_state else ""
            self._emit(
                Event(
                    kind=EventKind.STACKS,
                    at=self._clock(),
                    job_id=f.job_id,
                    attempt=f.attempt,
                    node=node,
                    rank=s.rank,
                    message=f"Python stacks of rank {s.rank} (pid {s.pid}{state}):\n{text}",
                )
            )

    def _emit_finding(self, f: Finding) -> None:
        self._emit(
            Event(
                kind=EventKind(f.kind.value),
                at=self._clock(),
                job_id=f.job_id,
                attempt=f.attempt,
                node=f.node,
                rank=f.rank,
                message=f.message,
            )
        )

    # ---------------------------------------------------------------- output (reconciler)

    def pending_fault(
        self,
        job_id: str,
        attempt: int,
        running_nodes: Iterable[str],
        now: float,
        *,
        straggler_after: int = 0,
    ) -> Fault | None:
        """The hang fault of a running attempt once it is settled, or the straggler fault the
        job's policy asks for, else None (once per attempt).

        Args:
            running_nodes: nodes that still run ranks of the attempt.
            now: wall clock, stamped as the fault's ``detected_at``.
            straggler_after: the job's ``straggler_restart_after`` (0: report only).
        """
        mono = time.monotonic()
        with self._lock:
            view = self._views.get((job_id, attempt))
            if view is None or view.fault_taken:
                return None
            if not view.hangs:
                return self._straggler_fault(view, attempt, now, straggler_after)
            reported = {h.node for h in view.hangs}
            first = min(h.received for h in view.hangs)
            if not set(running_nodes) <= reported and mono - first < self.cfg.settle_s:
                return None
            view.fault_taken = True
            report, why = self._culprit(view)
        message = report.message + (f"; {why}" if why else "")
        stopped = report.culprit == HangCulprit.STOPPED
        log.error(
            "[%s/%d/%s/%d] hang fault: %s", job_id, attempt, report.node, report.rank, message
        )
        return Fault(
            kind=FaultKind.HANG,
            attempt=attempt,
            node=report.node,
            rank=report.rank,
            message=message[:4000],
            detected_at=now,
            occurred_at=report.silent_since or now,
            classification=FaultClass.INFRA if stopped else FaultClass.USER,
        )

    def _straggler_fault(
        self, view: _AttemptView, attempt: int, now: float, after: int
    ) -> Fault | None:
        """Called with the lock held."""
        if after <= 0:
            return None
        due = [(n, r) for r, n in view.flagged_steps.items() if n >= after]
        if not due:
            return None
        steps, rank = max(due)
        view.fault_taken = True
        node = view.nodes_by_rank.get(rank, "")
        return Fault(
            kind=FaultKind.STRAGGLER,
            attempt=attempt,
            node=node,
            rank=rank,
            message=f"rank {rank} ({node}) was a straggler for {steps} steps "
            f"(straggler_restart_after={after}): restarting without {node}",
            detected_at=now,
            occurred_at=now,
            classification=FaultClass.INFRA,
        )

    def _culprit(self, view: _AttemptView) -> tuple[_HangReport, str]:
        hangs = view.hangs
        for h in hangs:
            if h.culprit == HangCulprit.STOPPED:
                return h, ""
        missing = self._missing(view)
        if missing:
            rank, seq, op, waiting = missing
            node = view.nodes_by_rank.get(rank, "")
            base = next((h for h in hangs if h.rank == rank), None)
            why = (
                f"rank {rank} ({node}) never entered {op} seq {seq}, which rank(s) "
                f"{waiting} are blocked in"
            )
            if base is None:
                base = _HangReport(
                    node=node,
                    rank=rank,
                    message=f"rank {rank} ({node}) hung",
                    evidence={},
                    culprit=HangCulprit.UNSPECIFIED,
                    silent_since=min(h.silent_since for h in hangs),
                    detected_at=hangs[0].detected_at,
                    received=0.0,
                )
            return base, why
        for h in hangs:
            if h.culprit == HangCulprit.OUTSIDE_COLLECTIVE:
                return h, ""
        return min(hangs, key=lambda h: (h.silent_since, h.rank)), ""

    def _missing(self, view: _AttemptView) -> tuple[int, int, str, list[int]] | None:
        stuck = [(seq, op, r) for r, v in view.inflight.items() for seq, op in v if seq >= 0]
        if not stuck:
            return None
        seq = max(s for s, _, _ in stuck)
        op = next(o for s, o, _ in stuck if s == seq)
        waiting = sorted({r for s, _, r in stuck if s == seq})
        entered = self.collective.entered(view.job_id, view.attempt)
        missing = sorted(r for r in view.nodes_by_rank if entered.get(r, -1) < seq)
        if not missing:
            return None
        return missing[0], seq, op, waiting

    def needs_pass(self, job_id: str, attempt: int) -> bool:
        """Whether the attempt has something for :meth:`pending_fault` to judge: a hang report
        not yet taken, or ranks counted as stragglers."""
        with self._lock:
            v = self._views.get((job_id, attempt))
            return v is not None and not v.fault_taken and bool(v.hangs or v.flagged_steps)

    def forget(self, job_id: str) -> None:
        """Drop a finished job's state."""
        with self._lock:
            for key in [k for k in self._views if k[0] == job_id]:
                del self._views[key]
            self._current.pop(job_id, None)
            self.straggler.forget(job_id)
            self.collective.forget(job_id)

    def scores(self, job_id: str) -> dict[int, float]:
        with self._lock:
            return self.straggler.scores(job_id)


# ---------------------------------------------------------------- wire -> records


def _finite(*values: float) -> bool:
    # one call per timing record: a sum is inf/nan when any term is (or when finite terms
    # overflow, which no real duration does)
    return math.isfinite(sum(values))


def _decode(node: str, hb: Any) -> tuple[list[StepRecord], list[CollectiveRecord]]:
    steps: list[StepRecord] = []
    bad = 0
    for s in list(hb.steps)[:_MAX_STEPS_PER_BEAT]:
        if (
            not s.job_id
            or s.step < 0
            or not _finite(s.start_s, s.end_s, s.data_wait_s, s.compute_s)
            or s.end_s < s.start_s
            or s.data_wait_s < 0
            or s.compute_s < 0
        ):
            bad += 1
            continue
        steps.append(
            StepRecord(
                job_id=s.job_id,
                attempt=s.attempt,
                rank=s.rank,
                node=node,
                step=s.step,
                start_s=s.start_s,
                end_s=s.end_s,
                data_wait_s=s.data_wait_s,
                compute_s=s.compute_s,
            )
        )
    colls: list[CollectiveRecord] = []
    for c in list(hb.collectives)[:_MAX_COLLECTIVES_PER_BEAT]:
        exit_s = None if c.in_flight else c.exit_s
        if (
            not c.job_id
            or not c.op
            or c.seq < -1
            or not _finite(c.enter_s, c.exit_s)
            or (exit_s is not None and exit_s < c.enter_s)
        ):
            bad += 1
            continue
        colls.append(
            CollectiveRecord(
                job_id=c.job_id,
                attempt=c.attempt,
                rank=c.rank,
                node=node,
                seq=c.seq,
                op=c.op[:64],
                nbytes=c.nbytes,
                enter_s=c.enter_s,
                exit_s=exit_s,
            )
        )
    if bad:
        log.warning("[-/-/%s/-] %d invalid timing record(s) dropped", node, bad)
    return steps, colls


def _inflight_by_rank(
    colls: list[CollectiveRecord],
    done: list[CollectiveSummary],
    views: Mapping[tuple[str, int], _AttemptView | None],
) -> dict[tuple[str, int], dict[int, list[tuple[int, str]]]]:
    """Latest in-flight report per rank; a rank whose newest collective completed is in none.

    A summary's completions are newer than any in-flight report of the same or an earlier seq
    in the same heartbeat (a collective completes after it was seen in flight). Only ranks in
    flight, in this batch or in their attempt's view, are looked at in a summary: the others
    have nothing to clear (most of them, most of the time)."""
    out: dict[tuple[str, int], dict[int, list[tuple[int, str]]]] = {}
    for rec in colls:
        ranks = out.setdefault((rec.job_id, rec.attempt), {})
        current = ranks.setdefault(rec.rank, [])
        if rec.exit_s is None:
            if (rec.seq, rec.op) not in current:
                current.append((rec.seq, rec.op))
        else:
            ranks[rec.rank] = [x for x in current if x[0] > rec.seq]
    for summary in done:
        key = (summary.job_id, summary.attempt)
        ranks = out.setdefault(key, {})
        view = views.get(key)
        held = view.inflight if view is not None else {}
        if not ranks and not held:
            continue
        newest: dict[int, int] = {}
        for rank, seq in zip(summary.rank, summary.seq, strict=True):
            if (rank in ranks or rank in held) and seq > newest.get(rank, -2):
                newest[rank] = seq
        for rank, seq in newest.items():
            ranks[rank] = [x for x in ranks.get(rank, ()) if x[0] > seq]
    return out


def _columns(node: str, summary: Any, unpack: Callable[[bytes, int], list[Any]], budget: int,
             names: tuple[str, ...]) -> list[Any] | None:
    """A summary's columns: unpacked from ``packed`` (what the agent sends), else read from
    the repeated fields ``names`` (older agents); None, logged, for packed bytes that are not
    whole entries or more than ``budget`` of them."""
    if not summary.packed:
        return [list(getattr(summary, name)) for name in names]
    try:
        return unpack(summary.packed, budget)
    except ValueError as e:
        log.warning("[-/-/%s/-] %s", node, e)
        return None


def _decode_summaries(node: str, hb: Any) -> list[StepSummary | CollectiveSummary]:
    """The heartbeat's columnar timing (``step_columns``, ``collective_columns``): columns are
    turned into lists in C and checked a column at a time; only a summary with a bad entry
    pays for a check per entry (and loses that entry)."""
    out: list[StepSummary | CollectiveSummary] = []
    budget = _MAX_STEPS_PER_BEAT
    bad = 0
    for c in hb.step_columns:
        cols = _columns(node, c, unpack_steps, budget,
                        ("rank", "step", "step_s", "data_wait_s", "compute_s"))
        if cols is None:
            bad += 1
            continue
        n = len(cols[0])
        if not c.job_id or any(len(x) != n for x in cols) or n > budget:
            bad += max(n, 1)
            continue
        budget -= n
        rank, step, step_s, wait, compute = cols
        if n and (min(step) < 0 or not _finite(sum(step_s), sum(wait), sum(compute))
                  or min(step_s) < 0 or min(wait) < 0 or min(compute) < 0):
            keep = [i for i in range(n) if step[i] >= 0
                    and _finite(step_s[i], wait[i], compute[i])
                    and min(step_s[i], wait[i], compute[i]) >= 0]
            bad += n - len(keep)
            rank, step, step_s, wait, compute = ([col[i] for i in keep] for col in cols)
        out.append(StepSummary(job_id=c.job_id, attempt=c.attempt, node=node, rank=rank,
                               step=step, step_s=step_s, data_wait_s=wait, compute_s=compute))
    budget = _MAX_COLLECTIVES_PER_BEAT
    for c in hb.collective_columns:
        ops = [op[:64] for op in c.ops]
        cols = _columns(node, c, unpack_collectives, budget,
                        ("rank", "seq", "op_index", "duration_s"))
        if cols is None:
            bad += 1
            continue
        n = len(cols[0])
        if not c.job_id or any(len(x) != n for x in cols) or n > budget or len(ops) > 4096:
            bad += max(n, 1)
            continue
        budget -= n
        rank, seq, op_index, duration = cols
        if n and (min(seq) < -1 or max(op_index) >= len(ops)
                  or not _finite(sum(duration)) or min(duration) < 0):
            keep = [i for i in range(n) if seq[i] >= -1 and op_index[i] < len(ops)
                    and _finite(duration[i]) and duration[i] >= 0]
            bad += n - len(keep)
            rank, seq, op_index, duration = ([col[i] for i in keep] for col in cols)
        out.append(CollectiveSummary(job_id=c.job_id, attempt=c.attempt, node=node, ops=ops,
                                     rank=rank, seq=seq, op_index=op_index, duration_s=duration))
    if bad:
        log.warning("[-/-/%s/-] %d invalid summarised timing entr(ies) dropped", node, bad)
    return out


def attach(rec: Any, cfg: DetectionConfig | None = None) -> Detection:
    """A :class:`Detection` wired to a reconciler: its event log and its jobs (under its lock)."""

    def attempt_ranks(job_id: str, attempt: int) -> dict[int, str] | None:
        with rec.lock:
            job = rec.jobs.get(job_id)
            if job is None or not 1 <= attempt <= len(job.attempts):
                return None
            return {r.rank: r.node for r in job.attempts[attempt - 1].ranks}

    return Detection(rec.events.emit, attempt_ranks, cfg)


def health_problem(reg: Any) -> str:
    """Why a registering node must be quarantined (its health check failed), or ""."""
    h = reg.health
    if not reg.HasField("health") or not h.ran or h.ok:
        return ""
    reason = h.reason[:1000] or "no reason given"
    return f"health check failed: {reason}"
