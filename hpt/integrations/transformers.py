"""hpt for the Hugging Face Trainer: one callback and one argument (``pip install hpt[transformers]``).

    from hpt.integrations.transformers import HptCallback, resume_from

    trainer = Trainer(model, args, train_dataset=..., callbacks=[HptCallback()])
    trainer.train(resume_from_checkpoint=resume_from(trainer))

Why an argument as well as a callback. The Trainer decides where a run resumes before any
callback runs: ``train(resume_from_checkpoint=DIR)`` reads ``DIR/trainer_state.json`` and from its
global step computes the epochs and batches to skip, then loads model, optimizer, scheduler and
grad scaler from ``DIR`` after it built them, and puts the RNG back once the skipped batches are
drawn. A callback's ``on_train_begin`` comes after all of that. So :func:`resume_from` restores
hpt's snapshot (every rank agreeing on one step of one source: the agent's memory, peers, disk;
see ``hpt.Checkpointer``) and writes it out as a Trainer checkpoint directory of this rank; the
Trainer then resumes from it exactly as from its own checkpoint. It returns None (train from
scratch) when no source holds a snapshot.

The directory is private to the rank, written by this process from state it verified
(checksums), and read back by the Trainer only through ``safetensors`` and
``torch.load(weights_only=True)`` (the Trainer's own loads in transformers 5.x); nothing that
crossed a process boundary is unpickled. The callback deletes it once the Trainer has read it.

What the callback does:

- ``on_train_begin`` (the Trainer built and wrapped model and optimizer): a model the Trainer
  wrapped in DDP gets :func:`hpt.integrations.ddp.report_bucket_allreduces`; an ``hpt.Checkpointer``
  over the model, the optimizer (lazy copies, waited for by its step-pre-hook) and the rest of
  the Trainer's state: LR scheduler, grad scaler, and ``TrainerState`` (global step, epoch, log
  history, stateful callbacks) as one JSON byte tensor (the Trainer's own ``trainer_state.json``).
- ``on_step_end`` (after each optimizer step): ``hpt.step(global_step)``. The snapshot of that
  step (every ``every`` steps) is taken where the Trainer's resume from it puts the RNG back:
  mid-epoch, as the next step begins (``on_step_begin``, after the Trainer drew its batches,
  as its resume does after drawing the skipped ones); after an epoch's last step, as the next
  epoch begins (``on_epoch_begin``, before its iterator draws anything, as a resume with no
  batch to skip does); after the last step, at ``on_train_end``. Evaluation or a checkpoint
  save the Trainer is about to run (its flow callback has just set ``should_evaluate``/
  ``should_save``) opens a section (``evaluation``/``save``, with ``eval_timeout_s``/``save_timeout_s`` as its own deadline when
  given); every evaluation batch is a progress beat, so a long evaluation is never taken for a
  hang while an evaluation batch that never ends still is. ``on_evaluate``/``on_save`` close
  them.
- ``on_train_end``: the last snapshot completes, and the agent is told training is over.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import tempfile
from typing import Any

try:
    from transformers.trainer_callback import ExportableState, TrainerCallback
except ImportError as exc:
    raise ImportError(
        "hpt.integrations.transformers needs the Hugging Face Trainer: "
        "pip install 'hpt[transformers]'"
    ) from exc

import numpy as np
import safetensors.torch
import torch

import hpt
from hpt.checkpoint import Checkpointer
from hpt.ckpt.errors import RestoreError
from hpt.ckpt.state import restore_rng
from hpt.integrations import _common

__all__ = ["HptCallback", "resume_from"]

log = logging.getLogger(__name__)

_WEIGHTS = "model.safetensors"
_OPTIMIZER = "optimizer.pt"
_SCHEDULER = "scheduler.pt"
_SCALER = "scaler.pt"
_TRAINER_STATE = "trainer_state.json"
_STATE_PAD = 4096


def _inner(optimizer: Any) -> Any:
    """The torch optimizer behind accelerate's ``AcceleratedOptimizer`` (which forwards
    ``step``/``state_dict`` to it and has no hooks of its own)."""
    return getattr(optimizer, "optimizer", optimizer)


def _scaler(trainer: Any) -> Any:
    return getattr(getattr(trainer, "accelerator", None), "scaler", None)


class _TrainerState:
    """LR scheduler, grad scaler and ``TrainerState``, as one Stateful for the Checkpointer.

    The TrainerState goes as its JSON text (the Trainer's own trainer_state.json) in a uint8
    tensor: its log history grows every logging step, and a tensor is copied, not walked leaf
    by leaf, at every snapshot.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        t = self.trainer
        state = t.state
        for cb in [c for c in t.callback_handler.callbacks + [t.control]
                   if isinstance(c, ExportableState)]:  # as the Trainer's own _save_checkpoint
            name = type(cb).__name__
            if not isinstance(state.stateful_callbacks.get(name), list):
                state.stateful_callbacks[name] = cb.state()
        # the fields as they are (no dataclasses.asdict: its deep copy of a log history that
        # grows every logging step cost a millisecond a step), compact JSON, as the Trainer's
        # TrainerState.load_from_json reads it
        fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
        text = json.dumps(fields, separators=(",", ":")).encode()
        # padded with JSON whitespace to a multiple of 4 KiB: the same tensor shape from one step
        # to the next keeps the snapshot's layout, and so its buffers, the same
        text += b" " * (-len(text) % _STATE_PAD)
        scaler = _scaler(t)
        return {
            "trainer_state": torch.frombuffer(bytearray(text), dtype=torch.uint8),
            "scheduler": t.lr_scheduler.state_dict() if t.lr_scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise RestoreError("the Trainer's state is restored through resume_from(trainer)")


class _Stash:
    """Where ``resume_from``'s restore puts the extra state (the Trainer loads it, not us)."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        raise RuntimeError("never saved")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


class _Resume(Checkpointer):
    """The restore chain of ``hpt.Checkpointer`` whose last step writes a Trainer checkpoint
    directory instead of loading live objects (the optimizer does not exist yet)."""

    def __init__(self, trainer: Any, directory: str) -> None:
        self._stash = _Stash()
        super().__init__(trainer.model, None, extra_state={"trainer": self._stash})
        self.trainer = trainer
        self.directory = directory

    def apply_state(self, state: Any) -> int:
        write_checkpoint(self.directory, state, self.trainer)
        return int(state["step"])


def write_checkpoint(directory: str, state: dict[str, Any], trainer: Any) -> None:
    """A Trainer checkpoint directory from a restored snapshot state tree (see the module doc).

    Tensors of ``state`` may be views of one snapshot buffer: each is cloned before it is written
    (safetensors refuses shared memory; torch.save would write the whole buffer)."""
    os.makedirs(directory, exist_ok=True)
    model = {k: v.detach().clone().contiguous() for k, v in state["model"].items()}
    safetensors.torch.save_file(model, os.path.join(directory, _WEIGHTS), metadata={"format": "pt"})
    extra = state["extra"]["trainer"]
    with open(os.path.join(directory, _TRAINER_STATE), "wb") as f:
        f.write(bytes(extra["trainer_state"].numpy().tobytes()))
    if "optim" in state:
        torch.save(_index_keyed(state["optim"]), os.path.join(directory, _OPTIMIZER))
        if extra["scheduler"] is not None:
            torch.save(extra["scheduler"], os.path.join(directory, _SCHEDULER))
    if extra["scaler"] is not None:
        torch.save(_clone(extra["scaler"]), os.path.join(directory, _SCALER))
    # The Trainer puts the RNG back from its own file once it drew the skipped batches.
    restore_rng(state["rng"])
    rng: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                           "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.random.get_rng_state_all()
    args = trainer.args
    name = f"rng_state_{args.process_index}.pth" if args.world_size > 1 else "rng_state.pth"
    torch.save(rng, os.path.join(directory, name))


def _clone(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_clone(v) for v in tree)
    return tree


def _index_keyed(saved: dict[str, Any]) -> dict[str, Any]:
    """``optimizer.state_dict()`` form of the snapshot's optimizer state, which the Checkpointer
    keys by parameter name: parameters are numbered in param-group order, as torch does."""
    if saved.get("keys") == "index":
        return _clone({"state": saved["state"], "param_groups": saved["param_groups"]})
    index: dict[str, int] = {}
    groups = []
    for g in saved["param_groups"]:
        ids = [index.setdefault(n, len(index)) for n in g["params"]]
        groups.append({**_clone(g), "params": ids})
    missing = [n for n in saved["state"] if n not in index]
    if missing:
        raise RestoreError(f"snapshot optimizer state names parameters in no group: {missing[:8]}")
    return {"state": {index[n]: _clone(s) for n, s in saved["state"].items()},
            "param_groups": groups}


def resume_from(trainer: Any) -> str | None:
    """Restore hpt's snapshot for ``trainer`` and return a Trainer checkpoint directory of it, for
    ``trainer.train(resume_from_checkpoint=...)``; None when there is nothing to restore.

    Call it on every rank (the ranks agree on the step), after building the Trainer (its
    process group exists then) with an :class:`HptCallback` among its callbacks (it saves the
    snapshots and deletes the directory once the Trainer has read it).

    Raises:
        ValueError: the trainer has no HptCallback.
        RestoreError: as ``hpt.Checkpointer.restore``.
    """
    callback = next((c for c in trainer.callback_handler.callbacks
                     if isinstance(c, HptCallback)), None)
    if callback is None:
        raise ValueError("trainer has no HptCallback: add callbacks=[HptCallback()] to Trainer()")
    callback._trainer = trainer
    _common.ensure_init()
    directory = tempfile.mkdtemp(prefix="hpt-resume-")
    restore = _Resume(trainer, directory)
    try:
        outcome = restore.restore_outcome()
    finally:
        restore.close()
    if outcome.step == 0:
        shutil.rmtree(directory, ignore_errors=True)
        return None
    callback._resume_dir = directory
    callback.restored_step = outcome.step
    log.info("[hpt] resuming the Trainer at optimizer step %d (from %s)", outcome.step,
             outcome.source)
    return directory


class HptCallback(TrainerCallback):  # type: ignore[misc]
    """Snapshots, progress and sections for a Hugging Face Trainer under hpt (module doc).

    Args:
        every: snapshot every N optimizer steps.
        eval_timeout_s: the hang deadline of an evaluation (None: the job's own deadline, counted
            from the last evaluation batch).
        save_timeout_s: the hang deadline of a Trainer checkpoint save (None: the job's).
        report_ddp: register the bucket all-reduce hook on the model the Trainer wrapped in DDP.
        **checkpointer_kwargs: passed to ``hpt.Checkpointer`` (``persist_dir``, ``timeout_s``...).
    """

    def __init__(self, every: int = 1, *, eval_timeout_s: float | None = None,
                 save_timeout_s: float | None = None, report_ddp: bool = True,
                 **checkpointer_kwargs: Any) -> None:
        if every < 1:
            raise ValueError(f"every ({every}) must be >= 1")
        for name, value in (("eval_timeout_s", eval_timeout_s), ("save_timeout_s", save_timeout_s)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} ({value!r}) must be > 0 seconds")
        self.every = every
        self.report_ddp = report_ddp
        self._timeouts = {"evaluation": eval_timeout_s, "save": save_timeout_s}
        self._ckpt_kwargs = checkpointer_kwargs
        self.checkpointer: Any = None
        self.restored_step = 0
        self._resume_dir: str | None = None
        self._trainer: Any = None  # bound by resume_from(trainer)
        self._due = 0  # the step whose snapshot the next step's start takes
        self._sections = _common.Sections()

    # -- training ----------------------------------------------------------------------------

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _common.ensure_init()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _common.ensure_init()
        trainer = self._trainer
        if trainer is None:
            raise ValueError("HptCallback needs trainer.train(resume_from_checkpoint="
                             "hpt.integrations.transformers.resume_from(trainer))")
        if self.report_ddp:
            # the Trainer wrapped the model (accelerate's DDP) before this hook, and its first
            # backward comes after it
            _common.report_ddp(trainer.model_wrapped)
        optimizer = _inner(kwargs.get("optimizer"))
        self.checkpointer = Checkpointer(
            kwargs["model"], optimizer, extra_state={"trainer": _TrainerState(trainer)},
            every=self.every, **self._ckpt_kwargs,
        )

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # The last step of an epoch is snapshotted here, before the new epoch's iterator draws
        # anything: a resume at an epoch boundary (no batch to skip) puts the RNG back as the
        # epoch begins, not after its first batch is drawn as a resume mid-epoch does. (The
        # resume directory stays: the Trainer reads its RNG file after this hook.)
        self._save_due()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # the Trainer has read the resume directory (the RNG last, just before this)
        self._drop_resume_dir()
        self._save_due()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step
        # the checkpointer decides: ``every``, or the cadence the controller set (adapt_cadence)
        if (self.checkpointer.due(step) if self.checkpointer is not None
                else step % self.every == 0):
            # The snapshot of step s is taken as step s+1 begins, not here: what runs in between
            # (an evaluation, the next epoch's iterator, the next batches drawn) is then behind
            # it, and the RNG it holds is the one the Trainer puts back after drawing them.
            self._due = step
        hpt.step(step)
        self._open_sections(control, step)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._open_sections(control, state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._sections.close()
        self._drop_resume_dir()
        self._save_due()
        if self.checkpointer is not None:
            self.checkpointer.close()
            self.checkpointer = None
        _common.finished()

    # -- sections ----------------------------------------------------------------------------

    def _open_sections(self, control: Any, step: int) -> None:
        for flag, name in (("should_evaluate", "evaluation"), ("should_save", "save")):
            if getattr(control, flag, False):
                self._sections.enter(name, timeout=self._timeouts[name])
                _common.beat(step)

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _common.beat(state.global_step)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._sections.exit("evaluation")

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._sections.exit("save")

    def _save_due(self) -> None:
        if self._due and self.checkpointer is not None:
            self.checkpointer.save(self._due)
        self._due = 0

    def _drop_resume_dir(self) -> None:
        if self._resume_dir is not None:
            shutil.rmtree(self._resume_dir, ignore_errors=True)
            self._resume_dir = None
