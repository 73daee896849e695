"""A Hugging Face Trainer job under hpt: a small MLP, DDP over gloo, deterministic.

The hpt lines are the callback and ``resume_from_checkpoint=resume_from(trainer)``. Rank 0 prints
the SHA-256 of the final model and optimizer state so a run that recovered from a fault can be
compared with a clean one bit for bit.

    hptctl submit -n 2 -p 2 -- python examples/hf_train.py --epochs 2
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import tempfile
import time

import torch
from transformers import Trainer, TrainingArguments, set_seed

from hpt.integrations.transformers import HptCallback, resume_from


class Regressor(torch.nn.Module):
    def __init__(self, step_time: float, slow_eval_batches: int = 0,
                 eval_batch_time: float = 0.0) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 1)
        )
        self.step_time = step_time
        self.slow_eval_batches = slow_eval_batches
        self.eval_batch_time = eval_batch_time

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        started = time.monotonic()
        out = self.net(x)
        loss = torch.nn.functional.mse_loss(out, labels)
        pace = self.step_time if self.training else 0.0
        if not self.training and self.slow_eval_batches > 0:
            self.slow_eval_batches -= 1  # a slow first evaluation, as the hang test needs
            pace = self.eval_batch_time
        left = pace - (time.monotonic() - started)
        if left > 0:
            time.sleep(left)  # pacing of the workload, not a wait on anything
        return {"loss": loss, "logits": out}


class Rows(torch.utils.data.Dataset):
    def __init__(self, seed: int, n: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 16, generator=g)
        self.y = self.x[:, :4].sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def tensor_bytes(t: torch.Tensor) -> bytes:
    flat = torch.as_tensor(t).detach().contiguous()
    return ctypes.string_at(flat.data_ptr(), flat.numel() * flat.element_size())


def digest(module: torch.nn.Module, opt: torch.optim.Optimizer) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor_bytes(t))
    for index, state in sorted(opt.state_dict()["state"].items()):
        for key, value in sorted(state.items()):
            h.update(f"{index}.{key}".encode())
            h.update(tensor_bytes(value))
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batches", type=int, default=12, help="batches per epoch per rank")
    parser.add_argument("--step-time", type=float, default=0.05)
    parser.add_argument("--eval-batches", type=int, default=2, help="per rank, each evaluation")
    parser.add_argument("--eval-batch-time", type=float, default=0.0,
                        help="seconds per batch of the first evaluation")
    parser.add_argument("--no-hpt", action="store_true", help="the same trainer without hpt")
    args = parser.parse_args()

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch = 8
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=batch, per_device_eval_batch_size=batch,
            num_train_epochs=args.epochs, learning_rate=0.01, seed=0, data_seed=0,
            eval_strategy="epoch", save_strategy="no", logging_strategy="epoch", report_to=[],
            use_cpu=True, ddp_backend="gloo" if world > 1 else None, disable_tqdm=True,
            remove_unused_columns=False, dataloader_num_workers=0,
        )
        set_seed(0)  # the model's initial weights (the Trainer seeds only after they exist)
        trainer = Trainer(
            model=Regressor(args.step_time, args.eval_batches, args.eval_batch_time), args=targs,
            train_dataset=Rows(1, batch * args.batches * world),
            eval_dataset=Rows(2, batch * args.eval_batches * world),
            callbacks=[] if args.no_hpt else [HptCallback()],
        )
        resume = None if args.no_hpt else resume_from(trainer)
        trainer.train(resume_from_checkpoint=resume)
        if targs.process_index == 0:
            print(f"final sha256 {digest(trainer.model, trainer.optimizer)}", flush=True)


if __name__ == "__main__":
    main()
