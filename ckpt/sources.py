"""Restore sources behind one protocol, and the chain that tries them in order.

A restore asks, source after source, "which steps can you give this rank?" and "give me the
state of step s for this rank". The sources, in the order a training process tries them:

- `SinkSource` over the process's own sink: the in-process memory of a standalone run (or the
  snapshots this process itself committed under an agent);
- `SinkSource` over the agent's shared memory for this rank, at the step (and generation) the
  controller chose;
- `ShardSetSource`: a set of old ranks' snapshots in shared memory (the agent copied them from
  peers or decoded them from parity), possibly of another world size: resharded by global offsets;
- `DiskSource` (fmt.py): a persisted global checkpoint;
- scratch: nothing restored, step 0.

Every source verifies what it returns (the engine's checksums for memory, the manifest's hashes
for disk) and raises a `CkptError`, `ValueError` or `OSError` naming what is wrong when it
cannot. `restore_chain` makes every rank agree on one step of one source, all ranks or none:
a source that fails on any rank (missing, checksum mismatch, load error) is skipped on every rank
with an event that says which source, which step and why, and the chain moves to the next step of
the same source (disk keeps older checkpoints) or to the next source. So a job never restores a
mix of steps, and never a state one rank could not load.

Resharding (Universal Checkpointing): a `RestoreTarget` says where each saved tensor goes in the
new world (its `placement`: the new rank's box of the global tensor); `state_from_snapshots`
cuts that box out of the old ranks' pieces with `restore.reshard`. Tensors that are not sharded
come from the old rank with the same number when there is one, else from old rank 0 (so at the
same world size every rank gets back exactly its own state, RNG and user state included);
after a resize of data-parallel state whose preferred old rank was lost (or at the same world
size, when no step was recoverable rank for rank), from the replica the agent put in its place
(`replica_rank`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from hpt.ckpt.errors import CkptError, RestoreError
from hpt.ckpt.layout import (
    Layout,
    ShardInfo,
    TensorEntry,
    build_layout,
    unflatten,
)
from hpt.ckpt.restore import reshard, tensors_of, verify_snapshot
from hpt.ckpt.sink import ShmSink, Snapshot, SnapshotRef, SnapshotSink
from hpt.splits import _SPLITS, EvenSplit, preferred_rank, split_name

log = logging.getLogger(__name__)

SOURCE_ERRORS: tuple[type[BaseException], ...] = (CkptError, ValueError, OSError, KeyError)
"""What a source raises when it cannot serve; anything else is a bug and propagates."""


class SourceUnavailable(CkptError):
    """A source that applies to this restore holds nothing usable; the message says why."""


Placement = Callable[[TensorEntry], ShardInfo]
"""Where a saved tensor goes in the new world: the new rank's box of the global tensor."""


def keep_placement(entry: TensorEntry) -> ShardInfo:
    """Every tensor where it was: the placement of a restore at the same world size."""
    return ShardInfo(entry.global_shape, entry.global_offset, entry.shape)


@dataclass(frozen=True, slots=True)
class RestoreTarget:
    """The rank being restored: its number, the world size, and where saved tensors go."""

    rank: int
    world_size: int
    placement: Placement = keep_placement


def replica_rank(new_rank: int, old_world: int, held: Collection[int],
                 alive: Collection[int] = ()) -> int:
    """The old rank a new rank reads after a resize of data-parallel state (no sharded tensor:
    every old rank holds the same model and optimizer, so any one of them serves): its
    preferred old rank when this node holds it, else one this node holds (spread by the new
    rank's number, so new ranks of one node take distinct replicas, and their RNG streams,
    while there are enough), else the preferred one when its node survived (``alive``: old
    ranks whose node did; empty: not known), else one that survived, spread by the new rank's
    number in the same way (new ranks of a fresh node do not all read the same replica and
    RNG streams). The agent fetches
    by this rule; the rank applies it to what the agent left in memory (``held``: what the
    agent held, or when it held none, what it fetched), so the rank's pick is always there,
    and verified when read."""
    pref = preferred_rank(new_rank, old_world)
    if pref in held:
        return pref
    if held:
        return sorted(held)[new_rank % len(held)]
    if pref in alive or not alive:
        return pref
    return sorted(alive)[new_rank % len(alive)]


def even_split(layouts: Mapping[int, Layout], old_world: int) -> EvenSplit | None:
    """The even split the sharded tensors of ``layouts`` (old rank -> its snapshot's layout)
    follow, on the one dim each is cut on (dim 0 for ZeRO/FSDP and DTensor ``Shard(0)``,
    dim 1 for a row-parallel weight or ``Shard(1)``; tensors may differ), over the whole
    world or within groups of consecutive ranks that divide it (HSDP). None when they follow
    none (a tensor cut on two dims, or slices cut some other way), or nothing is at hand. A
    layout with no sharded tensor fits every split, with no size."""
    if not layouts:
        return None
    sizes: set[int] = set()
    groups = [0] + [g for g in range(2, old_world) if old_world % g == 0]
    fits = {(name, g) for name in _SPLITS for g in groups}  # narrowed by the first tensor
    for rank, layout in layouts.items():
        for e in layout.entries:
            if e.is_replicated:
                continue
            cut = [d for d, (n, whole) in enumerate(zip(e.shape, e.global_shape, strict=True))
                   if n != whole or e.global_offset[d]]
            if len(cut) > 1:
                return None
            dim = cut[0] if cut else 0
            size = e.global_shape[dim]
            begin, end = e.global_offset[dim], e.global_offset[dim] + e.shape[dim]
            fits = {(name, g) for name, g in fits
                    if _slice(name, g, size, rank, old_world) == (begin, end)}
            if not fits:
                return None
            if size > 0:
                sizes.add(size)
    return EvenSplit(frozenset(split_name(name, g) for name, g in fits), frozenset(sizes))


def _slice(name: str, group: int, size: int, rank: int, world: int) -> tuple[int, int]:
    """[begin, end) of ``rank``'s slice of ``size`` rows under split ``name`` over the world
    (``group`` 0) or within its group of ``group`` ranks."""
    start = _SPLITS[name]
    if group:
        return start(size, rank % group, group), start(size, rank % group + 1, group)
    return start(size, rank, world), start(size, rank + 1, world)


def split_needs(layouts: Mapping[int, Layout], old_world: int, new_ranks: Iterable[int],
                new_world: int) -> set[int] | None:
    """The old ranks that new ranks ``new_ranks`` of ``new_world`` read after a resize of
    sharded state, predicted before they start (the agent does not know their boxes yet):
    :meth:`EvenSplit.needs` of the split the old snapshots at hand follow (:func:`even_split`).
    None when they follow none: then every old rank is needed, as before.

    A wrong guess costs the restore from memory (the rank finds a box uncovered and goes on to
    disk), never a wrong state: the rank assembles only what covers its boxes."""
    split = even_split(layouts, old_world)
    return None if split is None else split.needs(old_world, new_ranks, new_world)


def _source_rank(layouts: Mapping[int, Layout], old_world: int, target: RestoreTarget) -> int:
    """The old rank whose unsharded tensors and plain values ``target`` gets back, among the
    snapshots at hand: the preferred one, or after a resize of data-parallel state the
    replica the agent put here when the preferred one was lost (``replica_rank``): after a
    resize, or at the same world size when no step was recoverable rank for rank."""
    pref = preferred_rank(target.rank, old_world)
    if (pref in layouts or not layouts
            or not all(lay.is_replica for lay in layouts.values())):
        return pref
    return replica_rank(target.rank, old_world, layouts)


class RestoreSource(Protocol):
    """One place a rank's state can come from. See the module docstring."""

    name: str
    """Short name used in events: "memory", "shm", "peers", "disk"."""

    def steps(self, target: RestoreTarget) -> Sequence[int]:
        """Steps this source can restore for `target`, newest first; [] when the source does not
        apply. Raises `SourceUnavailable` (or another source error) when it applies but holds
        nothing usable, naming why."""
        ...

    def load(self, step: int, target: RestoreTarget) -> Any:
        """The verified state tree of `step` for `target` (tensors may be views of the source's
        memory: the caller copies out of them before the next save). Raises a source error."""
        ...


# -- states from snapshots ----------------------------------------------------------------------


def state_from_snapshots(
    snapshots: Mapping[int, Snapshot], old_world: int, target: RestoreTarget
) -> Any:
    """The state tree `target` needs, from verified snapshots of old ranks (old rank -> snapshot).

    When the target is the old rank itself and every tensor stays where it was, the tree's
    tensors are views of that snapshot's buffer; otherwise every tensor is assembled by global
    offsets (`restore.reshard`) from the snapshots given, which must cover every box needed.
    """
    if not snapshots:
        raise RestoreError("no snapshot to restore from")
    steps = {s.step for s in snapshots.values()}
    if len(steps) != 1:
        raise RestoreError(f"snapshots of different steps {sorted(steps)} cannot be combined")
    pref = _source_rank({r: s.layout for r, s in snapshots.items()}, old_world, target)
    if pref not in snapshots:
        raise RestoreError(f"the snapshot of old rank {pref} (meta and unsharded state) is missing")
    main = snapshots[pref]
    meta = json.loads(main.meta_json)
    if all(target.placement(e) == keep_placement(e) for e in main.layout.entries) and (
        pref == target.rank
    ):
        return unflatten(main.layout, meta, tensors_of(main.layout, main.buffer))
    order = [pref] + sorted(r for r in snapshots if r != pref)
    layout, tensors = reshard(
        [(snapshots[r].layout, snapshots[r].buffer) for r in order],
        target.rank,
        target.world_size,
        placement=lambda e, rank, world: target.placement(e),
    )
    return unflatten_as(main.layout, meta, layout, tensors)


def unflatten_as(
    saved: Layout, meta: Any, layout: Layout, tensors: Sequence[torch.Tensor]
) -> Any:
    """Rebuild the tree of `saved` (whose meta indexes its entries) from resharded tensors."""
    by_fqn = {e.fqn: t for e, t in zip(layout.entries, tensors, strict=True)}
    missing = [e.fqn for e in saved.entries if e.fqn not in by_fqn]
    if missing:
        raise RestoreError(f"resharded state lacks {missing[:8]}")
    ordered = [by_fqn[e.fqn] for e in saved.entries]
    new_layout = build_layout(
        [(e.fqn, t.dtype, t.shape) for e, t in zip(saved.entries, ordered, strict=True)]
    )
    return unflatten(new_layout, meta, ordered)


def needed_ranks(
    layouts: Mapping[int, Layout], old_world: int, target: RestoreTarget
) -> list[int]:
    """Old ranks whose snapshot holds part of what `target` needs (so only those are read and
    verified): the preferred rank, and every rank whose piece of a sharded tensor intersects the
    target's box of it."""
    from hpt.ckpt.restore import _intersect

    pref = _source_rank(layouts, old_world, target)
    needed = {pref}
    boxes: dict[str, ShardInfo] = {}
    for rank, layout in layouts.items():
        for e in layout.entries:
            if e.is_replicated:
                continue
            box = boxes.get(e.fqn)
            if box is None:
                box = boxes[e.fqn] = target.placement(e)
            if _intersect(e.global_offset, e.shape, box.global_offset, box.local_shape):
                needed.add(rank)
    return sorted(needed)


# -- sources ------------------------------------------------------------------------------------


class SinkSource:
    """Snapshots held by a `SnapshotSink` of this rank (in-process memory, or the agent's shared
    memory under this rank's prefix).

    Args:
        sink: the sink to read.
        name: the source's name in events.
        step: only this step (the controller's choice), or None for whatever the sink holds.
        generation: the generation holding `step` when known (then nothing is searched).
        accept: filter on the steps offered (e.g. only steps this process committed).
    """

    def __init__(
        self,
        sink: SnapshotSink,
        name: str,
        *,
        step: int | None = None,
        generation: int | None = None,
        accept: Callable[[int], bool] | None = None,
    ) -> None:
        self.sink = sink
        self.name = name
        self._step = step
        self._generation = generation
        self._accept = accept or (lambda step: True)

    def _refs(self) -> list[SnapshotRef]:
        if self._step is not None and self._generation is not None:
            return [SnapshotRef(step=self._step, generation=self._generation)]
        refs = [r for r in self.sink.held() if self._accept(r.step)]
        if self._step is not None:
            refs = [r for r in refs if r.step == self._step]
            if not refs:
                raise SourceUnavailable(f"the snapshot of step {self._step} is not held")
        return refs

    def steps(self, target: RestoreTarget) -> Sequence[int]:
        return [r.step for r in self._refs()]

    def load(self, step: int, target: RestoreTarget) -> Any:
        ref = next((r for r in self._refs() if r.step == step), None)
        if ref is None:
            raise SourceUnavailable(f"the snapshot of step {step} is not held")
        snap = self.sink.read(ref)
        verify_snapshot(snap)
        return state_from_snapshots({target.rank: snap}, target.rank + 1, target)


@dataclass(frozen=True, slots=True)
class ShardRef:
    """Where one old rank's snapshot lies in shared memory."""

    prefix: str
    generation: int


class ShardSetSource:
    """A set of old ranks' snapshots of one step in shared memory (ShmSink files), for a world of
    `old_world` ranks: the agent puts them there (its own, copied from a peer, or decoded from
    parity) and names them in the launch. Reshards when the world size changed."""

    def __init__(
        self, step: int, old_world: int, directory: str, shards: Mapping[int, ShardRef],
        *, name: str = "peers",
    ) -> None:
        self.name = name
        self.step = step
        self.old_world = old_world
        self.directory = directory
        self.shards = dict(shards)

    def steps(self, target: RestoreTarget) -> Sequence[int]:
        if not self.shards:
            return []
        return [self.step]

    def load(self, step: int, target: RestoreTarget) -> Any:
        if step != self.step:
            raise SourceUnavailable(f"holds step {self.step}, not {step}")
        snaps: dict[int, Snapshot] = {}
        sinks = {r: ShmSink(ref.prefix, directory=self.directory) for r, ref in self.shards.items()}
        # Read every record (small), then verify only the buffers this rank needs.
        for rank, ref in self.shards.items():
            snaps[rank] = sinks[rank].read(SnapshotRef(step=step, generation=ref.generation))
        wanted = needed_ranks({r: s.layout for r, s in snaps.items()}, self.old_world, target)
        missing = [r for r in wanted if r not in snaps]
        if missing:
            raise SourceUnavailable(f"old rank(s) {missing} of step {step} are not in memory here")
        for rank in wanted:
            verify_snapshot(snaps[rank])
        return state_from_snapshots({r: snaps[r] for r in wanted}, self.old_world, target)


# -- agreement and the chain --------------------------------------------------------------------


class Agreement(Protocol):
    """How the ranks of a job agree (a collective); a single process agrees with itself."""

    def min(self, value: int) -> int: ...

    def all(self, ok: bool) -> bool: ...


class LocalAgreement:
    def min(self, value: int) -> int:
        return value

    def all(self, ok: bool) -> bool:
        return ok


class ProcessGroupAgreement:
    """Agreement over torch.distributed (a gloo group: the values are CPU integers)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def min(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        self._dist.all_reduce(t, op=self._dist.ReduceOp.MIN, group=self._group)
        return int(t.item())

    def all(self, ok: bool) -> bool:
        return self.min(1 if ok else 0) == 1


def default_agreement() -> Agreement:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return ProcessGroupAgreement()
    return LocalAgreement()


@dataclass(frozen=True, slots=True)
class RestoreOutcome:
    step: int
    """Completed steps of the restored state; 0 when nothing was restored (scratch)."""
    source: str
    """Name of the source that served it, "scratch" when none did."""
    skipped: tuple[str, ...]
    """One line per thing skipped on the way: source, step and why."""


Event = Callable[[str, str], None]


def restore_chain(
    sources: Iterable[RestoreSource],
    target: RestoreTarget,
    *,
    check: Callable[[Any], None],
    apply: Callable[[Any], int],
    agreement: Agreement | None = None,
    on_event: Event | None = None,
) -> RestoreOutcome:
    """Try `sources` in order; restore the first step every rank can load from one source.

    Every rank must call this with the same sources in the same order (the collectives of
    `agreement` pair up by order). For each source: each rank offers its newest step not yet
    tried, the ranks agree on the smallest, each rank loads and `check`s it (a dry run that
    raises when the state does not fit the model), and only when every rank succeeded does each
    `apply` it. Otherwise the step is skipped on every rank, with an event
    ("checkpoint_skipped") naming the source, the step and this rank's reason, and the chain
    goes on below that step, then to the next source.

    Returns:
        What was restored; `RestoreOutcome.step == 0` means scratch (nothing was applied).

    Raises:
        RestoreError: applying failed on some rank after every rank had checked the state, and
            no later source restored one (the live state may be partly overwritten then).
    """
    agree = agreement or default_agreement()
    emit = on_event or (lambda kind, message: None)
    skipped: list[str] = []
    dirty = False

    def skip(line: str) -> None:
        skipped.append(line)
        log.warning("[ckpt] restore: %s", line)
        emit("checkpoint_skipped", line)

    for source in sources:
        try:
            offered = sorted({int(s) for s in source.steps(target)}, reverse=True)
            why = ""
        except SOURCE_ERRORS as exc:
            offered, why = [], f"{type(exc).__name__}: {exc}"
        if why:
            skip(f"{source.name}: nothing usable on this rank: {why}")
        bound: int | None = None
        while True:
            mine = next((s for s in offered if bound is None or s < bound), 0)
            step = agree.min(mine)
            if step <= 0:
                if mine > 0:
                    skip(f"{source.name}: step {mine} is here, but not on every rank")
                break
            state, reason = None, ""
            if step not in offered:
                reason = f"this rank does not hold step {step}"
            else:
                try:
                    state = source.load(step, target)
                    check(state)
                except SOURCE_ERRORS as exc:
                    state, reason = None, f"{type(exc).__name__}: {exc}"
            if agree.all(state is not None):
                try:
                    restored = apply(state)
                    applied = True
                except SOURCE_ERRORS as exc:
                    applied, reason = False, f"loading into the model failed: {exc}"
                dirty = True
                if agree.all(applied):
                    return RestoreOutcome(restored, source.name, tuple(skipped))
            skip(f"{source.name}: step {step}: {reason or 'another rank could not load it'}")
            bound = step
    if dirty:
        raise RestoreError(
            "a restore failed while loading into the model and no other source served: the "
            f"state is partly overwritten, not from scratch ({'; '.join(skipped)})"
        )
    return RestoreOutcome(0, "scratch", tuple(skipped))
