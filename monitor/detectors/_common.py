"""Small helpers shared by the detectors: robust statistics and config validation."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

# 1 / Phi^-1(3/4): scales a median absolute deviation to a standard deviation for normal data.
MAD_TO_SIGMA = 1.4826


def median_sorted(values: Sequence[float]) -> float:
    """Median of an already sorted, non-empty sequence."""
    n = len(values)
    mid = n // 2
    if n % 2:
        return values[mid]
    return (values[mid - 1] + values[mid]) / 2.0


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return median_sorted(sorted(values))


def require(ok: bool, field: str, value: object, rule: str) -> None:
    """Raise the config error every detector uses: 'field (value) must <rule>'."""
    if not ok:
        raise ValueError(f"{field} ({value!r}) must {rule}")


def is_finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class LowWatermark:
    """The minimum of per-rank counters that only grow (last step, last finished seq), without
    scanning every rank on every batch of records.

    The detectors evaluate a step once every rank reached it: ``min`` over all ranks. Computed
    per heartbeat that is O(ranks) per heartbeat, quadratic in the cluster (80,000 ranks: 80,000
    heartbeats' worth of scans a second). Here the minimum is cached with the number of ranks
    that sit at it; a rank leaving the minimum decrements that number and the scan runs again
    only when it reaches zero, i.e. about once per step of the whole job.
    """

    __slots__ = ("_at_min", "_stale", "value")

    def __init__(self) -> None:
        self.value = -1
        self._at_min = 0
        self._stale = True

    def invalidate(self) -> None:
        """The set of ranks changed: rescan on the next ``get``."""
        self._stale = True

    def raised(self, old: int, new: int) -> None:
        """A member's counter went from ``old`` to ``new`` (``new > old``)."""
        if not self._stale and old == self.value and new > old:
            self._at_min -= 1
            if self._at_min <= 0:
                self._stale = True

    def get(self, values: Callable[[], Iterable[int]]) -> int:
        """The minimum; ``values()`` (every member's counter) is called only to rescan."""
        if self._stale:
            vals = list(values())
            self.value = min(vals, default=-1)
            self._at_min = vals.count(self.value)
            self._stale = False
        return self.value
