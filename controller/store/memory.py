"""In-process ``Store``: the embedded default for ``hptctl up``; state lives as long as the process.

One lock guards everything, which makes each call atomic and compare-and-set trivially correct.
Values are immutable ``bytes``, so records are shared without copying.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Sequence

from hpt.controller.store import (
    DEFAULT_MAX_EVENTS,
    ConflictError,
    StoreError,
    Versioned,
    validate_event_range,
    validate_expected_version,
    validate_key,
    validate_max_events,
    validate_prefix,
    validate_value,
)


class MemoryStore:
    """A thread-safe ``Store`` in this process's memory.

    Args:
        max_events: events retained; appending past it drops the oldest.
    """

    def __init__(self, *, max_events: int = DEFAULT_MAX_EVENTS) -> None:
        validate_max_events(max_events)
        self._lock = threading.Lock()
        self._records: dict[str, Versioned] = {}
        # Retained events with consecutive seqs, oldest first.
        self._events: deque[tuple[int, bytes]] = deque(maxlen=max_events)
        self._last_seq = 0
        self._closed = False

    def get(self, key: str) -> Versioned | None:
        validate_key(key)
        with self._lock:
            self._check_open()
            return self._records.get(key)

    def put(self, key: str, value: bytes, *, expected_version: int | None) -> int:
        validate_key(key)
        validate_value(value)
        validate_expected_version(expected_version)
        with self._lock:
            self._check_open()
            current = self._version_locked(key)
            if expected_version is not None and expected_version != current:
                raise ConflictError("put", key, expected_version, current)
            self._records[key] = Versioned(value=value, version=current + 1)
            return current + 1

    def delete(self, key: str, *, expected_version: int | None) -> None:
        validate_key(key)
        validate_expected_version(expected_version)
        with self._lock:
            self._check_open()
            current = self._version_locked(key)
            if expected_version is not None and expected_version != current:
                raise ConflictError("delete", key, expected_version, current)
            self._records.pop(key, None)

    def scan(self, prefix: str) -> dict[str, Versioned]:
        validate_prefix(prefix)
        with self._lock:
            self._check_open()
            matches = [(k, v) for k, v in self._records.items() if k.startswith(prefix)]
        return dict(sorted(matches))

    def append_event(self, event: bytes) -> int:
        validate_value(event, "event")
        with self._lock:
            self._check_open()
            self._last_seq += 1
            self._events.append((self._last_seq, event))
            return self._last_seq

    def append_events(self, events: Sequence[bytes]) -> int:
        for event in events:  # a bad one refuses the batch before anything is appended
            validate_value(event, "event")
        seq = self._last_seq
        for event in events:  # one at a time: a subclass that refuses one stops the rest
            seq = self.append_event(event)
        return seq

    def read_events(self, after_seq: int, limit: int = 1000) -> list[tuple[int, bytes]]:
        validate_event_range(after_seq, limit)
        with self._lock:
            self._check_open()
            if not self._events:
                return []
            # Retained seqs are consecutive, so the first wanted one sits at a computable index.
            start = max(0, after_seq + 1 - self._events[0][0])
            return list(itertools.islice(self._events, start, start + limit))

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def _version_locked(self, key: str) -> int:
        record = self._records.get(key)
        return 0 if record is None else record.version

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("MemoryStore is closed")
