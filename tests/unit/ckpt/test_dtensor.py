"""DTensor state in snapshots: FSDP2 ``fully_shard`` on CPU/gloo, two real processes.

Phase 1 (world 2): train, snapshot step 3 into files that outlive the process (no ``shards=``:
the Checkpointer reads the placements), train 2 more steps, record the result; the processes end
(the kill). Phase 2 (world 2, a fresh model with other weights): restore step 3 from those
files, train the same 2 steps: bitwise the same weights and Adam moments. Phase 3 (world 1, in
this process): reshard the two ranks' snapshots by their recorded global offsets: bitwise the
full tensors phase 1 had at step 3.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hpt.ckpt import dtensor
from hpt.ckpt.checkpointer import Checkpointer
from hpt.ckpt.layout import ShardInfo, TensorEntry
from hpt.ckpt.restore import reshard
from hpt.ckpt.sink import ShmSink

pytest.importorskip("torch.distributed.fsdp")
from torch.distributed.fsdp import fully_shard  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    # 5 output rows: an uneven split over 2 ranks (3 + 2), as torch.chunk does
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int) -> None:
    for s in steps:
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(s * 10 + rank))
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def _full(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.full_tensor() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for key, v in st.items():
            if dtensor.is_dtensor(v):
                out[f"optim.{names[id(p)]}.{key}"] = v.full_tensor()
    return out


def _worker(rank: int, world: int, port: int, tmp: str, phase: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                           world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        model = _model(0 if phase == "save" else 1234)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        sink = ShmSink(f"dt-r{rank}", directory=tmp)
        ckpt = Checkpointer(model, opt, sink=sink)
        if phase == "save":
            _train(model, opt, range(3), rank)
            ckpt.save(3)
            ckpt.wait()
            full = _full(model, opt)  # a collective: every rank
            if rank == 0:
                torch.save(full, f"{tmp}/step3.pt")
        else:
            assert ckpt.restore() == 3
        _train(model, opt, range(3, 5), rank)
        result = _full(model, opt)
        ckpt.close()
        sink.close()
        if rank == 0:
            torch.save(result, f"{tmp}/{phase}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(fn, *args) -> None:  # type: ignore[no-untyped-def]
    # fork: the children start with torch imported (spawn re-imports it, seconds each)
    mp.start_processes(fn, args=args, nprocs=2, join=True, start_method="fork")


def _run(tmp: Path, phase: str) -> dict[str, torch.Tensor]:
    _spawn(_worker, 2, _port(), str(tmp), phase)
    return torch.load(tmp / f"{phase}.pt", weights_only=True)


@pytest.mark.timeout(300)
def test_fully_shard_snapshot_restores_bitwise_and_reshards_to_one_rank(tmp_path):
    saved = _run(tmp_path, "save")
    restored = _run(tmp_path, "restore")
    assert saved.keys() == restored.keys() and len(saved) == 4 + 2 * 4
    for k in saved:
        assert torch.equal(saved[k], restored[k]), k

    # world 1: cut the whole tensors out of both ranks' pieces by their global offsets
    step3 = torch.load(tmp_path / "step3.pt", weights_only=True)
    sources = []
    for rank in range(2):
        sink = ShmSink(f"dt-r{rank}", directory=tmp_path)
        snap = sink.read(sink.latest())
        assert snap.step == 3
        sources.append((snap.layout, snap.buffer))
        entry = snap.layout.entry("model.2.weight")
        assert entry.global_shape == (5, 16)
        assert (entry.global_offset, tuple(entry.shape)) == (((0, 0), (3, 16)) if rank == 0
                                                             else ((3, 0), (2, 16)))

    # the split an agent reports for these ranks (the controller names a resize's old ranks
    # from it): torch.chunk over the world, as DTensor Shard(0) cuts (5 rows: 3 + 2)
    from hpt.ckpt.sources import even_split

    for layouts in ({0: sources[0][0]}, {1: sources[1][0]}, dict(enumerate(s[0] for s in sources))):
        split = even_split(layouts, 2)
        assert split is not None and "chunk" in split.splits and split.sizes == {5, 16}, split
        assert "floor" not in split.splits  # (5 * 1 // 2 = 2 would start rank 1's rows at 2)

    def whole(e: TensorEntry, rank: int, world: int) -> ShardInfo:
        return ShardInfo(e.global_shape, (0,) * len(e.global_shape), e.global_shape)

    layout, tensors = reshard(sources, 0, 1, placement=whole)
    got = {e.fqn: t for e, t in zip(layout.entries, tensors, strict=True)}
    for k, v in step3.items():
        fqn = k if k.startswith("model.") else "optim.state." + k.removeprefix("optim.")
        assert torch.equal(got[fqn], v), fqn


def test_localize_records_placements_and_refuses_partial(tmp_path):
    _spawn(_placements_worker, _port())


def _placements_worker(rank: int, port: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                           world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        full = torch.arange(35.0).reshape(7, 5)
        state = {"a": distribute_tensor(full, mesh, [Shard(1)]),
                 "b": [distribute_tensor(full, mesh, [Replicate()]), 3], "c": torch.ones(2)}
        local, shards = dtensor.localize(state, "model")
        assert shards["model.a"] == ShardInfo((7, 5), (0, 3 * rank), (7, 3 - rank))
        assert shards["model.b.0"] == ShardInfo((7, 5), (0, 0), (7, 5))
        assert torch.equal(local["a"], full[:, 3 * rank: 3 * rank + 3 - rank])
        assert local["b"][1] == 3 and local["c"] is state["c"]
        partial = DTensor.from_local(full, mesh, [Partial()])
        with pytest.raises(ValueError, match=r"model\.p: placement P\(sum\) .*only Shard and Replicate"):
            dtensor.localize({"p": partial}, "model")
    finally:
        dist.destroy_process_group()
