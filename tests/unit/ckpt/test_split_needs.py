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


def test_each_split_finds_the_old_rank_of_any_row_in_constant_time() -> None:
    from hpt.splits import _SPLITS, _owner

    for name, start in _SPLITS.items():
        for size in (1, 2, 3, 5, 7, 10, 64, 100, 1000, 4097):
            for world in (1, 2, 3, 4, 7, 8, 16, 56, 64, 100):
                for row in range(size):
                    r = _owner(name, size, row, world)
                    assert start(size, r, world) <= row < start(size, r + 1, world), (
                        name, size, world, row, r)


@pytest.mark.parametrize("split", ["chunk", "floor", "tensor_split"])
def test_an_even_split_names_exactly_the_old_slices_a_new_one_overlaps(split: str) -> None:
    # small tensors too (fewer rows than ranks: empty slices), where a proportional guess fails
    from hpt.splits import _SPLITS, EvenSplit

    start = _SPLITS[split]
    for sizes in ((100,), (3, 10), (1000, 4097, 7)):
        even = EvenSplit(frozenset({split}), frozenset(sizes))
        for old, new in ((64, 56), (56, 64), (8, 3), (3, 8), (16, 15), (5, 5)):
            for rank in range(new):
                needs = even.needs(old, [rank], new)
                overlapping = {o for size in sizes for o in range(old)
                               if max(start(size, o, old), start(size, rank, new))
                               < min(start(size, o + 1, old), start(size, rank + 1, new))}
                assert overlapping <= needs
                extra = needs - overlapping - {rank if rank < old else 0}
                # only old ranks with nothing of a tensor, between two that are read
                assert all(any(start(s, o, old) == start(s, o + 1, old) for s in sizes)
                           for o in extra), (split, sizes, old, new, rank, extra)


def test_an_even_split_travels_as_a_short_string_and_bad_ones_name_the_field() -> None:
    from hpt.ckpt.sources import even_split
    from hpt.splits import EvenSplit

    layouts = {0: _flat(0, 3), 2: _flat(2, 3)}
    split = even_split(layouts, 3)
    assert split is not None and split.sizes == {30_000}
    assert split.splits == {"floor", "chunk", "tensor_split"}  # 30,000 / 3: alike under all
    text = split.encode()
    assert EvenSplit.decode(text) == split
    assert split.needs(3, [0], 2) == split_needs(layouts, 3, [0], 2) == {0, 1}
    replica = build_layout([("w", torch.float32, (4,))])
    whole = even_split({1: replica}, 3)
    assert whole is not None and not whole.sizes and whole.needs(2, [1, 2], 3) == {0, 1}
    for bad in ("", "chunk", "nope:10", "chunk:x", "chunk:-4", ":10", "chunk/1:10",
                "chunk/x:10", "chunk/:10"):
        with pytest.raises(ValueError, match="snapshot_split"):
            EvenSplit.decode(bad)
    a, b = EvenSplit.decode("chunk+floor:10"), EvenSplit.decode("floor:12")
    assert a.merge(b) == EvenSplit(frozenset({"floor"}), frozenset({10, 12}))
    assert EvenSplit.decode("chunk:10").merge(b) is None
    assert EvenSplit.decode("floor/8+chunk/8:30000").merge(EvenSplit.decode("floor/8:30000")) \
        == EvenSplit(frozenset({"floor/8"}), frozenset({30000}))


def _hsdp(rank: int, world: int, group: int, size: int = 30_001) -> Layout:
    """``examples/train.py --hsdp G``: a copy of the flat state per group of G consecutive
    ranks, sliced ``total * i // G`` within it (rank r holds slice r % G)."""
    i = rank % group
    lo, hi = size * i // group, size * (i + 1) // group
    box = ShardInfo((size,), (lo,), (hi - lo,))
    return build_layout([("flat", torch.float32, (hi - lo,))], shards={"flat": box})


def test_hsdp_slices_within_groups_are_told_and_a_new_rank_reads_one_copy_of_its_slice() -> None:
    from hpt.ckpt.sources import even_split

    # 3 replicas x 2 slices: rank 3 holds slice 1 of 2
    split = even_split({3: _hsdp(3, 6, 2)}, 6)
    assert split is not None and "floor/2" in split.splits
    assert not any("/" not in s for s in split.splits)  # no split over the whole world fits
    # a shrink to 2 replicas: each new rank reads its own old rank (same slice, its RNG)
    assert split.needs(6, [2, 3], 4) == {2, 3}
    # a grow to 4 replicas: new ranks 6, 7 prefer old rank 0 (slice 0); 7 also needs slice 1
    assert split.needs(6, [6, 7], 8) == {0, 1}
    # a world the groups do not divide: not known (the caller names every old rank)
    assert split.needs(6, [0], 5) is None
    assert split_needs({3: _hsdp(3, 6, 2)}, 6, [0], 5) is None
    # the slices of 4 ranks over a world of 8 (groups of 4) differ from those over 8
    four = even_split({r: _hsdp(r, 8, 4) for r in (1, 6)}, 8)
    assert four is not None and four.splits == {"floor/4"}
    assert four.needs(8, [0, 1, 2, 3], 4) == {0, 1, 2, 3}  # one group left: replica 0
