"""Erasure-coding throughput: ISA-L vs the torch codec vs a memcpy of the same bytes.

Not a test (pytest does not collect it). Prints one JSON line per measurement, the median of
several runs. Throughput counts the data bytes (k shards) processed per second.

    python tests/bench/bench_codec.py [--mib 256] [--k 4] [--m 2] [--runs 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from hpt.ckpt.codec import Codec, IsalCodec, TorchCodec

Emit = Callable[..., None]


def _median_s(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm-up: tables, page faults
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="data bytes per stripe, MiB")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--m", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="device for the torch codec")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    k, m = args.k, args.m
    shard = (args.mib << 20) // k
    data_bytes = shard * k
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 256, (shard,), dtype=torch.uint8, generator=gen) for _ in range(k)]
    common = {"k": k, "m": m, "bytes": data_bytes, "runs": args.runs, "threads": args.threads}

    def emit(impl: str, op: str, seconds: float, **extra: object) -> None:
        row = {"bench": "codec", "impl": impl, "op": op, **common, **extra}
        row.update(median_s=round(seconds, 5), gbps=round(data_bytes / seconds / 1e9, 3))
        print(json.dumps(row), flush=True)

    _bench_memcpy(data, args.runs, emit)
    reference: list[torch.Tensor] = []
    try:
        _bench_codec(IsalCodec(), data, m, args.runs, emit, reference)
    except OSError as exc:
        print(json.dumps({"bench": "codec", "impl": "isal", "skipped": str(exc)}), flush=True)
    on_dev = [d.to(args.device) for d in data]
    _bench_codec(TorchCodec(), on_dev, m, args.runs, emit, reference)


def _bench_memcpy(data: list[torch.Tensor], runs: int, emit: Emit) -> None:
    src = torch.cat(data)
    dst = torch.empty_like(src)
    emit("memcpy", "copy", _median_s(lambda: dst.copy_(src), runs), device="cpu")


def _bench_codec(
    codec: Codec, data: list[torch.Tensor], m: int, runs: int, emit: Emit, reference: list[Any]
) -> None:
    k, device = len(data), data[0].device
    parity = [torch.empty_like(data[0]) for _ in range(m)]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    emit(
        codec.name,
        "encode",
        _median_s(lambda: (codec.encode(data, parity), sync()), runs),
        device=str(device),
    )
    if not reference:
        reference.extend(p.cpu() for p in parity)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(parity, reference, strict=True))
    lost = min(m, k)  # the expensive case: m data shards gone
    stripe = [None] * lost + data[lost:] + parity
    out = [torch.empty_like(data[0]) if i < lost else None for i in range(k + m)]
    emit(
        codec.name,
        "decode",
        _median_s(lambda: (codec.decode(stripe, k, m, out=out), sync()), runs),
        device=str(device),
        lost=lost,
    )
    assert all(torch.equal(out[i], data[i]) for i in range(lost))


if __name__ == "__main__":
    main()
