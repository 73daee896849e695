"""A rank that snapshots into a ShmSink and then hangs in the middle of a copy.

Run as ``python _snapshot_writer.py PREFIX``: trains `STEPS` deterministic steps with a snapshot
after each, holds the last snapshot's copies half done, prints ``BLOCKED`` and waits to be
killed. test_shm.py imports `make_job` and `train_step` from this file to compute the state the
surviving snapshot must hold.
"""

from __future__ import annotations

import sys
import threading

import torch

STEPS = 3
CHUNK_BYTES = 4096


def make_job() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(4, 16, generator=g)
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def main(prefix: str) -> None:
    from hpt.ckpt import Checkpointer, ShmSink, SnapshotEngine

    blocked, never = threading.Event(), threading.Event()

    def hold_last_snapshot(step: int, task: int) -> None:
        if step == STEPS and task == 1:  # task 0 has copied: the buffer is half overwritten
            blocked.set()
            never.wait()

    model, opt = make_job()
    sink = ShmSink(prefix)
    ckpt = Checkpointer(model, opt, sink=sink)
    ckpt.engine.close()
    ckpt.engine = SnapshotEngine(
        sink, num_threads=1, chunk_bytes=CHUNK_BYTES, before_copy=hold_last_snapshot
    )
    for step in range(1, STEPS + 1):
        train_step(model, opt, step)
        ckpt.save(step)
        if step < STEPS:
            ckpt.wait()
    if not blocked.wait(60):
        sys.exit("copy never started")
    print("BLOCKED", flush=True)
    never.wait()


if __name__ == "__main__":
    main(sys.argv[1])
