"""``hpt.Checkpointer``: the checkpoint engine wired to the node agent.

Under an hpt agent the snapshots go into shared memory the agent names and keeps
(``HPT_SNAPSHOT_PREFIX``): a crashed rank leaves them behind, the agent reports them, and the
next attempt restores the step the controller found complete on every rank. ``restore()`` is a
chain of sources tried in order, every rank agreeing on one (ckpt/sources.py):

1. memory: what this process itself saved (a second ``restore()`` in one run rolls back);
2. shm: this rank's own snapshot of the chosen step (``HPT_RESTORE_STEP``; the generation comes
   with it in ``HPT_RESTORE_SHARDS``, see hpt/_restore_env.py);
3. peers: the old ranks' snapshots of that step the agent put in this node's memory
   (``HPT_RESTORE_SHARDS``), resharded when the world size changed;
4. disk: the newest checkpoint persisted under ``HPT_PERSIST_DIR`` that every rank verifies and
   loads;
5. scratch (returns 0).

A source that fails (missing, checksum mismatch, load error) is skipped on every rank with a
``checkpoint_skipped`` event naming it and why; the restore that succeeds sends ``restored``.
Without an agent it is the plain ``hpt.ckpt.Checkpointer`` (in-process memory, or
``persist_dir`` on local disk when given).

    ckpt = hpt.Checkpointer(model, optimizer, extra_state={"sampler": sampler})
    start = ckpt.restore()
    for step in range(start, steps):
        ...
        optimizer.step()
        ckpt.save(step + 1)
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from hpt._rank_protocol import (
    MAX_TEXT_CHARS,
    RankEvent,
    RankEventKind,
    SnapshotCommitted,
    SnapshotDiscarded,
)
from hpt._restore_env import RestorePlan, restore_plan
from hpt.ckpt.checkpointer import Checkpointer as _EngineCheckpointer
from hpt.ckpt.checkpointer import Stateful
from hpt.ckpt.checksum import RangeChecksum
from hpt.ckpt.disk import DiskSource
from hpt.ckpt.layout import Layout
from hpt.ckpt.sink import ShmSink
from hpt.ckpt.sources import RestoreOutcome, RestoreSource, ShardRef, ShardSetSource, SinkSource

log = logging.getLogger(__name__)
_METRIC_SOURCE = {"memory": "local", "shm": "local", "peers": "peer", "disk": "disk"}
"""Restore chain source -> the ``source`` label of the agent's restore metrics."""


class _AgentSink(ShmSink):
    """A ShmSink that tells the agent when a generation becomes complete or is overwritten."""

    def __init__(self, prefix: str, directory: str, channel: Any, rank: int) -> None:
        super().__init__(prefix, directory=directory)
        self._channel = channel
        self._rank = rank
        self._started: dict[int, float] = {}  # generation -> monotonic start of its save
        self.blocked_s: Callable[[], float | None] = lambda: None  # the Checkpointer's

    def acquire(self, layout: Layout, generation: int) -> torch.Tensor:
        self._started[generation] = time.monotonic()
        return super().acquire(layout, generation)

    def discard(self, generation: int) -> None:
        super().discard(generation)
        if self._channel is not None:
            self._channel.send(SnapshotDiscarded(generation=generation))

    def commit(self, step: int, generation: int, layout: Layout, meta_json: str,
               checksums: Sequence[RangeChecksum]) -> None:
        super().commit(step, generation, layout, meta_json, checksums)
        if self._channel is not None:
            started = self._started.pop(generation, None)
            self._channel.send(SnapshotCommitted(
                step=step, generation=generation, nbytes=layout.total_bytes,
                copy_s=None if started is None else time.monotonic() - started,
                blocked_s=self.blocked_s()))


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
            # Ranks of a data-parallel job drift up to two snapshots apart: a rank whose commit
            # of step s is in flight blocks in save(s+2) while its peers already committed s+2.
            # Three generations keep a step every rank still holds, so a rank killed mid-copy
            # is restored from memory rather than disk.
            kwargs.setdefault("num_generations", 3)
            # the agent pins the generations its protection rounds read (agent/snapshots.py)
            kwargs.setdefault("pinned", sink.pinned)
            # and the snapshot cadence the controller set for the job (adapt_cadence)
            kwargs.setdefault("cadence", sink.cadence)
        super().__init__(model, optimizer, extra_state=extra_state, sink=sink, every=every,
                         **kwargs)
        self._owns_sink = True  # closing an agent sink unmaps; the files stay with the agent
        if sink is not None:
            sink.blocked_s = lambda: self.blocked_s
        self._plan: RestorePlan = restore_plan(env)
        self._prefix = prefix
        self._shm_dir = env.get("HPT_SNAPSHOT_DIR", "/dev/shm")
        self._persist_dir = persist_dir or env.get("HPT_PERSIST_DIR", "")
        self._rank = int(env.get("RANK", "0"))

    def restore_sources(self) -> list[RestoreSource]:
        """memory, shm, peers, disk: every rank builds the same chain (a source that does not
        apply here offers nothing), so the ranks' agreement collectives pair up."""
        plan, rank = self._plan, self.restore_target().rank
        sources: list[RestoreSource] = [
            SinkSource(self.sink, "memory", accept=lambda step: step in self._saved_steps)
        ]
        own = plan.shards.get(rank) if plan.world_size == self.restore_target().world_size else None
        if own is not None:
            sources.append(SinkSource(ShmSink(own.prefix, directory=plan.directory), "shm",
                                      step=plan.step, generation=own.generation))
        elif plan.step > 0 and self._prefix:
            sources.append(SinkSource(ShmSink(self._prefix, directory=self._shm_dir), "shm",
                                      step=plan.step))
        else:
            sources.append(ShardSetSource(0, 1, self._shm_dir, {}, name="shm"))  # offers nothing
        sources.append(ShardSetSource(
            plan.step, max(plan.world_size, 1), plan.directory or self._shm_dir,
            {r: ShardRef(s.prefix, s.generation) for r, s in plan.shards.items()}, name="peers"))
        sources.append(DiskSource(self._persist_dir or None))
        return sources

    def restore_outcome(self) -> RestoreOutcome:
        started = time.monotonic()
        outcome = super().restore_outcome()
        if outcome.step > 0:
            log.info("[hpt] rank %d restored step %d from %s", self._rank, outcome.step,
                     outcome.source)
            # seconds and the tier feed the agent's hpt_restore_seconds{source}
            self._event(RankEventKind.RESTORED,
                        f"restored step {outcome.step} from {outcome.source}",
                        seconds=time.monotonic() - started,
                        source=_METRIC_SOURCE.get(outcome.source, ""))
        return outcome

    def _on_restore_event(self, kind: str, message: str) -> None:
        try:
            event = RankEventKind(kind)
        except ValueError:  # the restore chain named a kind the protocol lacks: log it here
            log.warning("[hpt] rank %d: restore event %s not sent to the agent: %s", self._rank,
                        kind, message)
            return
        self._event(event, message)

    def _event(self, kind: RankEventKind, message: str, *, seconds: float | None = None,
               source: str = "") -> None:
        """An event for the controller's log; ``seconds`` and ``source`` feed the agent's
        restore metrics."""
        from hpt import current

        ctx = current()
        if ctx is not None and ctx.channel is not None:
            ctx.channel.send(RankEvent(kind=kind, message=message[:MAX_TEXT_CHARS],
                                       seconds=seconds, source=source))
