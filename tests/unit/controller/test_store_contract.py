"""One contract for every ``Store``: each scenario runs against MemoryStore and RedisStore.

The Redis runs share one ``redis-server`` per session (``redis_server`` in tests/conftest.py) and
isolate themselves with a fresh namespace; the tests that stop Redis start their own.
"""

from __future__ import annotations

import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py

from hpt.controller.store import (
    MAX_KEY_CHARS,
    MAX_VALUE_BYTES,
    ConflictError,
    Store,
    StoreError,
    StoreUnavailableError,
    Versioned,
    open_store,
)
from hpt.controller.store.memory import MemoryStore
from hpt.controller.store.redis import RedisStore
from tests.redis_fixture import start_redis, stop_redis

MakeStore = Callable[..., Store]
JOIN_TIMEOUT_S = 60.0


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def make_store(request: pytest.FixtureRequest) -> Iterator[MakeStore]:
    """Factory for the store under test; keyword arguments go to its constructor."""
    opened: list[Store] = []
    if request.param == "memory":

        def make(**kwargs: Any) -> Store:
            opened.append(MemoryStore(**kwargs))
            return opened[-1]

    else:
        url = request.getfixturevalue("redis_server")
        namespace = f"t{uuid.uuid4().hex}"

        def make(**kwargs: Any) -> Store:
            opened.append(RedisStore(url, namespace=namespace, **kwargs))
            return opened[-1]

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(make_store: MakeStore) -> Store:
    return make_store()


# --- records -------------------------------------------------------------------------------------


def test_put_then_get_round_trips_the_exact_bytes_at_version_1(store: Store) -> None:
    assert store.get("jobs/a") is None
    payload = bytes(range(256)) * 4  # NULs and non-UTF-8 bytes survive
    assert store.put("jobs/a", payload, expected_version=None) == 1
    assert store.get("jobs/a") == Versioned(value=payload, version=1)
    assert store.put("jobs/empty", b"", expected_version=0) == 1
    assert store.get("jobs/empty") == Versioned(value=b"", version=1)


def test_every_successful_put_increments_the_version_by_one(store: Store) -> None:
    assert [store.put("k", b"%d" % i, expected_version=None) for i in range(3)] == [1, 2, 3]
    assert store.put("k", b"cas", expected_version=3) == 4
    assert store.get("k") == Versioned(value=b"cas", version=4)


def test_put_with_a_stale_version_conflicts_and_keeps_the_current_value(store: Store) -> None:
    store.put("jobs/a", b"one", expected_version=0)
    store.put("jobs/a", b"two", expected_version=1)
    with pytest.raises(ConflictError, match=r"'jobs/a'.*expected version 1.*found version 2") as e:
        store.put("jobs/a", b"stale", expected_version=1)
    assert (e.value.key, e.value.expected, e.value.actual) == ("jobs/a", 1, 2)
    assert store.get("jobs/a") == Versioned(value=b"two", version=2)


def test_put_expecting_absence_conflicts_once_the_key_exists(store: Store) -> None:
    assert store.put("jobs/a", b"first", expected_version=0) == 1
    with pytest.raises(ConflictError) as e:
        store.put("jobs/a", b"second", expected_version=0)
    assert (e.value.expected, e.value.actual) == (0, 1)
    assert store.get("jobs/a") == Versioned(value=b"first", version=1)


def test_put_expecting_a_version_of_an_absent_key_conflicts_and_writes_nothing(
    store: Store,
) -> None:
    with pytest.raises(ConflictError, match="key is absent") as e:
        store.put("jobs/missing", b"x", expected_version=3)
    assert (e.value.expected, e.value.actual) == (3, 0)
    assert store.get("jobs/missing") is None
    assert store.scan("") == {}


def test_delete_follows_the_same_compare_and_set_rules(store: Store) -> None:
    store.put("jobs/a", b"v1", expected_version=0)
    store.put("jobs/a", b"v2", expected_version=1)
    with pytest.raises(ConflictError, match=r"delete 'jobs/a'") as e:
        store.delete("jobs/a", expected_version=1)
    assert (e.value.expected, e.value.actual) == (1, 2)
    with pytest.raises(ConflictError):
        store.delete("jobs/a", expected_version=0)
    assert store.get("jobs/a") == Versioned(value=b"v2", version=2)

    store.delete("jobs/a", expected_version=2)
    assert store.get("jobs/a") is None
    assert store.scan("jobs/") == {}


def test_delete_of_an_absent_key_is_a_no_op_unless_a_version_is_expected(store: Store) -> None:
    store.delete("jobs/none", expected_version=None)
    store.delete("jobs/none", expected_version=0)
    with pytest.raises(ConflictError) as e:
        store.delete("jobs/none", expected_version=1)
    assert (e.value.expected, e.value.actual) == (1, 0)
    store.put("jobs/x", b"x", expected_version=0)
    store.delete("jobs/x", expected_version=None)
    assert store.get("jobs/x") is None


def test_a_key_created_again_after_delete_starts_over_at_version_1(store: Store) -> None:
    store.put("jobs/a", b"old", expected_version=None)
    store.put("jobs/a", b"old2", expected_version=None)
    store.delete("jobs/a", expected_version=2)
    assert store.put("jobs/a", b"new", expected_version=0) == 1
    assert store.get("jobs/a") == Versioned(value=b"new", version=1)


def test_scan_returns_exactly_the_keys_with_the_prefix_in_key_order(store: Store) -> None:
    keys = ["jobs/b", "jobs/a", "jobs2/x", "job", "attempts/a/1", "jobs/[x]*?", "jobs/é"]
    for key in keys:
        store.put(key, key.encode(), expected_version=0)
    store.put("jobs/a", b"again", expected_version=1)
    store.put("jobs/gone", b"x", expected_version=0)
    store.delete("jobs/gone", expected_version=1)

    jobs = store.scan("jobs/")
    assert list(jobs) == ["jobs/[x]*?", "jobs/a", "jobs/b", "jobs/é"]
    assert jobs["jobs/a"] == Versioned(value=b"again", version=2)
    assert jobs["jobs/b"] == Versioned(value=b"jobs/b", version=1)
    # Glob characters in a prefix are literal.
    assert list(store.scan("jobs/[")) == ["jobs/[x]*?"]
    assert list(store.scan("job")) == ["job", "jobs/[x]*?", "jobs/a", "jobs/b", "jobs/é", "jobs2/x"]
    assert store.scan("nothing/") == {}
    assert sorted(store.scan("")) == sorted(keys)


def test_scan_pages_through_more_keys_than_one_round_trip_returns(store: Store) -> None:
    num_keys = 2500  # > RedisStore's scan page of 1000
    for i in range(num_keys):
        store.put(f"attempts/{i:05d}", b"%d" % i, expected_version=None)
    found = store.scan("attempts/")
    assert len(found) == num_keys
    assert found["attempts/01234"] == Versioned(value=b"1234", version=1)


# --- events --------------------------------------------------------------------------------------


def test_event_seqs_start_at_1_and_have_no_gaps(store: Store) -> None:
    events = [b"submitted", b"", b"\x00\xff", b"submitted"]  # duplicates and empty are kept
    assert [store.append_event(e) for e in events] == [1, 2, 3, 4]
    assert store.read_events(0) == list(enumerate(events, start=1))


def test_a_batch_of_events_takes_the_next_seqs_in_order(make_store: MakeStore) -> None:
    store = make_store(max_events=4)
    assert store.append_events([]) == 0
    assert store.append_event(b"one") == 1
    assert store.append_events([b"two", b"", b"two"]) == 4  # the last one's seq
    assert store.append_events([]) == 4
    assert store.append_event(b"five") == 5
    assert store.read_events(0) == [(2, b"two"), (3, b""), (4, b"two"), (5, b"five")]
    with pytest.raises(ValueError, match="event"):
        store.append_events([b"six", "text"])  # type: ignore[list-item]
    assert store.read_events(5) == []  # nothing of a refused batch


def test_read_events_pages_in_ascending_seq_after_the_cursor(store: Store) -> None:
    for i in range(1, 8):
        store.append_event(b"e%d" % i)
    assert store.read_events(0, limit=3) == [(1, b"e1"), (2, b"e2"), (3, b"e3")]
    assert store.read_events(3, limit=3) == [(4, b"e4"), (5, b"e5"), (6, b"e6")]
    assert store.read_events(6, limit=3) == [(7, b"e7")]
    assert store.read_events(7) == []
    assert store.read_events(100) == []

    # What `hptctl events -f` does: poll with the last seq seen until nothing is left.
    seen: list[int] = []
    cursor = 0
    while page := store.read_events(cursor, limit=2):
        seen += [seq for seq, _ in page]
        cursor = page[-1][0]
    assert seen == list(range(1, 8))


def test_events_beyond_max_events_are_trimmed_oldest_first(make_store: MakeStore) -> None:
    store = make_store(max_events=3)
    assert [store.append_event(b"e%d" % i) for i in range(1, 6)] == [1, 2, 3, 4, 5]
    assert store.read_events(0) == [(3, b"e3"), (4, b"e4"), (5, b"e5")]
    assert store.append_event(b"e6") == 6
    assert store.read_events(0) == [(4, b"e4"), (5, b"e5"), (6, b"e6")]
    assert store.read_events(1, limit=1) == [(4, b"e4")]
    assert store.read_events(4) == [(5, b"e5"), (6, b"e6")]


# --- concurrency ---------------------------------------------------------------------------------


def test_concurrent_compare_and_set_increments_lose_no_update(store: Store) -> None:
    num_threads, increments_each = 8, 25
    store.put("counter", b"0", expected_version=0)
    barrier = threading.Barrier(num_threads, timeout=JOIN_TIMEOUT_S)
    won_versions: list[list[int]] = [[] for _ in range(num_threads)]
    errors: list[BaseException] = []

    def increment(thread_index: int) -> None:
        try:
            barrier.wait()
            for _ in range(increments_each):
                while True:
                    current = store.get("counter")
                    assert current is not None
                    new_value = b"%d" % (int(current.value) + 1)
                    try:
                        version = store.put("counter", new_value, expected_version=current.version)
                    except ConflictError:
                        continue
                    won_versions[thread_index].append(version)
                    break
        except BaseException as e:  # surfaced by the main thread below
            errors.append(e)

    # A tiny switch interval makes the in-memory threads interleave inside the retry loop.
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=increment, args=(i,)) for i in range(num_threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=JOIN_TIMEOUT_S)
    finally:
        sys.setswitchinterval(old_interval)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    total = num_threads * increments_each
    assert store.get("counter") == Versioned(value=b"%d" % total, version=total + 1)
    # Each successful put got its own version: no two writers both won the same step.
    assert sorted(v for versions in won_versions for v in versions) == list(range(2, total + 2))


# --- input validation ----------------------------------------------------------------------------

BAD_KEYS = [
    "",
    " ",
    "a b",
    "a\tb",
    "a\nb",
    "a\x00b",
    "a\x7fb",
    "a\u2028b",
    "x" * (MAX_KEY_CHARS + 1),
]


@pytest.mark.parametrize("key", BAD_KEYS + [None, 7, b"bytes"], ids=repr)
def test_bad_key_raises_value_error_naming_key_and_stores_nothing(store: Store, key: Any) -> None:
    with pytest.raises(ValueError, match=r"^key \("):
        store.put(key, b"x", expected_version=None)
    with pytest.raises(ValueError, match=r"^key \("):
        store.get(key)
    with pytest.raises(ValueError, match=r"^key \("):
        store.delete(key, expected_version=None)
    assert store.scan("") == {}


def test_longest_allowed_key_and_largest_allowed_value_are_accepted(store: Store) -> None:
    key = "k" * MAX_KEY_CHARS
    value = b"v" * MAX_VALUE_BYTES
    assert store.put(key, value, expected_version=0) == 1
    assert store.get(key) == Versioned(value=value, version=1)


@pytest.mark.parametrize(
    "value", ["text", bytearray(b"x"), memoryview(b"x"), None, b"x" * (MAX_VALUE_BYTES + 1)],
    ids=["str", "bytearray", "memoryview", "None", "too-large"],
)  # fmt: skip
def test_bad_value_raises_value_error_naming_value_and_stores_nothing(
    store: Store, value: Any
) -> None:
    with pytest.raises(ValueError, match=r"^value \("):
        store.put("jobs/a", value, expected_version=None)
    assert store.get("jobs/a") is None


@pytest.mark.parametrize("expected_version", [-1, 1.0, "1", True])
def test_bad_expected_version_raises_value_error_naming_it(
    store: Store, expected_version: Any
) -> None:
    with pytest.raises(ValueError, match=r"^expected_version \("):
        store.put("jobs/a", b"x", expected_version=expected_version)
    with pytest.raises(ValueError, match=r"^expected_version \("):
        store.delete("jobs/a", expected_version=expected_version)
    assert store.get("jobs/a") is None


def test_bad_event_and_read_arguments_raise_value_error_naming_the_field(store: Store) -> None:
    with pytest.raises(ValueError, match=r"^event \("):
        store.append_event("text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^event \("):
        store.append_event(b"x" * (MAX_VALUE_BYTES + 1))
    with pytest.raises(ValueError, match=r"^after_seq \("):
        store.read_events(-1)
    with pytest.raises(ValueError, match=r"^limit \("):
        store.read_events(0, limit=0)
    with pytest.raises(ValueError, match=r"^prefix \("):
        store.scan("a b")
    assert store.read_events(0) == []
    assert store.append_event(b"first") == 1


@pytest.mark.parametrize("max_events", [0, -5, 2.5])
def test_bad_max_events_raises_value_error_naming_it(
    make_store: MakeStore, max_events: Any
) -> None:
    with pytest.raises(ValueError, match=r"^max_events \("):
        make_store(max_events=max_events)


def test_a_closed_store_refuses_calls(store: Store) -> None:
    store.put("jobs/a", b"x", expected_version=0)
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        store.get("jobs/a")
    with pytest.raises(StoreError, match="closed"):
        store.append_event(b"x")


# --- Redis only ----------------------------------------------------------------------------------


@pytest.mark.redis
def test_redis_store_reopened_on_the_same_server_keeps_records_and_event_seqs(
    redis_server: str,
) -> None:
    namespace = f"t{uuid.uuid4().hex}"
    first = RedisStore(redis_server, namespace=namespace)
    first.put("jobs/a", b"running", expected_version=0)
    first.append_event(b"one")
    first.append_event(b"two")
    first.close()

    # A controller restart: a new client object against the same server.
    second = RedisStore(redis_server, namespace=namespace)
    try:
        assert second.get("jobs/a") == Versioned(value=b"running", version=1)
        assert second.scan("jobs/") == {"jobs/a": Versioned(value=b"running", version=1)}
        assert second.put("jobs/a", b"done", expected_version=1) == 2
        assert second.append_event(b"three") == 3
        assert second.read_events(0) == [(1, b"one"), (2, b"two"), (3, b"three")]
    finally:
        second.close()


@pytest.mark.redis
def test_redis_namespaces_on_one_server_never_see_each_other(redis_server: str) -> None:
    run = uuid.uuid4().hex
    a = RedisStore(redis_server, namespace=f"a{run}")
    b = RedisStore(redis_server, namespace=f"b{run}")
    try:
        a.put("jobs/x", b"from-a", expected_version=0)
        assert b.get("jobs/x") is None
        assert b.put("jobs/x", b"from-b", expected_version=0) == 1
        a.put("jobs/only-a", b"a", expected_version=0)
        assert a.append_event(b"a1") == 1
        assert b.append_event(b"b1") == 1

        assert a.scan("") == {
            "jobs/only-a": Versioned(value=b"a", version=1),
            "jobs/x": Versioned(value=b"from-a", version=1),
        }
        assert b.scan("") == {"jobs/x": Versioned(value=b"from-b", version=1)}
        b.delete("jobs/x", expected_version=1)
        assert a.get("jobs/x") == Versioned(value=b"from-a", version=1)
        assert a.read_events(0) == [(1, b"a1")]
        assert b.read_events(0) == [(1, b"b1")]
    finally:
        a.close()
        b.close()


@pytest.mark.redis
def test_redis_store_keeps_values_as_raw_bytes_on_the_server(redis_server: str) -> None:
    namespace = f"t{uuid.uuid4().hex}"
    store = RedisStore(redis_server, namespace=namespace)
    raw = redis_py.Redis.from_url(redis_server)
    try:
        store.put("jobs/a", b"\x08\x01proto", expected_version=0)
        assert raw.hget(f"{{{namespace}}}:kv:jobs/a", "d") == b"\x08\x01proto"
    finally:
        raw.close()
        store.close()


@pytest.mark.redis
def test_redis_store_raises_unavailable_once_the_server_is_gone(tmp_path: Path) -> None:
    url, proc = start_redis(tmp_path)
    try:
        store = RedisStore(url, namespace="gone")
        store.put("jobs/a", b"x", expected_version=0)
    finally:
        stop_redis(proc)
    assert proc.returncode is not None  # reaped

    calls: list[Callable[[], object]] = [
        lambda: store.get("jobs/a"),
        lambda: store.put("jobs/a", b"y", expected_version=1),
        lambda: store.delete("jobs/a", expected_version=None),
        lambda: store.scan("jobs/"),
        lambda: store.append_event(b"e"),
        lambda: store.read_events(0),
    ]
    for call in calls:
        with pytest.raises(StoreUnavailableError, match=r"unavailable"):
            call()
    store.close()

    # Opening against a dead server fails at once, and the message never shows the password.
    with pytest.raises(StoreUnavailableError) as e:
        open_store(url.replace("redis://", "redis://:hunter2@"))
    assert "hunter2" not in str(e.value)


@pytest.mark.redis
def test_open_store_picks_the_backend_from_the_url(redis_server: str) -> None:
    for url in ("", "memory://"):
        memory = open_store(url)
        assert isinstance(memory, MemoryStore)
        memory.close()
    redis_store = open_store(redis_server)
    assert isinstance(redis_store, RedisStore)
    redis_store.close()


@pytest.mark.parametrize("url", ["http://x", "postgres://user:s3cret@db/0", "127.0.0.1:6379"])
def test_open_store_rejects_other_urls_naming_redis_url(url: str) -> None:
    with pytest.raises(ValueError, match=r"^redis_url ") as e:
        open_store(url)
    assert "s3cret" not in str(e.value)


@pytest.mark.parametrize("namespace", ["", "a:b", "{x}", "a b", "n" * 65])
def test_redis_store_rejects_a_bad_namespace_before_connecting(namespace: str) -> None:
    with pytest.raises(ValueError, match=r"^namespace \("):
        RedisStore("redis://127.0.0.1:1/0", namespace=namespace)


def test_the_redis_module_imports_redis_py_not_itself() -> None:
    import hpt.controller.store.redis as store_redis

    assert store_redis.redis is redis_py
    assert hasattr(store_redis.redis, "Redis")
