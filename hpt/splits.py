"""How the sharded tensors of a job's snapshots are cut, told without the snapshots (and
without torch: the controller reads it from the agents' rank reports).

A ZeRO/FSDP rank's shard of a tensor is one slice of one dim under an even split of that dim
over the world. Which split (``_SPLITS``) and the sizes of the cut dims are enough to tell,
after a resize, which old ranks' slices a new rank's slice overlaps (:meth:`EvenSplit.needs`):
the agent tells it from a snapshot's layout (``hpt.ckpt.sources.even_split``), the controller
names just those old ranks in each node's restore plan.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass


def preferred_rank(new_rank: int, old_world: int) -> int:
    """The old rank whose unsharded tensors and plain values a new rank gets back."""
    return new_rank if new_rank < old_world else 0


_SPLITS: dict[str, Callable[[int, int, int], int]] = {
    # where rank r's slice of `size` rows starts when a world of w splits them evenly on dim 0
    "floor": lambda size, r, w: size * r // w,  # FlatShard-style (total * r // world)
    "tensor_split": lambda size, r, w: (r * (size // w) + min(r, size % w)) if r < w else size,
    "chunk": lambda size, r, w: min(r * -(-size // w), size),  # torch.chunk, DTensor Shard(0)
}


def _owner(split: str, size: int, row: int, world: int) -> int:
    """The rank whose slice of ``size`` rows holds ``row`` under ``split`` over ``world``
    ranks (the inverse of ``_SPLITS[split]``, in O(1))."""
    if split == "chunk":
        return min(row // -(-size // world), world - 1)
    if split == "floor":  # the last r with size * r // world <= row
        return min(((row + 1) * world - 1) // size, world - 1)
    q, extra = divmod(size, world)  # tensor_split: the first `extra` ranks hold q + 1 rows
    if row < extra * (q + 1):
        return row // (q + 1)
    return min(extra + (row - extra * (q + 1)) // q, world - 1)


MAX_SPLIT_SIZES = 256
"""An even split names at most this many distinct sizes (a model's cut dims are a handful);
more, and it is not reported (the controller then names every old rank)."""


def split_name(name: str, group: int = 0) -> str:
    """``name`` of ``_SPLITS`` over the whole world (``group`` 0), or ``name/G``: over groups
    of ``G`` consecutive ranks, rank r holding slice ``r % G`` (HSDP: a copy of the state
    sliced within each replica group, ranks numbered replica-major, as a (replicate, shard)
    device mesh numbers them)."""
    return f"{name}/{group}" if group else name


def parse_split(text: str) -> tuple[str, int]:
    """(name, group) of :func:`split_name`'s form; ValueError when it is not."""
    name, sep, group = text.partition("/")
    if name not in _SPLITS or (sep and (not group.isdigit() or int(group) < 2)):
        raise ValueError(f"{text[:40]!r} is not SPLIT or SPLIT/G (G >= 2) with SPLIT one of "
                         f"{sorted(_SPLITS)}")
    return name, int(group or 0)


@dataclass(frozen=True, slots=True)
class EvenSplit:
    """How the sharded tensors of some snapshots are cut: the even splits they all follow
    (:func:`split_name`: a ``_SPLITS`` convention over the world or within groups; several
    when the sizes cannot tell them apart) and the sizes of the dims they are cut on. Enough
    to tell which old ranks a new rank of another world size reads (:meth:`needs`) without
    the snapshots: an agent reports it per rank (``RankStatus.snapshot_split``,
    :meth:`encode`), so the controller names in a restore plan only the old ranks a node's
    new ranks read, not every one."""

    splits: frozenset[str]
    sizes: frozenset[int]

    def encode(self) -> str:
        """``"chunk+floor:4096,11008"``, ``"floor/8:30000"``; the wire form of :meth:`decode`."""
        return "+".join(sorted(self.splits)) + ":" + ",".join(map(str, sorted(self.sizes)))

    @classmethod
    def decode(cls, text: str) -> EvenSplit:
        """Raises ValueError naming what is wrong when ``text`` is not :meth:`encode`'s form."""
        names, sep, sizes = text.partition(":")
        splits = frozenset(names.split("+")) if names else frozenset()
        try:
            if not sep or not splits:
                raise ValueError("no split named")
            for name in splits:
                parse_split(name)
        except ValueError as exc:
            raise ValueError(f"snapshot_split {text[:80]!r}: expected SPLIT[+SPLIT]:SIZE,... "
                             f"({exc})") from None
        try:
            values = frozenset(int(v) for v in sizes.split(",")) if sizes else frozenset()
        except ValueError:
            raise ValueError(f"snapshot_split {text[:80]!r}: sizes must be integers") from None
        if any(v <= 0 for v in values) or len(values) > MAX_SPLIT_SIZES:
            raise ValueError(f"snapshot_split {text[:80]!r}: sizes must be positive, at most "
                             f"{MAX_SPLIT_SIZES} of them")
        return cls(splits, values)

    def merge(self, other: EvenSplit) -> EvenSplit | None:
        """The split both follow (None: none), over both's sizes."""
        common = self.splits & other.splits
        return EvenSplit(common, self.sizes | other.sizes) if common else None

    def needs(self, old_world: int, new_ranks: Iterable[int],
              new_world: int) -> set[int] | None:
        """The old ranks of ``old_world`` that new ranks ``new_ranks`` of ``new_world`` read:
        each one's preferred old rank, and every old rank whose slice of a cut dim overlaps
        the new rank's slice under any of the splits. O(splits x sizes) per new rank. Within
        groups of G (HSDP), the new world keeps G (it must divide it; None otherwise: not
        known) and a new rank's slice is that of the old ranks of the same ``r % G``: the
        preferred old rank, and old rank ``r % G`` when the preferred one holds another."""
        out: set[int] = set()
        ranks = list(new_ranks)
        for new in ranks:
            out.add(preferred_rank(new, old_world))
        for text in self.splits:
            name, group = parse_split(text)
            if group:
                if new_world % group or old_world % group:
                    return None
                out.update(new % group for new in ranks
                           if preferred_rank(new, old_world) % group != new % group)
                continue
            start = _SPLITS[name]
            for new in ranks:
                for size in self.sizes:
                    lo, hi = start(size, new, new_world), start(size, new + 1, new_world)
                    if lo < hi:
                        out.update(range(_owner(name, size, lo, old_world),
                                         _owner(name, size, hi - 1, old_world) + 1))
        return out


def common_split(texts: Iterable[str]) -> EvenSplit | None:
    """The split every one of ``texts`` (the ranks' ``snapshot_split`` reports) follows, over
    all their sizes; None when one is empty or they share none. Each distinct text is read
    once (a job's ranks report a few). Raises ValueError (naming it) when one does not read."""
    seen: set[str] = set()
    merged: EvenSplit | None = None
    for text in texts:
        if text in seen:
            continue
        if not text:
            return None
        seen.add(text)
        one = EvenSplit.decode(text)
        merged = one if merged is None else merged.merge(one)
        if merged is None:
            return None
    return merged
