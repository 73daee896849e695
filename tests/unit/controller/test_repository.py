"""The repository owns record versions: a compare-and-set conflict means another controller
leads, and this one steps down instead of overwriting the other's copy. Run against the memory
store and a real ``redis-server``."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest

from hpt.controller import convert
from hpt.controller.config import ControllerConfig
from hpt.controller.model import JobSpec, Node
from hpt.controller.reconcile import Reconciler
from hpt.controller.repository import Repository, SteppedDownError
from hpt.controller.store import FencedError, Store, StoreUnavailableError
from hpt.controller.store.memory import MemoryStore
from hpt.controller.store.redis import RedisStore

STEP_DOWN_TIMEOUT_S = 10.0


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    if request.param == "memory":
        opened: Store = MemoryStore()
    else:
        opened = RedisStore(request.getfixturevalue("redis_server"),
                            namespace=f"t{uuid.uuid4().hex}")
    yield opened
    opened.close()


def test_save_writes_over_the_version_it_loaded_and_then_its_own(store: Store) -> None:
    store.put("jobs/a", b"v1", expected_version=0)
    repo = Repository(store)
    assert repo.load("jobs/") == {"jobs/a": b"v1"} and repo.version("jobs/a") == 1
    assert repo.save("jobs/a", b"v2") and repo.save("jobs/a", b"v3")
    item = store.get("jobs/a")
    assert item is not None and (item.value, item.version) == (b"v3", 3)


def test_a_record_another_controller_wrote_makes_this_one_step_down_and_keeps_theirs(
    store: Store,
) -> None:
    repo = Repository(store)
    repo.create("jobs/a", b"mine")
    store.put("jobs/a", b"theirs", expected_version=1)  # another controller
    with pytest.raises(SteppedDownError, match="another controller") as err:
        repo.save("jobs/a", b"mine again")
    assert isinstance(err.value, FencedError)
    item = store.get("jobs/a")
    assert item is not None and item.value == b"theirs"
    with pytest.raises(SteppedDownError):  # never adopts their version to overwrite it later
        repo.save("jobs/a", b"mine again")
    assert store.get("jobs/a").value == b"theirs"  # type: ignore[union-attr]


def test_creating_a_record_that_exists_steps_down(store: Store) -> None:
    store.put("jobs/a", b"theirs", expected_version=0)
    with pytest.raises(SteppedDownError):
        Repository(store).create("jobs/a", b"mine")
    assert store.get("jobs/a").value == b"theirs"  # type: ignore[union-attr]


def test_a_record_the_store_lost_is_written_again_as_new(store: Store) -> None:
    repo = Repository(store)
    repo.create("jobs/a", b"v1")
    assert repo.save("jobs/a", b"v2")
    store.delete("jobs/a", expected_version=None)  # the store restarted empty
    assert repo.save("jobs/a", b"v3")
    item = store.get("jobs/a")
    assert item is not None and (item.value, item.version) == (b"v3", 1)
    assert repo.version("jobs/a") == 1


def test_delete_at_the_held_version_and_step_down_when_another_wrote_it(store: Store) -> None:
    repo = Repository(store)
    repo.create("jobs/a", b"v1")
    repo.create("jobs/b", b"v1")
    assert repo.delete("jobs/a") and store.get("jobs/a") is None and repo.version("jobs/a") == 0
    store.put("jobs/b", b"theirs", expected_version=1)
    with pytest.raises(SteppedDownError):
        repo.delete("jobs/b")
    assert store.get("jobs/b") is not None


class _DownStore(MemoryStore):
    down = False

    def put(self, key, value, *, expected_version):  # type: ignore[no-untyped-def]
        if self.down:
            raise StoreUnavailableError("down")
        return super().put(key, value, expected_version=expected_version)


def test_a_store_that_is_down_is_not_a_conflict_the_write_waits() -> None:
    store = _DownStore()
    repo = Repository(store)
    repo.create("nodes/n", b"v1")
    store.down = True
    assert repo.save("nodes/n", b"v2") is False and repo.version("nodes/n") == 1
    store.down = False
    assert repo.save("nodes/n", b"v2") and repo.version("nodes/n") == 2


def _controller(store: Store) -> Reconciler:
    return Reconciler(ControllerConfig(port=0, reconcile_period_s=0.05), store)


class _Link:
    def send(self, command) -> None:  # type: ignore[no-untyped-def]
        pass

    def close(self) -> None:
        pass


def test_a_controller_whose_job_another_wrote_steps_down_and_never_overwrites_it(
    store: Store,
) -> None:
    rec = _controller(store)
    rec.register(Node(name="n0", address="127.0.0.1", slots=1), _Link(), [], free_port=20001)
    job_id = rec.submit(JobSpec(command=("true",)))
    rec.reconcile_once()
    key = f"jobs/{job_id}"
    theirs = store.get(key)
    assert theirs is not None
    other = convert.job_from_bytes(theirs.value)
    other.reason = "written by the other controller"
    store.put(key, convert.job_to_bytes(other), expected_version=theirs.version)
    with rec.lock:
        rec.jobs[job_id].reason = "changed here"
        rec._dirty_jobs.add(job_id)
    crashed = threading.Event()
    rec.on_crash = lambda exc: crashed.set()
    rec.start()
    try:
        assert crashed.wait(STEP_DOWN_TIMEOUT_S)
        assert isinstance(rec.crashed, SteppedDownError)
    finally:
        rec._stopping.set()
        rec._wake.set()
        rec._thread.join(STEP_DOWN_TIMEOUT_S)  # type: ignore[union-attr]
    stored = convert.job_from_bytes(store.get(key).value)  # type: ignore[union-attr]
    assert stored.reason == "written by the other controller"


def test_a_submit_that_meets_another_controllers_record_is_refused_and_the_loop_steps_down(
    store: Store, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hpt.controller import reconcile

    rec = _controller(store)
    monkeypatch.setattr(reconcile.secrets, "token_hex", lambda n: "00000000")
    store.put("jobs/job-00000000", b"theirs", expected_version=0)
    with pytest.raises(SteppedDownError):
        rec.submit(JobSpec(command=("true",)))
    with pytest.raises(SteppedDownError):
        rec.reconcile_once()
    assert store.get("jobs/job-00000000").value == b"theirs"  # type: ignore[union-attr]
