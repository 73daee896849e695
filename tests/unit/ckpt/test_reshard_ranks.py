"""Restore onto another world size with real ranks (gloo on CPU): the restore chain's peers
source (HPT_RESTORE_SHARDS) and disk source reshard a row-sharded model and its Adam state by
global offsets; the re-assembled global tensors equal the snapshot bit for bit.

No cluster: the ranks are started here, so these run with the unit tests (beside the cluster
tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from hpt.ckpt import Checkpointer, ShmSink, fmt
from tests.integration.cluster import rendezvous

BIN = Path(__file__).resolve().parents[2] / "integration" / "bin"
sys.path.insert(0, str(BIN))
from reshard_rank import ROWS, GlobalPosition, sharded_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
STEP = 6
OLD_WORLD = 4


def old_world_snapshots(prefixes: list[str], step: int = STEP,
                        seed: int = 3) -> dict[str, torch.Tensor]:
    """Snapshots of an old world of len(prefixes) ranks, written as the ranks would (ShmSink
    files); returns the global tensors they hold together."""
    old_world = len(prefixes)
    torch.manual_seed(seed)
    full = {"body.weight": torch.randn(ROWS, 3), "body.bias": torch.randn(ROWS),
            "head.weight": torch.randn(2, 3), "head.bias": torch.randn(2)}
    grads = {k: torch.randn_like(v) for k, v in full.items()}
    global_state: dict[str, torch.Tensor] = {}
    for rank, prefix in enumerate(prefixes):
        model, shards = sharded_model(rank, old_world)
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                info = shards.get(name)
                lo = info.global_offset[0] if info else 0
                p.copy_(full[name][lo:lo + p.shape[0]])
                p.grad = grads[name][lo:lo + p.shape[0]].clone()
        opt.step()
        position = GlobalPosition()
        position.global_samples = step * 64 * old_world
        torch.manual_seed(100 + rank)  # each old rank has its own RNG stream
        with Checkpointer(model, opt, sink=ShmSink(prefix), shards=shards,
                          extra_state={"position": position}) as ckpt:
            ckpt.save(step)
        for name, p in model.named_parameters():
            for key in ("exp_avg", "exp_avg_sq", "step"):
                piece = opt.state[p][key]
                if name in shards and key != "step":
                    prev = global_state.get(f"optim.{name}.{key}")
                    global_state[f"optim.{name}.{key}"] = (
                        piece.clone() if prev is None else torch.cat([prev, piece]))
                else:
                    global_state[f"optim.{name}.{key}"] = piece.clone()
            if name in shards:
                prev = global_state.get(f"model.{name}")
                global_state[f"model.{name}"] = (
                    p.detach().clone() if prev is None else torch.cat([prev, p.detach()]))
            else:
                global_state[f"model.{name}"] = p.detach().clone()
    return global_state


def run_ranks(world: int, out: Path, env: dict[str, str], timeout_s: float = 240) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    logs = []
    with rendezvous(world) as store_env:
        for rank in range(world):
            rank_env = {**os.environ, **env, **store_env, "RANK": str(rank),
                        "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                        "PYTHONPATH": str(ROOT)}
            for name in ("HPT_AGENT_SOCKET", "HPT_SNAPSHOT_PREFIX"):
                rank_env.pop(name, None)
            procs.append(subprocess.Popen(
                [sys.executable, str(BIN / "reshard_rank.py"), str(out)], env=rank_env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        _communicate(procs, logs, timeout_s)
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(world)]


def _communicate(procs: list[subprocess.Popen[str]], logs: list[str], timeout_s: float) -> None:
    """Each rank's output into ``logs``; every rank reaped, killed at the deadline."""
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout_s)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("ranks did not finish: " + " | ".join(p.communicate()[0][-2000:] for p in procs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def gathered(out: Path, world: int) -> dict[str, torch.Tensor]:
    """The new ranks' tensors put back together: sharded ones concatenated in rank order."""
    per_rank = [torch.load(out / f"rank-{r}.pt", weights_only=True) for r in range(world)]
    result: dict[str, Any] = {}
    for name in per_rank[0]:
        if ".body." in name and not name.endswith(".step"):
            result[name] = torch.cat([s[name] for s in per_rank])
        else:
            assert all(torch.equal(s[name], per_rank[0][name]) for s in per_rank), name
            result[name] = per_rank[0][name]
    return result


def assert_bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name].reshape(-1).view(torch.uint8),
                           want[name].reshape(-1).view(torch.uint8)), name


@pytest.fixture
def old_shards():
    prefixes = [f"hpt-it-{os.getpid()}-{uuid.uuid4().hex[:6]}-r{r}" for r in range(OLD_WORLD)]
    try:
        yield prefixes, old_world_snapshots(prefixes)
    finally:
        for p in prefixes:
            ShmSink.remove(p)


def shards_env(prefixes: list[str], ranks: list[int] | None = None) -> dict[str, str]:
    ranks = list(range(OLD_WORLD)) if ranks is None else ranks
    doc = {"step": STEP, "world_size": OLD_WORLD, "dir": "/dev/shm",
           "shards": {str(r): {"prefix": prefixes[r], "generation": 0} for r in ranks}}
    return {"HPT_RESTORE_STEP": str(STEP),
            "HPT_RESTORE_SHARDS": json.dumps(doc, separators=(",", ":"))}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 3])
def test_peer_shards_of_a_world_of_4_restore_onto_fewer_ranks_bitwise(tmp_path, old_shards,
                                                                       world):
    prefixes, want = old_shards
    results = run_ranks(world, tmp_path / "out", shards_env(prefixes))
    assert [(r["step"], r["source"]) for r in results] == [(STEP, "peers")] * world
    assert {r["global_samples"] for r in results} == {STEP * 64 * OLD_WORLD}
    # unsharded state of new rank r comes from old rank r: its own RNG stream
    rngs = [r["rng"] for r in results]
    assert len({tuple(x) for x in rngs}) == world
    assert_bitwise(gathered(tmp_path / "out", world), want)


def persist_like_the_agent(root: Path, prefixes: list[str], step: int) -> None:
    """What each agent's Persister does with a rank's snapshot (agent/snapshots.py): copy it out
    of shared memory and call fmt.persist on the rank's directory with the snapshot meta."""
    for rank, prefix in enumerate(prefixes):
        sink = ShmSink(prefix)
        snap = sink.read(next(r for r in sink.held() if r.step == step))
        private = snap.buffer.clone()
        tensors = {e.fqn: private[e.offset:e.offset + e.nbytes].view(e.torch_dtype).view(e.shape)
                   for e in snap.layout.entries}
        meta = {"step": step, "rank": rank, "world_size": len(prefixes), "job_id": "j",
                "node": "n", "layout": snap.layout.to_json(), "meta_json": snap.meta_json}
        fmt.persist(root / f"rank-{rank:05d}", step, tensors, meta, keep_last=3)


@pytest.fixture
def persisted(tmp_path, old_shards):
    prefixes, want = old_shards
    root = tmp_path / "persist"
    persist_like_the_agent(root, prefixes, STEP)
    return root, want


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 3])
def test_a_global_checkpoint_of_a_world_of_4_restores_onto_fewer_ranks_bitwise(tmp_path,
                                                                              persisted, world):
    root, want = persisted
    # one global checkpoint; the agent's rank directories stay empty (its persisted-step report)
    assert [p.name for p in root.iterdir() if p.name.startswith(("step-", "."))] == [
        fmt.step_dir_name(STEP)]
    assert all(not any(p.iterdir()) for p in root.iterdir() if p.name.startswith("rank-"))
    results = run_ranks(world, tmp_path / "out", {"HPT_PERSIST_DIR": str(root)})
    assert [(r["step"], r["source"]) for r in results] == [(STEP, "disk")] * world
    assert {r["global_samples"] for r in results} == {STEP * 64 * OLD_WORLD}
    assert_bitwise(gathered(tmp_path / "out", world), want)


def test_plain_dcp_load_reshards_the_global_checkpoint_without_hpt(persisted):
    root, want = persisted
    path = root / fmt.step_dir_name(STEP)
    for world in (2, 3):
        for rank in range(world):
            # a new rank's box of the row-sharded weight, as a plain dcp.load user asks for it
            model, shards = sharded_model(rank, world)
            info = shards["body.weight"]
            full = torch.zeros(info.global_shape)
            state = {"model.body.weight": full, "model.head.weight": torch.zeros(2, 3),
                     "optim.state.body.weight.exp_avg": torch.zeros(info.global_shape)}
            dcp.load(state, checkpoint_id=path, no_dist=True)
            lo, n = info.global_offset[0], info.local_shape[0]
            assert torch.equal(full[lo:lo + n], want["model.body.weight"][lo:lo + n])
            assert torch.equal(state["model.head.weight"], want["model.head.weight"])
            assert torch.equal(state["optim.state.body.weight.exp_avg"],
                               want["optim.body.weight.exp_avg"])


def _recompute_manifest(path: Path) -> None:
    """Re-hash every listed file into a consistent manifest (what a writer of a different model,
    or anyone with write access, produces)."""
    from hpt.ckpt.manifest import FileEntry, Manifest, hash_file

    old = Manifest.from_json((path / fmt.MANIFEST_NAME).read_bytes())
    files = tuple(FileEntry(f.name, *hash_file(path / f.name, old.hash_algo)) for f in old.files)
    new = Manifest(version=old.version, step=old.step, hash_algo=old.hash_algo, files=files,
                   tensors=old.tensors, created_unix_s=old.created_unix_s,
                   metadata_digest=next(f.digest for f in files if f.name == ".metadata"))
    (path / fmt.MANIFEST_NAME).write_bytes(new.to_json())


@pytest.mark.timeout(300)
def test_ranks_agree_on_a_step_every_rank_verified_and_loaded(tmp_path):
    # Before: each rank took its own newest good checkpoint and the ranks agreed on the MIN, so
    # with rank 1's newest unusable and rank 0's second newest damaged, rank 0 loaded its
    # damaged copy of the agreed step and the job crash-looped. Now every rank checks the same
    # candidate step and all move on together until one loads everywhere.
    prefixes = [f"hpt-it-{os.getpid()}-{uuid.uuid4().hex[:6]}-r{r}" for r in range(2)]
    root = tmp_path / "persist"
    try:
        wants = {}
        for step in (4, 6, 8):
            wants[step] = old_world_snapshots(prefixes, step, seed=step)
            persist_like_the_agent(root, prefixes, step)
    finally:
        for p in prefixes:
            ShmSink.remove(p)
    # step 8 verifies but does not load on rank 1: its state is of an unknown version
    step8 = root / fmt.step_dir_name(8)
    index = json.loads((step8 / fmt.META_NAME).read_bytes())
    index["ranks"][1]["meta"]["version"] = 99
    (step8 / fmt.META_NAME).write_bytes(json.dumps(index).encode())
    _recompute_manifest(step8)
    # step 6: a byte flipped in the data file only rank 0 reads
    data = root / fmt.step_dir_name(6) / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    results = run_ranks(2, tmp_path / "out", {"HPT_PERSIST_DIR": str(root)})
    assert [(r["step"], r["source"]) for r in results] == [(4, "disk")] * 2
    skipped = [r["skipped"] for r in results]
    assert "disk: step 8: another rank could not load it" in skipped[0]
    assert any(s.startswith("disk: step 8: RestoreError") and "version 99" in s
               for s in skipped[1])
    assert any(s.startswith("disk: step 6: CorruptCheckpointError") and "__0_0.distcp" in s
               for s in skipped[0])
    assert "disk: step 6: another rank could not load it" in skipped[1]
    got = gathered(tmp_path / "out", 2)
    assert_bitwise(got, wants[4])
