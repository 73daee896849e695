"""The event log (kept in the store) and the rank log buffer (kept in memory), each with a
condition variable so ``hptctl events -f`` and ``hptctl logs -f`` wake on new lines."""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from hpt.controller import convert
from hpt.controller.model import Event
from hpt.controller.store import Store

log = logging.getLogger(__name__)


class EventLog:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._cond = threading.Condition()
        self._last_seq = 0

    def emit(self, event: Event) -> int:
        seq = self._store.append_event(convert.event_to_bytes(event))
        log.info(
            "[%s/%s/%s/%s] %s: %s",
            event.job_id or "-",
            event.attempt or "-",
            event.node or "-",
            event.rank if event.rank >= 0 else "-",
            event.kind,
            event.message,
        )
        with self._cond:
            self._last_seq = max(self._last_seq, seq)
            self._cond.notify_all()
        return seq

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


class LogBuffer:
    """The last ``max_lines_per_rank`` lines of every rank of every job, in arrival order."""

    def __init__(self, max_lines_per_rank: int) -> None:
        self._max = max_lines_per_rank
        self._lines: dict[str, dict[int, collections.deque[LogLine]]] = {}
        self._seq = 0
        self._cond = threading.Condition()

    def append(self, job_id: str, attempt: int, rank: int, stream: str, text: str) -> None:
        with self._cond:
            ranks = self._lines.setdefault(job_id, {})
            lines = ranks.get(rank)
            if lines is None:
                lines = ranks[rank] = collections.deque(maxlen=self._max)
            for part in text.splitlines():
                self._seq += 1
                lines.append(LogLine(self._seq, attempt, rank, stream, part))
            self._cond.notify_all()

    def read(self, job_id: str, after_seq: int, rank: int | None) -> list[LogLine]:
        with self._cond:
            ranks = self._lines.get(job_id, {})
            chosen = [ranks[rank]] if rank is not None and rank in ranks else []
            if rank is None:
                chosen = list(ranks.values())
            picked = [line for lines in chosen for line in lines if line.seq > after_seq]
        picked.sort(key=lambda line: line.seq)
        return picked

    def follow(
        self, job_id: str, rank: int | None, *, active, poll_s: float = 0.5
    ) -> Iterator[LogLine]:  # type: ignore[no-untyped-def]
        """Yield lines as they arrive while ``active()`` is true."""
        cursor = 0
        while True:
            lines = self.read(job_id, cursor, rank)
            yield from lines
            if lines:
                cursor = lines[-1].seq
            if not active():
                return
            with self._cond:
                self._cond.wait_for(lambda seen=cursor: self._seq > seen, timeout=poll_s)
