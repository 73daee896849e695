"""A data-parallel job with an evaluation phase: ``--steps`` steps of 0.05 s (all_reduce each),
and at step ``--eval-at`` every rank evaluates for ``--eval-s`` seconds without ``hpt.step``
(inside ``hpt.section("eval", timeout=T)`` when ``--section-timeout T`` is given)."""

import argparse
import contextlib
import threading

import torch
import torch.distributed as dist

import hpt

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=40)
parser.add_argument("--eval-at", type=int, default=10)
parser.add_argument("--eval-s", type=float, default=10.0)
parser.add_argument("--section-timeout", type=float, default=0.0)
args = parser.parse_args()

hpt.init()
pace = threading.Event()  # never set: a wait that paces the job
grad = torch.ones(16)
for step in range(args.steps):
    if step == args.eval_at:
        section = (hpt.section("eval", timeout=args.section_timeout) if args.section_timeout
                   else contextlib.nullcontext())
        with section:
            pace.wait(args.eval_s)  # the evaluation: long, and no step
            dist.all_reduce(grad)
    dist.all_reduce(grad)
    pace.wait(0.05)
    hpt.step(step + 1)
with hpt.section("finish", timeout=120):
    dist.destroy_process_group()
print(f"rank {dist.get_rank() if dist.is_initialized() else '-'} done", flush=True)
