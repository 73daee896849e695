"""How the reconciler stops an attempt: the grace it gives, and when it gives none.

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
    JobSpec,
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


def running_job(spec: JobSpec) -> tuple[reconcile.Reconciler, str, Link]:
    rec = reconcile.Reconciler(ControllerConfig(port=0), MemoryStore())
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
    rec.cancel(job_id, grace_s=30.0)
    assert [c.grace_s for c in link.stops()] == [30.0]
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
