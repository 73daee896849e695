"""The event log (kept in the store) and the rank log buffer (kept in memory), each with a
condition variable so ``hptctl events -f`` and ``hptctl logs -f`` wake on new lines.

Emitting an event never raises when the store is down: events wait in a bounded in-memory queue,
in order, and the control loop writes them out (``flush_pending``) once the store answers again.
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


class EventLog:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._cond = threading.Condition()
        self._last_seq = 0
        self._pending: collections.deque[bytes] = collections.deque()
        self._pending_lock = threading.Lock()
        self.num_dropped = 0

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def emit(self, event: Event) -> int:
        """Append ``event``; returns its seq, or 0 when it waits for the store to come back."""
        seq = self._append(convert.event_to_bytes(event))
        log.info(
            "[%s/%s/%s/%s] %s: %s",
            event.job_id or "-",
            event.attempt or "-",
            event.node or "-",
            event.rank if event.rank >= 0 else "-",
            event.kind.value,
            event.message,
        )
        return seq

    def flush_pending(self) -> int:
        """Write queued events, oldest first, until the store refuses; returns how many left."""
        with self._pending_lock:
            while self._pending:
                try:
                    seq = self._store.append_event(self._pending[0])
                except StoreUnavailableError:
                    break
                self._pending.popleft()
                self._advance(seq)
            return len(self._pending)

    def _append(self, data: bytes) -> int:
        with self._pending_lock:
            if not self._pending:
                try:
                    seq = self._store.append_event(data)
                except StoreUnavailableError as exc:
                    log.warning("event kept in memory until the store is back: %s", exc)
                else:
                    self._advance(seq)
                    return seq
            if len(self._pending) >= MAX_PENDING_EVENTS:
                self._pending.popleft()
                self.num_dropped += 1
            self._pending.append(data)
            return 0

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
