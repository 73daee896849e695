"""Bitwise restore and resharding by global offsets (hpt.ckpt.restore)."""

from __future__ import annotations

import pytest
import torch

from hpt.ckpt import MemorySink, SnapshotEngine
from hpt.ckpt.errors import CorruptCheckpointError, RestoreError
from hpt.ckpt.layout import ShardInfo, TensorEntry, flatten, pack, shard_dim0, unflatten
from hpt.ckpt.restore import (
    assemble,
    default_placement,
    load_into,
    materialize,
    read_region,
    reshard,
    verify_snapshot,
)


def global_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "emb": torch.randn(11, 4, generator=g),  # 11 rows: uneven splits for 2, 3 and 4 ranks
        "w": torch.randn(9, 3, generator=g).to(torch.bfloat16),
        "exp_avg": torch.randn(9, 3, generator=g),
        "idx": torch.arange(10, dtype=torch.int64),
        "norm": torch.randn(4, generator=g),  # replicated
        "step": torch.tensor(12.0),  # replicated, 0-dim
    }


SHARDED = ("emb", "w", "exp_avg", "idx")


def save_world(world: int) -> list[tuple]:
    """What every rank of a `world`-rank job saved: (layout, buffer, meta)."""
    full = global_state()
    ranks = []
    for rank in range(world):
        shards = {k: shard_dim0(full[k].shape, rank, world) for k in SHARDED}
        local = {
            k: (
                full[k][shards[k].global_offset[0] :][: shards[k].local_shape[0]]
                if k in shards
                else full[k]
            )
            for k in full
        }
        layout, meta, tensors = flatten(
            {"state": local, "lr": 0.1}, shards={f"state.{k}": v for k, v in shards.items()}
        )
        ranks.append((layout, pack(layout, tensors), meta))
    return ranks


@pytest.mark.parametrize(("old_world", "new_world"), [(4, 2), (2, 3), (3, 1), (1, 4)])
def test_reshard_gives_every_new_rank_exactly_its_slice(old_world: int, new_world: int) -> None:
    full = global_state()
    saved = save_world(old_world)

    def placement(entry: TensorEntry, rank: int, world: int) -> ShardInfo:
        # A 1-rank "shard" is the whole tensor and looks replicated; say which tensors to split.
        if entry.fqn.removeprefix("state.") in SHARDED:
            return shard_dim0(entry.global_shape, rank, world)
        return default_placement(entry, rank, world)

    for rank in range(new_world):
        layout, tensors = reshard(
            [(lay, buf) for lay, buf, _ in saved],
            rank,
            new_world,
            placement=placement if old_world == 1 else default_placement,
        )
        state = unflatten(layout, saved[0][2], tensors)
        assert state["lr"] == 0.1
        for k, t in full.items():
            got = state["state"][k]
            entry = layout.entry(f"state.{k}")
            if k in SHARDED:
                start, want = entry.global_offset[0], shard_dim0(t.shape, rank, new_world)
                assert entry.global_shape == tuple(t.shape)
                assert (entry.global_offset, entry.shape) == (want.global_offset, want.local_shape)
                expected = t[start : start + entry.shape[0]]
            else:
                assert entry.is_replicated
                expected = t
            assert got.dtype == expected.dtype
            assert torch.equal(
                got.view(torch.uint8) if got.dim() else got,
                expected.view(torch.uint8) if got.dim() else expected,
            )


def test_reshard_round_trip_back_to_the_original_world_is_identical() -> None:
    saved4 = save_world(4)
    new2 = [reshard([(lay, buf) for lay, buf, _ in saved4], r, 2) for r in range(2)]
    back4 = [reshard([(lay, pack(lay, ts)) for lay, ts in new2], r, 4) for r in range(4)]
    for (lay, buf, _), (lay_back, ts_back) in zip(saved4, back4, strict=True):
        assert lay_back == lay
        assert torch.equal(pack(lay_back, ts_back), buf)


def test_assemble_reports_a_region_no_piece_covers() -> None:
    pieces = [((0, 0), torch.ones(2, 3)), ((3, 0), torch.ones(1, 3))]  # row 2 was lost
    with pytest.raises(RestoreError, match="emb.*3 elements missing"):
        assemble(pieces, (0, 0), (4, 3), torch.float32, name="emb")


def test_read_region_serves_the_intersection_only() -> None:
    info = ShardInfo(global_shape=(10, 2), global_offset=(4, 0), local_shape=(3, 2))
    local = torch.arange(6.0).view(3, 2)
    layout, _, tensors = flatten({"w": local}, shards={"w": info})
    buf = pack(layout, tensors)
    entry = layout.entry("w")
    assert torch.equal(read_region(entry, buf, (5, 0), (10, 2)), local[1:])
    assert read_region(entry, buf, (0, 0), (4, 2)) is None


def test_load_into_copies_bitwise_in_place_and_checks_shapes() -> None:
    src = {"w": torch.randn(3, 4), "b": torch.tensor([1, 2], dtype=torch.int64)}
    layout, meta, tensors = flatten(src)
    buf = pack(layout, tensors)
    target = {"w": torch.zeros(3, 4), "b": torch.zeros(2, dtype=torch.int64)}
    w_storage = target["w"].data_ptr()
    load_into(target, layout, meta, buf)
    assert target["w"].data_ptr() == w_storage
    assert torch.equal(target["w"], src["w"]) and torch.equal(target["b"], src["b"])
    with pytest.raises(
        RestoreError, match="w: snapshot has float32\\[3, 4\\], target has float32\\[4, 3\\]"
    ):
        load_into(
            {"w": torch.zeros(4, 3), "b": torch.zeros(2, dtype=torch.int64)}, layout, meta, buf
        )
    with pytest.raises(RestoreError, match="missing in snapshot"):
        load_into({**target, "extra": torch.zeros(1)}, layout, meta, buf)
    load_into({"w": target["w"]}, layout, meta, buf, strict=False)


def test_a_flipped_byte_in_a_snapshot_is_detected() -> None:
    sink = MemorySink()
    engine = SnapshotEngine(sink, chunk_bytes=1024)
    engine.save(1, {"w": torch.randn(1000)})
    engine.close()
    ref = sink.latest()
    assert ref is not None
    snap = sink.read(ref)
    verify_snapshot(snap)
    snap.buffer[2500] ^= 0x10
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch in 1 byte range"):
        verify_snapshot(snap)
    assert materialize(snap.layout, snap.meta_json, snap.buffer)["w"].shape == (1000,)
