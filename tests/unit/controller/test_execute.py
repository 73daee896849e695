"""The reconciler driven one pass at a time: observations in, the decision executed, its commands
to a fake agent link and its events (from the job's transitions) out.

Wall and monotonic clocks are frozen; a test moves them. Every decision kind of ``decide.py``
is executed here at least once.
"""

from __future__ import annotations

import pytest

from hpt.controller import reconcile
from hpt.controller.config import ControllerConfig
from hpt.controller.model import (
    AttemptState,
    EventKind,
    JobSpec,
    JobState,
    LaunchCommand,
    Node,
    Rank,
    RankReport,
    RankState,
    StopCause,
    StopCommand,
)
from hpt.controller.store.memory import MemoryStore


class Link:
    """The command half of an agent's stream: records what the controller sends."""

    def __init__(self) -> None:
        self.sent: list[object] = []

    def send(self, command: object) -> None:
        self.sent.append(command)

    def close(self) -> None:
        pass

    def stops(self) -> list[StopCommand]:
        return [c for c in self.sent if isinstance(c, StopCommand)]

    def launches(self) -> list[LaunchCommand]:
        return [c for c in self.sent if isinstance(c, LaunchCommand)]


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Cluster:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, nodes: int, slots: int = 1) -> None:
        self.wall, self.mono = Clock(10_000.0), Clock(500.0)
        monkeypatch.setattr(reconcile.time, "monotonic", self.mono)
        self.store = MemoryStore()
        self.rec = reconcile.Reconciler(
            ControllerConfig(port=0, grow_hysteresis_s=10.0), self.store, clock=self.wall)
        self.links: dict[str, Link] = {}
        for i in range(nodes):
            self.add(f"n{i}", slots)

    def add(self, name: str, slots: int = 1) -> Link:
        link = self.links[name] = Link()
        self.rec.register(Node(name=name, address="127.0.0.1", slots=slots), link, [],
                          free_port=20_000 + len(self.links))
        return link

    def kinds(self, job_id: str) -> list[str]:
        return [e.kind for e in self.events(job_id)]

    def events(self, job_id: str) -> list:  # type: ignore[type-arg]
        from hpt.controller import convert

        return [e for e in (convert.event_from_bytes(b, s) for s, b in
                            self.store.read_events(0, 10_000)) if e.job_id == job_id]

    def report(self, job_id: str, rank: int, state: RankState, *, attempt: int = 1,
               step: int = 3, snapshots: tuple[int, ...] = ()) -> None:
        job = self.rec.jobs[job_id]
        r = job.attempts[attempt - 1].ranks[rank]
        self.rec.heartbeat(r.node, [RankReport(job_id=job_id, attempt=attempt, rank=Rank(
            rank=rank, local_rank=r.local_rank, node=r.node, pid=100 + rank, state=state,
            step=step, step_at=self.wall.t, snapshot_steps=snapshots))], [], free_port=0)

    def run_all(self, job_id: str, attempt: int = 1, **kw) -> None:  # type: ignore[no-untyped-def]
        for r in self.rec.jobs[job_id].attempts[attempt - 1].ranks:
            self.report(job_id, r.rank, RankState.RUNNING, attempt=attempt, **kw)


def test_launch_places_the_job_and_sends_each_node_its_ranks(monkeypatch):
    c = Cluster(monkeypatch, nodes=2)
    job_id = c.rec.submit(JobSpec(command=("python", "t.py"), nodes=2))
    c.rec.reconcile_once()
    job = c.rec.jobs[job_id]
    assert job.state == JobState.RUNNING and job.current is not None
    assert [(n, [cmd.ranks for cmd in link.launches()]) for n, link in c.links.items()] == [
        ("n0", [((0, 0),)]), ("n1", [((1, 0),)])]
    assert c.kinds(job_id) == [EventKind.JOB_SUBMITTED, EventKind.ATTEMPT_LAUNCHED]


def test_two_attempts_on_one_master_never_share_a_rendezvous_port(monkeypatch):
    c = Cluster(monkeypatch, nodes=1, slots=2)  # n0 reported port 20001 once
    first = c.rec.submit(JobSpec(command=("python", "t.py"), nodes=1))
    second = c.rec.submit(JobSpec(command=("python", "t.py"), nodes=1))
    c.rec.reconcile_once()  # both placed before n0's next heartbeat
    ports = {j: c.rec.jobs[j].current.master_port for j in (first, second)}
    # the reported port once, the other job another one
    assert 20001 in ports.values() and len(set(ports.values())) == 2, ports
    # (commands go out in job-id order, not submission order)
    assert {cmd.job_id: cmd.master_port for cmd in c.links["n0"].launches()} == ports


def test_wait_for_nodes_records_the_deadline_once(monkeypatch):
    c = Cluster(monkeypatch, nodes=1)
    job_id = c.rec.submit(JobSpec(command=("x",), nodes=2, node_wait_timeout_s=60.0))
    c.rec.reconcile_once()
    c.rec.reconcile_once()
    assert c.rec.jobs[job_id].deadline_at == c.wall.t + 60.0
    assert c.kinds(job_id).count(EventKind.WAITING_FOR_NODES) == 1


def test_fail_when_no_placement_before_the_deadline(monkeypatch):
    c = Cluster(monkeypatch, nodes=1)
    job_id = c.rec.submit(JobSpec(command=("x",), nodes=2, node_wait_timeout_s=60.0))
    c.rec.reconcile_once()
    c.wall.t += 60.0
    c.rec.reconcile_once()
    job = c.rec.jobs[job_id]
    assert job.state == JobState.FAILED and "node_wait_timeout_s (60)" in job.reason
    assert c.kinds(job_id)[-1] == EventKind.JOB_FAILED


def test_a_crash_stops_the_attempt_restarts_and_relaunches_once_it_stopped(monkeypatch):
    c = Cluster(monkeypatch, nodes=1, slots=2)
    job_id = c.rec.submit(JobSpec(command=("x",), procs_per_node=2, stop_grace_s=4.0))
    c.rec.reconcile_once()
    c.run_all(job_id)
    c.rec.reconcile_once()
    c.report(job_id, 1, RankState.FAILED)
    c.rec.reconcile_once()
    job = c.rec.jobs[job_id]
    assert job.state == JobState.RECOVERING and job.restarts == 1
    assert job.current is not None and job.current.state == AttemptState.STOPPING
    [stop] = c.links["n0"].stops()
    assert (stop.grace_s, stop.cause) == (4.0, StopCause.FAULT)
    c.report(job_id, 0, RankState.STOPPED)
    c.rec.reconcile_once()  # ends the attempt and relaunches in the same pass
    assert [a.state for a in job.attempts] == [AttemptState.FAILED, AttemptState.LAUNCHING]
    kinds = [k for k in c.kinds(job_id) if k != EventKind.RANK_EXITED]
    assert kinds[-4:] == [EventKind.FAULT, EventKind.RECOVERING, EventKind.ATTEMPT_LAUNCHED,
                          EventKind.RESTORE_SOURCE]


def test_an_ended_attempt_keeps_the_snapshots_its_restore_was_chosen_from(monkeypatch):
    # the agent reports the dead rank of attempt 1 with its (job, rank) memory, which the
    # ranks of attempt 2 now write: attempt 1's record must not take their steps
    c = Cluster(monkeypatch, nodes=1, slots=2)
    job_id = c.rec.submit(JobSpec(command=("x",), procs_per_node=2))
    c.rec.reconcile_once()
    c.run_all(job_id, snapshots=(8, 9))
    c.report(job_id, 1, RankState.FAILED, snapshots=(8, 9))
    c.rec.reconcile_once()
    c.report(job_id, 0, RankState.STOPPED, snapshots=(8, 9))
    c.rec.reconcile_once()
    job = c.rec.jobs[job_id]
    assert len(job.attempts) == 2 and job.attempts[1].restore_step == 9
    c.run_all(job_id, attempt=2, snapshots=(10, 11, 12))
    c.report(job_id, 1, RankState.FAILED, snapshots=(10, 11, 12))  # attempt 1's dead rank
    c.rec.reconcile_once()
    assert [r.snapshot_steps for r in job.attempts[0].ranks] == [(8, 9), (8, 9)]
    assert [r.snapshot_steps for r in job.attempts[1].ranks] == [(10, 11, 12)] * 2


def test_a_stop_not_confirmed_is_sent_again_without_grace(monkeypatch):
    c = Cluster(monkeypatch, nodes=1, slots=2)
    job_id = c.rec.submit(JobSpec(command=("x",), procs_per_node=2, stop_grace_s=4.0))
    c.rec.reconcile_once()
    c.run_all(job_id)
    c.report(job_id, 1, RankState.FAILED)
    c.rec.reconcile_once()
    c.mono.t += 4.0 + 5.0
    c.rec.reconcile_once()
    assert len(c.links["n0"].stops()) == 1
    c.mono.t += 0.5
    c.rec.reconcile_once()
    assert [(s.grace_s, s.cause) for s in c.links["n0"].stops()] == [
        (4.0, StopCause.FAULT), (0.0, StopCause.UNCONFIRMED)]


def test_no_restarts_left_fails_the_job_and_stops_its_ranks(monkeypatch):
    c = Cluster(monkeypatch, nodes=1, slots=2)
    job_id = c.rec.submit(JobSpec(command=("x",), procs_per_node=2, max_restarts=0))
    c.rec.reconcile_once()
    c.run_all(job_id)
    c.report(job_id, 0, RankState.FAILED)
    c.rec.reconcile_once()
    job = c.rec.jobs[job_id]
    assert job.state == JobState.FAILED and job.reason.startswith("max_restarts (0) reached")
    assert len(c.links["n0"].stops()) == 1
    kinds = [k for k in c.kinds(job_id) if k != EventKind.RANK_EXITED]
    assert kinds[-2:] == [EventKind.FAULT, EventKind.JOB_FAILED]


def test_succeed_when_every_rank_exited_0(monkeypatch):
    c = Cluster(monkeypatch, nodes=1)
    job_id = c.rec.submit(JobSpec(command=("x",)))
    c.rec.reconcile_once()
    c.report(job_id, 0, RankState.SUCCEEDED)
    c.rec.reconcile_once()
    job = c.rec.jobs[job_id]
    assert job.state == JobState.SUCCEEDED and job.attempts[0].state == AttemptState.SUCCEEDED
    assert c.kinds(job_id)[-1] == EventKind.JOB_SUCCEEDED


def test_cancel_is_queued_then_stops_with_its_grace_and_cancels_once_stopped(monkeypatch):
    c = Cluster(monkeypatch, nodes=1)
    job_id = c.rec.submit(JobSpec(command=("x",)))
    c.rec.reconcile_once()
    c.run_all(job_id)
    applied = c.rec.cancel(job_id, grace_s=12.0)
    assert not applied.is_set() and not c.rec.jobs[job_id].cancel_requested
    c.rec.reconcile_once()
    assert applied.is_set()
    [stop] = c.links["n0"].stops()
    assert (stop.grace_s, stop.cause) == (12.0, StopCause.CANCELLED)
    c.report(job_id, 0, RankState.STOPPED)
    c.rec.reconcile_once()
    assert c.rec.jobs[job_id].state == JobState.CANCELLED
    kinds = [k for k in c.kinds(job_id) if k != EventKind.RANK_EXITED]
    assert kinds[-2:] == [EventKind.CANCEL_REQUESTED, EventKind.JOB_CANCELLED]


def test_a_lost_node_shrinks_an_elastic_job_onto_the_survivor(monkeypatch):
    c = Cluster(monkeypatch, nodes=2)
    job_id = c.rec.submit(JobSpec(command=("x",), nodes=2, min_nodes=1))
    c.rec.reconcile_once()
    c.run_all(job_id)
    c.rec.reconcile_once()
    c.rec.disconnect("n1", c.links["n1"])
    c.mono.t += c.rec.cfg.heartbeat_period_s + 0.1
    c.rec.heartbeat("n0", [], [], free_port=0)
    c.rec.reconcile_once()  # n1 lost: its rank with it; the attempt stops
    c.report(job_id, 0, RankState.STOPPED)
    c.rec.reconcile_once()
    job = c.rec.jobs[job_id]
    assert job.attempts[0].cause is not None and job.attempts[0].cause.kind.value == "node_lost"
    assert job.current is not None and job.current.nodes == ["n0"] and job.current.world_size == 1
    assert "resize 2 -> 1 nodes" in job.current.history[0].reason


def test_grow_stops_the_attempt_once_a_node_was_free_for_the_hysteresis(monkeypatch):
    c = Cluster(monkeypatch, nodes=1)
    job_id = c.rec.submit(JobSpec(command=("x",), nodes=2, min_nodes=1))
    c.rec.reconcile_once()
    c.run_all(job_id, snapshots=(2,))
    c.rec.reconcile_once()
    c.add("n1")
    c.rec.reconcile_once()  # n1 free from now
    c.wall.t += 10.0
    c.rec.heartbeat("n0", [], [], free_port=0)
    c.rec.heartbeat("n1", [], [], free_port=0)
    c.rec.reconcile_once()
    job = c.rec.jobs[job_id]
    assert job.state == JobState.RECOVERING and job.attempts[0].state == AttemptState.STOPPING
    assert [s.cause for s in c.links["n0"].stops()] == [StopCause.RESIZE]
    assert c.kinds(job_id)[-1] == EventKind.RESIZE_REQUESTED


def test_a_straggler_fault_excludes_its_node_and_the_next_attempt_runs_without_it(monkeypatch):
    c = Cluster(monkeypatch, nodes=3)
    job_id = c.rec.submit(JobSpec(command=("x",), nodes=2, min_nodes=1,
                                  straggler_restart_after=2))
    c.rec.reconcile_once()
    c.run_all(job_id)
    c.rec.reconcile_once()
    monkeypatch.setattr(c.rec.detection, "pending_fault", lambda *a, **k: _straggler(job_id))
    monkeypatch.setattr(c.rec.detection, "needs_pass", lambda *a: True)  # ranks are counted
    c.rec.reconcile_once()
    job = c.rec.jobs[job_id]
    assert job.excluded_nodes == ["n1"]
    assert c.kinds(job_id)[-3:] == [EventKind.NODE_EXCLUDED, EventKind.FAULT,
                                    EventKind.RECOVERING]
    monkeypatch.setattr(c.rec.detection, "pending_fault", lambda *a, **k: None)
    c.report(job_id, 0, RankState.STOPPED)
    c.report(job_id, 1, RankState.STOPPED)
    c.rec.reconcile_once()
    assert job.current is not None and "n1" not in job.current.nodes


def _straggler(job_id: str):  # type: ignore[no-untyped-def]
    from hpt.controller.model import Fault, FaultKind

    return Fault(kind=FaultKind.STRAGGLER, attempt=1, node="n1", rank=1,
                 message="rank 1 (n1) was a straggler for 2 steps")


def test_a_report_off_the_rank_table_is_refused_and_the_loop_goes_on(monkeypatch):
    c = Cluster(monkeypatch, nodes=1)
    job_id = c.rec.submit(JobSpec(command=("x",)))
    c.rec.reconcile_once()
    c.run_all(job_id)
    c.report(job_id, 0, RankState.PENDING)  # RUNNING -> PENDING is no edge
    c.rec.reconcile_once()
    assert c.rec.jobs[job_id].attempts[0].ranks[0].state == RankState.RUNNING


def test_a_rank_declared_lost_that_keeps_reporting_is_fenced_once_a_second_not_per_report(
        monkeypatch):
    c = Cluster(monkeypatch, nodes=2)
    job_id = c.rec.submit(JobSpec(command=("x",), nodes=2, min_nodes=1))
    c.rec.reconcile_once()
    c.run_all(job_id)
    c.rec.reconcile_once()
    c.rec.disconnect("n1", c.links["n1"])
    c.mono.t += c.rec.cfg.heartbeat_period_s + 0.1
    c.rec.heartbeat("n0", [], [], free_port=0)
    c.rec.reconcile_once()  # n1 lost, its rank with it
    c.rec.register(Node(name="n1", address="127.0.0.1", slots=1), c.links["n1"],
                   [], free_port=1)
    for _ in range(3):  # the old rank goes on reporting RUNNING, heartbeat after heartbeat
        c.report(job_id, 1, RankState.RUNNING)
    fenced = [s for s in c.links["n1"].stops() if s.cause == StopCause.DECLARED_LOST]
    assert len(fenced) == 1
    c.mono.t += 1.1
    c.report(job_id, 1, RankState.RUNNING)
    assert len([s for s in c.links["n1"].stops() if s.cause == StopCause.DECLARED_LOST]) == 2
