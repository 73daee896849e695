"""DTensor state (FSDP2 ``fully_shard``, tensor parallel): placements read, global offsets recorded.

A model sharded with FSDP2 or DTensor APIs has DTensor parameters, and its optimizer's state
(Adam's moments) is DTensors of the same placements. The Checkpointer snapshots the *local*
piece of each and records where it sits in the global tensor (a :class:`ShardInfo`, the same
thing ``Checkpointer(shards=...)`` takes by hand), so that restore can reshard by global offsets
(restore.py) onto another world size or mesh.

- :func:`localize` replaces every DTensor leaf of a state tree with its local tensor (an alias:
  the engine's lazy copy still sees the optimizer's in-place updates) and returns the ShardInfo of
  each, keyed by the fqn ``layout.flatten`` gives the leaf.
- :func:`shard_info` computes one DTensor's ShardInfo from its mesh coordinate and placements:
  ``Shard(d)`` splits dim ``d`` the way ``torch.chunk`` does (pieces of ``ceil(n / k)``, the last
  ones shorter or empty), nested when several mesh dims shard the same tensor dim; ``Replicate``
  keeps the dim whole. ``Partial`` (pending reductions) and strided shardings whose local shape
  does not match this rule are refused, naming the tensor.
- :func:`like` turns restored local tensors back into DTensors with the live tensor's mesh and
  placements, for ``load_state_dict`` of a sharded model or optimizer.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeGuard

import torch

from hpt.ckpt.layout import ShardInfo

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def dtensor_type() -> type[DTensor] | None:
    """The DTensor class once the process imported ``torch.distributed.tensor``, else None: no
    DTensor exists before then. Importing it here would cost every process that imports the
    checkpoint engine ~1.5 s of CPU (sympy and the op tables): an agent never needs it."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None

__all__ = ["dtensor_type", "has_dtensor", "is_dtensor", "like", "like_params", "like_state",
           "localize", "shard_info"]


def is_dtensor(value: object) -> TypeGuard[DTensor]:
    cls = dtensor_type()
    return cls is not None and isinstance(value, cls)


def has_dtensor(model: torch.nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (else a snapshot need not look for them:
    a state tree has thousands of leaves, the RNG states alone)."""
    cls = dtensor_type()
    return cls is not None and any(isinstance(p, cls) for p in model.parameters())


def shard_info(t: Any, name: str = "tensor") -> ShardInfo:
    """Where this rank's local piece of DTensor ``t`` sits in the global tensor.

    Raises:
        ValueError: a placement other than Shard/Replicate, or a local shape the rule does not
            give (an uneven strided sharding), naming ``name``.
    """
    from torch.distributed.tensor import Replicate, Shard  # t is a DTensor: it is imported

    global_shape = tuple(int(n) for n in t.shape)
    mesh = t.device_mesh
    coordinate = mesh.get_coordinate()
    local_shape = list(global_shape)
    offset = [0] * len(global_shape)
    if coordinate is None:  # this rank is not in the mesh: it holds nothing
        return ShardInfo(global_shape, (0,) * len(global_shape), (0,) * len(global_shape))
    for mesh_dim, placement in enumerate(t.placements):
        if isinstance(placement, Replicate):
            continue
        if not isinstance(placement, Shard):
            raise ValueError(f"{name}: placement {placement} on mesh dim {mesh_dim} cannot be "
                             "snapshotted (only Shard and Replicate)")
        dim = placement.dim % len(global_shape)
        parts = mesh.size(mesh_dim)
        size = local_shape[dim]
        chunk = -(-size // parts)
        start = min(chunk * coordinate[mesh_dim], size)
        local_shape[dim] = min(size, start + chunk) - start
        offset[dim] += start
    actual = tuple(int(n) for n in t.to_local().shape)
    if tuple(local_shape) != actual:
        raise ValueError(f"{name}: local shape {actual} is not the {tuple(local_shape)} that "
                         f"placements {tuple(t.placements)} give for {global_shape}")
    return ShardInfo(global_shape, tuple(offset), tuple(local_shape))


def model_shards(model: torch.nn.Module) -> dict[str, ShardInfo]:
    """ShardInfo of each DTensor entry of ``model.state_dict()``: where a restore puts them."""
    return {k: shard_info(v, k) for k, v in model.state_dict().items() if is_dtensor(v)}


def localize(tree: Any, prefix: str = "") -> tuple[Any, dict[str, ShardInfo]]:
    """``tree`` with every DTensor replaced by its local tensor, and their ShardInfos by fqn.

    Containers are rebuilt only where they hold a DTensor; everything else is returned as is.
    """
    shards: dict[str, ShardInfo] = {}

    def walk(node: Any, path: str) -> Any:
        if is_dtensor(node):
            shards[path] = shard_info(node, path)
            return node.to_local().detach()
        if isinstance(node, Mapping):
            out = {k: walk(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
            return out if any(out[k] is not node[k] for k in out) else node
        if isinstance(node, list | tuple):
            items = [walk(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(node)]
            if all(a is b for a, b in zip(items, node, strict=True)):
                return node
            return items if isinstance(node, list) else tuple(items)
        return node

    return walk(tree, prefix), shards


def like(local: torch.Tensor, live: Any) -> Any:
    """``local`` (a restored local piece) as a DTensor placed like ``live``; ``local`` itself
    when ``live`` is not a DTensor."""
    if not is_dtensor(live):
        return local
    return type(live).from_local(local.to(live.to_local().device), live.device_mesh,
                                 live.placements, run_check=False, shape=live.shape,
                                 stride=live.stride())


def like_state(saved: Mapping[str, Any], live: Mapping[str, Any]) -> dict[str, Any]:
    """A restored model state_dict with each entry placed like the live one (see :func:`like`)."""
    return {k: like(v, live[k]) if isinstance(v, torch.Tensor) and k in live else v
            for k, v in saved.items()}


def like_params(state: Mapping[int, Mapping[str, Any]],
                params: list[torch.Tensor]) -> dict[int, dict[str, Any]]:
    """Optimizer state by parameter index, each tensor shaped like its DTensor parameter's local
    piece placed like that parameter (Adam's moments); scalars such as ``step`` stay plain."""
    out: dict[int, dict[str, Any]] = {}
    for index, per_param in state.items():
        p = params[index]
        local = p.to_local().shape if is_dtensor(p) else None
        out[index] = {
            key: like(value, p)
            if local is not None and isinstance(value, torch.Tensor) and value.shape == local
            else value
            for key, value in per_param.items()
        }
    return out
