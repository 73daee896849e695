"""The controller's own fault handling, driven one pass at a time: store retries and the degraded
state, its stall detector, retention of finished jobs, the launch deadline, and launches held
until the attempt they start is stored."""

from __future__ import annotations

import threading
import time

import pytest

from hpt.controller import retention
from hpt.controller.config import ControllerConfig
from hpt.controller.model import (
    Job,
    JobSpec,
    JobState,
    LaunchCommand,
    Node,
    NodeState,
    StateChange,
)
from hpt.controller.reconcile import DuplicateNodeError, Reconciler
from hpt.controller.stall import StallDetector
from hpt.controller.store import ConflictError, StoreUnavailableError, Versioned
from hpt.controller.store.memory import MemoryStore
from hpt.controller.store.retrying import RetryingStore, RetryPolicy


class FlakyStore(MemoryStore):
    """A MemoryStore that is down while ``down`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.calls = 0

    def _check(self) -> None:
        self.calls += 1
        if self.down:
            raise StoreUnavailableError("connection refused")

    def put(self, key, value, *, expected_version):  # type: ignore[no-untyped-def]
        self._check()
        return super().put(key, value, expected_version=expected_version)

    def append_event(self, event):  # type: ignore[no-untyped-def]
        self._check()
        return super().append_event(event)

    def delete(self, key, *, expected_version):  # type: ignore[no-untyped-def]
        self._check()
        return super().delete(key, expected_version=expected_version)


class Link:
    def __init__(self) -> None:
        self.sent: list[object] = []

    def send(self, command) -> None:  # type: ignore[no-untyped-def]
        self.sent.append(command)

    def close(self) -> None:
        pass


def make(store=None, **cfg) -> Reconciler:  # type: ignore[no-untyped-def]
    return Reconciler(ControllerConfig(port=0, **cfg), store or MemoryStore())


def register(rec: Reconciler, name: str, instance: str = "a") -> Link:
    link = Link()
    rec.register(Node(name=name, address="127.0.0.1", slots=2), link, [], 0, instance_id=instance)
    return link


def launches(link: Link) -> list[LaunchCommand]:
    return [c for c in link.sent if isinstance(c, LaunchCommand)]


def test_retrying_store_retries_then_fails_fast_while_down_and_reports_recovery():
    inner = FlakyStore()
    recovered = threading.Event()
    store = RetryingStore(inner, RetryPolicy(call_deadline_s=0.05, first_backoff_s=0.01,
                                             probe_cap_s=0.02), on_recovered=recovered.set)
    inner.down = True
    with pytest.raises(StoreUnavailableError):
        store.put("k", b"v", expected_version=0)
    assert inner.calls > 1, "retried within the call deadline"
    assert not store.health.up and "connection refused" in store.health.last_error
    calls = inner.calls
    with pytest.raises(StoreUnavailableError):
        store.put("k", b"v", expected_version=0)
    assert inner.calls == calls, "down: fails at once until the next probe is due"
    inner.down = False
    deadline = time.monotonic() + 10
    while True:
        try:
            assert store.put("k", b"v", expected_version=0) == 1
            break
        except StoreUnavailableError:
            assert time.monotonic() < deadline
            threading.Event().wait(0.01)
    assert store.health.up and recovered.is_set() and store.health.num_outages == 1


def test_retried_put_whose_first_try_landed_is_reported_as_done():
    class LostReply(MemoryStore):
        lost = True

        def put(self, key, value, *, expected_version):  # type: ignore[no-untyped-def]
            version = super().put(key, value, expected_version=expected_version)
            if self.lost:
                self.lost = False
                raise StoreUnavailableError("reply lost")
            return version

    store = RetryingStore(LostReply(), RetryPolicy(call_deadline_s=1.0, first_backoff_s=0.01))
    assert store.put("k", b"v", expected_version=0) == 1


class LandsThenTimesOut(MemoryStore):
    """Applies each write, and while ``lost`` raises as a reply that timed out would (Redis
    paused: the command runs once it resumes, the client has given up by then)."""

    lost = False

    def put(self, key, value, *, expected_version):  # type: ignore[no-untyped-def]
        version = super().put(key, value, expected_version=expected_version)
        if self.lost:
            raise StoreUnavailableError("Timeout reading from redis")
        return version

    def delete(self, key, *, expected_version):  # type: ignore[no-untyped-def]
        super().delete(key, expected_version=expected_version)
        if self.lost:
            raise StoreUnavailableError("Timeout reading from redis")


def _gives_up(store: RetryingStore, call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(StoreUnavailableError):
        call()
    store._next_probe = 0.0  # (the next call probes at once instead of after its backoff)


def test_a_put_that_gave_up_but_landed_is_not_read_as_another_controllers_write():
    inner = LandsThenTimesOut()
    store = RetryingStore(inner, RetryPolicy(call_deadline_s=0.0, first_backoff_s=0.01))
    assert store.put("jobs/a", b"v1", expected_version=0) == 1
    inner.lost = True
    _gives_up(store, lambda: store.put("jobs/a", b"v2", expected_version=1))  # landed: 2
    inner.lost = False
    # the controller still holds version 1: its next write of the record lands on top of v2
    assert store.put("jobs/a", b"v3", expected_version=1) == 3
    assert inner.get("jobs/a") == Versioned(value=b"v3", version=3)
    # a write the controller never made (another controller's) is still a conflict
    inner.put("jobs/a", b"theirs", expected_version=3)
    with pytest.raises(ConflictError):
        store.put("jobs/a", b"v4", expected_version=3)
    # two in a row that gave up, then one that goes through
    assert store.put("jobs/b", b"w1", expected_version=0) == 1
    inner.lost = True
    _gives_up(store, lambda: store.put("jobs/b", b"w2", expected_version=1))
    inner.lost = False
    inner_put, calls = inner.put, []

    def on_top_times_out(key, value, *, expected_version):  # type: ignore[no-untyped-def]
        calls.append(expected_version)  # the first try conflicts; the write on top of w2
        inner_put(key, value, expected_version=expected_version)  # lands...
        raise StoreUnavailableError("Timeout reading from redis")  # ...and times out

    inner.put = on_top_times_out  # type: ignore[method-assign]
    _gives_up(store, lambda: store.put("jobs/b", b"w3", expected_version=1))
    inner.put = inner_put  # type: ignore[method-assign]
    assert calls == [1, 2] and inner.get("jobs/b") == Versioned(value=b"w3", version=3)
    assert store.put("jobs/b", b"w4", expected_version=1) == 4
    assert inner.get("jobs/b") == Versioned(value=b"w4", version=4)
    # a delete that gave up but landed, then retried
    inner.lost = True
    _gives_up(store, lambda: store.delete("jobs/b", expected_version=4))
    inner.lost = False
    store.delete("jobs/b", expected_version=4)
    assert inner.get("jobs/b") is None


def test_later_puts_of_a_key_during_the_outage_do_not_hide_the_one_that_landed():
    # Redis killed just after it applied a put (its reply lost); puts of the same record from
    # the same version follow while it is down: refused at once, or refused by a dead socket
    inner = LandsThenTimesOut()
    store = RetryingStore(inner, RetryPolicy(call_deadline_s=0.0, first_backoff_s=0.01))
    assert store.put("jobs/c", b"x1", expected_version=0) == 1
    inner.lost = True
    with pytest.raises(StoreUnavailableError):
        store.put("jobs/c", b"x2", expected_version=1)  # landed: version 2
    inner.lost = False
    with pytest.raises(StoreUnavailableError, match="store down"):
        store.put("jobs/c", b"x2-fast", expected_version=1)  # never reached the store
    inner_put = inner.put

    def refused(key, value, *, expected_version):  # type: ignore[no-untyped-def]
        raise StoreUnavailableError("Error 111 connecting to 127.0.0.1. Connection refused.")

    inner.put = refused  # type: ignore[method-assign]
    _gives_up(store, lambda: store.put("jobs/c", b"x2-refused", expected_version=1))
    inner.put = inner_put  # type: ignore[method-assign]
    store._next_probe = 0.0
    assert store.put("jobs/c", b"x3", expected_version=1) == 3
    assert inner.get("jobs/c") == Versioned(value=b"x3", version=3)
    # what none of those puts wrote is still another writer's
    inner.lost = True
    _gives_up(store, lambda: store.put("jobs/c", b"x4", expected_version=3))
    inner.lost = False
    inner.put("jobs/c", b"theirs", expected_version=4)
    with pytest.raises(ConflictError):
        store.put("jobs/c", b"x5", expected_version=4)


def test_controller_keeps_running_while_the_store_is_down_and_writes_everything_after():
    from hpt.controller import convert

    inner = FlakyStore()
    rec = make(inner)
    register(rec, "n0")
    job_id = rec.submit(JobSpec(command=("true",)))
    inner.down = True
    rec.store._next_probe = 0.0
    with pytest.raises(StoreUnavailableError):  # refused, so not acknowledged: nothing stored
        rec.submit(JobSpec(command=("true",)))
    rec.reconcile_once()  # places the job; nothing can be written, and the loop goes on
    assert not rec.store_health().up and rec.events.num_pending > 0
    assert not convert.job_from_bytes(inner.get(f"jobs/{job_id}").value).attempts
    inner.down = False
    rec.store._next_probe = 0.0
    rec.reconcile_once()
    assert rec.store_health().up and rec.events.num_pending == 0
    assert convert.job_from_bytes(inner.get(f"jobs/{job_id}").value).attempts


def test_store_that_came_back_empty_gets_every_record_again():
    inner = FlakyStore()
    rec = make(inner)
    register(rec, "n0")
    job_id = rec.submit(JobSpec(command=("true",)))
    rec.reconcile_once()
    wiped = MemoryStore()
    rec.store.inner = wiped  # a Redis restarted without persistence
    rec._store_recovered.set()
    rec.reconcile_once()
    assert wiped.get(f"jobs/{job_id}") is not None and wiped.get("nodes/n0") is not None


def test_stall_detector_grants_grace_after_a_long_gap_only():
    stall = StallDetector(max_gap_s=1.0, grace_s=2.0)
    assert stall.observe(100.0) == 0.0 and stall.may_judge(100.0)
    assert stall.observe(100.5) == 0.0 and stall.may_judge(100.5)
    assert stall.observe(108.5) == 8.0
    assert not stall.may_judge(109.0) and stall.may_judge(110.5)
    assert stall.num_stalls == 1


def test_controller_stall_marks_no_node_lost_until_heartbeats_were_reobserved():
    rec = make()
    register(rec, "n0")
    rec.reconcile_once()
    rec.nodes["n0"].last_heartbeat -= 30  # silent for 30 s ... because we were paused
    rec.stall.last_pass -= 30
    rec.reconcile_once()
    assert rec.nodes["n0"].node.state == NodeState.READY
    rec.heartbeat("n0", [], [], 0)
    rec.stall.judge_after = 0.0
    rec.reconcile_once()
    assert rec.nodes["n0"].node.state == NodeState.READY


def test_lost_node_that_heartbeats_again_is_ready():
    rec = make()
    register(rec, "n0")
    rec.nodes["n0"].last_heartbeat -= 30
    rec.reconcile_once()
    assert rec.nodes["n0"].node.state == NodeState.LOST
    rec.heartbeat("n0", [], [], 0)
    assert rec.nodes["n0"].node.state == NodeState.READY


def test_second_live_agent_with_the_same_name_is_refused_the_same_agent_reconnects():
    rec = make()
    register(rec, "n0", instance="first")
    with pytest.raises(DuplicateNodeError, match="another live agent"):
        register(rec, "n0", instance="second")
    register(rec, "n0", instance="first")  # its own reconnect replaces its stream


def test_launch_waits_until_the_attempt_is_stored():
    inner = FlakyStore()
    rec = make(inner)
    link = register(rec, "n0")
    job_id = rec.submit(JobSpec(command=("true",)))
    inner.down = True
    rec.store._next_probe = 0.0
    rec.reconcile_once()
    assert rec.jobs[job_id].current is not None and not launches(link)
    inner.down = False
    rec.store._next_probe = 0.0
    rec.reconcile_once()
    assert [c.attempt for c in launches(link)] == [1]


def test_rank_that_never_starts_becomes_a_launch_timeout_fault():
    rec = make(launch_timeout_s=0.2)
    register(rec, "n0")
    job_id = rec.submit(JobSpec(command=("true",), max_restarts=0))
    rec.reconcile_once()  # launched; the agent never reports the rank
    deadline = time.monotonic() + 30
    while rec.jobs[job_id].state != JobState.FAILED:
        assert time.monotonic() < deadline, rec.jobs[job_id].reason
        threading.Event().wait(0.05)
        rec.reconcile_once()
    cause = rec.jobs[job_id].root_cause
    assert cause is not None and cause.kind.value == "launch_timeout"


def test_retention_keeps_the_newest_finished_jobs_within_count_and_age():
    def job(i: int, state: JobState, ended: float) -> Job:
        j = Job(id=f"j{i}", spec=JobSpec(command=("true",)), created_at=0.0, state=state)
        j.history.append(StateChange(state.value, ended, "x"))
        return j

    jobs = [job(0, JobState.SUCCEEDED, 10), job(1, JobState.FAILED, 20),
            job(2, JobState.RUNNING, 5), job(3, JobState.CANCELLED, 30)]
    assert retention.expired(jobs, 40, keep_count=2, keep_s=100) == ["j0"]
    assert retention.expired(jobs, 125, keep_count=5, keep_s=100) == ["j0", "j1"]
    assert retention.expired(jobs, 40, keep_count=5, keep_s=100, keep_bytes=5) == ["j0", "j1"]


def test_spec_over_the_size_budget_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"^env \(\d+ bytes\) makes the spec"):
        JobSpec(command=("true",), env=tuple((f"V{i}", "x" * 32_000) for i in range(40)))
