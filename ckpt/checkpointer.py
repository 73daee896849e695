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
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, Protocol

import torch

from hpt.ckpt import dtensor
from hpt.ckpt.engine import DEFAULT_NUM_THREADS, SnapshotEngine
from hpt.ckpt.errors import RestoreError
from hpt.ckpt.layout import ShardInfo, unflatten
from hpt.ckpt.restore import tensors_of, verify_snapshot
from hpt.ckpt.sink import MemorySink, Snapshot, SnapshotSink
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
        self.timeout_s = timeout_s
        self._shards = dict(shards or {})
        self._owns_sink = sink is None
        self.sink: SnapshotSink = MemorySink() if sink is None else sink
        self.engine = SnapshotEngine(
            self.sink, num_threads=num_threads, num_generations=num_generations
        )
        self._hook = (
            optimizer.register_step_pre_hook(self._before_optimizer_step)
            if optimizer is not None
            else None
        )

    # -- public ------------------------------------------------------------------------------

    def save(self, step: int) -> bool:
        """Snapshot the state after `step` completed steps if step % every == 0.

        Returns once the copies are launched (True), or at once without saving (False).

        Raises:
            SnapshotError: the previous snapshot failed (reported here, one step late).
        """
        if step % self.every:
            return False
        state, shards = self._capture(step)
        self.engine.save(step, state, shards=shards, timeout_s=self.timeout_s)
        return True

    def restore(self) -> int:
        """Load the newest complete snapshot from the sink into model, optimizer, extra state and
        RNG. Returns its step (the number of completed steps), or 0 when the sink has none.

        Raises:
            CorruptCheckpointError: the snapshot's checksums do not match.
            RestoreError: the snapshot does not fit this model/optimizer.
        """
        self.engine.wait(self.timeout_s)
        ref = self.sink.latest()
        if ref is None:
            log.info("[ckpt] no snapshot to restore; starting at step 0")
            return 0
        return self.restore_snapshot(self.sink.read(ref))

    def restore_snapshot(self, snap: Snapshot) -> int:
        """Load one snapshot (as read from any sink) into model, optimizer, extra state and RNG.

        Returns its step. Raises as `restore` does.
        """
        verify_snapshot(snap)
        # Views of the sink's buffer: every consumer below copies out of them.
        state = unflatten(
            snap.layout, json.loads(snap.meta_json), tensors_of(snap.layout, snap.buffer)
        )
        if state.get("version") != STATE_VERSION:
            raise RestoreError(f"snapshot state version {state.get('version')!r} is not supported")
        if self.model is not None:
            self.model.load_state_dict(dtensor.like_state(state["model"], self.model.state_dict()))
        if self.optimizer is not None:
            osd = self._optimizer_state_from(_clone(state["optim"]))
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            osd["state"] = dtensor.like_params(osd["state"], params)
            self.optimizer.load_state_dict(osd)
        for name, obj in self.extra_state.items():
            if name not in state["extra"]:
                raise RestoreError(f"snapshot has no extra_state[{name!r}]")
            obj.load_state_dict(_clone(state["extra"][name]))
        restore_rng(state["rng"])
        log.info("[ckpt] restored step %d from generation %d", snap.step, snap.generation)
        return int(state["step"])

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
        self.engine.wait_copied(self.timeout_s)

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

    def _capture(self, step: int) -> tuple[dict[str, Any], dict[str, ShardInfo]]:
        state: dict[str, Any] = {"version": STATE_VERSION, "step": step}
        shards: dict[str, ShardInfo] = {}
        if self.model is not None:
            params = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}
            sd = self.model.state_dict()
            state["model"] = {k: v if k in params else _clone(v) for k, v in sd.items()}
            shards.update({f"model.{k}": info for k, info in self._shards.items()})
        if self.optimizer is not None:
            osd = self.optimizer.state_dict()
            groups = _clone(osd["param_groups"])  # schedulers may mutate tensor lr in place
            names = self._param_names()
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
        state["extra"] = {k: _clone(obj.state_dict()) for k, obj in self.extra_state.items()}
        state["rng"] = capture_rng()
        if self.model is not None and dtensor.has_dtensor(self.model):
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
