"""The disk restore source over global checkpoints: containment (no symlink followed, retention
deletes only what hpt wrote) and the trust boundary (hpt never unpickles DCP's .metadata)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from hpt.ckpt import Checkpointer, MemorySink, fmt
from hpt.ckpt.disk import DiskSource
from hpt.ckpt.errors import CorruptCheckpointError, PersistError
from hpt.ckpt.manifest import FileEntry, Manifest, hash_file
from hpt.ckpt.sources import RestoreTarget, restore_chain


def _job(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    return model, opt


def _persist_snapshot(root: Path, step: int, seed: int, rank_dir: bool = True) -> dict:
    """Persist a Checkpointer snapshot the way the agent does; returns the model state."""
    model, opt = _job(seed)
    sink = MemorySink()
    with Checkpointer(model, opt, sink=sink) as ckpt:
        ckpt.save(step)
        ckpt.wait()
        snap = sink.read(sink.latest())
        tensors = {e.fqn: snap.buffer[e.offset:e.offset + e.nbytes].view(e.torch_dtype)
                   .view(e.shape).clone() for e in snap.layout.entries}
        meta = {"step": step, "rank": 0, "world_size": 1, "layout": snap.layout.to_json(),
                "meta_json": snap.meta_json}
        fmt.persist(root / "rank-00000" if rank_dir else root, step, tensors, meta, keep_last=1)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _restore(root: Path) -> tuple[int, list[str], dict]:
    model, opt = _job(99)
    ckpt = Checkpointer(model, opt)
    events: list[str] = []
    outcome = restore_chain([DiskSource(root)], RestoreTarget(0, 1), check=ckpt.check_state,
                            apply=ckpt.apply_state, on_event=lambda k, m: events.append(m))
    ckpt.close()
    return outcome.step, events, model.state_dict()


def _recompute_manifest(path: Path) -> None:
    """What an attacker with write access does after editing files: a manifest that matches."""
    old = Manifest.from_json((path / fmt.MANIFEST_NAME).read_bytes())
    files = []
    for f in old.files:
        size, digest = hash_file(path / f.name, old.hash_algo)
        files.append(FileEntry(f.name, size, digest))
    new = Manifest(version=old.version, step=old.step, hash_algo=old.hash_algo,
                   files=tuple(files), tensors=old.tensors,
                   metadata_digest=next(f.digest for f in files if f.name == ".metadata"),
                   created_unix_s=old.created_unix_s)
    (path / fmt.MANIFEST_NAME).write_bytes(new.to_json())


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.marker, "w"))


def test_a_planted_metadata_pickle_with_a_recomputed_manifest_is_never_unpickled(
    tmp_path: Path,
) -> None:
    root = tmp_path / "persist"
    want = _persist_snapshot(root, 5, seed=1)
    path = root / fmt.step_dir_name(5)
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    _recompute_manifest(path)
    fmt.verify(path)  # the attacker's manifest is consistent: only the trust boundary protects
    step, events, got = _restore(root)
    assert (step, events) == (5, [])
    assert all(torch.equal(got[k], want[k]) for k in want)
    fmt.load_verified(path)
    assert not marker.exists(), "hpt unpickled DCP's .metadata"


def test_a_planted_pickle_in_a_data_file_is_refused_by_weights_only_loading(
    tmp_path: Path,
) -> None:
    root = tmp_path / "persist"
    _persist_snapshot(root, 5, seed=1)
    path = root / fmt.step_dir_name(5)
    marker = tmp_path / "pwned"
    data = next(path.glob("*.distcp"))
    data.write_bytes(pickle.dumps(_Evil(marker)) + b"\0" * data.stat().st_size)
    _recompute_manifest(path)
    step, events, _ = _restore(root)
    assert step == 0 and "disk: step 5: CorruptCheckpointError" in events[0]
    assert not marker.exists()


def test_a_symlinked_rank_directory_is_not_followed_and_retention_stays_inside(
    tmp_path: Path,
) -> None:
    # Before: the agent's persister wrote into persist/rank-00000 and followed it when it was a
    # symlink; retention then deleted step- directories outside the persist directory.
    outside = tmp_path / "outside"
    victim = outside / fmt.step_dir_name(1)
    victim.mkdir(parents=True)
    (victim / "precious").write_bytes(b"x")
    root = tmp_path / "persist"
    root.mkdir()
    (root / "rank-00000").symlink_to(outside, target_is_directory=True)
    for step in (2, 3, 4):
        _persist_snapshot(root, step, seed=step)
    assert (victim / "precious").read_bytes() == b"x"
    assert sorted(p.name for p in outside.iterdir()) == [fmt.step_dir_name(1)]
    assert fmt.step_dir_name(4) in {p.name for p in root.iterdir()}


def test_symlinked_step_directories_and_files_are_skipped_and_never_deleted(
    tmp_path: Path,
) -> None:
    root = tmp_path / "persist"
    want = _persist_snapshot(root, 3, seed=3, rank_dir=False)
    outside = tmp_path / "outside"
    shutil.copytree(root / fmt.step_dir_name(3), outside / fmt.step_dir_name(9))
    link = root / fmt.step_dir_name(9)
    link.symlink_to(outside / fmt.step_dir_name(9), target_is_directory=True)
    step, events, got = _restore(root)
    assert step == 3 and "disk: step 9" in events[0] and "symlink" in events[0]
    assert all(torch.equal(got[k], want[k]) for k in want)
    # retention after a newer checkpoint leaves the link (hpt did not write it) and its target
    _persist_snapshot(root, 10, seed=10, rank_dir=False)
    assert link.is_symlink() and (outside / fmt.step_dir_name(9) / fmt.MANIFEST_NAME).exists()
    assert not (root / fmt.step_dir_name(3)).exists()
    # a data file swapped for a symlink to the same bytes is refused too
    path = root / fmt.step_dir_name(10)
    data = next(path.glob("*.distcp"))
    copy = tmp_path / "copy.bin"
    shutil.copyfile(data, copy)
    data.unlink()
    data.symlink_to(copy)
    with pytest.raises(CorruptCheckpointError, match="not a regular file"):
        DiskSource(root).load(10, RestoreTarget(0, 1))


def test_a_symlinked_staging_directory_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "persist"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / ".stage-step-0000000007-w2-a0").symlink_to(outside, target_is_directory=True)
    layout_tensors = {"w": torch.ones(3)}
    from hpt.ckpt.layout import build_layout
    layout = build_layout([("w", torch.float32, (3,))])
    with pytest.raises(PersistError, match="not a real directory"):
        fmt.persist_part(root, 7, layout_tensors, rank=0, world_size=2, layout=layout,
                         meta={}, keep_last=1)
    assert list(outside.iterdir()) == []


def test_parts_of_a_step_are_published_only_when_every_rank_wrote_its_part(
    tmp_path: Path,
) -> None:
    from hpt.ckpt.layout import ShardInfo, build_layout

    full = torch.arange(10.0)
    for rank, (lo, n) in enumerate([(0, 6), (6, 4)]):
        info = {"w": ShardInfo((10,), (lo,), (n,))}
        layout = build_layout([("w", torch.float32, (n,)), ("rng", torch.uint8, (2,))], info)
        out = fmt.persist_part(tmp_path, 3, {"w": full[lo:lo + n], "rng": torch.full((2,), rank,
                               dtype=torch.uint8)}, rank=rank, world_size=2, layout=layout,
                               meta={"rank": rank}, keep_last=1)
        published = out == tmp_path / fmt.step_dir_name(3)
        assert published == (rank == 1)
    tensors, meta = fmt.load_verified(tmp_path / fmt.step_dir_name(3))
    assert torch.equal(tensors["w"], full) and meta == {"rank": 0}
    assert torch.equal(tensors["hpt.rank00001/rng"], torch.full((2,), 1, dtype=torch.uint8))
    index = json.loads((tmp_path / fmt.step_dir_name(3) / fmt.META_NAME).read_bytes())
    assert [r["meta"] for r in index["ranks"]] == [{"rank": 0}, {"rank": 1}]
    assert sorted(p.name for p in tmp_path.iterdir()) == [fmt.step_dir_name(3)]


@pytest.mark.parametrize("name", ["uint16", "uint32", "uint64", "float8_e4m3fnuz",
                                  "float8_e5m2fnuz", "float8_e4m3fn", "float8_e5m2"])
def test_every_snapshot_dtype_persists_and_loads_bitwise(tmp_path: Path, name: str) -> None:
    # Before: layout.py and manifest.py had two dtype tables; these snapshotted, then failed
    # to persist.
    dtype = getattr(torch, name, None)
    if dtype is None:
        pytest.skip(f"torch has no {name}")
    raw = torch.arange(64, dtype=torch.uint8)
    t = raw.view(dtype) if dtype.itemsize == 1 else raw.view(torch.uint8).view(dtype)
    sink = MemorySink()
    from hpt.ckpt import SnapshotEngine
    engine = SnapshotEngine(sink)
    engine.save(1, {"t": t})
    engine.close()
    snap = sink.read(sink.latest())
    e = snap.layout.entries[0]
    tensors = {e.fqn: snap.buffer[e.offset:e.offset + e.nbytes].view(e.torch_dtype).view(e.shape)}
    fmt.persist_part(tmp_path, 1, tensors, rank=0, world_size=1, layout=snap.layout, meta={},
                     keep_last=1)
    loaded, _ = fmt.load_verified(tmp_path / fmt.step_dir_name(1))
    assert loaded["t"].dtype == dtype
    assert torch.equal(loaded["t"].view(torch.uint8), t.view(torch.uint8))
