"""How the reconciler stops an attempt (the grace it gives, and when it gives none), how it
classifies a fault, and how it paces the restarts of a crash loop.

The reconciler runs in-process against the memory store; agents are links that record the
commands they are sent. Monotonic time is a fake clock the tests advance.
"""

from __future__ import annotations

import time

import pytest

from hpt._proto import agent_pb2
from hpt.controller import reconcile
from hpt.controller.config import ControllerConfig
from hpt.controller.model import (
    ExitInfo,
    JobSpec,
    JobState,
    Node,
    Rank,
    RankReport,
    RankState,
    StopCommand,
)
from hpt.controller.store.memory import MemoryStore


class Link:
    def __init__(self) -> None:
        self.sent: list = []

    def send(self, command) -> None:  # type: ignore[no-untyped-def]
        self.sent.append(command)

    def close(self) -> None:
        pass

    def stops(self) -> list[StopCommand]:
        return [c for c in self.sent if isinstance(c, StopCommand)]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def mono(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(reconcile.time, "monotonic", clock)
    return clock


def beat_until(rec: reconcile.Reconciler, mono: Clock, until: float) -> None:
    """Advance the clock to ``until`` with the agent heartbeating (its ranks still running)."""
    while mono.t < until:
        mono.t = min(until, mono.t + 0.5)
        rec.heartbeat("node-0", [], [], free_port=23456)
        rec.reconcile_once()


def running_job(spec: JobSpec, clock=time.time) -> tuple[reconcile.Reconciler, str, Link]:  # type: ignore[no-untyped-def]
    rec = reconcile.Reconciler(ControllerConfig(port=0), MemoryStore(), clock=clock)
    link = Link()
    rec.register(Node(name="node-0", address="127.0.0.1", slots=4), link, [], free_port=23456)
    job_id = rec.submit(spec)
    rec.reconcile_once()
    attempt = rec.jobs[job_id].current
    assert attempt is not None
    reports = [
        RankReport(job_id=job_id, attempt=1,
                   rank=Rank(rank=r.rank, local_rank=r.local_rank, node="node-0", pid=100 + r.rank,
                             state=RankState.RUNNING, step=3))
        for r in attempt.ranks
    ]
    rec.heartbeat("node-0", reports, [], free_port=23456)
    rec.reconcile_once()
    return rec, job_id, link


def test_cancel_with_its_own_grace_is_not_cut_short_by_the_job_default(mono):
    rec, job_id, link = running_job(JobSpec(command=("python", "x.py"), procs_per_node=2))
    applied = rec.cancel(job_id, grace_s=30.0)  # queued: the next pass applies it
    assert link.stops() == [] and not applied.is_set()
    rec.reconcile_once()
    assert applied.is_set() and [c.grace_s for c in link.stops()] == [30.0]
    # Past the job's stop_grace_s (5 s) + 5 s, well within the cancel's 30 s: no SIGKILL resend.
    start = mono.t
    beat_until(rec, mono, start + 12.0)
    assert [c.grace_s for c in link.stops()] == [30.0]
    # Past 30 s + 5 s the agent is asked again, now without grace.
    beat_until(rec, mono, start + 36.0)
    assert [c.grace_s for c in link.stops()] == [30.0, 0.0]


def test_a_hung_attempt_is_stopped_without_grace(mono):
    rec, job_id, link = running_job(
        JobSpec(command=("python", "x.py"), procs_per_node=2, stop_grace_s=5.0))
    finding = agent_pb2.Finding(
        kind="hang", job_id=job_id, attempt=1, rank=1, node="node-0",
        message="rank 1 (node-0) made no progress", silent_since=time.time() - 6,
        detected_at=time.time(),
        evidence={"culprit_reason": "its process is stopped (state T)", "proc_states": "1:T"},
        culprit=agent_pb2.HANG_CULPRIT_STOPPED,
    )
    rec.detection.on_heartbeat("node-0", agent_pb2.Heartbeat(findings=[finding]))
    rec.reconcile_once()
    stops = link.stops()
    assert len(stops) == 1 and stops[0].grace_s == 0.0 and "hang" in stops[0].reason


def test_a_crash_keeps_the_jobs_grace_for_the_other_ranks(mono):
    rec, job_id, link = running_job(
        JobSpec(command=("python", "x.py"), procs_per_node=2, stop_grace_s=7.0))
    crashed = RankReport(job_id=job_id, attempt=1,
                         rank=Rank(rank=0, local_rank=0, node="node-0", pid=100,
                                   state=RankState.FAILED, exit_reason="exited with code 1"))
    rec.heartbeat("node-0", [crashed], [], free_port=23456)
    rec.reconcile_once()
    assert [c.grace_s for c in link.stops()] == [7.0]


def ended(job_id: str, rank: int, state: RankState, *, at: float, reason: str,
          error_type: str = "", signal: str = "", step: int = -1,
          snapshot_steps: tuple[int, ...] = ()) -> RankReport:
    return RankReport(job_id=job_id, attempt=1, rank=Rank(
        rank=rank, local_rank=rank, node="node-0", pid=100 + rank, state=state, step=step,
        exit_reason=reason, snapshot_steps=snapshot_steps,
        exit=ExitInfo(exit_code=-9 if signal else 1, signal=signal, error_type=error_type,
                      ended_at=at)))


@pytest.mark.parametrize("error_type,expected", [
    ("CorruptCheckpointError", "platform"),
    ("RestoreError", "platform"),
    ("OutOfMemory", "oom"),
    ("ValueError", "user"),
])
def test_checkpoint_errors_are_the_platforms_and_oom_kills_have_their_class(mono, error_type,
                                                                            expected):
    rec, job_id, _ = running_job(JobSpec(command=("python", "x.py"), procs_per_node=2))
    rec.heartbeat("node-0", [ended(job_id, 0, RankState.FAILED, at=time.time(),
                                   reason=f"exited with code 1: {error_type}: x",
                                   error_type=error_type)], [], free_port=23456)
    rec.reconcile_once()
    assert rec.jobs[job_id].root_cause.classification.value == expected


def test_a_self_fenced_rank_is_the_root_cause_not_the_peer_error_it_caused(mono):
    rec, job_id, _ = running_job(JobSpec(command=("python", "x.py"), procs_per_node=2))
    t = time.time()
    rec.heartbeat("node-0", [
        ended(job_id, 0, RankState.STOPPED, at=t - 2.0,
              reason="stopped: self-fenced: controller unreachable"),
        ended(job_id, 1, RankState.FAILED, at=t - 1.0,
              reason="exited with code 1: RuntimeError: Connection closed by peer",
              error_type="RuntimeError"),
    ], [], free_port=23456)
    rec.reconcile_once()
    cause = rec.jobs[job_id].root_cause
    assert (cause.rank, cause.classification.value) == (0, "infra")
    assert "self-fenced" in cause.message


def test_a_crash_loop_backs_off_between_restarts_and_a_fault_after_progress_does_not(mono):
    wall = Clock()
    rec, job_id, link = running_job(
        JobSpec(command=("python", "x.py"), procs_per_node=1, max_restarts=5), clock=wall)
    launches = lambda: [c for c in link.sent if not isinstance(c, StopCommand)]  # noqa: E731

    def crash(attempt: int, step: int = -1) -> None:
        report = ended(job_id, 0, RankState.FAILED, at=wall.t, reason="exited with code 1",
                       step=step)
        rec.heartbeat("node-0", [RankReport(job_id=job_id, attempt=attempt, rank=report.rank)],
                      [], free_port=23456)
        rec.reconcile_once()  # fault seen, attempt stopping, then stopped: every rank ended
        rec.reconcile_once()

    def tick(seconds: float) -> None:
        wall.t += seconds
        mono.t += seconds
        rec.heartbeat("node-0", [], [], free_port=23456)
        rec.reconcile_once()

    crash(1)  # before any step: the first attempt of a crash loop
    assert rec.jobs[job_id].state == JobState.RECOVERING
    assert len(launches()) == 1
    tick(0.3)
    assert len(launches()) == 1, "relaunched within the 0.5 s backoff"
    tick(0.3)
    assert len(launches()) == 2
    crash(2)
    tick(0.9)
    assert len(launches()) == 2, "the second restart of the loop waits 1 s"
    tick(0.2)
    assert len(launches()) == 3
    # attempt 3 makes progress, then fails: the next attempt goes at once
    rec.heartbeat("node-0", [RankReport(job_id=job_id, attempt=3, rank=Rank(
        rank=0, local_rank=0, node="node-0", pid=300, state=RankState.RUNNING, step=5,
        step_at=wall.t, first_step_at=wall.t))], [], free_port=23456)
    rec.reconcile_once()
    crash(3, step=5)
    tick(0.01)
    assert len(launches()) == 4


def test_a_fault_records_the_steps_it_lost_and_the_metrics_count_them(mono):
    from hpt.controller.metrics import ControllerMetrics

    wall = Clock()
    rec, job_id, link = running_job(
        JobSpec(command=("python", "x.py"), procs_per_node=2), clock=wall)
    t0 = wall.t
    progress = [RankReport(job_id=job_id, attempt=1, rank=Rank(
        rank=r, local_rank=r, node="node-0", pid=100 + r, state=RankState.RUNNING, step=10,
        step_at=t0 + 9.0, first_step_at=t0, snapshot_steps=(6, 8))) for r in (0, 1)]
    rec.heartbeat("node-0", progress, [], free_port=23456)
    rec.reconcile_once()
    wall.t = mono.t = t0 + 10.0
    rec.heartbeat("node-0", [ended(job_id, 1, RankState.FAILED, at=wall.t, step=10,
                                   reason="exited with code 1", snapshot_steps=(6, 8))], [],
                  free_port=23456)
    rec.reconcile_once()
    wall.t += 0.1
    rec.heartbeat("node-0", [ended(job_id, 0, RankState.STOPPED, at=wall.t, step=10,
                                   reason="stopped: fault", snapshot_steps=(6, 8))], [],
                  free_port=23456)
    rec.reconcile_once()
    rec.reconcile_once()
    job = rec.jobs[job_id]
    assert len(job.attempts) == 2 and job.attempts[1].restore_step == 8
    assert job.attempts[0].cause.steps_lost == 2 and job.root_cause.steps_lost == 2
    metrics = ControllerMetrics(rec)
    metrics.sync()
    text = metrics.metrics.render().decode()
    assert "hpt_steps_lost_total 2.0" in text
    # 10 steps in 9 s: 1 s each; the 2 lost steps moved from productive to redone
    assert 'hpt_goodput_seconds_total{category="redone"} 2.0' in text
    assert 'hpt_goodput_seconds_total{category="productive"} 8.0' in text
