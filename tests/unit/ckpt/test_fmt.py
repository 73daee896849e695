"""On-disk checkpoint format: DCP compatibility, manifest verification, atomic publish,
retention, disk-full behaviour and the bounded background persister."""

from __future__ import annotations

import errno
import gc
import os
import pickle
import shutil
import subprocess
import threading
import uuid
import warnings
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from hpt.ckpt import fmt
from hpt.ckpt.errors import CorruptCheckpointError, PersistError
from hpt.ckpt.fmt import (
    FAULT_STAGES,
    MANIFEST_NAME,
    Persister,
    latest_good,
    load_verified,
    persist,
    step_dir_name,
    verify,
)

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 8, generator=gen)
    special = torch.tensor([float("nan"), -0.0, float("inf"), 1e-45, -1.5])
    return {
        "model.w32": torch.cat([base.flatten(), special]),
        "model.w16": torch.randn(5, 3, generator=gen).half(),
        "model.wbf16": torch.randn(4, 4, generator=gen).bfloat16(),
        "optim.step": torch.tensor(seed, dtype=torch.int64),
        "data.pos": torch.randint(-(2**62), 2**62, (7,), generator=gen),
        "model.w_t": base.t(),  # non-contiguous
        "model.w_strided": base[::2, 1::3],  # non-contiguous view of a bigger storage
        "mask": torch.rand(9, generator=gen) > 0.5,
    }


def _assert_bitwise_equal(
    got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]
) -> None:
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        assert (g.dtype, g.shape) == (w.dtype, w.shape), name
        as_int = _INT_OF_SIZE[w.element_size()]
        g_bits = g.contiguous().view(as_int) if w.dtype != torch.bool else g
        w_bits = w.contiguous().view(as_int) if w.dtype != torch.bool else w
        assert torch.equal(g_bits, w_bits), name


def _entries(root: Path) -> list[str]:
    return sorted(os.listdir(root))


def _copy_as(src: Path, step: int) -> Path:
    dst = src.with_name(step_dir_name(step))
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def two_checkpoints(tmp_path: Path) -> tuple[Path, Path]:
    """A good older checkpoint (step 10) and a good newer one (step 20) that tests damage."""
    older = persist(tmp_path, 10, _state(1), {"step": 10}, keep_last=5)
    newer = persist(tmp_path, 20, _state(2), {"step": 20}, keep_last=5)
    return older, newer


def _data_file(path: Path) -> Path:
    return next(p for p in path.iterdir() if p.suffix == ".distcp")


# --------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("thread_count", [1, 2])
def test_persist_then_load_verified_round_trips_bitwise(tmp_path: Path, thread_count: int) -> None:
    state = _state(3)
    meta = {"step": 3, "rng": {"python": [3, list(range(5)), None]}, "layout": "v1"}
    path = persist(tmp_path, 3, state, meta, keep_last=2, thread_count=thread_count)
    assert path == tmp_path / "step-0000000003"
    loaded, loaded_meta = load_verified(path)
    _assert_bitwise_equal(loaded, state)
    assert loaded_meta == meta
    assert _entries(tmp_path) == ["step-0000000003"]  # no temporary directory left


def test_plain_dcp_load_reads_an_hpt_checkpoint_without_hpt(tmp_path: Path) -> None:
    state = _state(4)
    path = persist(tmp_path, 4, state, {}, keep_last=1)
    target = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in state.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # DCP: "assuming ... single process"
        dcp.load(target, checkpoint_id=path)
    _assert_bitwise_equal(target, state)


def test_persist_replaces_an_existing_checkpoint_of_the_same_step(tmp_path: Path) -> None:
    persist(tmp_path, 5, _state(5), {"v": 1}, keep_last=3)
    path = persist(tmp_path, 5, _state(6), {"v": 2}, keep_last=3)
    loaded, meta = load_verified(path)
    _assert_bitwise_equal(loaded, _state(6))
    assert meta == {"v": 2}
    assert _entries(tmp_path) == ["step-0000000005"]


# --------------------------------------------------------------------------- damage
def test_flipped_byte_in_a_data_file_skips_to_the_previous_checkpoint(
    two_checkpoints: tuple[Path, Path],
) -> None:
    older, newer = two_checkpoints
    data = _data_file(newer)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(raw)
    good, skipped = latest_good(older.parent)
    assert good == older
    assert len(skipped) == 1 and skipped[0][0] == newer
    assert data.name in skipped[0][1] and "sha256 mismatch" in skipped[0][1]
    with pytest.raises(CorruptCheckpointError, match=data.name):
        load_verified(newer)


def test_truncated_file_is_skipped_with_its_size_as_reason(
    two_checkpoints: tuple[Path, Path],
) -> None:
    older, newer = two_checkpoints
    data = _data_file(newer)
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) - 100)
    good, skipped = latest_good(older.parent)
    assert good == older
    assert [p for p, _ in skipped] == [newer]
    assert "truncated" in skipped[0][1] and data.name in skipped[0][1]


class _Evil:
    """Unpickling this creates a file: what a planted DCP `.metadata` could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def test_malicious_metadata_pickle_is_never_unpickled(
    two_checkpoints: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    older, newer = two_checkpoints
    markers = tmp_path_factory.mktemp("markers")
    # The payload is live: unpickling a twin of it does create its marker.
    pickle.loads(pickle.dumps(_Evil(markers / "proof"))).close()
    assert (markers / "proof").exists()
    marker = markers / "pwned"
    metadata = newer / ".metadata"
    evil = pickle.dumps(_Evil(marker))
    size = metadata.stat().st_size
    assert len(evil) < size
    metadata.write_bytes(evil + b"\0" * (size - len(evil)))  # same size: only the hash can tell
    good, skipped = latest_good(older.parent)
    assert good == older
    assert ".metadata" in skipped[0][1] and "mismatch" in skipped[0][1]
    with pytest.raises(CorruptCheckpointError, match=r"\.metadata"):
        load_verified(newer)
    loaded, _ = load_verified(good)
    _assert_bitwise_equal(loaded, _state(1))
    assert not marker.exists()


def test_directory_without_manifest_is_a_torn_write_and_ignored(
    two_checkpoints: tuple[Path, Path],
) -> None:
    older, newer = two_checkpoints
    torn = _copy_as(newer, 30)
    (torn / MANIFEST_NAME).unlink()
    good, skipped = latest_good(older.parent)
    assert good == newer
    assert [p for p, _ in skipped] == [torn] and "missing (torn" in skipped[0][1]
    with pytest.raises(CorruptCheckpointError, match=MANIFEST_NAME):
        verify(torn)


def test_edited_manifest_fails_its_own_digest(two_checkpoints: tuple[Path, Path]) -> None:
    _, newer = two_checkpoints
    manifest = newer / MANIFEST_NAME
    manifest.write_text(manifest.read_text().replace('"version": 1', '"version": 1 '))
    verify(newer)  # whitespace is not content
    manifest.write_text(manifest.read_text().replace("[", "[ "))
    verify(newer)
    text = manifest.read_text()
    manifest.write_text(text.replace('"dtype": "float32"', '"dtype": "float64"', 1))
    with pytest.raises(CorruptCheckpointError, match="manifest_digest"):
        verify(newer)
    manifest.write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="invalid"):
        verify(newer)


def test_checkpoint_copied_under_another_step_name_is_rejected(
    two_checkpoints: tuple[Path, Path],
) -> None:
    _, newer = two_checkpoints
    with pytest.raises(CorruptCheckpointError, match="manifest says step 20"):
        verify(_copy_as(newer, 21))


# --------------------------------------------------------------------------- names, symlinks
def test_bad_names_are_rejected_and_ignored(two_checkpoints: tuple[Path, Path]) -> None:
    older, newer = two_checkpoints
    root = older.parent
    for name in ("step-21", "step-00000000021", "step-000000002x", "Step-0000000021", "x"):
        shutil.copytree(newer, root / name)
        with pytest.raises(ValueError, match="must be step-<10 digits>"):
            verify(root / name)
    assert latest_good(root) == (newer, [])
    for bad_step in (-1, 10**10, 1.0, True):
        with pytest.raises(ValueError, match="step"):
            persist(root, bad_step, {}, {}, keep_last=1)  # type: ignore[arg-type]


def test_symlinks_are_never_followed(
    two_checkpoints: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    older, newer = two_checkpoints
    root = older.parent
    outside = tmp_path_factory.mktemp("outside") / step_dir_name(99)
    shutil.copytree(newer, outside)
    link = root / step_dir_name(99)
    link.symlink_to(outside, target_is_directory=True)
    good, skipped = latest_good(root)
    assert good == newer
    assert skipped == [(link, skipped[0][1])] and "symlink" in skipped[0][1]
    data = _data_file(newer)
    copy = outside / "copy.bin"
    shutil.copyfile(data, copy)
    data.unlink()
    data.symlink_to(copy)  # same bytes, but through a link
    with pytest.raises(CorruptCheckpointError, match="not a regular file"):
        verify(newer)


# --------------------------------------------------------------------------- retention
def test_retention_keeps_exactly_the_newest_k(tmp_path: Path) -> None:
    for step in range(1, 7):
        persist(tmp_path, step, {"x": torch.full((4,), step)}, {}, keep_last=3)
    assert _entries(tmp_path) == [step_dir_name(s) for s in (4, 5, 6)]
    assert latest_good(tmp_path)[0] == tmp_path / step_dir_name(6)


def test_retention_never_deletes_the_checkpoint_just_written(tmp_path: Path) -> None:
    persist(tmp_path, 100, {"x": torch.ones(2)}, {}, keep_last=1)
    persist(tmp_path, 50, {"x": torch.zeros(2)}, {}, keep_last=1)  # e.g. after a rollback
    assert _entries(tmp_path) == [step_dir_name(50), step_dir_name(100)]
    persist(tmp_path, 60, {"x": torch.zeros(2)}, {}, keep_last=1)
    assert _entries(tmp_path) == [step_dir_name(60), step_dir_name(100)]


def test_retention_counts_only_intact_checkpoints(tmp_path: Path) -> None:
    for step in (1, 2):
        persist(tmp_path, step, {"x": torch.ones(2)}, {}, keep_last=2)
    (tmp_path / step_dir_name(2) / MANIFEST_NAME).unlink()  # torn
    persist(tmp_path, 3, {"x": torch.ones(2)}, {}, keep_last=2)
    # step 2 does not count, so step 1 is still one of the two newest intact ones
    assert _entries(tmp_path) == [step_dir_name(s) for s in (1, 2, 3)]
    persist(tmp_path, 4, {"x": torch.ones(2)}, {}, keep_last=2)
    assert _entries(tmp_path) == [step_dir_name(s) for s in (3, 4)]


def test_persist_sweeps_scratch_directories_of_dead_writers_only(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait(timeout=30)
    host = fmt._scratch_name("tmp", "step-0000000001").split("-")[3]
    names = {
        "dead_tmp": f".tmp-step-0000000001-{host}-{dead.pid}-0123abcd",
        "dead_old": f".old-step-0000000001-{host}-{dead.pid}-0123abce",
        "any_del": f".del-step-0000000001-otherhost-{os.getpid()}-0123abcf",
        "live_tmp": f".tmp-step-0000000001-{host}-{os.getppid()}-0123abd0",
        "other_host_tmp": f".tmp-step-0000000001-otherhost-{dead.pid}-0123abd1",
        "unrelated": ".tmp-something",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "data").write_bytes(b"x")
    persist(tmp_path, 2, {"x": torch.ones(1)}, {}, keep_last=1)
    kept = {"live_tmp", "other_host_tmp", "unrelated"}
    assert _entries(tmp_path) == sorted([names[k] for k in kept] + [step_dir_name(2)])


# --------------------------------------------------------------------------- I/O failures
@pytest.mark.parametrize("stage", FAULT_STAGES)
def test_io_error_at_any_stage_publishes_nothing_and_keeps_the_previous(
    tmp_path: Path, stage: str
) -> None:
    previous = persist(tmp_path, 1, _state(1), {"step": 1}, keep_last=1)
    persist(tmp_path, 2, _state(2), {"step": 2}, keep_last=2)

    def fail(at: str) -> None:
        if at == stage:
            raise OSError(errno.ENOSPC, "No space left on device")

    for step in (3, 2):  # a new step, and replacing an existing one
        with pytest.raises(PersistError, match="No space left on device") as info:
            persist(tmp_path, step, _state(9), {"step": 9}, keep_last=1, fault_hook=fail)
        assert isinstance(info.value.__cause__, OSError)
        assert _entries(tmp_path) == [step_dir_name(1), step_dir_name(2)]
    _assert_bitwise_equal(load_verified(previous)[0], _state(1))
    loaded, meta = load_verified(tmp_path / step_dir_name(2))
    _assert_bitwise_equal(loaded, _state(2))
    assert meta == {"step": 2}


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs CAP_SYS_ADMIN; skipped otherwise)."""
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30, check=False)


# DCP's writer threads (thread_count > 1) let the ENOSPC escape to threading.excepthook as well
# as failing the save; that is DCP's behaviour, not ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("thread_count", [1, 4])
def test_real_disk_full_publishes_nothing_and_keeps_the_previous(
    tiny_tmpfs: Path, thread_count: int
) -> None:
    root = tiny_tmpfs / "ckpts"
    small = {"x": torch.arange(1000, dtype=torch.int64)}
    previous = persist(root, 1, small, {"step": 1}, keep_last=1)
    big = {f"x{i}": torch.zeros(1 << 20, dtype=torch.uint8) for i in range(4)}  # > the tmpfs
    with pytest.raises(PersistError, match="No space left on device"):
        persist(root, 2, big, {"step": 2}, keep_last=1, thread_count=thread_count)
    assert _entries(root) == [step_dir_name(1)]
    assert latest_good(root) == (previous, [])
    _assert_bitwise_equal(load_verified(previous)[0], small)


def test_meta_that_is_not_json_is_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="meta is not JSON-safe"):
        persist(tmp_path, 1, {"x": torch.ones(1)}, {"bad": object()}, keep_last=1)
    with pytest.raises(ValueError, match="meta is not JSON-safe"):
        persist(tmp_path, 1, {"x": torch.ones(1)}, {"nan": float("nan")}, keep_last=1)
    assert not tmp_path.exists() or _entries(tmp_path) == []


def test_latest_good_of_an_empty_or_missing_root_is_none(tmp_path: Path) -> None:
    assert latest_good(tmp_path) == (None, [])
    assert latest_good(tmp_path / "missing") == (None, [])


# --------------------------------------------------------------------------- Persister
class _Provider:
    """A tensors provider whose lifetime the test can watch through a weakref."""

    def __init__(self, step: int, calls: list[int]) -> None:
        self.step, self.calls = step, calls

    def __call__(self) -> dict[str, torch.Tensor]:
        self.calls.append(self.step)
        return {"x": torch.full((2,), self.step)}


def test_slow_disk_skips_intermediate_snapshots_and_holds_at_most_one(tmp_path: Path) -> None:
    started, release = threading.Event(), threading.Event()
    written: list[int] = []

    def slow_write(step: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
        if step == 1:
            started.set()
            assert release.wait(30)
        written.append(step)
        return tmp_path / step_dir_name(step)

    calls: list[int] = []
    persister = Persister(tmp_path, keep_last=1, write=slow_write)
    try:
        assert persister.offer(1, _Provider(1, calls), {"step": 1})
        assert started.wait(30)
        refs, results = [], []
        for step in range(2, 11):
            provider = _Provider(step, calls)
            refs.append(weakref.ref(provider))
            results.append(persister.offer(step, provider, {"step": step}))
            del provider
        assert results == [True] + [False] * 8  # each later offer displaced a pending one
        gc.collect()
        assert [r() is not None for r in refs] == [False] * 8 + [True]  # only one held
        stats = persister.stats
        assert (stats.num_pending, stats.busy, stats.num_skipped) == (1, True, 8)
        assert not persister.flush(timeout_s=0.05)
        release.set()
        assert persister.flush(timeout_s=30)
    finally:
        release.set()
        assert persister.close(timeout_s=30)
    assert written == [1, 10] and calls == [1, 10]
    stats = persister.stats
    assert (stats.num_written, stats.num_skipped, stats.num_failed) == (2, 8, 0)
    assert stats.last_step == 10 and stats.num_pending == 0


def test_persister_latches_failures_and_keeps_going(tmp_path: Path) -> None:
    results: list[tuple[int, Path | None, BaseException | None]] = []
    done = threading.Event()

    def on_result(step: int, path: Path | None, error: BaseException | None) -> None:
        results.append((step, path, error))
        if len(results) == 2:
            done.set()

    def broken_provider() -> dict[str, torch.Tensor]:
        raise OSError(errno.EIO, "shared memory gone")

    persister = Persister(tmp_path, keep_last=2, on_result=on_result)
    try:
        assert persister.offer(1, broken_provider, {})
        assert persister.flush(timeout_s=30)
        assert persister.offer(2, lambda: {"x": torch.ones(3)}, {"step": 2})
        assert done.wait(30)
    finally:
        assert persister.close(timeout_s=30)
    stats = persister.stats
    assert (stats.num_written, stats.num_failed) == (1, 1)
    assert stats.last_error is not None and "step 1" in stats.last_error
    assert "shared memory gone" in stats.last_error
    assert results[0][0] == 1 and results[0][1] is None and isinstance(results[0][2], OSError)
    assert results[1] == (2, tmp_path / step_dir_name(2), None)
    assert latest_good(tmp_path)[0] == tmp_path / step_dir_name(2)
    with pytest.raises(RuntimeError, match="closed"):
        persister.offer(3, lambda: {}, {})


def test_persister_close_drains_or_drops_the_pending_offer(tmp_path: Path) -> None:
    gate = threading.Event()
    entered = threading.Event()
    written: list[int] = []

    def write(step: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
        entered.set()
        assert gate.wait(30)
        written.append(step)
        return tmp_path

    for drain, expected in ((True, [1, 2]), (False, [1])):
        gate.clear()
        entered.clear()
        written.clear()
        persister = Persister(tmp_path, keep_last=1, write=write)
        persister.offer(1, dict, {})
        assert entered.wait(30)
        persister.offer(2, dict, {})
        assert not persister.close(timeout_s=0, drain=drain)  # closed, step 1 still running
        gate.set()
        assert persister.close(timeout_s=30)
        assert written == expected
        assert persister.stats.num_skipped == (0 if drain else 1)
