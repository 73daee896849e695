"""The packed timing columns: what the agent writes the controller reads back, and bytes that
do not hold whole entries, or too many, are refused with the field named."""

from __future__ import annotations

import math

import pytest

from hpt.monitor.columns import pack_collectives, pack_steps, unpack_collectives, unpack_steps


def test_steps_and_collectives_round_trip_bit_for_bit() -> None:
    steps = ([0, 7, 2**32 - 1], [0, -1, 2**62], [0.1, math.inf, 5e-324], [0.0, 1.5, 2.5],
             [math.nan, 0.25, 1e300])
    back = unpack_steps(pack_steps(*steps), limit=3)
    assert [list(c) for c in back[:2]] == [steps[0], steps[1]]
    for got, want in zip(back[2:], steps[2:], strict=True):
        assert [x.hex() for x in got] == [float(x).hex() for x in want]  # nan included
    colls = ([1, 2], [10, -1], [0, 3], [0.5, 0.0])
    assert [list(c) for c in unpack_collectives(pack_collectives(*colls), limit=2)] == \
        [list(c) for c in colls]
    assert unpack_steps(b"", limit=0) == [(), (), (), (), ()]


def test_a_partial_entry_or_too_many_entries_is_refused_naming_the_field() -> None:
    data = pack_steps([0, 1], [1, 1], [0.1, 0.1], [0.0, 0.0], [0.1, 0.1])
    with pytest.raises(ValueError, match=r"step_columns.packed: 71 bytes is not a whole number"):
        unpack_steps(data[:-1], limit=10)
    with pytest.raises(ValueError, match=r"step_columns.packed: 2 entries, more than the 1"):
        unpack_steps(data, limit=1)
    with pytest.raises(ValueError, match=r"collective_columns.packed: 23 bytes"):
        unpack_collectives(pack_collectives([0], [1], [0], [0.1])[:-1], limit=10)
    with pytest.raises(ValueError, match="unequal lengths"):
        pack_steps([0, 1], [1], [0.1], [0.0], [0.1])
