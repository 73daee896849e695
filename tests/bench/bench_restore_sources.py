"""Restore time per source of the restore chain, for the same bytes.

One model (a row-sharded Linear and Adam: 3 x the parameter bytes) is snapshotted by an old
world of 4 ranks; then one rank restores the WHOLE state (world 1) from each source in turn:

- memory: a snapshot of the whole state in this process (MemorySink): verify + load;
- shm: the same snapshot in shared-memory files (ShmSink): map, verify, load;
- peers: the 4 old ranks' snapshots in shared memory, resharded 4 -> 1 by global offsets;
- disk: the global DCP checkpoint those 4 ranks persisted (the agent's path), read back through
  the page cache (hash of every needed file, torch.load(weights_only) of each piece, assemble).

Each time is the median of --runs restores through `restore_chain` into the live model (the
chain's checks and the copy into the parameters included); ratios are against memory, measured
in the same run. Not a test (pytest does not collect it); prints one JSON line per source.

    python tests/bench/bench_restore_sources.py [--mib 64] [--runs 5] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import torch

from hpt.ckpt import Checkpointer, MemorySink, ShmSink, fmt
from hpt.ckpt.disk import DiskSource
from hpt.ckpt.layout import shard_dim0
from hpt.ckpt.sources import (
    LocalAgreement,
    RestoreSource,
    RestoreTarget,
    ShardRef,
    ShardSetSource,
    SinkSource,
    restore_chain,
)

OLD_WORLD = 4
COLS = 1024


def model_for(rows: int, rank: int, world: int) -> tuple[torch.nn.Module, dict]:
    info = shard_dim0((rows, COLS), rank, world)
    model = torch.nn.Linear(COLS, info.local_shape[0], bias=False)
    return model, ({"weight": info} if world > 1 else {})


def trained(model: torch.nn.Module, full: torch.Tensor, lo: int) -> torch.optim.Optimizer:
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    with torch.no_grad():
        model.weight.copy_(full[lo:lo + model.weight.shape[0]])
    model.weight.grad = torch.ones_like(model.weight)
    opt.step()
    return opt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="parameter MiB (state is 3x)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = args.mib * (1 << 20) // (4 * COLS)
    full = torch.randn(rows, COLS)
    tag = f"hpt-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="hpt-bench-restore-"))
    prefixes = [f"{tag}-r{r}" for r in range(OLD_WORLD)]
    whole_prefix = f"{tag}-whole"
    try:
        # the old world's snapshots, and their persisted global checkpoint
        for rank, prefix in enumerate(prefixes):
            model, shards = model_for(rows, rank, OLD_WORLD)
            opt = trained(model, full, shards["weight"].global_offset[0])
            sink = ShmSink(prefix)
            with Checkpointer(model, opt, sink=sink, shards=shards) as ckpt:
                ckpt.save(1)
                ckpt.wait()
                snap = sink.read(sink.latest())
                tensors = {e.fqn: snap.buffer[e.offset:e.offset + e.nbytes].view(e.torch_dtype)
                           .view(e.shape) for e in snap.layout.entries}
                fmt.persist(root, 1, tensors, {"rank": rank, "world_size": OLD_WORLD,
                                               "layout": snap.layout.to_json(),
                                               "meta_json": snap.meta_json}, keep_last=1)
        # the whole state once, in process memory and in shared memory
        model, _ = model_for(rows, 0, 1)
        opt = trained(model, full, 0)
        memory = MemorySink()
        whole_shm = ShmSink(whole_prefix)
        for sink in (memory, whole_shm):
            with Checkpointer(model, opt, sink=sink) as ckpt:
                ckpt.save(1)
        state_bytes = memory.read(memory.latest()).layout.total_bytes

        target_model, _ = model_for(rows, 0, 1)
        target_opt = torch.optim.Adam(target_model.parameters(), lr=0.1)
        ckpt = Checkpointer(target_model, target_opt)
        target = RestoreTarget(0, 1, placement=ckpt._placement)
        sources: dict[str, RestoreSource] = {
            "memory": SinkSource(memory, "memory"),
            "shm": SinkSource(whole_shm, "shm", step=1),
            "peers": ShardSetSource(1, OLD_WORLD, "/dev/shm",
                                    {r: ShardRef(p, 0) for r, p in enumerate(prefixes)}),
            "disk": DiskSource(root),
        }
        results = {}
        for name, source in sources.items():
            times = []
            for _ in range(args.runs):
                with torch.no_grad():
                    target_model.weight.zero_()
                t0 = time.perf_counter()
                outcome = restore_chain([source], target, check=ckpt.check_state,
                                        apply=ckpt.apply_state, agreement=LocalAgreement())
                times.append(time.perf_counter() - t0)
                assert outcome.step == 1 and torch.equal(target_model.weight, model.weight), name
            results[name] = statistics.median(times)
        for name, seconds in results.items():
            print(json.dumps({
                "bench": "restore_source", "source": name, "state_bytes": state_bytes,
                "median_s": round(seconds, 4), "gb_per_s": round(state_bytes / seconds / 1e9, 2),
                "x_memory": round(seconds / results["memory"], 2),
                "runs": args.runs, "old_world": OLD_WORLD, "new_world": 1,
            }))
        ckpt.close()
        memory.close()
    finally:
        for prefix in [*prefixes, whole_prefix]:
            ShmSink.remove(prefix)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
