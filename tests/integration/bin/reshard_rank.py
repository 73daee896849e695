"""One rank of a job that restores a row-sharded model (ZeRO-style) through hpt.Checkpointer.

Launched by tests/unit/ckpt/test_reshard_ranks.py as WORLD_SIZE processes on gloo (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT and the HPT_RESTORE_* / HPT_PERSIST_DIR variables in the
environment).
The model is `sharded_model(rank, world)` below: a row-sharded body and a replicated head, Adam.
Each rank restores, then writes what it holds to OUT/rank-R.pt (read back with
``torch.load(weights_only=True)``) and OUT/rank-R.json (step, source, skipped).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import hpt
from hpt.ckpt.layout import ShardInfo, shard_dim0

ROWS, COLS = 10, 3


class GlobalPosition:
    """The data position as a global sample count: the same on every rank, any world size."""

    def __init__(self) -> None:
        self.global_samples = 0

    def state_dict(self) -> dict[str, int]:
        return {"global_samples": self.global_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.global_samples = int(state["global_samples"])


def sharded_model(rank: int, world: int) -> tuple[torch.nn.Module, dict[str, ShardInfo]]:
    info_w = shard_dim0((ROWS, COLS), rank, world)
    info_b = shard_dim0((ROWS,), rank, world)
    model = torch.nn.ModuleDict({
        "body": torch.nn.Linear(COLS, info_w.local_shape[0]),
        "head": torch.nn.Linear(COLS, 2),
    })
    return model, {"body.weight": info_w, "body.bias": info_b}


def main() -> None:
    out = Path(sys.argv[1])
    ctx = hpt.init()
    model, shards = sharded_model(ctx.rank, ctx.world_size)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    position = GlobalPosition()
    ckpt = hpt.Checkpointer(model, opt, extra_state={"position": position}, shards=shards)
    outcome = ckpt.restore_outcome()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    for name, p in model.named_parameters():
        for key, value in opt.state.get(p, {}).items():
            state[f"optim.{name}.{key}"] = value
    torch.save(state, out / f"rank-{ctx.rank}.pt")
    (out / f"rank-{ctx.rank}.json").write_text(json.dumps({
        "step": outcome.step, "source": outcome.source, "skipped": list(outcome.skipped),
        "global_samples": position.global_samples, "rng": torch.get_rng_state()[:16].tolist(),
    }))
    ckpt.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
