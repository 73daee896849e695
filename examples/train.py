"""Demo training job: a small MLP on synthetic data, data parallel over gloo, deterministic.

Every rank draws its batch for step ``s`` from a generator seeded by (seed, s, rank), so the
data position is just the step number; dropout draws from the global RNG, so a restore must
bring the RNG back too. Gradients are averaged with all_reduce. ``hpt.Checkpointer`` snapshots
model, optimizer (Adam), the data position and every RNG after each step; after a fault the
next attempt resumes from the newest snapshot complete on every rank. Rank 0 prints the
SHA-256 of the final model and optimizer state so runs can be compared bit for bit.

``--shard`` keeps parameters and optimizer state sharded the way ZeRO-3 and FSDP do: every
parameter flattened into one vector, each rank holding and updating only its slice (declared to
the checkpointer with ``shards=``), the slices gathered back into the model before each
forward. A node lost then takes state no other node holds: it is decoded from parity, and a
resize cuts the old slices into the new world's. ``--hsdp G`` shards the same way within each
group of G consecutive ranks (a node's, with G its ranks) and replicates across the groups
(HSDP): a lost node's slices are on every other node, and its coded snapshot leaves them out.

    hptctl submit -n 2 -p 2 -- python examples/train.py --steps 40
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import time

import torch
import torch.distributed as dist

import hpt
from hpt.ckpt import ShardInfo


def build_model(seed: int, hidden: int = 64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(32, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.1),
        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1),
    )


class DataPosition:
    """Where the data stream is: the user state a real loader/sampler would checkpoint."""

    def __init__(self) -> None:
        self.samples_seen = 0

    def state_dict(self) -> dict[str, int]:
        return {"samples_seen": self.samples_seen}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.samples_seen = int(state["samples_seen"])


def batch(seed: int, step: int, rank: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
    x = torch.randn(size, 32, generator=g)
    y = x[:, :4].sum(dim=1, keepdim=True) + 0.1 * torch.randn(size, 1, generator=g)
    return x, y


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The tensor's raw bytes, without numpy (the CPU torch wheel does not pull it in)."""
    flat = t.detach().contiguous()
    return ctypes.string_at(flat.data_ptr(), flat.numel() * flat.element_size())


class FlatShard(torch.nn.Module):
    """This rank's slice of ``model``'s parameters flattened into one vector (ZeRO-3/FSDP):
    the optimizer updates the slice; ``load_into_model`` gathers every rank's slice back into
    the model's parameters, ``reduce_grads`` averages the model's gradients and keeps the
    slice's part. Slices are as even as the world allows (the first ranks' may be one
    shorter)."""

    def __init__(self, model: torch.nn.Module, rank: int, world: int, group: int = 0) -> None:
        super().__init__()
        self._model = [model]  # (a list: the model is not part of this module's state)
        self.world = world
        group = group or world  # ranks one copy of the state is sliced over
        if world % group:
            raise ValueError(f"--hsdp ({group}) must divide the world size ({world})")
        self.group, self.rank = group, rank % group  # the slice this rank holds
        self.pg = None
        if 1 < group < world:  # every rank makes every group, in the same order
            for first in range(0, world, group):
                pg = dist.new_group(list(range(first, first + group)))
                if first <= rank < first + group:
                    self.pg = pg
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        self.total = flat.numel()
        self.bounds = [self.total * r // group for r in range(group + 1)]
        lo, hi = self.bounds[self.rank], self.bounds[self.rank + 1]
        self.flat = torch.nn.Parameter(flat[lo:hi].clone())

    def shards(self) -> dict[str, ShardInfo]:
        lo = self.bounds[self.rank]
        return {"flat": ShardInfo((self.total,), (lo,), (self.flat.numel(),))}

    def gather(self, piece: torch.Tensor) -> torch.Tensor:
        """The whole vector whose slice on this rank is ``piece`` (a collective of its group)."""
        if self.group == 1:
            return piece.detach().clone()
        sizes = [self.bounds[r + 1] - self.bounds[r] for r in range(self.group)]
        padded = torch.zeros(max(sizes), dtype=piece.dtype)
        padded[:piece.numel()] = piece.detach()
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=self.pg)
        return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])

    def load_into_model(self) -> None:
        whole = self.gather(self.flat)
        with torch.no_grad():
            at = 0
            for p in self._model[0].parameters():
                p.copy_(whole[at:at + p.numel()].view_as(p))
                at += p.numel()

    def reduce_grads(self) -> None:
        grad = torch.cat([p.grad.reshape(-1) for p in self._model[0].parameters()])
        if self.world > 1:
            dist.all_reduce(grad)
            grad /= self.world
        self.flat.grad = grad[self.bounds[self.rank]:self.bounds[self.rank + 1]].clone()

    def digest(self, opt: torch.optim.Optimizer) -> str:
        """SHA-256 of the whole vector and the whole optimizer state (a collective)."""
        h = hashlib.sha256(tensor_bytes(self.gather(self.flat)))
        for key, value in sorted(opt.state[self.flat].items()):
            whole = (self.gather(value) if torch.is_tensor(value)
                     and value.shape == self.flat.shape else torch.as_tensor(value))
            h.update(key.encode())
            h.update(tensor_bytes(whole))
        return h.hexdigest()


def state_digest(model: torch.nn.Module, opt: torch.optim.Optimizer) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor_bytes(p))
    for index, state in sorted(opt.state_dict()["state"].items()):
        for key, value in sorted(state.items()):
            h.update(f"{index}.{key}".encode())
            h.update(tensor_bytes(torch.as_tensor(value)))
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-time", type=float, default=0.1,
                        help="seconds each step takes at least (makes the demo watchable)")
    parser.add_argument("--pace-file", default="",
                        help="--step-time holds only while this file exists; once it is gone "
                        "the steps run unpaced (a harness that needs the job alive for a while, "
                        "then done)")
    parser.add_argument("--no-ckpt", action="store_true", help="do not snapshot")
    parser.add_argument("--save-every", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=64, help="width of the hidden layers")
    parser.add_argument("--shard", action="store_true",
                        help="shard parameters and optimizer state across the ranks (ZeRO-3)")
    parser.add_argument("--hsdp", type=int, default=0, metavar="G",
                        help="shard across each group of G ranks, replicate across groups")
    parser.add_argument("--first-step-file", default="",
                        help="rank 0 appends '<restart count> <wall time>' after its first step "
                        "(benchmarks compare runners with it)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    ctx = hpt.init()
    world = dist.get_world_size() if dist.is_initialized() else 1
    model = build_model(args.seed, args.hidden)
    shard = FlatShard(model, ctx.rank, world, args.hsdp) if args.shard or args.hsdp else None
    saved: torch.nn.Module = shard if shard is not None else model
    opt = torch.optim.Adam(saved.parameters(), lr=0.01)
    position = DataPosition()
    torch.manual_seed(args.seed * 7919 + ctx.rank)  # dropout masks differ per rank
    ckpt = None
    start = 0
    if not args.no_ckpt:
        ckpt = hpt.Checkpointer(saved, opt, extra_state={"data": position},
                                every=args.save_every,
                                shards=shard.shards() if shard is not None else None)
        start = ckpt.restore()
        if start:
            print(f"rank {ctx.rank} resumed at step {start}", flush=True)
    for step in range(start, args.steps):
        started = time.monotonic()
        assert position.samples_seen == step * 64, "data position must match the step"
        x, y = batch(args.seed, step, ctx.rank)
        position.samples_seen += x.shape[0]
        if shard is not None:
            shard.load_into_model()
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        if shard is not None:
            model.zero_grad()  # (the model's parameters are not the optimizer's)
        loss.backward()
        if shard is not None:
            shard.reduce_grads()
        elif world > 1:
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        if ckpt is not None:
            ckpt.save(step + 1)
        hpt.step(step + 1)
        if args.first_step_file and ctx.rank == 0 and step == start:
            with open(args.first_step_file, "a") as f:
                f.write(f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')} {time.time()}\n")
        if ctx.rank == 0 and (step + 1) % 10 == 0:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.4f}", flush=True)
        left = args.step_time - (time.monotonic() - started)
        if left > 0 and (not args.pace_file or os.path.exists(args.pace_file)):
            time.sleep(left)  # pacing of the demo workload, not a wait on anything
    # After the last step: the final save and teardown take as long as they take, not a step
    # (without the section the agent would call a slow one a hang).
    with hpt.section("finish", timeout=300):
        if ckpt is not None:
            ckpt.close()
        digest = shard.digest(opt) if shard is not None else state_digest(model, opt)
        if ctx.rank == 0:
            print(f"final sha256 {digest}", flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
