"""Persistence bandwidth: `persist` (DCP files + hashed manifest + fsync + atomic rename)
against a raw fsync'd write of the same bytes, the physical limit of the disk.

Not a test (pytest does not collect it). Prints one JSON line per measurement, the median of
several runs. Verification and loading read back through the page cache.

    python tests/bench/bench_persist.py [--dir /tmp] [--mib 1024] [--runs 3]
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hpt.ckpt.fmt import load_verified, persist, verify
from hpt.ckpt.manifest import hash_files


def _median_s(fn: Callable[[int], object], runs: int) -> float:
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _raw_write(path: Path, tensors: list[torch.Tensor]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for t in tensors:
            view = _bytes_view(t)
            while view:
                view = view[os.write(fd, view[: 64 << 20]) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _bytes_view(t: torch.Tensor) -> memoryview:
    nbytes = t.numel() * t.element_size()
    return memoryview((ctypes.c_ubyte * nbytes).from_address(t.data_ptr())).cast("B")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write")
    parser.add_argument("--mib", type=int, default=1024, help="checkpoint size, MiB")
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    per = (args.mib << 20) // args.tensors // 4
    gen = torch.Generator().manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(per, generator=gen) for i in range(args.tensors)}
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    work = Path(tempfile.mkdtemp(prefix="hpt-bench-persist-", dir=args.dir))
    common = {"bytes": nbytes, "runs": args.runs, "dir": str(work)}

    def emit(op: str, seconds: float, **extra: object) -> None:
        row = {"bench": "persist", "op": op, **common, **extra}
        row.update(median_s=round(seconds, 4), gbps=round(nbytes / seconds / 1e9, 3))
        print(json.dumps(row), flush=True)

    try:
        raw = work / "raw.bin"
        emit(
            "raw_write_fsync", _median_s(lambda i: _raw_write(raw, list(state.values())), args.runs)
        )
        raw.unlink()
        root = work / "ckpts"
        for threads in (1, 2, 4):
            write = functools.partial(persist, root, keep_last=1, thread_count=threads)
            emit(
                "persist",
                _median_s(lambda i, write=write: write(i, state, {"step": i}), args.runs),
                dcp_threads=threads,
            )
        path = persist(root, 99, state, {"step": 99}, keep_last=1)
        files = [p for p in path.iterdir()]
        emit("hash_only_sha256", _median_s(lambda i: hash_files(files, "sha256"), args.runs))
        emit("verify", _median_s(lambda i: verify(path), args.runs))
        emit("load_verified", _median_s(lambda i: load_verified(path), args.runs))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
