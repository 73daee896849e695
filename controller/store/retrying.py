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
reported as done. A ``put`` that gave up (it raised ``StoreUnavailableError``: Redis paused, a
reply timed out) may have landed too, once the store answers again: the next ``put`` of that
key, made from the version before it, then conflicts with the version the lost one produced.
If that version holds exactly the bytes of one of the puts that reached the store from that
version and gave up (their digests are kept per key until a put of the key succeeds; a put
refused at once while the store is down never reached it and is not kept), the conflict is our
own earlier write and the new put is applied on top of it. Without this, a single controller
read its own write as another controller's and stepped down: one Redis paused for 3 s ended
the controller, and the agents killed every rank when their lease ran out. A ``delete`` likewise: a retry that finds the record gone is done. An
event appended just before a lost reply may be appended twice (events are at-least-once across
an outage).
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from hpt.controller.store import ConflictError, Store, StoreUnavailableError, Versioned

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_UNCERTAIN = 100_000
"""Keys whose last put gave up that are remembered (oldest forgotten first): 40 bytes for
each put remembered."""
MAX_DIGESTS = 8
"""Values remembered per key for puts that gave up from the same version (any one may have
landed; the first to land made the others conflict)."""


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


_DELETED = b"deleted"
"""What a delete that gave up is remembered as (no SHA-256 digest is this short)."""


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
        self._uncertain: OrderedDict[str, tuple[int, frozenset[bytes]]] = OrderedDict()
        """Key -> (expected version, SHA-256 digests of the values) of the puts that gave up
        after reaching the store from that version: one of them may have landed."""

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
                if expected_version is None or exc.actual <= expected_version:
                    raise
                item = self.inner.get(key)  # our earlier try landed and its reply was lost?
                if item is None or item.version != exc.actual:
                    raise
                if tries > 1 and item.version == expected_version + 1 and item.value == value:
                    return item.version
                if not self._landed(key, item.version - 1, _digest(item.value)):
                    raise  # nor a put of ours that gave up: another writer's
                log.warning("put %r: a put of ours that gave up had landed (version %d); "
                            "writing on top of it", key, item.version)
                try:
                    return self.inner.put(key, value, expected_version=item.version)
                except StoreUnavailableError:
                    self._remember(key, item.version, _digest(value))
                    raise

        try:
            version = self._call("put", once)
        except StoreUnavailableError:
            if expected_version is not None and tries:  # (a put refused while the store is
                # down never reached it: it cannot have landed)
                self._remember(key, expected_version, _digest(value))
            raise
        self._forget(key)
        return version

    def delete(self, key: str, *, expected_version: int | None) -> None:
        tries = 0

        def once() -> None:
            nonlocal tries
            tries += 1
            try:
                self.inner.delete(key, expected_version=expected_version)
            except ConflictError as exc:
                # an earlier try (of this call, or one that gave up) landed and its reply was
                # lost, or a put of ours that gave up left the record one version on: either
                # way the record is ours to delete
                if exc.actual == 0 and (tries > 1 or self._landed(key, expected_version,
                                                                   _DELETED)):
                    return
                if (expected_version is not None and exc.actual == expected_version + 1
                        and key in self._uncertain):
                    item = self.inner.get(key)
                    if item is not None and self._landed(key, expected_version,
                                                         _digest(item.value)):
                        self.inner.delete(key, expected_version=item.version)
                        return
                raise

        try:
            self._call("delete", once)
        except StoreUnavailableError:
            if expected_version is not None and tries:
                self._remember(key, expected_version, _DELETED)
            raise
        self._forget(key)

    def _landed(self, key: str, version: int | None, digest: bytes) -> bool:
        """A write of ``key`` from ``version`` whose value has ``digest`` gave up after
        reaching the store: it may be what the store holds now."""
        lost = self._uncertain.get(key)
        return lost is not None and lost[0] == version and digest in lost[1]

    def _forget(self, key: str) -> None:
        """A write of ``key`` went through: no earlier one of it is in doubt any more."""
        if self._uncertain:
            with self._lock:
                self._uncertain.pop(key, None)

    def _remember(self, key: str, expected_version: int, digest: bytes) -> None:
        with self._lock:
            lost = self._uncertain.get(key)
            if lost is not None and lost[0] > expected_version:
                return  # a write on top of a landed one gave up: that one is remembered
            if lost is not None and lost[0] == expected_version:  # another try from the same
                # version: whichever landed first, the record holds one of them
                if len(lost[1]) >= MAX_DIGESTS:
                    return
                digests = lost[1] | {digest}
            else:
                digests = frozenset((digest,))
            self._uncertain[key] = (expected_version, digests)
            self._uncertain.move_to_end(key)
            while len(self._uncertain) > MAX_UNCERTAIN:
                self._uncertain.popitem(last=False)

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
