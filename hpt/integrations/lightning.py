"""hpt for PyTorch Lightning: one callback (``pip install hpt[lightning]``).

    from hpt.integrations.lightning import HptCallback, ResumableLoader

    trainer = pl.Trainer(..., callbacks=[HptCallback()])
    trainer.fit(model, train_dataloaders=ResumableLoader(loader))

What the callback does, hook by hook:

- ``setup``: ``hpt.init()`` if the script did not (Lightning owns the process group; under hpt
  it finds torchelastic's variables and does not spawn).
- ``on_fit_start`` (after the strategy wrapped the model and built the optimizers): builds an
  ``hpt.Checkpointer`` over the LightningModule, the first optimizer (lazy copies, waited for by
  its step-pre-hook) and the rest of the trainer's state: other optimizers, LR schedulers, the
  fit loop's progress (epoch, batch, optimizer steps: Lightning's own ``fit_loop.state_dict()``,
  which also carries the state of resumable loaders), the precision plugin (grad scaler) and the
  data position. Then restores the snapshot the controller chose (or the newest persisted one).
  A DDP-wrapped model gets :func:`hpt.integrations.ddp.report_bucket_allreduces`.
- ``on_train_batch_end``: after each optimizer step, ``hpt.step(global_step)``.
- ``on_train_batch_start``: the snapshot of the step before, every ``every`` steps (returns once
  the copies are launched; they overlap this batch's forward and backward). Taken here rather
  than at the end of the step so that what runs between two batches (validation, the next
  epoch's data iterator) lies before it. The first batch after a restore puts the RNG back as
  it was at the snapshot (building the data iterator in between draws from the global RNG).
- validation is a section (``validation``) and every validation batch is a progress beat, so a
  validation loop longer than the hang deadline is not a hang while a validation batch that never
  ends still is; Lightning's own checkpoint saving beats before it writes.

The data position. Lightning resumes a loader mid-epoch only when the loader has
``state_dict``/``load_state_dict``; it restarts the epoch otherwise. :class:`ResumableLoader`
wraps any sized iterable of batches (a ``DataLoader``) with that interface: the callback marks
the batches done as each batch starts (Lightning's prefetching makes the loader's own count run
ahead), and a restored loader skips the batches its epoch had done (drawing them, so an augmenting loader's RNG stays in step) and sets the sampler's epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

try:
    import pytorch_lightning as pl
except ImportError:  # the unified package ships the same API as lightning.pytorch
    try:
        import lightning.pytorch as pl  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError(
            "hpt.integrations.lightning needs PyTorch Lightning: pip install 'hpt[lightning]'"
        ) from exc

import hpt
from hpt import _rank_monitor
from hpt.ckpt.state import capture_rng, restore_rng
from hpt.integrations import _common

__all__ = ["HptCallback", "ResumableLoader"]

log = logging.getLogger(__name__)


class ResumableLoader:
    """A sized iterable of batches that Lightning can resume mid-epoch (see the module doc)."""

    def __init__(self, loader: Any) -> None:
        if not hasattr(loader, "__len__") or not hasattr(loader, "__iter__"):
            raise ValueError(f"loader ({type(loader).__name__}) must be a sized iterable")
        self.loader = loader
        self._epoch = 0
        self._done = 0
        self._skip = 0
        self._set_epoch: int | None = None

    @property
    def sampler(self) -> Any:
        """The wrapped loader's sampler: Lightning calls its ``set_epoch`` every epoch."""
        return getattr(self.loader, "sampler", None)

    @property
    def batch_sampler(self) -> Any:
        return getattr(self.loader, "batch_sampler", None)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        skip, self._skip = self._skip, 0
        if self._set_epoch is not None:
            for obj in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
                if callable(getattr(obj, "set_epoch", None)):
                    obj.set_epoch(self._set_epoch)
            self._set_epoch = None
        it = iter(self.loader)
        for _ in range(skip):
            next(it)
        self._done = skip
        yield from it

    def mark_done(self, epoch: int, batches: int) -> None:
        """``batches`` of ``epoch`` are trained on (the callback calls this as each batch
        starts, before it snapshots)."""
        self._epoch, self._done = epoch, batches

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "done": self._done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, done = state.get("epoch"), state.get("done")
        if not isinstance(epoch, int) or not isinstance(done, int) or done < 0:
            raise ValueError(f"ResumableLoader state ({state!r}) needs int epoch and done >= 0")
        self._epoch, self._done, self._skip, self._set_epoch = epoch, done, done, epoch


class _TrainerState:
    """The trainer's state beyond the module and the first optimizer, as one Stateful."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        t = self.trainer
        return {
            "optimizers": [opt.state_dict() for opt in t.optimizers[1:]],
            "lr_schedulers": [cfg.scheduler.state_dict() for cfg in t.lr_scheduler_configs],
            "fit_loop": t.fit_loop.state_dict(),
            "precision": t.precision_plugin.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        t = self.trainer
        for opt, saved in zip(t.optimizers[1:], state["optimizers"], strict=True):
            opt.load_state_dict(saved)
        for cfg, saved in zip(t.lr_scheduler_configs, state["lr_schedulers"], strict=True):
            cfg.scheduler.load_state_dict(saved)
        t.fit_loop.load_state_dict(state["fit_loop"])
        t.precision_plugin.load_state_dict(state["precision"])


class HptCallback(pl.Callback):
    """Snapshots, progress and sections for a Lightning trainer under hpt (module doc).

    Args:
        every: snapshot every N optimizer steps.
        report_ddp: register the bucket all-reduce hook on a DDP-wrapped model.
        **checkpointer_kwargs: passed to ``hpt.Checkpointer`` (``persist_dir``, ``timeout_s``...).
    """

    def __init__(self, every: int = 1, *, report_ddp: bool = True, **checkpointer_kwargs: Any):
        if every < 1:
            raise ValueError(f"every ({every}) must be >= 1")
        self.every = every
        self.report_ddp = report_ddp
        self._ckpt_kwargs = checkpointer_kwargs
        self.checkpointer: Any = None
        self.restored_step = 0
        self._last_step = 0
        self._due = 0
        self._rng_after_restore: dict[str, Any] | None = None
        self._sections = _common.Sections()

    # -- setup and restore -------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        _common.ensure_init()

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.report_ddp:
            _common.report_ddp(trainer.strategy.model)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.checkpointer = hpt.Checkpointer(
            pl_module, optimizer, extra_state={"trainer": _TrainerState(trainer)},
            every=self.every, **self._ckpt_kwargs,
        )
        self.restored_step = self.checkpointer.restore()
        if self.restored_step:
            self._rng_after_restore = capture_rng()
            log.info("[hpt] resumed at optimizer step %d (epoch %d)", self.restored_step,
                     trainer.fit_loop.epoch_progress.current.processed)

    # -- training ----------------------------------------------------------------------------

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        restoring = self._rng_after_restore is not None
        if restoring:
            restore_rng(self._rng_after_restore)
            self._rng_after_restore = None
        loader = trainer.train_dataloader
        if isinstance(loader, ResumableLoader):
            loader.mark_done(trainer.current_epoch, batch_idx)  # the batches before this one
        if self._due and self.checkpointer is not None and not restoring:
            # The snapshot of step s is taken here, as batch s+1 starts, not when batch s ends:
            # whatever ran in between (validation, the next epoch's iterator, both drawing from
            # the global RNG) is then behind it, and a restore that puts the RNG back at the
            # first batch start it sees continues exactly as the run it replaces.
            self.checkpointer.save(self._due)
        self._due = 0

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step <= max(self.restored_step, self._last_step):  # accumulating: no optimizer step
            return
        self._last_step = step
        self._due = step
        hpt.step(step)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._sections.close()
        if self.checkpointer is not None:
            self.checkpointer.close()
            self.checkpointer = None
        _common.finished()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        # the trainer's teardown just put SIG_DFL back on every signal it saw at fit start
        _rank_monitor.rearm_stack_dump()
        _common.finished()

    # -- sections ----------------------------------------------------------------------------

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._sections.enter("validation")
        _common.beat(trainer.global_step)

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        _common.beat(trainer.global_step)

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        _common.beat(trainer.global_step)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self._sections.exit("validation")

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        _common.beat(trainer.global_step)  # Lightning's own checkpoint: its write follows

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._sections.close()
