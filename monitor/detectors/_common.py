"""Small helpers shared by the detectors: robust statistics and config validation."""

from __future__ import annotations

import math
from collections.abc import Sequence

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
