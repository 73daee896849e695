"""Bounds that keep one client from starving the others: follow-streams take a slot from a fixed
number, and ``ListJobs`` answers in pages that fit the channel's message size.

The gRPC server runs every call on one worker pool. A ``logs -f``/``events -f`` stream holds its
worker for as long as it follows, so without a cap a few hundred of them leave no worker for the
unary RPCs (``hptctl ls``, ``submit``) or for agents connecting. ``StreamSlots`` refuses the
stream beyond the cap instead (the servicer answers RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


class StreamSlots:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._free = threading.Semaphore(limit)
        self._lock = threading.Lock()
        self.in_use = 0

    def try_acquire(self) -> bool:
        if not self._free.acquire(blocking=False):
            return False
        with self._lock:
            self.in_use += 1
        return True

    def release(self) -> None:
        with self._lock:
            self.in_use -= 1
        self._free.release()


def page_token(created_at: float, job_id: str) -> str:
    return f"{created_at!r}/{job_id}"


def parse_page_token(token: str) -> tuple[float, str]:
    """Raises ValueError naming ``page_token`` when it is not one this server handed out."""
    at, sep, job_id = token.partition("/")
    try:
        if not sep or not job_id:
            raise ValueError
        return float(at), job_id
    except ValueError:
        raise ValueError(f"page_token ({token[:80]!r}) is not a token ListJobs returned") from None


def page(
    items: Sequence[T], *, size_of: Callable[[T], int], page_size: int, max_bytes: int
) -> tuple[list[T], bool]:
    """The first items that fit ``page_size`` items and ``max_bytes`` bytes (at least one);
    returns them and whether more remain."""
    out: list[T] = []
    total = 0
    for item in items:
        n = size_of(item)
        if out and (len(out) >= page_size or total + n > max_bytes):
            return out, True
        out.append(item)
        total += n
    return out, False
