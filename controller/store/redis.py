"""``Store`` on a Redis server (redis-py): state that outlives the controller process.

Layout, for namespace ``ns`` (the ``{ns}`` hash tag keeps a namespace in one cluster slot, which
the multi-key scripts need):

- ``{ns}:kv:<key>``: a hash with ``v`` (version, decimal), ``d`` (the value's raw bytes) and
  ``e`` (the leader epoch that wrote it; empty without leader election).
- ``{ns}:keys``: a sorted set of every key, all at score 0, so ``scan`` is a lexicographic range.
- ``{ns}:events``: a stream whose entry ids are ``<seq>-0``, trimmed to ``max_events`` entries.
- ``{ns}:events:seq``: the last seq handed out; it survives trimming.

Compare-and-set and event appends run as Lua scripts, so each is atomic on the server and seqs
are gap-free without client-side locking. A store ``fence``d with a leader epoch
(:mod:`hpt.controller.leader`) checks the epoch key in the same script: a deposed leader's write
is refused (``FencedError``) and nothing is written. No retries happen here (redis-py's are switched off):
connection errors and timeouts become ``StoreUnavailableError`` and the controller decides.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from hpt.controller.store import (
    DEFAULT_MAX_EVENTS,
    ConflictError,
    FencedError,
    StoreError,
    StoreUnavailableError,
    Versioned,
    validate_event_range,
    validate_expected_version,
    validate_key,
    validate_max_events,
    validate_prefix,
    validate_value,
)

# Every write script takes the epoch key as its last KEY and the expected epoch ("" for none) as
# its last ARGV, and returns -1 (first element) when the epoch moved on.
_FENCE_LUA = """
if ARGV[#ARGV] ~= '' and redis.call('GET', KEYS[#KEYS]) ~= ARGV[#ARGV] then
  return {-1, 0}
end
"""

# KEYS: record hash, key index. ARGV: expected version ("" for none), value, key.
# Returns {1, new_version} or {0, current_version}.
_PUT_LUA = _FENCE_LUA + """
local current = tonumber(redis.call('HGET', KEYS[1], 'v')) or 0
if ARGV[1] ~= '' and tonumber(ARGV[1]) ~= current then
  return {0, current}
end
redis.call('HSET', KEYS[1], 'v', current + 1, 'd', ARGV[2], 'e', ARGV[#ARGV])
redis.call('ZADD', KEYS[2], 0, ARGV[3])
return {1, current + 1}
"""

# KEYS: record hash, key index. ARGV: expected version ("" for none), key.
# Returns {1, 0} or {0, current_version}.
_DELETE_LUA = _FENCE_LUA + """
local current = tonumber(redis.call('HGET', KEYS[1], 'v')) or 0
if ARGV[1] ~= '' and tonumber(ARGV[1]) ~= current then
  return {0, current}
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
return {1, 0}
"""

# KEYS: event stream, seq counter. ARGV: max_events, event..., fence. Returns the last seq.
# Each XADD runs before the counter moves past it: a failure part way leaves a prefix and no gap.
_APPEND_LUA = _FENCE_LUA.replace("{-1, 0}", "-1") + """
local seq = tonumber(redis.call('GET', KEYS[2])) or 0
for i = 2, #ARGV - 1 do
  seq = seq + 1
  redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[1], string.format('%d-0', seq), 'e', ARGV[i])
  redis.call('SET', KEYS[2], string.format('%d', seq))
end
return seq
"""

_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SCAN_PAGE = 1000


class RedisStore:
    """A ``Store`` backed by Redis; any number of clients may share one namespace.

    Args:
        url: ``redis://[user:password@]host:port/db`` or ``rediss://`` for TLS.
        namespace: prefix that isolates this store from others on the same server
            (letters, digits, ``_.-``; at most 64).
        max_events: events retained; appending past it trims the oldest.
        socket_timeout_s: deadline for connecting and for each command.

    Raises:
        StoreUnavailableError: the server did not answer a PING.
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "hpt",
        max_events: int = DEFAULT_MAX_EVENTS,
        socket_timeout_s: float = 2.0,
    ) -> None:
        if not isinstance(namespace, str) or not _NAMESPACE_RE.fullmatch(namespace):
            raise ValueError(
                f"namespace ({namespace!r}) must be 1-64 letters, digits, '_', '.' or '-'"
            )
        validate_max_events(max_events)
        if not socket_timeout_s > 0:
            raise ValueError(f"socket_timeout_s ({socket_timeout_s!r}) must be > 0")
        self._max_events = max_events
        self._closed = False
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
        )
        kwargs = self._client.connection_pool.connection_kwargs
        # Named in errors instead of the URL, which may carry a password.
        address = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        self._where = f"redis at {address}/{kwargs.get('db', 0)} (namespace {namespace!r})"
        prefix = f"{{{namespace}}}:"
        self._record_prefix = prefix + "kv:"
        self._index_key = prefix + "keys"
        self._events_key = prefix + "events"
        self._seq_key = prefix + "events:seq"
        self._put_script = self._client.register_script(_PUT_LUA)
        self._delete_script = self._client.register_script(_DELETE_LUA)
        self._append_script = self._client.register_script(_APPEND_LUA)
        self.lease_key = prefix + "leader"
        """Where :mod:`hpt.controller.leader` keeps the leader lease (holder, epoch, expiry)."""
        self.epoch_key = prefix + "leader:epoch"
        """The last leader epoch handed out; ``fence`` makes writes check it."""
        self._fence: tuple[str, str] = (self.epoch_key, "")
        try:
            with self._errors("connect"):
                self._client.ping()
        except StoreError:
            self._client.close()
            raise

    def get(self, key: str) -> Versioned | None:
        validate_key(key)
        with self._errors("get"):
            version, data = self._client.hmget(self._record_prefix + key, ["v", "d"])
        if version is None:
            return None
        return Versioned(value=data, version=int(version))

    def put(self, key: str, value: bytes, *, expected_version: int | None) -> int:
        validate_key(key)
        validate_value(value)
        validate_expected_version(expected_version)
        with self._errors("put"):
            ok, version = self._put_script(
                keys=[self._record_prefix + key, self._index_key, self._fence[0]],
                args=[_expected_arg(expected_version), value, key, self._fence[1]],
            )
        self._check_fence(ok, "put", key)
        if not ok:
            assert expected_version is not None
            raise ConflictError("put", key, expected_version, version)
        return int(version)

    def delete(self, key: str, *, expected_version: int | None) -> None:
        validate_key(key)
        validate_expected_version(expected_version)
        with self._errors("delete"):
            ok, version = self._delete_script(
                keys=[self._record_prefix + key, self._index_key, self._fence[0]],
                args=[_expected_arg(expected_version), key, self._fence[1]],
            )
        self._check_fence(ok, "delete", key)
        if not ok:
            assert expected_version is not None
            raise ConflictError("delete", key, expected_version, version)

    def scan(self, prefix: str) -> dict[str, Versioned]:
        validate_prefix(prefix)
        records: dict[str, Versioned] = {}
        # UTF-8 preserves code point order and never contains 0xff, so this range is the prefix.
        low = b"[" + prefix.encode() if prefix else b"-"
        high = b"[" + prefix.encode() + b"\xff" if prefix else b"+"
        with self._errors("scan"):
            while True:
                keys = self._client.zrangebylex(self._index_key, low, high, 0, _SCAN_PAGE)
                if not keys:
                    break
                pipe = self._client.pipeline(transaction=False)
                for key in keys:
                    pipe.hmget(self._record_prefix.encode() + key, ["v", "d"])
                for key, (version, data) in zip(keys, pipe.execute(), strict=True):
                    # None: deleted between the index read and this read.
                    if version is not None:
                        records[key.decode()] = Versioned(value=data, version=int(version))
                if len(keys) < _SCAN_PAGE:
                    break
                low = b"(" + keys[-1]
        return records

    def append_event(self, event: bytes) -> int:
        return self.append_events([event])

    def append_events(self, events: Sequence[bytes]) -> int:
        for event in events:
            validate_value(event, "event")
        with self._errors("append_events"):
            seq = int(
                self._append_script(
                    keys=[self._events_key, self._seq_key, self._fence[0]],
                    args=[self._max_events, *events, self._fence[1]],
                )
            )
        self._check_fence(seq, "append_events", "events")
        return seq

    def read_events(self, after_seq: int, limit: int = 1000) -> list[tuple[int, bytes]]:
        validate_event_range(after_seq, limit)
        with self._errors("read_events"):
            entries = self._client.xrange(self._events_key, f"{after_seq + 1}-0", "+", count=limit)
        return [(int(entry_id.split(b"-")[0]), fields[b"e"]) for entry_id, fields in entries]

    @property
    def redis(self) -> redis.Redis:
        """The client (the leader lease runs its own scripts on the same server)."""
        return self._client

    def fence(self, epoch: int) -> None:
        """From now on every write succeeds only while ``epoch_key`` holds ``epoch`` (this
        controller's leader epoch, :mod:`hpt.controller.leader`); others raise ``FencedError``."""
        self._fence = (self.epoch_key, str(epoch))

    def _check_fence(self, code: int, op: str, key: str) -> None:
        if code == -1:
            raise FencedError(f"{op} {key!r}: leader epoch {self._fence[1]} is no longer current")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._client.close()

    @contextmanager
    def _errors(self, op: str) -> Iterator[None]:
        """Refuse calls after close; translate redis-py errors into ``StoreError``s."""
        if self._closed:
            raise StoreError(f"{op}: RedisStore for {self._where} is closed")
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError) as e:
            # ReadOnlyError: we are talking to a replica, e.g. right after a failover.
            raise StoreUnavailableError(f"{op}: {self._where} unavailable: {e}") from e
        except redis.RedisError as e:
            raise StoreError(f"{op}: {self._where} failed: {e}") from e


def _expected_arg(expected_version: int | None) -> str:
    return "" if expected_version is None else str(expected_version)
