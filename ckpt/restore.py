"""Reading snapshots back: bitwise restore into live tensors, and resharding by global offsets.

A snapshot is a flat byte buffer plus its `Layout` and JSON meta (layout.py). This module turns it
back into tensors:

- `tensors_of` / `materialize`: typed views (or copies) of every entry, the nested state rebuilt;
- `load_into`: copy every tensor bitwise into the matching live tensor of a target state (e.g.
  `model.state_dict()`, whose tensors alias the parameters);
- `verify_snapshot`: check the checksums the engine computed before trusting a buffer;
- resharding (Universal Checkpointing: save distributed, load by global tensor offsets): every
  entry records where its piece sits in the global tensor, so `assemble` can cut the region a
  rank of a NEW world size needs out of the pieces the old ranks saved, and `reshard` does it for
  a whole state. All pure functions over tensors; the agent serves the same slices over the wire.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from hpt.ckpt.checksum import verify
from hpt.ckpt.errors import CorruptCheckpointError, RestoreError
from hpt.ckpt.layout import Layout, ShardInfo, TensorEntry, build_layout, flatten, shard_dim0
from hpt.ckpt.layout import unflatten as _unflatten
from hpt.ckpt.sink import Snapshot


def _typed(buffer: torch.Tensor, e: TensorEntry) -> torch.Tensor:
    return buffer[e.offset : e.offset + e.nbytes].view(e.torch_dtype).view(e.shape)


def _check_buffer(layout: Layout, buffer: torch.Tensor) -> None:
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() < layout.total_bytes:
        raise ValueError(
            f"buffer must be a 1-D uint8 tensor of >= {layout.total_bytes} bytes, got "
            f"{buffer.dtype} {tuple(buffer.shape)}"
        )


def tensors_of(layout: Layout, buffer: torch.Tensor, *, copy: bool = False) -> list[torch.Tensor]:
    """Every entry of `layout` as a tensor over `buffer` (views, or owned copies with `copy`)."""
    _check_buffer(layout, buffer)
    views = [_typed(buffer, e) for e in layout.entries]
    return [v.clone() for v in views] if copy else views


def materialize(layout: Layout, meta: Any, buffer: torch.Tensor, *, copy: bool = True) -> Any:
    """The nested state a snapshot holds. With `copy=False` tensors are views of `buffer`.

    `meta` is the meta tree or its JSON text.
    """
    if isinstance(meta, str):
        meta = json.loads(meta)
    return _unflatten(layout, meta, tensors_of(layout, buffer, copy=copy))


def verify_snapshot(snapshot: Snapshot) -> None:
    """Raise CorruptCheckpointError unless every checksum of `snapshot` matches its buffer."""
    covered = sum(c.length for c in snapshot.checksums)
    if covered != snapshot.layout.total_bytes:
        raise CorruptCheckpointError(
            f"snapshot of step {snapshot.step}: checksums cover {covered} of "
            f"{snapshot.layout.total_bytes} bytes"
        )
    bad = verify(snapshot.buffer, list(snapshot.checksums))
    if bad:
        ranges = ", ".join(f"[{c.start}, {c.start + c.length})" for c in bad[:4])
        raise CorruptCheckpointError(
            f"snapshot of step {snapshot.step} (generation {snapshot.generation}): checksum "
            f"mismatch in {len(bad)} byte range(s): {ranges}"
        )


def load_into(
    target: Any, layout: Layout, meta: Any, buffer: torch.Tensor, *, strict: bool = True
) -> None:
    """Copy every snapshot tensor bitwise into the tensor at the same fqn in `target`, in place.

    `target` is a nested state of live tensors (e.g. `{"model": model.state_dict()}`); plain
    values in it cannot be updated in place and are left alone (use `materialize` for them).
    `meta` is accepted for symmetry with `materialize` and checked to parse.

    Raises:
        RestoreError: a tensor's dtype or shape differs, or (strict) the fqn sets differ.
    """
    if isinstance(meta, str):
        json.loads(meta)
    _check_buffer(layout, buffer)
    target_layout, _, live = flatten(target)
    by_fqn = {e.fqn: e for e in layout.entries}
    if strict:
        missing = [e.fqn for e in target_layout.entries if e.fqn not in by_fqn]
        wanted = {e.fqn for e in target_layout.entries}
        unexpected = [f for f in by_fqn if f not in wanted]
        if missing or unexpected:
            raise RestoreError(
                f"snapshot and target differ: missing in snapshot {missing[:8]}, "
                f"not in target {unexpected[:8]}"
            )
    with torch.no_grad():
        for te, dst in zip(target_layout.entries, live, strict=True):
            src_entry = by_fqn.get(te.fqn)
            if src_entry is None:
                continue
            if src_entry.dtype != te.dtype or src_entry.shape != te.shape:
                raise RestoreError(
                    f"{te.fqn}: snapshot has {src_entry.dtype}{list(src_entry.shape)}, target has "
                    f"{te.dtype}{list(te.shape)}"
                )
            dst.copy_(_typed(buffer, src_entry))


# -- resharding ------------------------------------------------------------------------------


def read_region(
    entry: TensorEntry,
    buffer: torch.Tensor,
    global_offset: Sequence[int],
    shape: Sequence[int],
) -> torch.Tensor | None:
    """The part of the box (global_offset, shape) that `entry`'s saved piece holds, as a view of
    `buffer`, or None when they do not intersect. The agent serves restore requests with this."""
    box = _intersect(entry.global_offset, entry.shape, global_offset, shape)
    if box is None:
        return None
    lo, hi = box
    src = _typed(buffer, entry)
    return src[
        tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, entry.global_offset, strict=True))
    ]


def _intersect(
    off_a: Sequence[int], shape_a: Sequence[int], off_b: Sequence[int], shape_b: Sequence[int]
) -> tuple[list[int], list[int]] | None:
    """(lo, hi) corners of the intersection of two boxes, or None when it is empty."""
    lo = [max(a, b) for a, b in zip(off_a, off_b, strict=True)]
    hi = [min(a + s, b + t) for a, s, b, t in zip(off_a, shape_a, off_b, shape_b, strict=True)]
    if any(low >= high for low, high in zip(lo, hi, strict=True)):
        return None
    return lo, hi


def assemble(
    pieces: Iterable[tuple[Sequence[int], torch.Tensor]],
    global_offset: Sequence[int],
    shape: Sequence[int],
    dtype: torch.dtype,
    *,
    name: str = "tensor",
) -> torch.Tensor:
    """Build the box (global_offset, shape) of a global tensor from saved pieces.

    Args:
        pieces: (global_offset, tensor) of every saved piece that may intersect the box; pieces
            may overlap (replicas), the box must be fully covered.
        global_offset, shape: the box wanted, in global coordinates.
        dtype: the dtype of the result (must equal the pieces' dtype: resharding is bitwise).
        name: used in error messages.

    Raises:
        RestoreError: some element of the box is in no piece, or a piece has another dtype.
    """
    shape = tuple(shape)
    out = torch.empty(shape, dtype=dtype)
    covered = torch.zeros(shape, dtype=torch.bool)
    for offset, piece in pieces:
        if piece.dtype != dtype:
            raise RestoreError(f"{name}: piece has dtype {piece.dtype}, expected {dtype}")
        inter = _intersect(offset, piece.shape, global_offset, shape)
        if inter is None:
            continue
        lo, hi = inter
        src = piece[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offset, strict=True))]
        box = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, global_offset, strict=True))
        out[box].copy_(src)
        covered[box] = True
    if not bool(covered.all()):
        raise RestoreError(
            f"{name}: the saved pieces do not cover region offset {list(global_offset)} "
            f"shape {list(shape)} ({int((~covered).sum())} elements missing)"
        )
    return out


def default_placement(entry: TensorEntry, rank: int, world: int) -> ShardInfo:
    """Where a tensor goes in the new world: replicated tensors stay whole, sharded ones are split
    on dim 0 over the new world (the same rule as `layout.shard_dim0`). A tensor saved by a
    1-rank world looks replicated; pass a `placement` that names the tensors to split then."""
    if entry.is_replicated:
        return ShardInfo(entry.global_shape, (0,) * len(entry.global_shape), entry.global_shape)
    return shard_dim0(entry.global_shape, rank, world)


def reshard(
    sources: Sequence[tuple[Layout, torch.Tensor]],
    rank: int,
    world: int,
    *,
    placement: Callable[[TensorEntry, int, int], ShardInfo] = default_placement,
) -> tuple[Layout, list[torch.Tensor]]:
    """The state rank `rank` of a world of `world` ranks needs, cut from the old ranks' snapshots.

    Args:
        sources: (layout, buffer) of every old rank, any order; each fqn must have the same global
            shape and dtype on every rank that holds it.
        rank, world: the new rank and world size.
        placement: entry (from the first source that has it), rank, world -> the new ShardInfo.

    Returns:
        (layout, tensors): the new rank's layout (entries in the order of `sources[0]`, then any
        fqn only later sources have) and owned tensors; `unflatten(layout, meta, tensors)` with
        the meta of `sources[0]` rebuilds the state when every rank saved the same fqns.
    """
    by_fqn: dict[str, list[tuple[TensorEntry, torch.Tensor]]] = {}
    for layout, buffer in sources:
        _check_buffer(layout, buffer)
        for e in layout.entries:
            by_fqn.setdefault(e.fqn, []).append((e, buffer))
    items = []
    shards: dict[str, ShardInfo] = {}
    tensors = []
    for fqn, saved in by_fqn.items():
        first = saved[0][0]
        for e, _ in saved[1:]:
            if e.global_shape != first.global_shape or e.dtype != first.dtype:
                raise RestoreError(
                    f"{fqn}: ranks disagree on the global tensor ({first.dtype}"
                    f"{list(first.global_shape)} vs {e.dtype}{list(e.global_shape)})"
                )
        info = placement(first, rank, world)
        if first.is_replicated:
            saved = saved[:1]  # every replica is the whole tensor; one is enough
        tensors.append(
            assemble(
                ((e.global_offset, _typed(buf, e)) for e, buf in saved),
                info.global_offset,
                info.local_shape,
                first.torch_dtype,
                name=fqn,
            )
        )
        items.append((fqn, first.torch_dtype, info.local_shape))
        shards[fqn] = info
    return build_layout(items, shards), tensors
