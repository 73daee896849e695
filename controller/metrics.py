"""The controller's Prometheus metrics, derived from its state once a second.

Everything exported here is computed from what the reconciler already keeps (jobs, attempts,
faults, nodes) and from the detectors (:mod:`hpt.controller.detect`): a sync thread takes the
reconciler's lock once a second, sets the gauges and advances the counters by what changed
since the previous sync. So no code path of the control loop has to remember to count, and the
counters restart from the stored state after a controller restart (Prometheus handles resets).

Goodput ledger per job (``hpt_goodput_seconds_total{category}``): ``productive`` is time from
an attempt's first step until it ended or its fault occurred, less the time of the steps the
fault lost; ``detection`` from a fault occurring to the controller recording it; ``restart``
from recording it to the launch of the next attempt (stopping the old one, placing the new);
``restore`` from that launch to the next attempt's first step (start-up, state restore, first
step); ``redone``: the lost steps (``Fault.steps_lost``, also counted in
``hpt_steps_lost_total``) times the failed attempt's mean step time.

``serve`` exposes ``/metrics`` through :class:`hpt.monitor.export.Metrics`, the one module that
imports ``prometheus_client``. The sync also forgets the detector state of finished jobs.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from hpt.controller.model import Attempt, Job, JobState
from hpt.monitor.export import Metrics
from hpt.monitor.metrics import JOB_STATES, NODE_STATES

log = logging.getLogger(__name__)

SYNC_PERIOD_S = 1.0


class ControllerMetrics:
    """Metrics of one controller; ``start()`` the sync thread, optionally ``serve()``."""

    def __init__(self, rec: Any) -> None:
        self._rec = rec
        self.metrics = Metrics()
        self._attempts: set[tuple[str, int]] = set()
        self._faults: set[tuple[str, int]] = set()
        self._recoveries: set[tuple[str, int]] = set()
        self._lost: set[tuple[str, int]] = set()
        self._goodput: dict[tuple[str, str], float] = {}
        self._forgotten: set[str] = set()
        self._counted: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self.port = 0
        # series per node and per rank: computed when scraped, never kept up to date (at
        # 10,000 nodes and 80,000 ranks that upkeep cost more than the heartbeats)
        self.metrics.on_scrape("hpt_agent_heartbeat_age_seconds", self._heartbeat_ages)
        self.metrics.on_scrape("hpt_straggler_score", self._straggler_scores)
        self.metrics.on_scrape("hpt_agent_heartbeats_total", lambda: [
            ({"node": node}, float(n)) for node, n in dict(rec.detection.num_heartbeats).items()])

    def _heartbeat_ages(self) -> list[tuple[dict[str, object], float]]:
        rec, mono = self._rec, time.monotonic()
        with rec.lock:
            last = [(name, rt.last_heartbeat) for name, rt in rec.nodes.items()]
        return [({"node": name}, max(0.0, mono - t)) for name, t in last]

    def _straggler_scores(self) -> list[tuple[dict[str, object], float]]:
        rec = self._rec
        with rec.lock:
            running = [j.id for j in rec.jobs.values() if j.state == JobState.RUNNING]
        return [({"rank": rank}, score) for job_id in running
                for rank, score in rec.detection.scores(job_id).items()]

    def start(self) -> None:
        self.sync()
        self._thread = threading.Thread(target=self._loop, name="hpt-metrics", daemon=True)
        self._thread.start()

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (0: a free port); returns the bound port."""
        self._server, self.port = self.metrics.serve(host, port)
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _loop(self) -> None:
        while not self._stop.wait(SYNC_PERIOD_S):
            try:
                self.sync()
            except Exception:  # metrics must never take the controller down
                log.exception("metrics sync failed")

    # ---------------------------------------------------------------- one sync

    def sync(self) -> None:
        rec, m = self._rec, self.metrics
        now = time.time()
        with rec.lock:
            jobs = list(rec.jobs.values())
            by_state = {s: 0 for s in JOB_STATES}
            for job in jobs:
                by_state[job.state.value.lower()] += 1
                self._count_job(job, now)
            nodes = {s: 0 for s in NODE_STATES}
            for rt in rec.nodes.values():
                nodes[rt.node.state.value.lower()] += 1
            ratios = {j.id: r for j in jobs if j.state == JobState.RUNNING
                      and (r := memory_ratio(j)) is not None}
            cadences = {j.id: j.persist_every or j.spec.persist_every for j in jobs
                        if j.state == JobState.RUNNING and j.spec.persist_dir}
            finished = [j.id for j in jobs if j.state.is_terminal and j.id not in self._forgotten]
            health = rec.store_health()
            stalls = rec.stall.num_stalls
        m.set("hpt_store_up", 1.0 if health.up else 0.0)
        m.set("hpt_store_pending_events", rec.events.num_pending)
        for name, total in (("hpt_store_outages_total", health.num_outages),
                            ("hpt_controller_stalls_total", stalls)):
            if total > self._counted.get(name, 0):
                m.inc(name, total - self._counted.get(name, 0))
                self._counted[name] = total
        for state, n in by_state.items():
            m.set("hpt_jobs", n, state=state)
        for state, n in nodes.items():
            m.set("hpt_nodes", n, state=state)
        det = rec.detection
        m.clear("hpt_snapshot_memory_ratio")
        for job_id, ratio in ratios.items():
            m.set("hpt_snapshot_memory_ratio", ratio, hpt_job=job_id)
        m.clear("hpt_job_persist_every_steps")
        for job_id, every in cadences.items():
            m.set("hpt_job_persist_every_steps", every, hpt_job=job_id)
        for job_id in finished:
            det.forget(job_id)
            self._forgotten.add(job_id)
        live = {j.id for j in jobs}
        if len(self._forgotten) > len(live):  # jobs the controller dropped (retention)
            self._forgotten &= live
            self._attempts = {k for k in self._attempts if k[0] in live}
            self._faults = {k for k in self._faults if k[0] in live}
            self._recoveries = {k for k in self._recoveries if k[0] in live}
            self._goodput = {k: v for k, v in self._goodput.items() if k[0] in live}

    def _count_job(self, job: Job, now: float) -> None:
        m = self.metrics
        ledger = {"productive": 0.0, "detection": 0.0, "restart": 0.0, "restore": 0.0,
                  "redone": 0.0}
        for i, attempt in enumerate(job.attempts):
            key = (job.id, attempt.number)
            if key not in self._attempts:
                self._attempts.add(key)
                m.inc("hpt_attempts_total")
            cause = attempt.cause
            nxt = job.attempts[i + 1] if i + 1 < len(job.attempts) else None
            if attempt.first_step_at:
                end = attempt.ended_at or now
                if cause is not None and cause.occurred_at:
                    end = min(end, max(cause.occurred_at, attempt.first_step_at))
                ledger["productive"] += max(0.0, end - attempt.first_step_at)
            if cause is None:
                continue
            kind = cause.kind.value
            detection_s = (cause.detected_at - cause.occurred_at) if cause.occurred_at else 0.0
            if key not in self._faults:
                self._faults.add(key)
                m.inc("hpt_faults_total", kind=kind)
                m.observe("hpt_fault_detection_seconds", max(0.0, detection_s), kind=kind)
            ledger["detection"] += max(0.0, detection_s)
            if cause.steps_lost > 0:
                redone_s = min(cause.steps_lost * mean_step_s(attempt), ledger["productive"])
                ledger["redone"] += redone_s
                ledger["productive"] -= redone_s
            if cause.steps_lost >= 0 and key not in self._lost:
                self._lost.add(key)
                if cause.steps_lost:
                    m.inc("hpt_steps_lost_total", cause.steps_lost)
            if nxt is not None and nxt.first_step_at:
                recovery_s = max(0.0, nxt.first_step_at - cause.detected_at)
                ledger["restart"] += max(0.0, nxt.started_at - cause.detected_at)
                ledger["restore"] += max(0.0, nxt.first_step_at - max(nxt.started_at,
                                                                      cause.detected_at))
                if key not in self._recoveries:
                    self._recoveries.add(key)
                    m.observe("hpt_recovery_seconds", recovery_s, kind=kind)
            elif not job.state.is_terminal:
                ledger["restart"] += max(0.0, now - cause.detected_at)
        for category, total in ledger.items():
            prev = self._goodput.get((job.id, category), 0.0)
            if total > prev:
                m.inc("hpt_goodput_seconds_total", total - prev, category=category)
                self._goodput[(job.id, category)] = total


def mean_step_s(attempt: Attempt) -> float:
    """Mean time of the attempt's steps, from its first completed step to its latest report."""
    steps = attempt.progress - attempt.restore_step
    last = max((r.step_at for r in attempt.ranks), default=0.0)
    if steps < 2 or not attempt.first_step_at or last <= attempt.first_step_at:
        return 0.0
    return (last - attempt.first_step_at) / (steps - 1)


def memory_ratio(job: Job) -> float | None:
    """(state + protection of one generation) / state of the job's current attempt."""
    attempt = job.current
    if attempt is None:
        return None
    state = sum(r.snapshot_bytes for r in attempt.ranks)
    if not state or not attempt.parity_bytes:
        return None
    return (state + attempt.parity_bytes) / state
