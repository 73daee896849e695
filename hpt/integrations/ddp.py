"""DDP's gradient all-reduces, visible to hpt's collective detector.

DDP's reducer all-reduces gradient buckets from C++, past the ``torch.distributed`` functions
that :mod:`hpt._instrument` wraps, so a rank that skips a backward is invisible to the C4-style
"rank missing from a stuck collective" check. :func:`report_bucket_allreduces` registers a
communication hook that does what DDP's default does (divide the bucket by the group size,
asynchronous all-reduces) through ``torch.distributed.all_reduce`` looked up at call time:
under ``hpt.init()`` that is the instrumented wrapper, so every all-reduce of a bucket is a
collective record with its sequence number, in flight until its future completes. It reduces
each gradient of the bucket on its own (see ``_allreduce_bucket``: bitwise restarts), trading
DDP's one large all-reduce per bucket for several smaller ones.

    model = DistributedDataParallel(model)
    hpt.integrations.ddp.report_bucket_allreduces(model)

Register before the first backward (DDP allows one hook per model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["report_bucket_allreduces"]


@dataclass(frozen=True, slots=True)
class _HookState:
    group: Any
    """The DDP model's process group; None for the default group (so records carry a seq)."""
    world_size: int


def report_bucket_allreduces(model: torch.nn.parallel.DistributedDataParallel) -> None:
    """Route ``model``'s bucket all-reduces through ``torch.distributed.all_reduce``.

    Raises:
        ValueError: ``model`` is not a DistributedDataParallel.
        RuntimeError: a communication hook is already registered (DDP's own error).
    """
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise ValueError(f"model ({type(model).__name__}) must be a DistributedDataParallel")
    group = model.process_group
    default = dist.distributed_c10d._get_default_group()
    state = _HookState(group=None if group is default else group,
                       world_size=dist.get_world_size(group))
    model.register_comm_hook(state, _allreduce_bucket)


def _allreduce_bucket(state, bucket):  # type: ignore[no-untyped-def]
    # no annotations: DDP compares them with the real types, and this module's are strings
    buffer = bucket.buffer()
    buffer.div_(state.world_size)
    # One all-reduce per gradient (views into the bucket), not one per bucket: DDP rebuilds its
    # buckets after the first iteration of every process, so a restarted process reduces with
    # another bucket layout than the run it replaces at the same step, and where an element sits
    # in the buffer decides its summation order across more than two ranks. Per gradient, the
    # order depends on the gradient alone, and a restore stays bitwise.
    # dist.all_reduce is looked up now, not at import: hpt.init() may have wrapped it since.
    works = [dist.all_reduce(g, group=state.group, async_op=True) for g in bucket.gradients()]
    done = torch.futures.collect_all([w.get_future() for w in works])
    return done.then(lambda _: buffer)
