"""The packed form of a heartbeat's timing columns (``StepColumns.packed``,
``CollectiveColumns.packed``): each column's values little-endian, one column after the other.

A heartbeat carries every step and collective its node's ranks finished since the last one;
at 10,000 nodes that is 80,000 step entries and a few times as many collective entries a second
into one controller. Read from repeated protobuf fields, every entry costs a call into the
protobuf runtime (about 48 us for one node's 8 steps and 16 collectives, measured); unpacked
from bytes, a column is one C call. Nothing here trusts the bytes: a length that is not a whole
number of entries, or more entries than ``limit``, is an error naming the field.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from functools import lru_cache

__all__ = ["pack_collectives", "pack_steps", "unpack_collectives", "unpack_steps"]

# rank uint32, step int64, step_s / data_wait_s / compute_s float64
_STEP_TYPES = "Iqddd"
# rank uint32, seq int64, op_index uint32, duration_s float64
_COLLECTIVE_TYPES = "IqId"


@lru_cache(maxsize=512)
def _layout(types: str, n: int) -> struct.Struct:
    return struct.Struct("<" + "".join(f"{n}{t}" for t in types))


def _entry_size(types: str) -> int:
    return struct.calcsize("<" + types)


_STEP_ENTRY = _entry_size(_STEP_TYPES)
_COLLECTIVE_ENTRY = _entry_size(_COLLECTIVE_TYPES)


def _pack(types: str, columns: Sequence[Sequence[float | int]]) -> bytes:
    n = len(columns[0])
    if any(len(c) != n for c in columns):
        raise ValueError(f"columns of unequal lengths: {[len(c) for c in columns]}")
    return _layout(types, n).pack(*(x for c in columns for x in c))


def _unpack(types: str, entry: int, data: bytes, field: str,
            limit: int) -> list[tuple[float | int, ...]]:
    n, rest = divmod(len(data), entry)
    if rest:
        raise ValueError(f"{field}: {len(data)} bytes is not a whole number of "
                         f"{entry}-byte entries")
    if n > limit:
        raise ValueError(f"{field}: {n} entries, more than the {limit} a heartbeat may carry")
    flat = _layout(types, n).unpack(data)
    return [flat[i * n:(i + 1) * n] for i in range(len(types))]


def pack_steps(rank: Sequence[int], step: Sequence[int], step_s: Sequence[float],
               data_wait_s: Sequence[float], compute_s: Sequence[float]) -> bytes:
    """``StepColumns.packed`` of these columns (equal lengths)."""
    return _pack(_STEP_TYPES, (rank, step, step_s, data_wait_s, compute_s))


def unpack_steps(data: bytes, limit: int) -> list[tuple[float | int, ...]]:
    """``[rank, step, step_s, data_wait_s, compute_s]`` of a ``StepColumns.packed``."""
    return _unpack(_STEP_TYPES, _STEP_ENTRY, data, "step_columns.packed", limit)


def pack_collectives(rank: Sequence[int], seq: Sequence[int], op_index: Sequence[int],
                     duration_s: Sequence[float]) -> bytes:
    """``CollectiveColumns.packed`` of these columns (equal lengths)."""
    return _pack(_COLLECTIVE_TYPES, (rank, seq, op_index, duration_s))


def unpack_collectives(data: bytes, limit: int) -> list[tuple[float | int, ...]]:
    """``[rank, seq, op_index, duration_s]`` of a ``CollectiveColumns.packed``."""
    return _unpack(_COLLECTIVE_TYPES, _COLLECTIVE_ENTRY, data, "collective_columns.packed",
                   limit)
