"""Lightning with and without ``HptCallback``: per-step overhead, and snapshot blocking time
against Lightning's own ``trainer.save_checkpoint`` on the same model. JSON lines on stdout.

One process on CPU. The snapshots take hpt's agent path without an agent: ``HPT_SNAPSHOT_PREFIX``
makes the Checkpointer write shared-memory files (in a temporary directory in /dev/shm) as under
an agent.
Steps are paced to ``--step-ms`` (sleep after the compute, as a GPU step would leave the host
idle), so the overhead is what the callback adds to a step of that length.

- ``overhead``: median step time (time between consecutive ``on_train_batch_end``) of runs with
  the callback over runs without it, interleaved, ``--repeats`` each; ratio and percent.
- ``blocking``: per snapshot, the time ``checkpointer.save`` blocks plus the time the next
  optimizer step waits for its copies, against ``trainer.save_checkpoint(path)`` (a local file)
  at the same steps; medians and the ratio.

    python tests/bench/bench_lightning.py --params-m 4 --steps 60 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

import hpt
import hpt.integrations.lightning as hpt_integration
from hpt.integrations.lightning import HptCallback


class Model(pl.LightningModule):
    def __init__(self, width: int, step_s: float) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(),
                                       torch.nn.Linear(width, 1))
        self.step_s = step_s
        self.started = 0.0

    def on_train_batch_start(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.started = time.perf_counter()

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def on_before_optimizer_step(self, optimizer):  # type: ignore[no-untyped-def]
        left = self.step_s - (time.perf_counter() - self.started)
        if left > 0:
            time.sleep(left)  # the accelerator's share of the step

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.Adam(self.parameters(), lr=1e-4)


class StepClock(pl.Callback):
    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.ends.append(time.perf_counter())


class Blocking(pl.Callback):
    """Times hpt's snapshot of what HptCallback snapshots (save + the next step's wait for its
    copies) and Lightning's save_checkpoint, at the same steps."""

    def __init__(self, every: int, path: str) -> None:
        self.every, self.path = every, path
        self.ckpt: Any = None
        self.hpt_s: list[float] = []
        self.lightning_s: list[float] = []
        self._pending = 0.0

    def on_fit_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        hpt_integration._common.ensure_init()
        self.ckpt = hpt.Checkpointer(pl_module, trainer.optimizers[0],
                                     extra_state={"trainer": hpt_integration._TrainerState(trainer)})

    def on_train_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        self.ckpt.close()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # type: ignore[no-untyped-def]
        if self._pending:
            t0 = time.perf_counter()
            self.ckpt.wait_copied()
            self.hpt_s.append(self._pending + time.perf_counter() - t0)
            self._pending = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        step = trainer.global_step
        if step % self.every or step < 2 * self.every:
            return
        t0 = time.perf_counter()
        self.ckpt.save(step)
        self._pending = time.perf_counter() - t0
        t0 = time.perf_counter()
        trainer.save_checkpoint(self.path)
        self.lightning_s.append(time.perf_counter() - t0)


def run(args: argparse.Namespace, *, with_hpt: bool, blocking: bool = False) -> dict[str, float]:
    width = int((args.params_m * 1e6) ** 0.5)
    pl.seed_everything(0, verbose=False)
    model = Model(width, args.step_ms / 1000)
    data = TensorDataset(torch.randn(args.steps * 4, width), torch.randn(args.steps * 4, 1))
    clock = StepClock()
    callbacks: list[pl.Callback] = [clock]
    if with_hpt:
        callbacks.insert(0, HptCallback())
    probe = None
    if blocking:
        probe = Blocking(args.blocking_every, os.path.join(args.tmp, "lightning.ckpt"))
        callbacks.append(probe)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(model, DataLoader(data, batch_size=4))
    gaps = [b - a for a, b in zip(clock.ends, clock.ends[1:], strict=False)][5:]
    out = {"step_s": statistics.median(gaps), "state_bytes": sum(
        p.numel() * p.element_size() * 3 for p in model.parameters())}
    if probe is not None:
        out["hpt_block_s"] = statistics.median(probe.hpt_s)
        out["lightning_save_s"] = statistics.median(probe.lightning_s)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params-m", type=float, default=4.0, help="model parameters, millions")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--step-ms", type=float, default=50.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blocking-every", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # snapshots in /dev/shm as under an agent (a disk-backed directory made each save's unlink
    # of the overwritten generation's record cost milliseconds)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory(dir=shm) as snaps:
        args.tmp = tmp
        os.environ["HPT_SNAPSHOT_PREFIX"] = "bench-lightning"
        os.environ["HPT_SNAPSHOT_DIR"] = snaps
        base, with_cb = [], []
        for _ in range(args.repeats):
            base.append(run(args, with_hpt=False)["step_s"])
            with_cb.append(run(args, with_hpt=True)["step_s"])
        b, w = statistics.median(base), statistics.median(with_cb)
        print(json.dumps({"bench": "lightning_callback_overhead", "params_m": args.params_m,
                          "step_ms": args.step_ms, "steps": args.steps, "repeats": args.repeats,
                          "median_step_s_without": round(b, 5), "median_step_s_with": round(w, 5),
                          "ratio": round(w / b, 4), "overhead_pct": round(100 * (w / b - 1), 2)}),
              flush=True)
        blocks = [run(args, with_hpt=False, blocking=True) for _ in range(args.repeats)]
        h = statistics.median(r["hpt_block_s"] for r in blocks)
        lt = statistics.median(r["lightning_save_s"] for r in blocks)
        print(json.dumps({"bench": "lightning_snapshot_blocking", "params_m": args.params_m,
                          "state_bytes": blocks[0]["state_bytes"], "repeats": args.repeats,
                          "hpt_block_s": round(h, 5), "lightning_save_checkpoint_s": round(lt, 5),
                          "ratio": round(h / lt, 4)}), flush=True)


if __name__ == "__main__":
    main()
