"""A data-parallel training loop (gloo) that injects the fault its environment asks for.

Every rank does ``--step-time`` seconds of "compute" (a sleep plus a small matmul), then one
all_reduce of its gradient, then ``hpt.step``. Knobs (see ``tests/faults/faults.py``), each
active only in attempt ``FI_ATTEMPT`` (default 1) so that the restarted attempt runs clean:

- ``FI_SLOW_RANK`` / ``FI_SLOW_FACTOR``: that rank's compute takes FACTOR x as long;
- ``FI_STOP_RANK`` / ``FI_STOP_STEP``: that rank SIGSTOPs itself at that step;
- ``FI_STALL_RANK`` / ``FI_STALL_STEP``: that rank never enters the step's all_reduce (it
  blocks before it), so its peers wait in a collective it is missing from;
- ``FI_SPIN_RANK`` / ``FI_SPIN_STEP``: that rank spins in a regular expression that
  backtracks catastrophically: C code that holds the GIL the whole time.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import threading
import time

import torch
import torch.distributed as dist

import hpt


def knob(name: str, default: int = -1) -> int:
    return int(os.environ.get(name, default))


def spin_holding_the_gil() -> None:
    # (a+)+$ against "aaa...b" tries 2^n ways to split the a's; _sre never releases the GIL.
    re.match(r"(a+)+$", "a" * 64 + "b")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--step-time", type=float, default=0.05)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ctx = hpt.init()
    active = ctx.attempt == knob("FI_ATTEMPT", 1)
    rank = ctx.rank
    slow = float(os.environ.get("FI_SLOW_FACTOR", "1")) if knob("FI_SLOW_RANK") == rank else 1.0
    w = torch.ones(64, 64)
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(rank))
    never = threading.Event()
    for step in range(args.steps):  # no checkpoint: every attempt starts over
        with hpt.section("compute"):
            time.sleep(args.step_time * (slow if active else 1.0))  # the simulated work
            grad = (x @ w).sum(dim=0)
        if active and step == knob("FI_STOP_STEP") and rank == knob("FI_STOP_RANK"):
            os.kill(os.getpid(), signal.SIGSTOP)
        if active and step == knob("FI_SPIN_STEP") and rank == knob("FI_SPIN_RANK"):
            spin_holding_the_gil()
        if active and step == knob("FI_STALL_STEP") and rank == knob("FI_STALL_RANK"):
            never.wait(3600)  # stuck before the all_reduce: the peers wait in it
        if dist.is_initialized():
            dist.all_reduce(grad)
        w -= 1e-6 * grad.unsqueeze(0)
        hpt.step(step + 1)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
