"""Benchmark of the in-process snapshot engine against memcpy, torch.save and DCP async_save.

Run:  python tests/bench/bench_snapshot.py --params 50e6      (default 320e6: ~3.84 GB with Adam)

A GPT-like model (embedding, pre-LN transformer blocks, untied head) in fp32 with Adam state is
trained on random tokens on the CPU. Printed as JSON lines (one per measurement, medians of
--runs runs):

- memcpy: `Tensor.copy_` of one buffer as large as the snapshot (torch's own threads);
- hpt: blocking time of `Checkpointer.save` (first save, which also gets the buffers, and steady
  state), time until the copies are done and until the snapshot is committed (checksums
  included), copy bandwidth, for a MemorySink and a ShmSink;
- step: median training step time without saves and with a save after every step (the step
  includes the optimizer pre-hook's wait), and the inflation;
- restore: `Checkpointer.restore` into a fresh model and optimizer;
- torch.save: blocking time of `torch.save` of model+optimizer state to --out-dir;
- dcp.async_save: the blocking part (staging) and the total, single process (no_dist).

Never collected by pytest (no test_ prefix); never asserts timings.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hpt.ckpt import Checkpointer, MemorySink, ShmSink
from hpt.ckpt.engine import DEFAULT_NUM_THREADS  # noqa: E402


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def make_model(params: float, vocab: int, seq: int) -> GPT:
    d = 512 if params <= 60e6 else 768 if params <= 200e6 else 1024
    layers = max(1, round((params - 2 * vocab * d) / (12 * d * d)))
    return GPT(vocab, d, layers, heads=d // 64, seq=seq)


def median_time(fn: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def emit(**fields: Any) -> None:
    print(
        json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in fields.items()}),
        flush=True,
    )


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    n = sum(t.nbytes for t in model.state_dict().values())
    for s in opt.state.values():
        n += sum(t.nbytes for t in s.values() if isinstance(t, torch.Tensor))
    return n


def bench_memcpy(total: int, runs: int) -> None:
    src = torch.empty(total, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src).fill_(0)
    t = median_time(lambda: dst.copy_(src), runs)
    emit(bench="memcpy", bytes=total, s=t, GBps=total / t / 1e9)


def bench_hpt(
    sink_name: str,
    sink: Any,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    train_step: Callable[[], None],
    total: int,
    args: argparse.Namespace,
) -> None:
    ckpt = Checkpointer(model, opt, sink=sink, num_threads=args.threads)
    blocking, copy_s, complete_s = [], [], []
    step = 0
    for i in range(args.runs + 1):
        step += 1
        t0 = time.perf_counter()
        ckpt.save(step)
        t1 = time.perf_counter()
        ckpt.wait_copied()
        t2 = time.perf_counter()
        ckpt.wait()
        t3 = time.perf_counter()
        if i == 0:
            emit(
                bench="hpt_first_save",
                sink=sink_name,
                blocking_s=t1 - t0,
                copy_s=t2 - t0,
                complete_s=t3 - t0,
            )
            continue
        blocking.append(t1 - t0)
        copy_s.append(t2 - t0)
        complete_s.append(t3 - t0)
    c = statistics.median(copy_s)
    emit(
        bench="hpt_save",
        sink=sink_name,
        blocking_s=statistics.median(blocking),
        copy_s=c,
        complete_s=statistics.median(complete_s),
        copy_GBps=total / c / 1e9,
        checksum_and_commit_s=statistics.median(complete_s) - c,
    )

    # step time with a save after every step (copies overlap the next forward/backward)
    def step_and_save() -> None:
        nonlocal step
        train_step()
        step += 1
        ckpt.save(step)

    ckpt.wait()
    # Measured back to back with plain steps: a shared machine drifts over minutes.
    plain_step = median_time(train_step, args.runs)
    saved_step = median_time(step_and_save, args.runs)
    ckpt.wait()
    emit(
        bench="step",
        saves=True,
        sink=sink_name,
        s=saved_step,
        plain_s=plain_step,
        inflation_pct=100 * (saved_step - plain_step) / plain_step,
    )

    # restore into a fresh model and optimizer (what a restarted rank does)
    ckpt.close()
    times = []
    for _ in range(max(1, args.runs // 2)):
        fresh = make_model(args.params, args.vocab, args.seq)
        fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-4)
        restorer = Checkpointer(fresh, fresh_opt, sink=sink)
        t0 = time.perf_counter()
        restorer.restore()
        times.append(time.perf_counter() - t0)
        restorer.close()
        del fresh, fresh_opt, restorer
        gc.collect()
    t = statistics.median(times)
    emit(bench="restore", sink=sink_name, where="same process", s=t, GBps=total / t / 1e9)
    if isinstance(sink, ShmSink):
        # What a restarted rank does: a new process maps the files and restores from them.
        for _ in range(max(1, args.runs // 2)):
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--restore-child",
                    sink.prefix,
                    "--params",
                    str(args.params),
                    "--vocab",
                    str(args.vocab),
                    "--seq",
                    str(args.seq),
                ],
                check=True,
                timeout=600,
            )
        sink.close(unlink=True)
    else:
        sink.close()


def restore_child(args: argparse.Namespace) -> None:
    """Restore from a ShmSink in a fresh process, as a restarted rank would."""
    model = make_model(args.params, args.vocab, args.seq)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    sink = ShmSink(args.restore_child)
    with Checkpointer(model, opt, sink=sink) as ckpt:
        t0 = time.perf_counter()
        ckpt.restore()
        t = time.perf_counter() - t0
    total = state_bytes(model, opt)
    emit(bench="restore", sink="shm", where="new process", s=t, GBps=total / t / 1e9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=320e6)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=DEFAULT_NUM_THREADS)
    ap.add_argument(
        "--out-dir", default=None, help="where torch.save / DCP write (default: a temp dir)"
    )
    ap.add_argument("--skip", default="", help="comma list of: shm,torch_save,dcp")
    ap.add_argument("--restore-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if args.restore_child:
        restore_child(args)
        return

    torch.manual_seed(0)
    model = make_model(args.params, args.vocab, args.seq)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1))

    def train_step() -> None:
        opt.zero_grad(set_to_none=False)
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.reshape(-1, args.vocab), tokens[:, 1:].reshape(-1)).backward()
        opt.step()

    train_step()  # creates the Adam state
    train_step()  # and warms up the allocator
    nparams = sum(p.numel() for p in model.parameters())
    total = state_bytes(model, opt)
    emit(
        bench="config",
        params=nparams,
        state_bytes=total,
        torch=torch.__version__,
        cpus=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        hpt_threads=args.threads,
    )

    bench_memcpy(total, args.runs)

    # -- training steps without saves -----------------------------------------------------
    base_step = median_time(train_step, args.runs)
    emit(bench="step", saves=False, s=base_step)

    # -- hpt --------------------------------------------------------------------------------
    sinks: list[tuple[str, Callable[[], Any]]] = [("memory", MemorySink)]
    prefix = f"hpt-bench-{uuid.uuid4().hex[:8]}"
    if "shm" not in skip:
        sinks.append(("shm", lambda: ShmSink(prefix)))
    for sink_name, make_sink in sinks:
        bench_hpt(sink_name, make_sink(), model, opt, train_step, total, args)
        gc.collect()

    # -- torch.save and DCP ---------------------------------------------------------------
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="hpt-bench-")
    try:
        if "torch_save" not in skip:
            path = os.path.join(out_dir, "ckpt.pt")

            def torch_save() -> None:
                torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)

            t = median_time(torch_save, args.runs)
            emit(bench="torch.save", dir=out_dir, blocking_s=t, GBps=total / t / 1e9)
            os.unlink(path)
        if "dcp" not in skip:
            import torch.distributed.checkpoint as dcp

            blocking, totals = [], []
            for i in range(args.runs):
                ckpt_dir = os.path.join(out_dir, f"dcp-{i}")
                t0 = time.perf_counter()
                fut = dcp.async_save(
                    {"model": model.state_dict(), "optim": opt.state_dict()},
                    checkpoint_id=ckpt_dir,
                    no_dist=True,
                )
                t1 = time.perf_counter()
                (fut.upload_completion if hasattr(fut, "upload_completion") else fut).result()
                t2 = time.perf_counter()
                blocking.append(t1 - t0)
                totals.append(t2 - t0)
                shutil.rmtree(ckpt_dir)
                gc.collect()
            emit(
                bench="dcp.async_save",
                dir=out_dir,
                blocking_s=statistics.median(blocking),
                total_s=statistics.median(totals),
                first_blocking_s=blocking[0],
            )
    finally:
        if args.out_dir is None:
            shutil.rmtree(out_dir, ignore_errors=True)
        ShmSink.remove(prefix)


if __name__ == "__main__":
    main()
