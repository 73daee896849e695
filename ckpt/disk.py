"""The disk restore source: persisted checkpoints (fmt.py) behind the `RestoreSource` protocol."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hpt.ckpt import fmt
from hpt.ckpt.errors import RestoreError
from hpt.ckpt.layout import Layout, unflatten
from hpt.ckpt.sources import RestoreTarget, SourceUnavailable


class DiskSource:
    """Checkpoints persisted under ``root/rank-NNNNN`` for this rank (same world size only)."""

    name = "disk"

    def __init__(self, root: str | Path, *, rank: int) -> None:
        self.root = Path(root) / f"rank-{rank:05d}" if root else None

    def steps(self, target: RestoreTarget) -> Sequence[int]:
        if self.root is None:
            return []
        return [s for s, _ in fmt._step_dirs(self.root)]

    def load(self, step: int, target: RestoreTarget) -> Any:
        if self.root is None:
            raise SourceUnavailable("no persist directory")
        tensors, meta = fmt.load_verified(self.root / fmt.step_dir_name(step))
        try:
            layout = Layout.from_json(meta["layout"])
            tree = meta["meta"] if "meta" in meta else json.loads(meta["meta_json"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RestoreError(f"checkpoint of step {step} has no hpt layout: {exc}") from exc
        return unflatten(layout, tree, [tensors[e.fqn] for e in layout.entries])
