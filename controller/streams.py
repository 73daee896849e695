"""The event log (kept in the store) and the rank log buffer (kept in memory), each with a
condition variable so ``hptctl events -f`` and ``hptctl logs -f`` wake on new lines.

Emitting an event never raises and never waits for the store: events queue in memory, in order,
and the control loop writes what queued since its last pass in one store call at the end of the
pass (``flush_pending``), before the records that pass changed. A loss storm's hundreds of
events cost one round trip, not one each under the reconciler's lock. While the store is down
the queue is bounded and keeps the newest.
Rank logs are bounded in bytes per rank, not only in lines."""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass

from hpt.controller import convert
from hpt.controller.model import Event
from hpt.controller.store import Store, StoreUnavailableError

log = logging.getLogger(__name__)

MAX_PENDING_EVENTS = 10_000
"""Events held in memory while the store is down; beyond it the oldest are dropped (counted)."""
BATCH_EVENTS = 512
BATCH_BYTES = 4 * 1024 * 1024
"""At most this many events, and (past the first) bytes, per store call."""


class EventLog:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._cond = threading.Condition()
        self._last_seq = 0
        self._pending: collections.deque[bytes] = collections.deque()
        self._pending_lock = threading.Lock()
        self._down_logged = False
        self.num_dropped = 0

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def emit(self, event: Event) -> None:
        """Queue ``event``; the next ``flush_pending`` writes it."""
        data = convert.event_to_bytes(event)
        with self._pending_lock:
            if len(self._pending) >= MAX_PENDING_EVENTS:
                self._pending.popleft()
                self.num_dropped += 1
            self._pending.append(data)
        log.info(
            "[%s/%s/%s/%s] %s: %s",
            event.job_id or "-",
            event.attempt or "-",
            event.node or "-",
            event.rank if event.rank >= 0 else "-",
            event.kind.value,
            event.message,
        )

    def flush_pending(self) -> int:
        """Write queued events, oldest first, in batches, until the store refuses; returns how
        many are left. Emitters wait meanwhile (they run under the reconciler's lock, as the
        loop does when it calls this)."""
        with self._pending_lock:
            while self._pending:
                batch, size = [], 0
                for data in self._pending:
                    if batch and (len(batch) >= BATCH_EVENTS or size + len(data) > BATCH_BYTES):
                        break
                    batch.append(data)
                    size += len(data)
                try:
                    seq = self._store.append_events(batch)
                except StoreUnavailableError as exc:
                    # the whole batch goes again next time (at least once, as a retried single
                    # append always was: a reply lost after the write cannot be told apart)
                    if not self._down_logged:
                        log.warning("%d event(s) kept in memory until the store is back: %s",
                                    len(self._pending), exc)
                        self._down_logged = True
                    break
                for _ in batch:
                    self._pending.popleft()
                self._down_logged = False
                self._advance(seq)
            return len(self._pending)

    def _advance(self, seq: int) -> None:
        with self._cond:
            self._last_seq = max(self._last_seq, seq)
            self._cond.notify_all()

    def read(self, after_seq: int, limit: int = 1000) -> list[Event]:
        return [convert.event_from_bytes(b, s) for s, b in self._store.read_events(after_seq, limit)]

    def wait_beyond(self, seq: int, timeout_s: float) -> None:
        """Block until an event after ``seq`` was emitted here, or ``timeout_s`` passed."""
        with self._cond:
            self._cond.wait_for(lambda: self._last_seq > seq, timeout=timeout_s)


@dataclass(frozen=True, slots=True)
class LogLine:
    seq: int
    attempt: int
    rank: int
    stream: str
    text: str


MAX_LINE_CHARS = 64 * 1024
"""A longer line is cut here (the rank's log file on its node keeps it whole)."""


class LogBuffer:
    """The last lines of every rank of every job, in arrival order: at most
    ``max_lines_per_rank`` lines and ``max_bytes_per_rank`` characters per (job, rank)."""

    def __init__(self, max_lines_per_rank: int, max_bytes_per_rank: int = 4 * 1024 * 1024) -> None:
        self._max = max_lines_per_rank
        self._max_bytes = max_bytes_per_rank
        self._lines: dict[str, dict[int, collections.deque[LogLine]]] = {}
        self._bytes: dict[tuple[str, int], int] = {}
        self._seq = 0
        self._cond = threading.Condition()

    @property
    def num_bytes(self) -> int:
        with self._cond:
            return sum(self._bytes.values())

    def append(self, job_id: str, attempt: int, rank: int, stream: str, text: str) -> None:
        with self._cond:
            ranks = self._lines.setdefault(job_id, {})
            lines = ranks.get(rank)
            if lines is None:
                lines = ranks[rank] = collections.deque()
            size = self._bytes.get((job_id, rank), 0)
            for part in text.splitlines():
                if len(part) > MAX_LINE_CHARS:
                    part = part[:MAX_LINE_CHARS] + f" [... {len(part) - MAX_LINE_CHARS} chars cut]"
                self._seq += 1
                lines.append(LogLine(self._seq, attempt, rank, stream, part))
                size += len(part)
                while len(lines) > self._max or (size > self._max_bytes and len(lines) > 1):
                    size -= len(lines.popleft().text)
            self._bytes[(job_id, rank)] = size
            self._cond.notify_all()

    def forget(self, job_id: str) -> None:
        """Drop a job's lines (the controller no longer keeps the job)."""
        with self._cond:
            for rank in self._lines.pop(job_id, {}):
                self._bytes.pop((job_id, rank), None)

    def read(self, job_id: str, after_seq: int, rank: int | None) -> list[LogLine]:
        with self._cond:
            ranks = self._lines.get(job_id, {})
            chosen = [ranks[rank]] if rank is not None and rank in ranks else []
            if rank is None:
                chosen = list(ranks.values())
            picked = [line for lines in chosen for line in lines if line.seq > after_seq]
        picked.sort(key=lambda line: line.seq)
        return picked

    def wait_beyond(self, seq: int, timeout_s: float) -> None:
        """Block until a line after ``seq`` arrived (any job), or ``timeout_s`` passed."""
        with self._cond:
            self._cond.wait_for(lambda: self._seq > seq, timeout=timeout_s)
