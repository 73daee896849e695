"""Demo training job: a small MLP on synthetic data, data parallel over gloo, deterministic.

Every rank draws its batch for step ``s`` from a generator seeded by (seed, s, rank), so the
data position is just the step number. Gradients are averaged with all_reduce. Rank 0 prints
the SHA-256 of the final parameters so runs can be compared bit for bit.

    hptctl submit -n 2 -p 2 -- python examples/train.py --steps 40
"""

from __future__ import annotations

import argparse
import hashlib
import time

import torch
import torch.distributed as dist

import hpt


def build_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, 1),
    )


def batch(seed: int, step: int, rank: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
    x = torch.randn(size, 32, generator=g)
    y = x[:, :4].sum(dim=1, keepdim=True) + 0.1 * torch.randn(size, 1, generator=g)
    return x, y


def state_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-time", type=float, default=0.1,
                        help="seconds each step takes at least (makes the demo watchable)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    ctx = hpt.init()
    model = build_model(args.seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    world = dist.get_world_size() if dist.is_initialized() else 1
    for step in range(ctx.restore_step, args.steps):
        started = time.monotonic()
        x, y = batch(args.seed, step, ctx.rank)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        if world > 1:
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        hpt.step(step + 1)
        if ctx.rank == 0 and (step + 1) % 10 == 0:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.4f}", flush=True)
        left = args.step_time - (time.monotonic() - started)
        if left > 0:
            time.sleep(left)  # pacing of the demo workload, not a wait on anything
    if ctx.rank == 0:
        print(f"final sha256 {state_digest(model)}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
