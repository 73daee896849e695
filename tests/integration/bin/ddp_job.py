"""A DDP job (gloo, CPU) whose bucket all-reduces hpt reports; optionally one rank skips a backward
(first attempt only).

``--skip-rank R --skip-step S``: rank R skips its backward (and optimizer step) at step S, as a
rank with an empty batch would; afterwards its all-reduces pair with its peers' previous ones,
and at the end its peers wait in an all-reduce it never enters. It then idles, alive, so the
collective detector (not a crash) must name it.
"""

from __future__ import annotations

import argparse
import threading

import torch
import torch.distributed as dist

import hpt
from hpt.integrations.ddp import report_bucket_allreduces


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip-rank", type=int, default=-1)
    parser.add_argument("--skip-step", type=int, default=-1)
    parser.add_argument("--step-time", type=float, default=0.05)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ctx = hpt.init()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 1))
    report_bucket_allreduces(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pause = threading.Event()  # never set: pacing only
    for step in range(args.steps):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step * 100 + ctx.rank))
        loss = model(x).pow(2).mean()
        if ctx.attempt == 1 and ctx.rank == args.skip_rank and step == args.skip_step:
            print(f"rank {ctx.rank} skips the backward of step {step}", flush=True)
        else:
            opt.zero_grad()
            loss.backward()
            opt.step()
        hpt.step(step + 1)
        pause.wait(args.step_time)
    if ctx.attempt == 1 and ctx.rank == args.skip_rank:
        print(f"rank {ctx.rank} done, one all-reduce short; idling", flush=True)
        pause.wait(600)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
