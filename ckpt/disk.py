"""The disk restore source: a persisted global checkpoint (fmt.py) behind `RestoreSource`.

Each rank reads only what it needs: hpt's JSON index (``hpt-meta.json``, checked against the
manifest; DCP's pickled ``.metadata`` is never read), then the data files holding the pieces its
new layout intersects, each checked against the manifest's SHA-256 before a byte of it is used.
Pieces go straight into the rank's state tree, cut and joined by global offsets
(`restore.assemble`), so a checkpoint written by W ranks restores onto any other world size;
`sources.restore_chain` makes every rank agree on a step all of them verified and loaded.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hpt.ckpt import fmt
from hpt.ckpt.errors import CorruptCheckpointError
from hpt.ckpt.layout import build_layout
from hpt.ckpt.restore import _intersect, assemble
from hpt.ckpt.sources import RestoreTarget, unflatten_as
from hpt.splits import preferred_rank


class DiskSource:
    """Global checkpoints ``root/step-NNNNNNNNNN`` (fmt.py), newest first."""

    name = "disk"

    def __init__(self, root: str | os.PathLike[str] | None) -> None:
        self.root = Path(os.path.realpath(root)) if root else None

    def steps(self, target: RestoreTarget) -> Sequence[int]:
        if self.root is None or not self.root.is_dir():
            return []
        return [step for step, _ in fmt._step_dirs(self.root)]

    def load(self, step: int, target: RestoreTarget) -> Any:
        if self.root is None:
            raise CorruptCheckpointError("no persist directory")
        path = self.root / fmt.step_dir_name(step)
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode) or not stat.S_ISDIR(mode):
            raise CorruptCheckpointError(f"{path}: a symlink or not a directory; never followed")
        manifest = fmt._read_manifest(path)
        if manifest.step != step:
            raise CorruptCheckpointError(f"{path}: manifest says step {manifest.step}")
        index = fmt.read_index(path, manifest)
        main = index.ranks[preferred_rank(target.rank, index.world_size)]
        plan = []
        for entry in main.layout.entries:
            box = target.placement(entry)
            if entry.is_replicated:
                holders = [(main, entry)]
            else:
                holders = []
                for rank in index.ranks:
                    try:
                        e = rank.layout.entry(entry.fqn)
                    except KeyError:
                        continue
                    if e.fqn in rank.pieces and _intersect(
                            e.global_offset, e.shape, box.global_offset, box.local_shape):
                        holders.append((rank, e))
            plan.append((entry, box, holders))
        fmt.verify_files(path, manifest, {r.pieces[e.fqn].file for _, _, hs in plan
                                          for r, e in hs if e.fqn in r.pieces})
        tensors = []
        for entry, box, holders in plan:
            pieces = [(e.global_offset, fmt.read_piece(path, r.pieces[e.fqn], e))
                      for r, e in holders if e.fqn in r.pieces]
            if len(pieces) == 1 and pieces[0][0] == box.global_offset and tuple(
                    pieces[0][1].shape) == box.local_shape:
                tensors.append(pieces[0][1])  # the whole box in one piece: no copy
            else:
                tensors.append(assemble(pieces, box.global_offset, box.local_shape,
                                        entry.torch_dtype, name=entry.fqn))
        layout = build_layout([(e.fqn, t.dtype, tuple(t.shape))
                               for (e, _, _), t in zip(plan, tensors, strict=True)])
        return unflatten_as(main.layout, main.meta, layout, tensors)
