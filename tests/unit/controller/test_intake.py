"""RPC intake: a submit and an agent's events are queued observations that a pass applies.

The handler changes no state on its own thread: the job is stored (or refused) by the pass, on
the loop's thread, and the submitter is answered with what that pass found.
"""

from __future__ import annotations

import threading

import pytest

from hpt.controller.config import ControllerConfig
from hpt.controller.model import Event, EventKind, JobSpec
from hpt.controller.reconcile import Reconciler
from hpt.controller.store import StoreUnavailableError
from hpt.controller.store.memory import MemoryStore


class WatchedStore(MemoryStore):
    """Records which thread wrote each job record; refuses every write while ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.writers: dict[str, str] = {}

    def put(self, key, value, *, expected_version):  # type: ignore[no-untyped-def]
        if self.down:
            raise StoreUnavailableError("connection refused")
        self.writers.setdefault(key, threading.current_thread().name)
        return super().put(key, value, expected_version=expected_version)

    def append_event(self, event):  # type: ignore[no-untyped-def]
        if self.down:
            raise StoreUnavailableError("connection refused")
        return super().append_event(event)


@pytest.fixture
def running():  # type: ignore[no-untyped-def]
    store = WatchedStore()
    rec = Reconciler(ControllerConfig(port=0), store)
    rec.load()
    rec.start()
    yield rec, store
    rec.stop()


def test_a_submit_is_stored_by_the_loops_pass_before_it_is_answered(running):  # type: ignore[no-untyped-def]
    rec, store = running
    job_id = rec.submit(JobSpec(command=("true",)))
    assert store.writers[f"jobs/{job_id}"] == "hpt-reconcile"  # not the handler's thread
    with rec.lock:
        assert job_id in rec.jobs
    assert [e.kind for e in rec.events.read(0) if e.job_id == job_id][:1] == [
        EventKind.JOB_SUBMITTED]


def test_a_submit_the_store_refuses_is_never_acknowledged(running):  # type: ignore[no-untyped-def]
    rec, store = running
    store.down = True
    rec.store._next_probe = 0.0
    with pytest.raises(StoreUnavailableError):
        rec.submit(JobSpec(command=("true",), name="refused"))
    with rec.lock:
        assert not rec.jobs and not rec.inbox
    assert not [k for k in store.writers if k.startswith("jobs/")]


def test_agent_events_are_recorded_by_the_next_pass_not_the_handler():
    rec = Reconciler(ControllerConfig(port=0), MemoryStore())
    event = Event(kind=EventKind.PERSIST_FAILED, at=0.0, job_id="j", node="n0",
                  message="disk full")
    rec.agent_events("n0", [event])
    assert len(rec.inbox) == 1 and rec.events.read(0) == []  # queued, nothing recorded yet
    rec.reconcile_once()
    (recorded,) = rec.events.read(0)
    assert (recorded.kind, recorded.node, recorded.message) == (EventKind.PERSIST_FAILED, "n0",
                                                                "disk full")
    assert recorded.at > 0  # a missing time is the pass's
