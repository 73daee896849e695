"""The object a training script uses: `Checkpointer(model, optimizer, ...)`.

    ckpt = hpt.ckpt.Checkpointer(model, optimizer, extra_state={"sampler": sampler}, sink=sink)
    start = ckpt.restore()                # completed steps in the restored state, 0 if none
    for step in range(start, steps):
        ...forward, backward...
        optimizer.step()
        ckpt.save(step + 1)               # returns once the copies are launched

What a snapshot holds: the model's state_dict, the optimizer's state (keyed by parameter name when
every optimized parameter belongs to the model, so it can be resharded together with the
weights), `extra_state[k].state_dict()` for every k, and every global RNG (state.py).

What is copied when: model parameters and optimizer state tensors are copied lazily by the
engine (engine.py), because only `optimizer.step` mutates them and a step-pre-hook waits for the
copies. Everything else (module buffers such as BatchNorm statistics, which forward mutates,
optimizer hyper-parameter tensors, user state, RNG) is cloned inside `save`: small, and mutated
where no hook can see it. Code that mutates parameters outside `optimizer.step` (EMA, weight
clipping, ...) must call `wait_copied()` first.

The sink is the only seam: a MemorySink by default, a ShmSink for snapshots that survive the
process, or the agent's sink.

Restore is a chain of sources (sources.py): this class offers its own sink; `hpt.Checkpointer`
adds the agent's shared memory, peers' snapshots and disk. A state saved by N ranks restores onto
M ranks: tensors named in `shards` are cut out of the old ranks' pieces by their global offsets,
every other tensor and value comes from the old rank with the same number (old rank 0 for new
ranks beyond the old world).

Data position across a resize: keep a GLOBAL count in `extra_state` (samples consumed by all
ranks together, the same number on every rank) and derive each rank's position from it and the
current world size after `restore()`; a per-rank position cannot be carried to another world
size. Example::

    class Position:                      # same value on every rank
        def __init__(self): self.global_samples = 0
        def state_dict(self): return {"global_samples": self.global_samples}
        def load_state_dict(self, s): self.global_samples = s["global_samples"]

    # each step: every rank reads batch rows [global_samples + rank*b, ... + (rank+1)*b),
    # then global_samples += world_size * b
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol

import torch

from hpt.ckpt import dtensor
from hpt.ckpt.engine import DEFAULT_NUM_THREADS, SnapshotEngine
from hpt.ckpt.errors import RestoreError
from hpt.ckpt.layout import ShardInfo, TensorEntry
from hpt.ckpt.restore import verify_snapshot
from hpt.ckpt.sink import MemorySink, Snapshot, SnapshotSink
from hpt.ckpt.sources import (
    Agreement,
    RestoreOutcome,
    RestoreSource,
    RestoreTarget,
    SinkSource,
    default_agreement,
    restore_chain,
    state_from_snapshots,
)
from hpt.ckpt.state import capture_rng, restore_rng

log = logging.getLogger(__name__)

STATE_VERSION = 1


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any) -> Any: ...


def _map_tensors(tree: Any, fn: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, list):
        return [_map_tensors(v, fn) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_map_tensors(v, fn) for v in tree)
    if isinstance(tree, Mapping):
        return {k: _map_tensors(v, fn) for k, v in tree.items()}
    return tree


def _clone(tree: Any) -> Any:
    return _map_tensors(tree, lambda t: t.detach().clone())


class Checkpointer:
    """Snapshots model, optimizer, user state and RNG every `every` steps, and restores them.

    Args:
        model: the module whose state_dict is saved (None to save only the rest).
        optimizer: its optimizer; a step-pre-hook is registered that waits for in-flight copies.
        extra_state: name -> object with state_dict()/load_state_dict() (sampler, scheduler, ...).
        sink: where snapshots go; default an in-process MemorySink (closed with the Checkpointer).
        every: `save(step)` snapshots only when step % every == 0.
        shards: model state_dict key -> ShardInfo for parameters that are this rank's piece of a
            bigger tensor (applied to the optimizer state of the same shape too); everything else
            is saved as replicated.
        num_threads: copy threads of the engine.
        num_generations: snapshot buffers written in turn (>= 2).
        pinned: generations the sink's owner keeps from being overwritten for now
            (``SnapshotEngine``'s ``pinned``).
        cadence: ``(every, from_step, before)`` the sink's owner asks for now, or None
            (``due``; the node agent's, ``ShmSink.cadence``).
        timeout_s: deadline of every wait for a previous snapshot.
    """

    def __init__(
        self,
        model: torch.nn.Module | None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        extra_state: Mapping[str, Stateful] | None = None,
        sink: SnapshotSink | None = None,
        every: int = 1,
        shards: Mapping[str, ShardInfo] | None = None,
        num_threads: int = DEFAULT_NUM_THREADS,
        num_generations: int = 2,
        pinned: Callable[[], Collection[int]] | None = None,
        cadence: Callable[[], tuple[int, int, int] | None] | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        if every < 1:
            raise ValueError(f"every ({every}) must be >= 1")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s ({timeout_s}) must be > 0")
        for name, obj in (extra_state or {}).items():
            if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                raise ValueError(f"extra_state[{name!r}] has no state_dict()/load_state_dict()")
        self.model = model
        self.optimizer = optimizer
        self.extra_state = dict(extra_state or {})
        self.every = every
        self._cadence = cadence
        self.timeout_s = timeout_s
        self._shards = dict(shards or {})
        self._saved_steps: set[int] = set()
        self._lazy_params: set[str] = set()
        self.blocked_s: float | None = None
        """Seconds the training thread was held by the newest snapshot measured: its
        ``save`` and the next optimizer step's wait for its copies (None: none yet). What a
        snapshot costs training, beside the copies' interference (the agent reports it, and
        the controller's snapshot cadence weighs it)."""
        self._blocking: float | None = None  # the newest save's, until the next step's wait
        self._owns_sink = sink is None
        self.sink: SnapshotSink = MemorySink() if sink is None else sink
        self.engine = SnapshotEngine(
            self.sink, num_threads=num_threads, num_generations=num_generations, pinned=pinned
        )
        self._hook = (
            optimizer.register_step_pre_hook(self._before_optimizer_step)
            if optimizer is not None
            else None
        )

    # -- public ------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Whether ``save(step)`` snapshots: ``step % every == 0``, or the cadence the sink's
        owner asks for (``cadence``: its ``every`` from its first step on, its ``before`` up to
        there, this ``every`` where that is 0)."""
        asked = self._cadence() if self._cadence is not None else None
        if asked is None:
            return step % self.every == 0
        every, start, before = asked
        return step % (every if step >= start else before or self.every) == 0

    def save(self, step: int) -> bool:
        """Snapshot the state after `step` completed steps if step % every == 0.

        Returns once the copies are launched (True), or at once without saving (False).

        Raises:
            SnapshotError: the previous snapshot failed (reported here, one step late).
        """
        if not self.due(step):
            return False
        started = time.perf_counter()
        state, shards = self._capture(step)
        self.engine.save(step, state, shards=shards, timeout_s=self.timeout_s,
                         copy_now=self._copy_now)
        self._saved_steps.add(step)
        took = time.perf_counter() - started
        if self._hook is None:  # nothing waits for the copies on the training thread later
            self.blocked_s = took
        else:
            self._blocking = took
        return True

    def restore(self) -> int:
        """Restore the newest state the restore sources hold (`restore_sources`), agreed by every
        rank, into model, optimizer, extra state and RNG. Returns its step (the number of
        completed steps), or 0 when no source has one (nothing is changed then).

        Raises:
            RestoreError: loading into the model failed after every rank had checked the state,
                and no later source served.
        """
        return self.restore_outcome().step

    def restore_outcome(self) -> RestoreOutcome:
        """`restore`, returning which source served and what was skipped on the way."""
        self.engine.wait(self.timeout_s)
        outcome = restore_chain(
            self.restore_sources(),
            self.restore_target(),
            check=self.check_state,
            apply=self.apply_state,
            agreement=self._agreement(),
            on_event=self._on_restore_event,
        )
        if outcome.step == 0:
            log.info("[ckpt] no snapshot to restore; starting at step 0")
        else:
            log.info("[ckpt] restored step %d from %s", outcome.step, outcome.source)
        return outcome

    def restore_sources(self) -> list[RestoreSource]:
        """The sources `restore` tries, in order. Here: this Checkpointer's own sink."""
        return [SinkSource(self.sink, "memory")]

    def restore_target(self) -> RestoreTarget:
        """This rank, the world size, and where each saved tensor goes (from `shards`)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        else:
            rank, world = 0, 1
        return RestoreTarget(rank=rank, world_size=world, placement=self._placement)

    def _agreement(self) -> Agreement:
        return default_agreement()

    def _on_restore_event(self, kind: str, message: str) -> None:
        """Hook for subclasses that report restore events (the agent-connected one does)."""

    def restore_snapshot(self, snap: Snapshot) -> int:
        """Load one snapshot (as read from any sink) into model, optimizer, extra state and RNG.

        Returns its step. Raises as `restore` does.
        """
        verify_snapshot(snap)
        state = state_from_snapshots({0: snap}, 1, RestoreTarget(0, 1))
        self.check_state(state)
        step = self.apply_state(state)
        log.info("[ckpt] restored step %d from generation %d", snap.step, snap.generation)
        return step

    def check_state(self, state: Any) -> None:
        """Raise RestoreError unless `state` (a restored state tree) fits this model, optimizer
        and extra state: the dry run before anything live is overwritten."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            version = state.get("version") if isinstance(state, dict) else None
            raise RestoreError(f"snapshot state version {version!r} is not supported")
        for key in ("step", "extra", "rng"):
            if key not in state:
                raise RestoreError(f"snapshot state has no {key!r}")
        if self.model is not None:
            if "model" not in state:
                raise RestoreError("snapshot has no model state")
            live = self.model.state_dict()
            saved = state["model"]
            missing = sorted(set(live) - set(saved))
            unexpected = sorted(set(saved) - set(live))
            if missing or unexpected:
                raise RestoreError(
                    f"snapshot and model differ: missing in snapshot {missing[:8]}, not in the "
                    f"model {unexpected[:8]}"
                )
            for k, t in live.items():
                s = saved[k]
                if dtensor.is_dtensor(t):
                    t = t.to_local()
                if isinstance(t, torch.Tensor) and (
                    not isinstance(s, torch.Tensor) or s.shape != t.shape or s.dtype != t.dtype
                ):
                    got = f"{s.dtype}{list(s.shape)}" if isinstance(s, torch.Tensor) else type(s)
                    raise RestoreError(
                        f"model.{k}: snapshot has {got}, model has {t.dtype}{list(t.shape)}"
                    )
        if self.optimizer is not None:
            if "optim" not in state:
                raise RestoreError("snapshot has no optimizer state")
            self._optimizer_state_from(state["optim"])
        for name in self.extra_state:
            if name not in state["extra"]:
                raise RestoreError(f"snapshot has no extra_state[{name!r}]")

    def apply_state(self, state: Any) -> int:
        """Load a checked state tree into model, optimizer, extra state and RNG; returns its
        step. Tensors of `state` may be views of a source's memory: everything is copied."""
        if self.model is not None:
            self.model.load_state_dict(dtensor.like_state(state["model"], self.model.state_dict()))
        if self.optimizer is not None:
            osd = self._optimizer_state_from(_clone(state["optim"]))
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            osd["state"] = dtensor.like_params(osd["state"], params)
            self.optimizer.load_state_dict(osd)
        for name, obj in self.extra_state.items():
            obj.load_state_dict(_clone(state["extra"][name]))
        restore_rng(state["rng"])
        return int(state["step"])

    def _target_shards(self) -> dict[str, ShardInfo]:
        """`shards`, plus the placement of every DTensor parameter (ckpt/dtensor.py); cached
        per model state_dict identity of its tensors."""
        shards = dict(self._shards)
        if self.model is not None and dtensor.has_dtensor(self.model):
            key = tuple(id(v) for v in self.model.state_dict().values())
            cached = getattr(self, "_dtensor_shards", None)
            if cached is None or cached[0] != key:
                cached = (key, {k: dtensor.shard_info(v)
                                for k, v in self.model.state_dict().items()
                                if dtensor.is_dtensor(v)})
                self._dtensor_shards = cached
            shards.update(cached[1])
        return shards

    def _placement(self, entry: TensorEntry) -> ShardInfo:
        """Where a saved tensor goes on this rank: its piece per `shards` (for optimizer state,
        the piece of the parameter it belongs to), else the whole tensor."""
        fqn = entry.fqn
        info = None
        shards = self._target_shards()
        if fqn.startswith("model."):
            info = shards.get(fqn.removeprefix("model."))
        elif fqn.startswith("optim.state."):
            rest = fqn.removeprefix("optim.state.")
            for pname, candidate in shards.items():
                if rest.startswith(pname + ".") and candidate.global_shape == entry.global_shape:
                    info = candidate
                    break
        if info is not None and info.global_shape == entry.global_shape:
            return info
        whole = entry.global_shape
        return ShardInfo(whole, (0,) * len(whole), whole)

    def wait_copied(self) -> None:
        """Wait until the saved tensors may be mutated (called before every optimizer step)."""
        self.engine.wait_copied(self.timeout_s)

    def wait(self) -> None:
        """Wait until the in-flight snapshot is complete; raises SnapshotError if it failed."""
        self.engine.wait(self.timeout_s)

    @property
    def pending(self) -> bool:
        return self.engine.pending

    def close(self) -> None:
        """Finish the in-flight snapshot, remove the optimizer hook, close an owned sink."""
        try:
            self.engine.close(self.timeout_s)
        finally:
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            if self._owns_sink:
                self.sink.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- capture -----------------------------------------------------------------------------

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        started = time.perf_counter()
        self.engine.wait_copied(self.timeout_s)
        if self._blocking is not None:
            self.blocked_s = self._blocking + time.perf_counter() - started
            self._blocking = None

    def _param_names(self) -> list[str] | None:
        """Model names of the optimizer's parameters in state_dict order, or None if some
        optimized parameter is not a (uniquely named) model parameter."""
        if self.model is None or self.optimizer is None:
            return None
        by_id = {id(p): n for n, p in self.model.named_parameters()}
        names = [by_id.get(id(p)) for g in self.optimizer.param_groups for p in g["params"]]
        if None in names or len(set(names)) != len(names):
            return None
        return names  # type: ignore[return-value]

    def _copy_now(self, fqn: str) -> bool:
        """Tensors cloned inside `save` (see the module doc): all but the model's parameters and
        the optimizer's per-parameter state, which the step-pre-hook protects; and not the RNG
        states, which `capture_rng` made fresh."""
        if fqn.startswith("model."):
            return fqn.removeprefix("model.") not in self._lazy_params
        return not fqn.startswith(("optim.state.", "rng."))

    def _capture(self, step: int) -> tuple[dict[str, Any], dict[str, ShardInfo]]:
        # Tensors are not cloned here: the engine clones those `_copy_now` names after its one
        # walk of the state (a second walk to clone cost as much as the save's encoding).
        state: dict[str, Any] = {"version": STATE_VERSION, "step": step}
        shards: dict[str, ShardInfo] = {}
        names: list[str] | None = None
        has_dtensor = False
        if self.model is not None:
            # One state_dict walk tells the parameters (copied lazily), their names for the
            # optimizer state and whether any is a DTensor: named_parameters() twice and a
            # third pass over the parameters cost as much again as the state_dict itself.
            model_state = self.model.state_dict(keep_vars=True)
            dtensor_type = dtensor.dtensor_type()
            lazy: set[str] = set()
            by_id: dict[int, str] = {}
            for k, v in model_state.items():
                if isinstance(v, torch.nn.Parameter):
                    lazy.add(k)
                    by_id.setdefault(id(v), k)
                if dtensor_type is not None and isinstance(v, dtensor_type):
                    has_dtensor = True
            self._lazy_params = lazy
            state["model"] = model_state
            shards.update({f"model.{k}": info for k, info in self._shards.items()})
            if self.optimizer is not None:
                found = [by_id.get(id(p)) for g in self.optimizer.param_groups
                         for p in g["params"]]
                if None not in found and len(set(found)) == len(found):
                    names = found  # type: ignore[assignment]
        if self.optimizer is not None:
            osd = self.optimizer.state_dict()
            # state_dict() packs new group dicts; their tensors (an lr a scheduler mutates in
            # place) are cloned by the engine
            groups = osd["param_groups"]
            if names is None:
                state["optim"] = {"state": osd["state"], "param_groups": groups, "keys": "index"}
            else:
                for g in groups:
                    g["params"] = [names[i] for i in g["params"]]
                per_param = {names[i]: s for i, s in osd["state"].items()}
                state["optim"] = {"state": per_param, "param_groups": groups, "keys": "name"}
                for pname, info in self._shards.items():
                    for key, value in per_param.get(pname, {}).items():
                        if (
                            isinstance(value, torch.Tensor)
                            and tuple(value.shape) == info.local_shape
                        ):
                            shards[f"optim.state.{pname}.{key}"] = info
        state["extra"] = {k: obj.state_dict() for k, obj in self.extra_state.items()}
        state["rng"] = capture_rng()
        if has_dtensor:
            state, placed = dtensor.localize(state)  # DTensor leaves: local piece + offsets
            shards.update(placed)
        return state, shards

    def _optimizer_state_from(self, saved: dict[str, Any]) -> dict[str, Any]:
        """Turn the saved optimizer state back into `optimizer.load_state_dict` form."""
        if saved.get("keys") == "index":
            return {"state": saved["state"], "param_groups": saved["param_groups"]}
        names = self._param_names()
        if names is None:
            raise RestoreError(
                "snapshot keys optimizer state by parameter name, but this optimizer has "
                "parameters that are not uniquely named parameters of the model"
            )
        index = {n: i for i, n in enumerate(names)}
        missing = [n for g in saved["param_groups"] for n in g["params"] if n not in index]
        if missing:
            raise RestoreError(f"snapshot optimizer has parameters the model lacks: {missing[:8]}")
        groups = [{**g, "params": [index[n] for n in g["params"]]} for g in saved["param_groups"]]
        return {"state": {index[n]: s for n, s in saved["state"].items()}, "param_groups": groups}
