"""A PyTorch Lightning job under hpt: a small MLP, DDP over gloo, deterministic.

The only hpt lines are the callback and the resumable loader wrapper. Rank 0 prints the SHA-256
of the final model and optimizer state so a run that recovered from a fault can be compared with
a clean one bit for bit.

    hptctl submit -n 2 -p 2 -- python examples/lightning_train.py --epochs 2
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import time

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from hpt.integrations.lightning import HptCallback, ResumableLoader


class Regressor(pl.LightningModule):
    def __init__(self, step_time: float, val_batch_time: float) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 1)
        )
        self.step_time = step_time
        self.val_batch_time = val_batch_time

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        started = time.monotonic()
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        left = self.step_time - (time.monotonic() - started)
        if left > 0:
            time.sleep(left)  # pacing of the workload, not a wait on anything
        return loss

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        if self.val_batch_time > 0 and self.current_epoch == 0:
            time.sleep(self.val_batch_time)  # a slow first evaluation, as the hang test needs
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        opt = torch.optim.Adam(self.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def dataset(seed: int, n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    return TensorDataset(x, x[:, :4].sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g))


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
    parser.add_argument("--val-batches", type=int, default=2)
    parser.add_argument("--val-batch-time", type=float, default=0.0,
                        help="seconds each validation batch of the first epoch takes")
    parser.add_argument("--no-hpt", action="store_true", help="the same trainer without hpt")
    args = parser.parse_args()

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    pl.seed_everything(0, workers=True, verbose=False)
    model = Regressor(args.step_time, args.val_batch_time)
    batch = 8
    train = dataset(1, batch * args.batches * world)
    sampler = DistributedSampler(train, num_replicas=world, rank=int(os.environ.get("RANK", "0")),
                                 shuffle=True, seed=0)
    loader = DataLoader(train, batch_size=batch, sampler=sampler,
                        generator=torch.Generator().manual_seed(0))
    val = DataLoader(dataset(2, batch * args.val_batches), batch_size=batch)
    callbacks = [] if args.no_hpt else [HptCallback()]
    trainer = pl.Trainer(
        accelerator="cpu", devices=local, num_nodes=world // local,
        strategy=pl.strategies.DDPStrategy(process_group_backend="gloo") if world > 1 else "auto",
        max_epochs=args.epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    train_loader = loader if args.no_hpt else ResumableLoader(loader)
    trainer.fit(model, train_dataloaders=train_loader, val_dataloaders=val)
    # Lightning keeps training after a SIGTERM (its handler only sets a flag): a rank the agent
    # stopped must not print a final state for the attempt that replaced it
    if trainer.global_rank == 0 and not trainer.received_sigterm and not trainer.interrupted:
        print(f"final sha256 {digest(model, trainer.optimizers[0])}", flush=True)


if __name__ == "__main__":
    main()
