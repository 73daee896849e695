"""The Hugging Face Trainer with and without ``HptCallback``: per-step overhead, and snapshot
blocking time against the Trainer's own checkpoint save on the same model. JSON lines on stdout.

One process on CPU. The snapshots take hpt's agent path without an agent: ``HPT_SNAPSHOT_PREFIX``
makes the Checkpointer write shared-memory files (in a temporary directory in /dev/shm) as under
an agent. Steps are paced to ``--step-ms`` (a sleep before the optimizer step, as a GPU step
would leave the host idle), so the overhead is what the callback adds to a step of that length.

- ``hf_callback_overhead``: median step time (between consecutive ``on_step_end``) of runs with
  the callback over runs without it, interleaved, ``--repeats`` each; ratio and percent.
- ``hf_snapshot_blocking``: per snapshot, the time ``checkpointer.save`` blocks plus the time the
  next optimizer step waits for its copies, against the Trainer's full checkpoint
  (``_save_checkpoint``: model, optimizer, scheduler, RNG, trainer state, as ``save_strategy``
  writes it) and ``save_model`` (weights only) at the same steps; medians and ratios.

    python tests/bench/bench_hf.py --params-m 4 --steps 60 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

import hpt
import hpt.integrations.transformers as hpt_integration
from hpt.integrations.transformers import HptCallback, resume_from


class Model(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(),
                                       torch.nn.Linear(width, 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.net(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int, width: int) -> None:
        self.x, self.y = torch.randn(n, width), torch.randn(n, 1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class Pace(TrainerCallback):  # type: ignore[misc]
    """Steps of ``step_s``: sleeps before the optimizer step; records each step's end."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.started = 0.0
        self.ends: list[float] = []

    def on_step_begin(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
        self.started = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
        left = self.step_s - (time.perf_counter() - self.started)
        if left > 0:
            time.sleep(left)  # the accelerator's share of the step

    def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
        self.ends.append(time.perf_counter())


class TimedHpt(HptCallback):
    """HptCallback that records how long each snapshot launch blocks the training thread."""

    def __init__(self, every: int, **kwargs: Any) -> None:
        super().__init__(every, **kwargs)
        self.save_s: list[float] = []

    def _save_due(self) -> None:
        due = self._due
        t0 = time.perf_counter()
        super()._save_due()
        if due:
            self.save_s.append(time.perf_counter() - t0)


class Blocking(TrainerCallback):  # type: ignore[misc]
    """Times hpt's snapshot of what HptCallback snapshots (save + the next step's wait for its
    copies) and the Trainer's own saves, at the same steps."""

    def __init__(self, every: int, out: str) -> None:
        self.every, self.out = every, out
        self.trainer: Any = None
        self.ckpt: Any = None
        self.hpt_s: list[float] = []
        self.full_s: list[float] = []
        self.model_s: list[float] = []
        self._pending = 0.0

    def on_train_begin(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
        hpt_integration._common.ensure_init()
        self.ckpt = hpt.Checkpointer(
            kw["model"], hpt_integration._inner(kw["optimizer"]),
            extra_state={"trainer": hpt_integration._TrainerState(self.trainer)})

    def on_train_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
        self.ckpt.close()

    def on_pre_optimizer_step(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
        if self._pending:
            t0 = time.perf_counter()
            self.ckpt.wait_copied()
            self.hpt_s.append(self._pending + time.perf_counter() - t0)
            self._pending = 0.0

    def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
        step = state.global_step
        if step % self.every or step < 2 * self.every:
            return
        t0 = time.perf_counter()
        self.ckpt.save(step)
        self._pending = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.trainer._save_checkpoint(self.trainer.model, trial=None)
        self.full_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        self.trainer.save_model(os.path.join(self.out, "model"))
        self.model_s.append(time.perf_counter() - t0)


def run(args: argparse.Namespace, *, with_hpt: bool, blocking: bool = False) -> dict[str, float]:
    width = int((args.params_m * 1e6) ** 0.5)
    set_seed(0)
    model = Model(width)
    pace = Pace(args.step_ms / 1000)
    callbacks: list[Any] = [pace]
    kwargs = {"num_threads": args.num_threads} if args.num_threads else {}
    hpt_cb = TimedHpt(args.every, **kwargs) if with_hpt else None
    if hpt_cb is not None:
        callbacks.insert(0, hpt_cb)
    probe = None
    out = tempfile.mkdtemp(dir=args.tmp)
    if blocking:
        probe = Blocking(args.blocking_every, out)
        callbacks.append(probe)
    targs = TrainingArguments(
        output_dir=out, per_device_train_batch_size=4, max_steps=args.steps, learning_rate=1e-4,
        save_strategy="no", eval_strategy="no", logging_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=targs, train_dataset=Rows(args.steps * 4, width),
                      callbacks=callbacks)
    if probe is not None:
        probe.trainer = trainer
    trainer.train(resume_from_checkpoint=resume_from(trainer) if with_hpt else None)
    gaps = [b - a for a, b in zip(pace.ends, pace.ends[1:], strict=False)][5:]
    result = {"step_s": statistics.median(gaps), "state_bytes": sum(
        p.numel() * p.element_size() * 3 for p in model.parameters())}
    if hpt_cb is not None:
        result["save_launch_s"] = statistics.median(hpt_cb.save_s)
    if probe is not None:
        result["hpt_block_s"] = statistics.median(probe.hpt_s)
        result["trainer_checkpoint_s"] = statistics.median(probe.full_s)
        result["save_model_s"] = statistics.median(probe.model_s)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params-m", type=float, default=4.0, help="model parameters, millions")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--step-ms", type=float, default=50.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every", type=int, default=1, help="HptCallback(every=N)")
    parser.add_argument("--num-threads", type=int, default=0,
                        help="snapshot copy threads (0: the engine's default)")
    parser.add_argument("--blocking-every", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory(dir=shm) as snaps:
        args.tmp = tmp
        os.environ["HPT_SNAPSHOT_PREFIX"] = "bench-hf"
        os.environ["HPT_SNAPSHOT_DIR"] = snaps
        base, with_cb, launch = [], [], []
        for _ in range(args.repeats):
            base.append(run(args, with_hpt=False)["step_s"])
            r = run(args, with_hpt=True)
            with_cb.append(r["step_s"])
            launch.append(r["save_launch_s"])
        b, w = statistics.median(base), statistics.median(with_cb)
        print(json.dumps({"bench": "hf_callback_overhead", "params_m": args.params_m,
                          "step_ms": args.step_ms, "steps": args.steps, "repeats": args.repeats,
                          "every": args.every, "num_threads": args.num_threads,
                          "median_save_launch_s": round(statistics.median(launch), 5),
                          "median_step_s_without": round(b, 5), "median_step_s_with": round(w, 5),
                          "ratio": round(w / b, 4), "overhead_pct": round(100 * (w / b - 1), 2),
                          "loadavg_1m": round(os.getloadavg()[0], 2)}), flush=True)
        blocks = [run(args, with_hpt=False, blocking=True) for _ in range(args.repeats)]
        h = statistics.median(r["hpt_block_s"] for r in blocks)
        full = statistics.median(r["trainer_checkpoint_s"] for r in blocks)
        weights = statistics.median(r["save_model_s"] for r in blocks)
        print(json.dumps({"bench": "hf_snapshot_blocking", "params_m": args.params_m,
                          "state_bytes": blocks[0]["state_bytes"], "repeats": args.repeats,
                          "hpt_block_s": round(h, 5), "trainer_checkpoint_s": round(full, 5),
                          "save_model_s": round(weights, 5), "ratio_vs_checkpoint": round(h / full, 4),
                          "loadavg_1m": round(os.getloadavg()[0], 2)}), flush=True)


if __name__ == "__main__":
    main()
