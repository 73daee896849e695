"""Where the controller keeps its state: a narrow, versioned key-value ``Store`` plus an event log.

The controller persists every job and attempt record (protobuf bytes, never pickle) through
``Store.put`` with compare-and-set on ``expected_version``, appends every event (fault, attempt,
state change) through ``Store.append_events`` (what one pass emitted, in one call), and
rebuilds its state with ``Store.scan`` when it restarts. Two implementations follow the same contract and are tested by one suite
(``tests/unit/controller/test_store_contract.py``):

- ``memory.MemoryStore``: in-process and thread-safe; the embedded default for ``hptctl up``.
  State dies with the process.
- ``redis.RedisStore``: redis-py against a Redis server; state outlives the controller, which is
  what lets a restarted controller pick up running jobs.

``open_store`` picks one from ``ControllerConfig.redis_url``. Stores never retry: a backend that
cannot be reached raises ``StoreUnavailableError`` and the controller decides what to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

MAX_KEY_CHARS = 512
"""Longest accepted key, in characters."""
MAX_VALUE_BYTES = 16 * 1024 * 1024
"""Largest accepted value or event."""
DEFAULT_MAX_EVENTS = 100_000
"""Events retained before the oldest are trimmed."""


@dataclass(frozen=True, slots=True)
class Versioned:
    """A stored value with its version."""

    value: bytes
    version: int
    """>= 1; starts at 1 when the key is created and increments on every successful put."""


class StoreError(Exception):
    """Base of every error a Store raises (bad input raises ValueError instead)."""


class ConflictError(StoreError):
    """A compare-and-set failed: the key's version was not the expected one. Nothing was written."""

    def __init__(self, op: str, key: str, expected: int, actual: int) -> None:
        self.key = key
        self.expected = expected
        self.actual = actual
        found = "the key is absent" if actual == 0 else f"found version {actual}"
        super().__init__(f"{op} {key!r}: expected version {expected}, {found}")


class FencedError(StoreError):
    """The write carried a leader epoch that is no longer current: another controller leads now.
    Nothing was written; the caller must stop acting as the leader."""


class StoreUnavailableError(StoreError):
    """The backend is down, unreachable, or did not answer in time; the call may not have run."""


class Store(Protocol):
    """Versioned records plus an append-only event log; every method is safe to call from threads.

    Versions are per key: a key that is deleted and created again starts over at version 1.
    """

    def get(self, key: str) -> Versioned | None:
        """Read one record (before a compare-and-set, and for ``hptctl status``); None if absent."""
        ...

    def put(self, key: str, value: bytes, *, expected_version: int | None) -> int:
        """Write a record; called on every job and attempt state change.

        Args:
            key: non-empty, printable, no whitespace, at most ``MAX_KEY_CHARS`` characters.
            value: bytes, at most ``MAX_VALUE_BYTES``.
            expected_version: None writes unconditionally; 0 requires the key to be absent;
                N requires the current version to be N.

        Returns:
            The new version.

        Raises:
            ConflictError: the version did not match; nothing was written.
            ValueError: bad key, value or expected_version; nothing was written.
            StoreUnavailableError: the backend could not be reached.
        """
        ...

    def delete(self, key: str, *, expected_version: int | None) -> None:
        """Remove a record (job garbage collection) with the same rules as ``put``.

        Deleting an absent key with ``expected_version`` None or 0 is a no-op.
        """
        ...

    def scan(self, prefix: str) -> dict[str, Versioned]:
        """Every record whose key starts with ``prefix`` (empty: all), in key order.

        Called when the controller starts, to rebuild its state. Not a snapshot across keys: a
        record changed while the scan runs may appear in its old or new version.
        """
        ...

    def append_event(self, event: bytes) -> int:
        """Append one event (bytes, at most ``MAX_VALUE_BYTES``); called for every event.

        Returns:
            Its sequence number: 1 for the first event, then exactly one more each time.
        """
        ...

    def append_events(self, events: Sequence[bytes]) -> int:
        """Append ``events`` in order, as ``append_event`` would one by one, in one call to the
        store (the controller writes what a pass emitted at once). Returns the last one's
        sequence number (the current one when ``events`` is empty). A failure part way leaves
        a prefix appended and the sequence without a gap."""
        ...

    def read_events(self, after_seq: int, limit: int = 1000) -> list[tuple[int, bytes]]:
        """Up to ``limit`` retained events with seq > ``after_seq``, in ascending order.

        Polled by ``hptctl events -f`` with the last seq it saw. Events trimmed past the
        retention bound are skipped silently, so the first seq returned may exceed after_seq + 1.
        """
        ...

    def close(self) -> None:
        """Release connections; called once at controller shutdown. Later calls raise StoreError."""
        ...


def open_store(url: str) -> Store:
    """The store for ``ControllerConfig.redis_url``.

    Args:
        url: "" or "memory://" for a ``MemoryStore``; "redis://host:port/db" (or "rediss://" for
            TLS) for a ``RedisStore``.

    Raises:
        ValueError: any other scheme.
        StoreUnavailableError: the Redis server did not answer.
    """
    if url in ("", "memory://"):
        from hpt.controller.store.memory import MemoryStore

        return MemoryStore()
    # Only the scheme is echoed back: the rest of the URL may carry a password.
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss"):
        from hpt.controller.store.redis import RedisStore

        return RedisStore(url)
    raise ValueError(
        f"redis_url (scheme {scheme!r}) must be empty, 'memory://', 'redis://host:port/db' "
        "or 'rediss://host:port/db'"
    )


def validate_key(key: object) -> str:
    """Return ``key`` if it is a valid store key; the error names ``key``."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"key ({key!r}) must be a non-empty str")
    if len(key) > MAX_KEY_CHARS:
        raise ValueError(
            f"key ({key[:40]!r}..., {len(key)} chars) must be <= {MAX_KEY_CHARS} chars"
        )
    if not key.isprintable() or any(ch.isspace() for ch in key):
        raise ValueError(f"key ({key!r}) must not contain whitespace or control characters")
    return key


def validate_prefix(prefix: object) -> str:
    """Return ``prefix`` if it is empty or a valid key."""
    if prefix == "":
        return ""
    try:
        return validate_key(prefix)
    except ValueError as e:
        raise ValueError(str(e).replace("key (", "prefix (", 1)) from None


def validate_value(value: object, field: str = "value") -> bytes:
    """Return ``value`` if it is bytes of at most ``MAX_VALUE_BYTES``; the error names ``field``."""
    if not isinstance(value, bytes):
        raise ValueError(f"{field} ({type(value).__name__}) must be bytes")
    if len(value) > MAX_VALUE_BYTES:
        raise ValueError(f"{field} ({len(value)} bytes) must be <= {MAX_VALUE_BYTES} bytes")
    return value


def validate_expected_version(expected_version: object) -> int | None:
    """Return ``expected_version`` if it is None or an int >= 0."""
    if expected_version is None:
        return None
    if (
        not isinstance(expected_version, int)
        or isinstance(expected_version, bool)
        or expected_version < 0
    ):
        raise ValueError(f"expected_version ({expected_version!r}) must be None or an int >= 0")
    return expected_version


def validate_event_range(after_seq: object, limit: object) -> None:
    """Check ``read_events`` arguments: after_seq an int >= 0, limit an int >= 1."""
    if not isinstance(after_seq, int) or isinstance(after_seq, bool) or after_seq < 0:
        raise ValueError(f"after_seq ({after_seq!r}) must be an int >= 0")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValueError(f"limit ({limit!r}) must be an int >= 1")


def validate_max_events(max_events: object) -> int:
    """Return ``max_events`` if it is an int >= 1."""
    if not isinstance(max_events, int) or isinstance(max_events, bool) or max_events < 1:
        raise ValueError(f"max_events ({max_events!r}) must be an int >= 1")
    return max_events
