"""Which old ranks a sharded resize needs, predicted before the new ranks start."""

from __future__ import annotations

import pytest
import torch

from hpt.ckpt.layout import Layout, ShardInfo, build_layout, shard_dim0
from hpt.ckpt.sources import split_needs


def _flat(rank: int, world: int, size: int = 30_000) -> Layout:
    """A ZeRO-style slice (``total * r // world``) of one vector, and its Adam state."""
    lo, hi = size * rank // world, size * (rank + 1) // world
    box = ShardInfo((size,), (lo,), (hi - lo,))
    return build_layout([("flat", torch.float32, (hi - lo,)), ("exp_avg", torch.float32,
                          (hi - lo,)), ("step", torch.float32, ())],
                        shards={"flat": box, "exp_avg": box})


def test_a_shrink_reads_the_old_slices_each_new_slice_overlaps() -> None:
    layouts = {0: _flat(0, 3), 2: _flat(2, 3)}  # what one node holds is enough to tell
    assert split_needs(layouts, 3, [0], 2) == {0, 1}
    assert split_needs(layouts, 3, [1], 2) == {1, 2}
    # 8 -> 4: each new slice is two old ones
    eight = {r: _flat(r, 8) for r in (0, 5)}
    assert split_needs(eight, 8, [2], 4) == {2, 4, 5}  # 4, 5, and its preferred old rank 2
    assert split_needs(eight, 8, [0, 1], 4) == {0, 1, 2, 3}


def test_a_grow_reads_the_one_or_two_old_slices_a_new_one_lies_in() -> None:
    layouts = {0: _flat(0, 2)}
    assert split_needs(layouts, 2, [2], 3) == {0, 1}  # preferred old rank 0, slice in old 1
    assert split_needs(layouts, 2, [1], 3) == {0, 1}


def _rows(rank: int, world: int, size: int) -> Layout:
    box = shard_dim0((size, 4), rank, world)  # tensor_split: the extra rows go first
    return build_layout([("w", torch.float32, tuple(box.local_shape))], shards={"w": box})


def test_the_split_the_old_slices_follow_is_the_one_predicted() -> None:
    # 10 rows over 3: tensor_split gives 4, 3, 3; rank 1 holds rows 4..6
    assert split_needs({1: _rows(1, 3, 10)}, 3, [1], 2) == {1, 2}  # new rank 1: rows 5..9
    # torch.chunk (DTensor Shard(0)): 5 rows over 4 are 2, 2, 1, 0; 3 new ranks take 2, 2, 1
    box = ShardInfo((5,), (4,), (1,))
    chunked = {2: build_layout([("w", torch.float32, (1,))], shards={"w": box})}
    assert split_needs(chunked, 4, [2], 3) == {2}  # row 4, old rank 2's
    # 12 rows over 3 fit every convention alike: 6 -> 4 ranks is the same under all
    assert split_needs({0: _rows(0, 3, 12)}, 3, [1], 4) == {0, 1}


def test_tensors_cut_on_dim_1_or_on_different_dims_are_predicted_per_tensor() -> None:
    # a row-parallel weight (Shard(1)): 12 columns over 3, rank 1 holds columns 4..7
    box = ShardInfo((4, 12), (0, 4), (4, 4))
    cols = build_layout([("w", torch.float32, (4, 4))], shards={"w": box})
    assert split_needs({1: cols}, 3, [0], 2) == {0, 1}  # new rank 0: columns 0..5
    assert split_needs({1: cols}, 3, [1], 2) == {1, 2}
    # column- and row-parallel weights side by side: 9 rows of one, 6 columns of the other
    both = build_layout([("a", torch.float32, (3, 5)), ("b", torch.float32, (5, 2))],
                        shards={"a": ShardInfo((9, 5), (3, 0), (3, 5)),
                                "b": ShardInfo((5, 6), (0, 2), (5, 2))})
    assert split_needs({1: both}, 3, [2], 4) == {1, 2}  # 3/4 of each: olds 1 and 2 (pref 1)
    assert split_needs({1: both}, 3, [0], 4) == {0}


def test_a_layout_that_is_no_even_split_on_one_dim_needs_every_old_rank() -> None:
    # cut on two dims (a 2-D mesh)
    box = ShardInfo((4, 12), (2, 4), (2, 4))
    assert split_needs({1: build_layout([("w", torch.float32, (2, 4))], shards={"w": box})},
                       3, [0], 2) is None
    # a slice where no even split of its rank puts it
    box = ShardInfo((3000,), (0,), (1000,))
    assert split_needs({2: build_layout([("w", torch.float32, (1000,))], shards={"w": box})},
                       3, [0], 2) is None
    assert split_needs({}, 3, [0], 2) is None  # nothing at hand to tell


@pytest.mark.parametrize("old,new", [(3, 2), (4, 3), (5, 8), (16, 12)])
def test_the_prediction_covers_every_box_a_new_rank_takes(old: int, new: int) -> None:
    size = 1000
    layouts = {r: _flat(r, old, size) for r in range(old)}
    for rank in range(new):
        lo, hi = size * rank // new, size * (rank + 1) // new
        needs = split_needs({0: layouts[0]}, old, [rank], new)
        assert needs is not None
        covering = {r for r in range(old)
                    if size * r // old < hi and lo < size * (r + 1) // old}
        assert covering <= needs and len(needs - covering) <= 1  # its preferred rank
