"""``hpt.Checkpointer``: the checkpoint engine wired to the node agent.

Under an hpt agent the snapshots go into shared memory the agent names and keeps
(``HPT_SNAPSHOT_PREFIX``): a crashed rank leaves them behind, the agent reports them, and the
next attempt restores the step the controller found complete on every rank
(``HPT_RESTORE_STEP``). With no snapshot in memory (a new job, or the whole cluster restarted)
it restores the newest checkpoint persisted under ``HPT_PERSIST_DIR`` that verifies on every
rank. Without an agent it is the plain ``hpt.ckpt.Checkpointer`` (in-process memory, or
``persist_dir`` on local disk when given).

    ckpt = hpt.Checkpointer(model, optimizer, extra_state={"sampler": sampler})
    start = ckpt.restore()
    for step in range(start, steps):
        ...
        optimizer.step()
        ckpt.save(step + 1)
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from hpt import _faults
from hpt.ckpt import fmt
from hpt.ckpt.checkpointer import Checkpointer as _EngineCheckpointer
from hpt.ckpt.checkpointer import Stateful
from hpt.ckpt.checksum import RangeChecksum, checksum
from hpt.ckpt.errors import RestoreError
from hpt.ckpt.layout import Layout
from hpt.ckpt.sink import ShmSink, Snapshot, SnapshotRef

log = logging.getLogger(__name__)

_MAX_GENERATIONS = 8


class _AgentSink(ShmSink):
    """A ShmSink that tells the agent when a generation becomes complete or is overwritten."""

    def __init__(self, prefix: str, directory: str, channel: Any, rank: int) -> None:
        super().__init__(prefix, directory=directory)
        self._channel = channel
        self._rank = rank
        self._started: dict[int, float] = {}  # generation -> monotonic start of its save

    def acquire(self, layout: Layout, generation: int) -> torch.Tensor:
        self._started[generation] = time.monotonic()
        return super().acquire(layout, generation)

    def discard(self, generation: int) -> None:
        super().discard(generation)
        if self._channel is not None:
            self._channel.send({"op": "discard", "generation": generation})

    def commit(self, step: int, generation: int, layout: Layout, meta_json: str,
               checksums: Sequence[RangeChecksum]) -> None:
        delay = _faults.commit_delay(self._rank, step)
        if delay:
            _faults.hold(delay)
        super().commit(step, generation, layout, meta_json, checksums)
        if self._channel is not None:
            started = self._started.pop(generation, None)
            msg = {"op": "snapshot", "step": step, "generation": generation,
                   "bytes": layout.total_bytes}
            if started is not None:
                msg["copy_s"] = time.monotonic() - started
            self._channel.send(msg)


class Checkpointer(_EngineCheckpointer):
    """See the module docstring. Arguments as ``hpt.ckpt.Checkpointer``, plus ``persist_dir``
    for runs without an agent (with an agent, the job's ``persist_dir`` applies)."""

    def __init__(
        self,
        model: torch.nn.Module | None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        extra_state: Mapping[str, Stateful] | None = None,
        every: int = 1,
        persist_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        env = os.environ
        prefix = env.get("HPT_SNAPSHOT_PREFIX", "")
        sink = None
        if prefix:
            from hpt import current

            ctx = current()
            sink = _AgentSink(prefix, env.get("HPT_SNAPSHOT_DIR", "/dev/shm"),
                              ctx.channel if ctx is not None else None,
                              int(env.get("RANK", "0")))
        if prefix:
            # Ranks of a data-parallel job drift up to two snapshots apart: a rank whose commit
            # of step s is in flight blocks in save(s+2) while its peers already committed s+2.
            # Three generations keep a step every rank still holds, so a rank killed mid-copy
            # is restored from memory rather than disk.
            kwargs.setdefault("num_generations", 3)
        super().__init__(model, optimizer, extra_state=extra_state, sink=sink, every=every,
                         **kwargs)
        self._owns_sink = True  # closing an agent sink unmaps; the files stay with the agent
        self._restore_step = int(env.get("HPT_RESTORE_STEP", "0") or 0)
        self._persist_dir = persist_dir or env.get("HPT_PERSIST_DIR", "")
        self._rank = int(env.get("RANK", "0"))

    def restore(self) -> int:
        """Restore the step the controller chose (from memory), else the newest persisted
        checkpoint every rank has, else nothing. Returns the completed steps restored (0: none).
        """
        if self._restore_step > 0:
            started = time.monotonic()
            snap = self._find(self._restore_step)
            step = self.restore_snapshot(snap)
            log.info("[hpt] rank %d restored step %d from agent memory", self._rank, step)
            self._event("restored", f"restored step {step} from the agent's memory",
                        seconds=time.monotonic() - started, bytes=snap.layout.total_bytes,
                        source="local")
            return step
        if self._persist_dir:
            return self._restore_from_disk(Path(self._persist_dir) / f"rank-{self._rank:05d}")
        return 0

    def _find(self, step: int) -> Snapshot:
        for generation in range(_MAX_GENERATIONS):
            try:
                return self.sink.read(SnapshotRef(step=step, generation=generation))
            except (RestoreError, FileNotFoundError, ValueError):
                continue
        raise RestoreError(f"the snapshot of step {step} chosen by the controller is not in "
                           f"this node's memory ({os.environ.get('HPT_SNAPSHOT_PREFIX')})")

    def _restore_from_disk(self, root: Path) -> int:
        path, skipped = fmt.latest_good(root)
        for bad, reason in skipped:
            log.warning("[hpt] rank %d skipped persisted checkpoint %s: %s", self._rank,
                        bad.name, reason)
            self._event("checkpoint_skipped", f"skipped {bad}: {reason}")
        step = fmt.parse_step_dir(path.name) if path is not None else 0
        step = _agree_on_min(step or 0)
        if step <= 0:
            return 0
        path = root / fmt.step_dir_name(step)
        started = time.monotonic()
        tensors, meta = fmt.load_verified(path)
        snap = _snapshot_from_disk(step, tensors, meta)
        restored = self.restore_snapshot(snap)
        log.info("[hpt] rank %d restored step %d from %s", self._rank, restored, path)
        self._event("restored", f"restored step {restored} from disk ({path})",
                    seconds=time.monotonic() - started, bytes=snap.layout.total_bytes,
                    source="disk")
        return restored

    def _event(self, kind: str, message: str, **fields: Any) -> None:
        """An event for the controller's log; ``fields`` (numbers) feed the agent's metrics."""
        from hpt import current

        ctx = current()
        if ctx is not None and ctx.channel is not None:
            ctx.channel.send({"op": "event", "kind": kind, "message": message, **fields})


def _agree_on_min(step: int) -> int:
    """Every rank restores the same step: the newest one all of them have."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return step
    value = torch.tensor([step], dtype=torch.int64)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())


def _snapshot_from_disk(step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Snapshot:
    try:
        layout = Layout.from_json(meta["layout"])
        meta_json = meta["meta_json"]
    except (KeyError, TypeError, ValueError) as exc:
        raise RestoreError(f"persisted checkpoint of step {step} has no hpt layout: {exc}") from exc
    if not isinstance(meta_json, str):
        raise RestoreError("persisted checkpoint meta_json must be a string")
    json.loads(meta_json)  # fail here, not halfway through loading, if it is not JSON
    buffer = torch.zeros(layout.total_bytes, dtype=torch.uint8)
    for entry in layout.entries:
        src = tensors.get(entry.fqn)
        if src is None:
            raise RestoreError(f"persisted checkpoint of step {step} lacks {entry.fqn!r}")
        view = buffer[entry.offset:entry.offset + entry.nbytes].view(entry.torch_dtype)
        view.view(entry.shape).copy_(src)
    whole = RangeChecksum(start=0, length=layout.total_bytes, value=checksum(buffer))
    return Snapshot(step=step, generation=-1, layout=layout, meta_json=meta_json,
                    checksums=(whole,), buffer=buffer)
