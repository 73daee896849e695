"""A ``Store`` wrapper that rides out a store outage: bounded retries with backoff, a fast-failing
"down" state between probes, and a health record the controller shows while the store is down.

Stores themselves never retry (see ``hpt.controller.store``). The controller wraps its store in
``RetryingStore``: a call that meets ``StoreUnavailableError`` is retried with exponential
backoff and jitter until ``call_deadline_s`` has passed, then raises. Once a call has given up
the store is *down*: further calls fail at once (they never hold the control loop's lock for
the full deadline again) until the next probe is due, and probes back off up to
``probe_cap_s``. The first call that succeeds marks the store *up* again and runs
``on_recovered`` (the reconciler then rewrites everything it holds, in case the store came back
empty).

A write whose reply was lost may have been applied: a retried ``put`` that then conflicts with
exactly the version it would have produced, holding exactly its bytes, is our own write and is
reported as done. An event appended just before a lost reply may be appended twice (events are
at-least-once across an outage).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from hpt.controller.store import ConflictError, Store, StoreUnavailableError, Versioned

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    call_deadline_s: float = 0.5
    """How long one call keeps retrying before it raises (keep it well under the agents' lease:
    the control loop holds its lock meanwhile)."""
    first_backoff_s: float = 0.02
    """First pause between two tries; doubles each time, with +-50 % jitter."""
    probe_cap_s: float = 2.0
    """Longest pause between two probes of a store that is down."""

    def __post_init__(self) -> None:
        if not self.call_deadline_s >= 0:
            raise ValueError(f"call_deadline_s ({self.call_deadline_s}) must be >= 0")
        if not self.first_backoff_s > 0:
            raise ValueError(f"first_backoff_s ({self.first_backoff_s}) must be > 0")
        if not self.probe_cap_s >= self.first_backoff_s:
            raise ValueError(f"probe_cap_s ({self.probe_cap_s}) must be >= first_backoff_s")


@dataclass(frozen=True, slots=True)
class StoreHealth:
    up: bool
    down_since: float = 0.0
    """Wall clock when the store went down; 0 while up."""
    last_error: str = ""
    num_outages: int = 0
    num_failed_calls: int = 0

    def describe(self) -> str:
        if self.up:
            return "ok"
        return f"unavailable since {time.strftime('%H:%M:%S', time.localtime(self.down_since))}: "\
            f"{self.last_error}"


class RetryingStore:
    """``Store`` over ``inner`` with bounded retries; see the module docstring."""

    def __init__(
        self,
        inner: Store,
        policy: RetryPolicy | None = None,
        *,
        on_recovered: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.policy = policy or RetryPolicy()
        self.on_recovered = on_recovered
        self._clock = clock
        self._lock = threading.Lock()
        self._health = StoreHealth(up=True)
        self._next_probe = 0.0
        self._probe_backoff = self.policy.first_backoff_s
        self._sleep = threading.Event()

    @property
    def health(self) -> StoreHealth:
        return self._health

    # ---------------------------------------------------------------- Store

    def get(self, key: str) -> Versioned | None:
        return self._call("get", lambda: self.inner.get(key))

    def put(self, key: str, value: bytes, *, expected_version: int | None) -> int:
        tries = 0

        def once() -> int:
            nonlocal tries
            tries += 1
            try:
                return self.inner.put(key, value, expected_version=expected_version)
            except ConflictError as exc:
                if tries > 1 and expected_version is not None and exc.actual == expected_version + 1:
                    item = self.inner.get(key)  # our earlier try landed and its reply was lost?
                    if item is not None and item.version == exc.actual and item.value == value:
                        return item.version
                raise

        return self._call("put", once)

    def delete(self, key: str, *, expected_version: int | None) -> None:
        self._call("delete", lambda: self.inner.delete(key, expected_version=expected_version))

    def scan(self, prefix: str) -> dict[str, Versioned]:
        return self._call("scan", lambda: self.inner.scan(prefix))

    def append_event(self, event: bytes) -> int:
        return self._call("append_event", lambda: self.inner.append_event(event))

    def append_events(self, events: Sequence[bytes]) -> int:
        return self._call("append_events", lambda: self.inner.append_events(events))

    def read_events(self, after_seq: int, limit: int = 1000) -> list[tuple[int, bytes]]:
        return self._call("read_events", lambda: self.inner.read_events(after_seq, limit))

    def close(self) -> None:
        self._sleep.set()
        self.inner.close()

    # ---------------------------------------------------------------- retries

    def _call(self, op: str, fn: Callable[[], T]) -> T:
        now = self._clock()
        with self._lock:
            if not self._health.up and now < self._next_probe:
                raise StoreUnavailableError(f"{op}: store down ({self._health.last_error})")
        deadline = now + (self.policy.call_deadline_s if self._health.up else 0.0)
        backoff = self.policy.first_backoff_s
        while True:
            try:
                result = fn()
            except StoreUnavailableError as exc:
                now = self._clock()
                if now + backoff > deadline:
                    self._failed(op, exc, now)
                    raise
                self._sleep.wait(backoff * (0.5 + random.random()))
                backoff *= 2
                continue
            self._succeeded()
            return result

    def _failed(self, op: str, exc: StoreUnavailableError, now: float) -> None:
        with self._lock:
            h = self._health
            if h.up:
                log.error("store unavailable (%s); the controller keeps running and retries with "
                          "backoff up to %.1fs: %s", op, self.policy.probe_cap_s, exc)
                self._probe_backoff = self.policy.first_backoff_s
                self._health = StoreHealth(up=False, down_since=time.time(), last_error=str(exc),
                                           num_outages=h.num_outages + 1,
                                           num_failed_calls=h.num_failed_calls + 1)
            else:
                self._probe_backoff = min(self._probe_backoff * 2, self.policy.probe_cap_s)
                self._health = StoreHealth(up=False, down_since=h.down_since,
                                           last_error=str(exc), num_outages=h.num_outages,
                                           num_failed_calls=h.num_failed_calls + 1)
            self._next_probe = now + self._probe_backoff * (0.5 + random.random())

    def _succeeded(self) -> None:
        if self._health.up:
            return
        with self._lock:
            h = self._health
            if h.up:
                return
            self._health = StoreHealth(up=True, num_outages=h.num_outages,
                                       num_failed_calls=h.num_failed_calls)
        log.warning("store reachable again after %.1fs", time.time() - h.down_since)
        self.on_recovered()
