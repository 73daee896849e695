"""Cost of hpt's monitoring: rank-side hooks and controller-side detectors.

Run: ``python tests/bench/bench_hook_overhead.py [--steps N] [--runs R]``. Prints JSON lines:

- ``train_step``: median step time of a small CPU gloo (world size 1) training loop with a few
  all_reduce per step, without and with ``hpt._instrument`` installed (timer driven each step,
  records handed to a sink that keeps them), and the overhead ratio.
- ``hook_call``: per-call cost of the collective wrapper, measured on a wrapped no-op and on a
  real 1-element all_reduce.
- ``detectors``: CPU seconds per 1,000 timing records through the straggler and collective
  detectors (and JSON decoding of the records, which the controller also pays).

Figures are medians over ``--runs`` runs; this is a benchmark, never a test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from hpt import _instrument as ins
from hpt.monitor.detectors.collective import CollectiveDetector
from hpt.monitor.detectors.straggler import StragglerDetector
from hpt.monitor.records import CollectiveRecord, StepRecord, decode_line, encode_line


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def train_loop(steps: int, timer: ins.StepTimer | None) -> float:
    """Median seconds per step of a small MLP, gradients all-reduced one tensor at a time."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(128, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 128), torch.randint(0, 10, (32,))
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        if timer is not None:
            timer.begin_step(step)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        for p in model.parameters():  # 6 all_reduce per step
            dist.all_reduce(p.grad)
        opt.step()
        if timer is not None:
            timer.end_step(step)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[steps // 10 :])


def per_call_s(fn: Callable[[], Any], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def bench_training(steps: int, runs: int) -> None:
    kept: list[dict[str, Any]] = []
    without, with_hooks = [], []
    train_loop(steps // 4, None)  # warm up
    for _ in range(runs):  # interleave so drift hits both alike
        without.append(train_loop(steps, None))
        timer = ins.install("bench", 0, 0, "node", kept.extend)
        try:
            with_hooks.append(train_loop(steps, timer))
        finally:
            ins.uninstall()
        kept.clear()
    a, b = statistics.median(without), statistics.median(with_hooks)
    emit(
        bench="train_step",
        steps=steps,
        runs=runs,
        all_reduce_per_step=6,
        without_s=round(a, 7),
        with_s=round(b, 7),
        overhead_ratio=round(b / a, 4),
        overhead_us_per_step=round((b - a) * 1e6, 2),
    )


def bench_hook_call(runs: int) -> None:
    n = 20_000
    sink: list[dict[str, Any]] = []
    timer = ins.StepTimer("bench", 0, 0, "node", sink.extend, max_buffered=n + 1)
    t = torch.ones(1)

    def noop(tensor: Any, op: Any = None, group: Any = None, async_op: bool = False) -> None:
        return None

    wrapped = ins._make_wrapper(timer, "all_reduce", noop)
    bare, hooked = [], []
    for _ in range(runs):
        bare.append(per_call_s(lambda: noop(t), n))
        hooked.append(per_call_s(lambda: wrapped(t), n))
        timer.flush()
        sink.clear()
    wrapper_s = statistics.median(hooked) - statistics.median(bare)

    real_bare, real_hooked = [], []
    m = 2_000
    for _ in range(runs):
        real_bare.append(per_call_s(lambda: dist.all_reduce(t), m))
        timer2 = ins.install("bench", 0, 0, "node", sink.extend, max_buffered=m + 1)
        try:
            real_hooked.append(per_call_s(lambda: dist.all_reduce(t), m))
            t0 = time.perf_counter()
            timer2.flush()
            flush_s = (time.perf_counter() - t0) / m
        finally:
            ins.uninstall(flush=False)
        sink.clear()
    emit(
        bench="hook_call",
        wrapper_us=round(wrapper_s * 1e6, 3),
        all_reduce_1elem_us=round(statistics.median(real_bare) * 1e6, 2),
        all_reduce_1elem_hooked_us=round(statistics.median(real_hooked) * 1e6, 2),
        flush_us_per_record=round(flush_s * 1e6, 3),
    )


def synthetic_records(num_ranks: int, num_steps: int, colls_per_step: int) -> tuple[list, list]:
    rng = random.Random(0)
    steps, colls = [], []
    seq = 0
    for s in range(num_steps):
        for r in range(num_ranks):
            c = 0.1 * (1 + rng.uniform(-0.03, 0.03)) * (1.3 if r == 3 else 1.0)
            steps.append(
                StepRecord(
                    job_id="j",
                    attempt=0,
                    rank=r,
                    node=f"n{r // 8}",
                    step=s,
                    start_s=s,
                    end_s=s + 0.15,
                    data_wait_s=0.0,
                    compute_s=c,
                )
            )
        for _ in range(colls_per_step):
            for r in range(num_ranks):
                enter = seq + rng.uniform(0, 0.002) + (0.01 if r == 3 else 0.0)
                colls.append(
                    CollectiveRecord(
                        job_id="j",
                        attempt=0,
                        rank=r,
                        node=f"n{r // 8}",
                        seq=seq,
                        op="all_reduce",
                        nbytes=1 << 20,
                        enter_s=enter,
                        exit_s=seq + 0.02,
                    )
                )
            seq += 1
    return steps, colls


def cpu_per_1000(records: list, make: Callable[[], Any], batch: int, runs: int) -> float:
    samples = []
    for _ in range(runs):
        det = make()
        t0 = time.process_time()
        for i in range(0, len(records), batch):
            det.observe(records[i : i + batch], now=float(i))
        samples.append((time.process_time() - t0) / len(records) * 1000)
    return statistics.median(samples)


def bench_detectors(runs: int) -> None:
    for num_ranks in (8, 64, 512):
        num_steps = max(4, 20_000 // num_ranks)
        steps, colls = synthetic_records(num_ranks, num_steps, colls_per_step=1)
        lines = [encode_line(r) for r in steps[:5000]]
        decode = []
        for _ in range(runs):
            t0 = time.process_time()
            for line in lines:
                decode_line(line)
            decode.append((time.process_time() - t0) / len(lines) * 1000)
        emit(
            bench="detectors",
            ranks=num_ranks,
            records=len(steps),
            straggler_cpu_s_per_1000=round(
                cpu_per_1000(steps, StragglerDetector, num_ranks, runs), 5
            ),
            collective_cpu_s_per_1000=round(
                cpu_per_1000(colls, CollectiveDetector, num_ranks, runs), 5
            ),
            decode_json_cpu_s_per_1000=round(statistics.median(decode), 5),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            bench_training(args.steps, args.runs)
            bench_hook_call(args.runs)
        finally:
            dist.destroy_process_group()
    bench_detectors(args.runs)


if __name__ == "__main__":
    main()
