"""On-disk checkpoints: ONE global torch.distributed.checkpoint (DCP) checkpoint per step.

The agent persists every Nth complete snapshot in the background (DESIGN.md, "Checkpoint path");
restore falls back to these directories when neither local memory nor peers have the state. A
checkpoint is one directory ``root/step-NNNNNNNNNN/`` holding every rank's part of that step:

- DCP data files ``__R_I.distcp`` (written by old rank R) and one ``.metadata`` describing every
  tensor with its GLOBAL shape and every rank's piece at its global offset, so that plain
  ``torch.distributed.checkpoint.load(state_dict, checkpoint_id=path)`` reads it without hpt and
  reshards it onto any world size. Tensors a rank holds whole (not in `shards`) appear once
  under their name (rank 0's copy) and, for ranks R > 0, under ``hpt.rankRRRRR/<name>`` (each
  rank's own RNG, data position, ... so the same world size restores every rank exactly);
- ``hpt-meta.json`` (`INDEX_FORMAT`): hpt's own description of the same thing, in JSON: per old
  rank its layout, its meta tree, and where each of its tensors lies (file, offset, length).
  hpt restores from this and never reads ``.metadata``, which is a pickle (the trust boundary:
  someone who can write the persist directory can change the training state, never run code in
  a rank; data files are read with ``torch.load(weights_only=True)``);
- ``hpt-manifest.json``: format version, step, the dtype and global shape of every DCP tensor,
  and the size and SHA-256 of every other file. It is written last.

Writers: every rank's part is written by whoever holds that rank's snapshot (the agents, each in
the background, with no collective between them) into a staging directory named by step, world
size and attempt (``.stage-step-S-wW-aA``): its data files, then ``part-rRRRRR.json`` by
atomic rename. The writer that sees all W parts (an ``O_EXCL`` lock file elects one) writes
``.metadata``, ``hpt-meta.json`` and the manifest, then renames the staging directory to its
``step-`` name: a ``step-`` directory is complete or absent. A ``step-`` directory whose manifest
is missing or does not match the files is never treated as a checkpoint. This needs a persist
directory every writer sees (one node, or a shared file system).

Containment: nothing under the root is followed through a symlink (``O_NOFOLLOW``, ``lstat``),
the root is resolved once (realpath) and every path is a plain name under it; retention deletes
only directories hpt wrote (a real ``step-`` directory holding hpt's files), never a symlink.

`Persister` runs `persist` on a background thread behind a one-slot mailbox, so a disk slower than
the snapshot cadence skips intermediate snapshots instead of queueing them in memory.

The manifest itself (format, parsing, hashing) lives in manifest.py; the restore side in disk.py.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import inspect
import io
import json
import logging
import os
import pickle
import re
import shutil
import socket
import stat
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import (
    FileSystemWriter,
    _StorageInfo,
)
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.checkpoint.storage import WriteResult

from hpt.ckpt.errors import CorruptCheckpointError, PersistError
from hpt.ckpt.layout import Layout, build_layout, dtype_name
from hpt.ckpt.layout import TensorEntry as LayoutEntry
from hpt.ckpt.manifest import (
    DTYPES,
    FORMAT_VERSION,
    HASH_ALGO,
    FileEntry,
    Manifest,
    TensorEntry,
    hash_files,
)
from hpt.ckpt.restore import assemble

__all__ = [
    "FORMAT_VERSION",
    "FAULT_STAGES",
    "MANIFEST_NAME",
    "META_NAME",
    "FileEntry",
    "Manifest",
    "PersistStats",
    "Persister",
    "TensorEntry",
    "latest_good",
    "load_verified",
    "parse_step_dir",
    "persist",
    "persist_part",
    "step_dir_name",
    "verify",
]

log = logging.getLogger(__name__)

MANIFEST_NAME = "hpt-manifest.json"
META_NAME = "hpt-meta.json"
DCP_METADATA = ".metadata"
_STEP_DIR = re.compile(r"step-(\d{10})")
_SCRATCH = re.compile(
    r"\.(?P<kind>tmp|old|del)-step-\d{10}-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[0-9a-f]{8}"
)
_MAX_STEP = 10**10 - 1
_MAX_MANIFEST_BYTES = 64 << 20

# Stages at which `persist` calls its fault hook (tests inject ENOSPC and friends there).
FAULT_STAGES = ("dcp_saved", "files_hashed", "part_written", "meta_written", "manifest_written")

PART_FORMAT = "hpt.ckpt-part.v1"
INDEX_FORMAT = "hpt.ckpt-index.v1"
_PART_NAME = re.compile(r"part-r(\d{5})\.json")
_RANK_DIR = re.compile(r"rank-(\d{5})")
_STAGE = re.compile(r"\.stage-step-(\d{10})-w(\d+)-a(\d+)")
_FINISH_LOCK = ".finish"
_MAX_INDEX_BYTES = 256 << 20


def dcp_key(entry: LayoutEntry, rank: int) -> str:
    """The DCP name of one rank's tensor: its own name for a piece of a sharded tensor and for
    rank 0's whole tensors; ``hpt.rankRRRRR/<name>`` for whole tensors of ranks > 0."""
    if not entry.is_replicated or rank == 0:
        return entry.fqn
    return f"hpt.rank{rank:05d}/{entry.fqn}"


# --------------------------------------------------------------------------- names
def step_dir_name(step: int) -> str:
    """``step-`` plus the step as 10 digits: the only names that can hold a checkpoint."""
    _check_step(step)
    return f"step-{step:010d}"


def parse_step_dir(name: str) -> int | None:
    """The step of a checkpoint directory name, or None when it is not one."""
    match = _STEP_DIR.fullmatch(name)
    return int(match.group(1)) if match else None


def _check_step(step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= _MAX_STEP:
        raise ValueError(f"step ({step!r}) must be an int in 0..{_MAX_STEP}")


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Remove a file, symlink or directory tree (never following a symlink)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


@functools.cache
def _dcp_kwargs() -> dict[str, Any]:
    # `no_dist` keeps DCP from running collectives when the caller's process has a process
    # group; torch versions without the argument fall back to single-process on their own.
    return {"no_dist": True} if "no_dist" in inspect.signature(dcp_save).parameters else {}


@contextlib.contextmanager
def _single_process_dcp() -> Iterator[None]:
    """Silence DCP's "assuming the intent is to save/load in a single process" warning, which
    is exactly what we ask for."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.distributed is disabled", category=UserWarning
        )
        yield


# --------------------------------------------------------------------------- persist
def persist(
    root: Path,
    step: int,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    *,
    keep_last: int,
    thread_count: int = 4,
    fault_hook: Callable[[str], None] | None = None,
) -> Path:
    """Write a checkpoint ``root/step-{step:010d}`` of one writer and apply retention.

    Two callers. A single process (world of one): `tensors` is its flat state dict and `meta`
    any JSON-safe mapping (returned by `load_verified`). The agent, for one rank's snapshot:
    `meta` carries ``rank``, ``world_size``, ``layout`` and ``meta_json`` (and ``attempt`` when
    known) and `tensors` the snapshot's tensors by layout name; then this writes that rank's part
    of the step's global checkpoint (`persist_part`) under `root`, or under its parent when
    `root` is the ``rank-NNNNN`` directory of that rank (the agent's layout before the global
    format: the checkpoint goes to the job's persist directory all the same).

    An existing checkpoint of the same step is replaced. After publishing, all but the newest
    `keep_last` checkpoints whose manifest is intact are deleted (hpt-written checkpoint
    directories older than those go too, whether intact or not); the one just written is never
    deleted. Scratch directories that crashed writers left behind are swept at the same time.

    Args:
        root: directory holding the checkpoints; created if missing.
        step: training step, 0..9999999999.
        tensors: flat state dict (name -> tensor, any device, any layout).
        meta: JSON-safe metadata (see above).
        keep_last: how many checkpoints to keep, >= 1.
        thread_count: DCP writer threads, one data file each; the files are then hashed in
            parallel too. 4 beat 1 in each of three runs of tests/bench/bench_persist.py on
            the 2-core dev box (0.68-1.02 GB/s against 0.58-0.74 GB/s for 1 GiB).
        fault_hook: test seam, called with each name in `FAULT_STAGES`; what it raises is
            treated as an I/O failure at that point.

    Returns:
        The published checkpoint directory, or for an agent's part that was not the last of its
        step, the staging directory it went to.

    Raises:
        ValueError: bad arguments (nothing was written).
        PersistError: an I/O error (disk full, ...); nothing was published, the temporary
            files are gone and the earlier checkpoints are untouched.
    """
    snapshot = _snapshot_part(Path(root), meta)
    if snapshot is not None:
        part_root, rank, world, attempt, layout, tree = snapshot
        path = persist_part(part_root, step, tensors, rank=rank, world_size=world, layout=layout,
                            meta=tree, attempt=attempt, keep_last=keep_last,
                            thread_count=thread_count, fault_hook=fault_hook)
        if part_root != Path(root):
            # Transitional: an agent that still scans its rank directory for persisted steps
            # finds it (empty) and reports the step it was told succeeded. Never written into.
            with contextlib.suppress(OSError):
                Path(root).mkdir(exist_ok=True)
        return path
    layout = build_layout([(n, t.dtype, tuple(t.shape)) for n, t in _checked_tensors(tensors)])
    return persist_part(root, step, tensors, rank=0, world_size=1, layout=layout,
                        meta=dict(meta), attempt=0, keep_last=keep_last,
                        thread_count=thread_count, fault_hook=fault_hook)


def _snapshot_part(
    root: Path, meta: Mapping[str, Any]
) -> tuple[Path, int, int, int, Layout, Any] | None:
    """(root, rank, world, attempt, layout, meta tree) when `meta` is an agent's snapshot meta."""
    if not ("layout" in meta and "meta_json" in meta and "rank" in meta):
        return None
    rank: Any = meta["rank"]  # checked just below
    world: Any = meta.get("world_size")
    attempt: Any = meta.get("attempt", 0)
    for name, value in (("rank", rank), ("world_size", world), ("attempt", attempt)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"meta.{name} ({value!r}) must be an int >= 0")
    if not 0 <= rank < world:
        raise ValueError(f"meta.rank ({rank}) must be in 0..{world - 1}")
    layout = Layout.from_json(meta["layout"])
    raw = meta["meta_json"]
    try:
        tree = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError as exc:
        raise ValueError(f"meta.meta_json is not JSON: {exc}") from exc
    match = _RANK_DIR.fullmatch(root.name)
    if match is not None and int(match.group(1)) == rank:
        root = root.parent
    return root, rank, world, attempt, layout, tree


def _checked_tensors(tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    out = []
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor name {name!r} must be a non-empty str")
        if not isinstance(t, torch.Tensor) or str(t.dtype).removeprefix("torch.") not in DTYPES:
            raise ValueError(f"tensors[{name!r}] must be a tensor of a dtype in {list(DTYPES)}")
        out.append((name, t))
    return out


def persist_part(
    root: Path,
    step: int,
    tensors: Mapping[str, torch.Tensor],
    *,
    rank: int,
    world_size: int,
    layout: Layout,
    meta: Any,
    attempt: int = 0,
    keep_last: int,
    thread_count: int = 4,
    fault_hook: Callable[[str], None] | None = None,
) -> Path:
    """Write rank `rank`'s part of the global checkpoint of `step` (a world of `world_size`);
    the writer of the last part publishes ``root/step-{step:010d}`` (see the module docstring).

    Args:
        tensors: the rank's tensors by layout name (every entry of `layout`).
        layout: the rank's layout: shapes, dtypes and global offsets of its tensors.
        meta: the rank's JSON-safe meta tree (layout.flatten's meta), stored in the index.
        attempt: the attempt that took the snapshot; parts of different attempts never mix.

    Returns:
        The published checkpoint directory, or the staging directory when other parts are
        still missing. Raises as `persist`.
    """
    _check_step(step)
    if keep_last < 1:
        raise ValueError(f"keep_last ({keep_last}) must be >= 1")
    if thread_count < 1:
        raise ValueError(f"thread_count ({thread_count}) must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank ({rank}) must be in 0..{world_size - 1}")
    given = dict(_checked_tensors(tensors))
    for e in layout.entries:
        t = given.get(e.fqn)
        if t is None or tuple(t.shape) != e.shape or dtype_name(t.dtype) != e.dtype:
            raise ValueError(f"tensors[{e.fqn!r}] must be a {e.dtype}{list(e.shape)} tensor")
    try:
        meta_doc = json.loads(json.dumps(meta, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"meta is not JSON-safe: {exc}") from exc
    hook = fault_hook or (lambda stage: None)
    root = _resolved_root(Path(root))
    final = root / step_dir_name(step)
    single = world_size == 1
    stage = root / (_scratch_name("tmp", final.name) if single
                    else f".stage-{final.name}-w{world_size}-a{attempt}")
    scratch = stage / f".r{rank:05d}-{uuid.uuid4().hex[:8]}"
    published = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        _mkdir_nofollow(stage)
        scratch.mkdir()
        keys = {e.fqn: dcp_key(e, rank) for e in layout.entries}
        to_write = {keys[e.fqn]: given[e.fqn] for e in layout.entries if given[e.fqn].numel()}
        # We fsync every file ourselves below, overlapped with hashing them.
        writer = FileSystemWriter(scratch, sync_files=False, thread_count=thread_count)
        with _single_process_dcp():
            written = dcp_save(to_write, storage_writer=writer, **_dcp_kwargs())
        hook("dcp_saved")
        renamed: dict[str, str] = {}
        for entry in os.scandir(scratch):
            if entry.name.endswith(".distcp"):
                renamed[entry.name] = f"__{rank}_{entry.name.split('_', 3)[-1]}"
                os.rename(entry.path, stage / renamed[entry.name])
        pieces = _pieces_of(written, renamed)
        names = sorted(set(renamed.values()))
        hashed = hash_files([stage / n for n in names], HASH_ALGO, fsync=True)
        hook("files_hashed")
        part = {
            "format": PART_FORMAT,
            "step": step,
            "rank": rank,
            "world_size": world_size,
            "attempt": attempt,
            "layout": json.loads(layout.to_json()),
            "meta": meta_doc,
            "pieces": [dict(pieces[keys[e.fqn]], fqn=e.fqn) for e in layout.entries
                       if keys[e.fqn] in pieces],
            "files": [{"name": n, "size_bytes": sz, "digest": d}
                      for n, (sz, d) in zip(names, hashed, strict=True)],
        }
        _write_atomic(stage / f"part-r{rank:05d}.json", _dumps(part))
        hook("part_written")
        _remove(scratch)
        published = _finish_if_complete(root, stage, final, step, world_size, hook)
    except BaseException as exc:
        _remove(scratch)
        if single:
            _remove(stage)
        # DCP wraps I/O errors in CheckpointException, which derives from BaseException.
        if isinstance(exc, Exception | CheckpointException):
            raise PersistError(
                f"persisting step {step} (rank {rank} of {world_size}) to {final} failed: "
                f"{_summary(exc)}"
            ) from exc
        raise
    if published is None:
        return stage
    try:
        _retain(root, keep_last, final)
        _sweep_leftovers(root, final_step=step)
    except OSError as exc:
        log.warning("retention in %s failed (keep_last=%d): %s", root, keep_last, exc)
    return final


def _pieces_of(written: Any, renamed: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """DCP key -> where `dcp_save` put it (file after renaming, offset, length, transforms)."""
    out: dict[str, dict[str, Any]] = {}
    for index, info in written.storage_data.items():
        out[index.fqn] = {
            "key": index.fqn,
            "file": renamed[info.relative_path],
            "offset": int(info.offset),
            "length": int(info.length),
            "transforms": list(info.transform_descriptors or []),
        }
    return out


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    _write_file(tmp, data)
    os.rename(tmp, path)


def _mkdir_nofollow(path: Path) -> None:
    """Create `path` (one level) or accept an existing real directory; never a symlink."""
    try:
        path.mkdir()
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise OSError(errno.ENOTDIR, "exists and is not a real directory", str(path)) from None


def _resolved_root(root: Path) -> Path:
    """The root with symlinks resolved once: every later path is a plain name under it."""
    return Path(os.path.realpath(root))


def _read_parts(stage: Path, world_size: int) -> list[dict[str, Any]] | None:
    found: dict[int, Path] = {}
    for entry in os.scandir(stage):
        match = _PART_NAME.fullmatch(entry.name)
        if match is not None and entry.is_file(follow_symlinks=False):
            found[int(match.group(1))] = Path(entry.path)
    if set(found) != set(range(world_size)):
        return None
    parts = []
    for rank in range(world_size):
        doc = json.loads(_read_nofollow(found[rank], _MAX_INDEX_BYTES))
        if not isinstance(doc, dict) or doc.get("format") != PART_FORMAT or doc.get("rank") != rank:
            raise OSError(errno.EIO, f"part of rank {rank} is not a {PART_FORMAT} record")
        parts.append(doc)
    return parts


def _finish_if_complete(root: Path, stage: Path, final: Path, step: int, world_size: int,
                        hook: Callable[[str], None]) -> Path | None:
    """Publish the checkpoint if every rank's part is in `stage` and no other writer does it."""
    if _read_parts(stage, world_size) is None:
        return None
    try:
        fd = os.open(stage / _FINISH_LOCK, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return None  # another writer publishes it
    os.close(fd)
    try:
        parts = _read_parts(stage, world_size)
        assert parts is not None
        index, metadata, results, tensors = _global_view(step, world_size, parts)
        with _single_process_dcp():
            FileSystemWriter(stage, sync_files=True).finish(metadata, [results])
        _write_file(stage / META_NAME, _dumps(index))
        hook("meta_written")
        files = [FileEntry(f["name"], f["size_bytes"], f["digest"])
                 for part in parts for f in part["files"]]
        hashed = hash_files([stage / DCP_METADATA, stage / META_NAME], HASH_ALGO, fsync=True)
        files += [FileEntry(n, sz, d) for n, (sz, d) in
                  zip((DCP_METADATA, META_NAME), hashed, strict=True)]
        files.sort(key=lambda f: f.name)
        manifest = Manifest(
            version=FORMAT_VERSION,
            step=step,
            hash_algo=HASH_ALGO,
            files=tuple(files),
            tensors=tuple(tensors),
            metadata_digest=next(f.digest for f in files if f.name == DCP_METADATA),
            created_unix_s=time.time(),
        )
        for entry in os.scandir(stage):
            if _PART_NAME.fullmatch(entry.name):
                os.unlink(entry.path)
        _write_file(stage / MANIFEST_NAME, manifest.to_json())  # last: it makes a checkpoint
        hook("manifest_written")
        os.unlink(stage / _FINISH_LOCK)
        _fsync_dir(stage)
        _publish(stage, final)
    except BaseException:
        _remove(stage / _FINISH_LOCK)
        raise
    return final


def _global_view(
    step: int, world_size: int, parts: list[dict[str, Any]]
) -> tuple[dict[str, Any], Metadata, list[WriteResult], list[TensorEntry]]:
    """From every rank's part: hpt's index, DCP's global Metadata and write results, and the
    manifest's tensor list (DCP name, dtype, global shape)."""
    state_md: dict[str, TensorStorageMetadata] = {}
    results: list[WriteResult] = []
    ranks = []
    for part in parts:
        layout = Layout.from_json(part["layout"])
        by_fqn = {e.fqn: e for e in layout.entries}
        for piece in part["pieces"]:
            e = by_fqn[piece["fqn"]]
            md = state_md.get(piece["key"])
            if md is None:
                md = state_md[piece["key"]] = TensorStorageMetadata(
                    properties=TensorProperties(dtype=DTYPES[e.dtype]),
                    size=torch.Size(e.global_shape), chunks=[])
            elif tuple(md.size) != e.global_shape or md.properties.dtype != DTYPES[e.dtype]:
                raise OSError(errno.EIO, f"ranks disagree on the global tensor {e.fqn!r}")
            offsets = torch.Size(e.global_offset)
            md.chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(e.shape)))
            results.append(WriteResult(
                index=MetadataIndex(piece["key"], offsets),
                size_in_bytes=piece["length"],
                storage_data=_StorageInfo(piece["file"], piece["offset"], piece["length"],
                                          transform_descriptors=piece["transforms"] or None),
            ))
        ranks.append({"rank": part["rank"], "layout": part["layout"], "meta": part["meta"],
                      "pieces": part["pieces"]})
    index = {"format": INDEX_FORMAT, "step": step, "world_size": world_size, "ranks": ranks}
    tensors = [TensorEntry(k, str(md.properties.dtype).removeprefix("torch."), tuple(md.size))
               for k, md in state_md.items()]
    return index, Metadata(state_dict_metadata=dict(state_md)), results, tensors


def _read_nofollow(path: Path, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
    return raw


def _summary(exc: BaseException) -> str:
    """One line naming the root cause. DCP wraps errors in a CheckpointException that renders
    every rank's traceback and keeps the original error (an ENOSPC, say) only as the context of
    the error it caused, so look through both for an OSError first."""
    starts: list[BaseException] = [exc]
    if isinstance(exc, CheckpointException):
        for failure in exc.failures.values():
            starts.append(failure[0] if isinstance(failure, tuple) else failure)
    chain: list[BaseException] = []
    for start in starts:
        e: BaseException | None = start
        while e is not None and e not in chain:
            chain.append(e)
            e = e.__cause__ or e.__context__
    cause = next((e for e in chain if isinstance(e, OSError)), chain[-1])
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"


def _publish(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final` atomically, moving an existing `final` aside first."""
    aside = None
    if final.is_symlink() or final.exists():
        aside = final.with_name(_scratch_name("old", final.name))
        os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except OSError:
        if aside is not None:
            os.rename(aside, final)
        raise
    _fsync_dir(final.parent)
    if aside is not None:
        _remove(aside)


def _retain(root: Path, keep_last: int, written: Path) -> None:
    num_kept = 0
    for _, path in _step_dirs(root):
        if path == written:
            num_kept += 1
        elif num_kept < keep_last:
            num_kept += _manifest_intact(path)
        elif not _written_by_hpt(path):
            log.warning("retention: left %s alone: not a checkpoint hpt wrote (a symlink, or "
                        "no hpt files in it)", path)
        else:
            doomed = path.with_name(_scratch_name("del", path.name))
            os.rename(path, doomed)  # never leave a half-deleted step- directory behind
            _remove(doomed)
            log.info("retention: deleted %s (keep_last=%d)", path, keep_last)


def _scratch_name(kind: str, step_dir: str) -> str:
    """Hidden name of a directory being written ("tmp"), moved aside ("old") or deleted ("del").

    It carries host and pid so that a later `persist` can sweep what a crashed writer left.
    """
    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"
    return f".{kind}-{step_dir}-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _written_by_hpt(path: Path) -> bool:
    """A real directory (never a symlink) holding hpt's own files: what retention may delete."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        return any(stat.S_ISREG(os.lstat(path / name).st_mode)
                   for name in (MANIFEST_NAME, META_NAME) if os.path.lexists(path / name))
    except OSError:
        return False


def _sweep_leftovers(root: Path, final_step: int | None = None) -> None:
    """Remove scratch directories of crashed writers: every "del" one, "tmp"/"old" ones of
    this host whose process is gone (another host's pids mean nothing here), and staging
    directories of steps older than `final_step` (just published: they can no longer matter)."""
    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"
    for entry in os.scandir(root):
        stage = _STAGE.fullmatch(entry.name)
        if stage is not None and final_step is not None and int(stage.group(1)) < final_step:
            if entry.is_dir(follow_symlinks=False):
                log.info("removing staging directory %s of an older step", entry.path)
                _remove(Path(entry.path))
            continue
        match = _SCRATCH.fullmatch(entry.name)
        if match is None:
            continue
        if match["kind"] != "del":
            pid = int(match["pid"])
            if match["host"] != host or pid == os.getpid() or _pid_alive(pid):
                continue
        log.info("removing leftover %s", entry.path)
        _remove(Path(entry.path))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _manifest_intact(path: Path) -> bool:
    """Cheap check for retention: the manifest parses and names this step (no data hashing)."""
    try:
        return _read_manifest(path).step == parse_step_dir(path.name)
    except CorruptCheckpointError:
        return False


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Entries of `root` named like checkpoints, newest step first (not checked further)."""
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    found = [(parse_step_dir(e.name), Path(root) / e.name) for e in entries]
    return sorted(((s, p) for s, p in found if s is not None), reverse=True)


# --------------------------------------------------------------------------- verify / load
def _read_manifest(path: Path) -> Manifest:
    try:
        fd = os.open(path / MANIFEST_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"{path}: {MANIFEST_NAME} missing (torn or unfinished write)"
        ) from None
    except OSError as exc:
        raise CorruptCheckpointError(f"{path}: {MANIFEST_NAME} unreadable: {exc}") from exc
    try:
        with os.fdopen(fd, "rb") as f:
            raw = f.read(_MAX_MANIFEST_BYTES + 1)
        if len(raw) > _MAX_MANIFEST_BYTES:
            raise ValueError(f"larger than {_MAX_MANIFEST_BYTES} bytes")
        return Manifest.from_json(raw)
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError included
        raise CorruptCheckpointError(f"{path}: {MANIFEST_NAME} invalid: {exc}") from exc


def verify(path: Path) -> Manifest:
    """Check a checkpoint directory against its manifest, hashing every file.

    Raises:
        ValueError: the directory name is not ``step-`` plus 10 digits.
        CorruptCheckpointError: the directory is a symlink or not a directory, the manifest is
            missing or invalid, or a listed file is missing, not a regular file, of the wrong
            size or hash; the message names the file and what is wrong.
    """
    path = Path(path)
    step = parse_step_dir(path.name)
    if step is None:
        raise ValueError(f"checkpoint directory name {path.name!r} must be step-<10 digits>")
    try:
        mode = os.lstat(path).st_mode
    except OSError as exc:
        raise CorruptCheckpointError(f"{path}: cannot stat: {exc}") from exc
    if stat.S_ISLNK(mode):
        raise CorruptCheckpointError(f"{path}: is a symlink; checkpoints are never followed")
    if not stat.S_ISDIR(mode):
        raise CorruptCheckpointError(f"{path}: not a directory")
    manifest = _read_manifest(path)
    if manifest.step != step:
        raise CorruptCheckpointError(f"{path}: manifest says step {manifest.step}")
    listed = {f.name: f for f in manifest.files}
    for required in (DCP_METADATA, META_NAME):
        if required not in listed:
            raise CorruptCheckpointError(f"{path}: {required} not listed in {MANIFEST_NAME}")
    if listed[DCP_METADATA].digest != manifest.metadata_digest:
        raise CorruptCheckpointError(f"{path}: {MANIFEST_NAME} disagrees on {DCP_METADATA}")
    for f in manifest.files:  # sizes first: cheap, and catches truncation before any hashing
        try:
            st = os.lstat(path / f.name)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{path}: {f.name} missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise CorruptCheckpointError(f"{path}: {f.name} is not a regular file")
        if st.st_size != f.size_bytes:
            raise CorruptCheckpointError(
                f"{path}: {f.name} has {st.st_size} bytes, manifest says {f.size_bytes} "
                f"(truncated or overwritten)"
            )
    try:
        hashed = hash_files([path / f.name for f in manifest.files], manifest.hash_algo)
    except OSError as exc:
        raise CorruptCheckpointError(f"{path}: reading a file failed: {exc}") from exc
    for f, (size, digest) in zip(manifest.files, hashed, strict=True):
        if size != f.size_bytes or digest != f.digest:
            raise CorruptCheckpointError(
                f"{path}: {f.name} {manifest.hash_algo} mismatch (damaged or replaced)"
            )
    return manifest


def load_verified(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Verify a checkpoint (every file), then load every DCP tensor whole, on the CPU.

    Returns:
        (DCP name -> global tensor, the meta of old rank 0: the ``meta`` given to `persist` by a
        single writer).

    Raises:
        ValueError: bad directory name.
        CorruptCheckpointError: verification or loading failed.
    """
    path = Path(path)
    manifest = verify(path)
    index = read_index(path, manifest)
    pieces: dict[str, list[tuple[tuple[int, ...], torch.Tensor]]] = {}
    entries: dict[str, LayoutEntry] = {}
    for rank in index.ranks:
        for entry in rank.layout.entries:
            piece = rank.pieces.get(entry.fqn)
            if piece is None:
                continue  # an empty piece of a sharded tensor
            entries.setdefault(piece.key, entry)
            pieces.setdefault(piece.key, []).append(
                (entry.global_offset, read_piece(path, piece, entry)))
    state = {}
    for t in manifest.tensors:
        if entries.get(t.name) is None:
            raise CorruptCheckpointError(f"{path}: no piece of {t.name!r} in {META_NAME}")
        state[t.name] = assemble(pieces[t.name], (0,) * len(t.shape), t.shape,
                                 DTYPES[t.dtype], name=t.name)
    return state, index.ranks[0].meta


@dataclass(frozen=True, slots=True)
class Piece:
    """Where one tensor of one old rank lies: DCP name, data file, byte range."""

    key: str
    file: str
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class RankIndex:
    rank: int
    layout: Layout
    meta: Any
    pieces: dict[str, Piece]
    """Layout name -> its piece (absent for an empty piece)."""


@dataclass(frozen=True, slots=True)
class Index:
    """hpt's JSON description of a global checkpoint (``hpt-meta.json``)."""

    step: int
    world_size: int
    ranks: tuple[RankIndex, ...]


def read_index(path: Path, manifest: Manifest) -> Index:
    """Read ``hpt-meta.json`` after matching its hash against `manifest`; validates every field
    it uses (CorruptCheckpointError naming the field). Never reads DCP's ``.metadata``."""
    entry = next((f for f in manifest.files if f.name == META_NAME), None)
    if entry is None:
        raise CorruptCheckpointError(f"{path}: {META_NAME} not listed in {MANIFEST_NAME}")
    try:
        raw = _read_nofollow(path / META_NAME, _MAX_INDEX_BYTES)
    except OSError as exc:
        raise CorruptCheckpointError(f"{path}: {META_NAME} unreadable: {exc}") from exc
    if len(raw) != entry.size_bytes or hashlib.new(manifest.hash_algo, raw).hexdigest() != \
            entry.digest:
        raise CorruptCheckpointError(f"{path}: {META_NAME} {manifest.hash_algo} mismatch")
    files = {f.name for f in manifest.files}
    try:
        doc = json.loads(raw)
        _field_is(doc, dict, "index")
        _field_is(doc.get("format") == INDEX_FORMAT, bool, "format", INDEX_FORMAT)
        world = doc.get("world_size")
        _field_is(isinstance(world, int) and world >= 1, bool, "world_size", "an int >= 1")
        ranks = doc.get("ranks")
        _field_is(isinstance(ranks, list) and len(ranks) == world, bool, "ranks",
                  f"a list of {world} ranks")
        parsed = []
        for i, r in enumerate(ranks):
            _field_is(r, dict, f"ranks[{i}]")
            _field_is(r.get("rank") == i, bool, f"ranks[{i}].rank", str(i))
            layout = Layout.from_json(r.get("layout"))
            names = {e.fqn for e in layout.entries}
            pieces = {}
            for j, p in enumerate(r.get("pieces") or []):
                where = f"ranks[{i}].pieces[{j}]"
                _field_is(p, dict, where)
                ok = (p.get("fqn") in names and isinstance(p.get("key"), str)
                      and p.get("file") in files and p.get("file", "").endswith(".distcp")
                      and all(isinstance(p.get(k), int) and p[k] >= 0
                              for k in ("offset", "length"))
                      and p.get("transforms") in ([], None))
                _field_is(ok, bool, where, "a piece of a listed .distcp file, no transforms")
                pieces[p["fqn"]] = Piece(p["key"], p["file"], p["offset"], p["length"])
            parsed.append(RankIndex(i, layout, r.get("meta"), pieces))
    except ValueError as exc:  # JSONDecodeError and layout errors included
        raise CorruptCheckpointError(f"{path}: {META_NAME} invalid: {exc}") from exc
    if doc.get("step") != manifest.step:
        raise CorruptCheckpointError(f"{path}: {META_NAME} says step {doc.get('step')}")
    return Index(step=manifest.step, world_size=world, ranks=tuple(parsed))


def _field_is(value: Any, typ: type, field: str, rule: str = "") -> None:
    if typ is bool:
        if value is not True:
            raise ValueError(f"{field} must be {rule}")
    elif not isinstance(value, typ):
        raise ValueError(f"{field} must be a {typ.__name__}")


def verify_files(path: Path, manifest: Manifest, names: set[str]) -> None:
    """Check the size and hash of the listed files `names` (what one rank is about to read)."""
    listed = {f.name: f for f in manifest.files}
    wanted = []
    for name in sorted(names):
        f = listed.get(name)
        if f is None:
            raise CorruptCheckpointError(f"{path}: {name} is not listed in {MANIFEST_NAME}")
        try:
            st = os.lstat(path / name)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{path}: {name} missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise CorruptCheckpointError(f"{path}: {name} is not a regular file")
        if st.st_size != f.size_bytes:
            raise CorruptCheckpointError(
                f"{path}: {name} has {st.st_size} bytes, manifest says {f.size_bytes}")
        wanted.append(f)
    try:
        hashed = hash_files([path / f.name for f in wanted], manifest.hash_algo)
    except OSError as exc:
        raise CorruptCheckpointError(f"{path}: reading a file failed: {exc}") from exc
    for f, (size, digest) in zip(wanted, hashed, strict=True):
        if size != f.size_bytes or digest != f.digest:
            raise CorruptCheckpointError(
                f"{path}: {f.name} {manifest.hash_algo} mismatch (damaged or replaced)")


def read_piece(path: Path, piece: Piece, entry: LayoutEntry) -> torch.Tensor:
    """One rank's tensor from its data file (``torch.load(weights_only=True)`` of its byte
    range, never through a symlink); checks dtype and shape against the layout."""
    try:
        fd = os.open(path / piece.file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            raw = os.pread(fd, piece.length, piece.offset)
        finally:
            os.close(fd)
        if len(raw) != piece.length:
            raise ValueError(f"{piece.file} ends before byte {piece.offset + piece.length}")
        tensor = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise CorruptCheckpointError(f"{path}: reading {entry.fqn} failed: {exc}") from exc
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != entry.torch_dtype or tuple(
            tensor.shape) != entry.shape:
        raise CorruptCheckpointError(f"{path}: {entry.fqn} is not a {entry.dtype}"
                                     f"{list(entry.shape)} tensor")
    return tensor


def latest_good(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint under `root` that verifies.

    Returns:
        (its directory or None when there is none, [(newer directory skipped, reason), ...]
        newest first). Names other than ``step-`` plus 10 digits are not checkpoints and are
        ignored without a reason (temporary and trash directories among them).
    """
    skipped: list[tuple[Path, str]] = []
    for _, path in _step_dirs(Path(root)):
        try:
            verify(path)
        except CorruptCheckpointError as exc:
            log.warning("skipping checkpoint: %s", exc)
            skipped.append((path, str(exc)))
            continue
        return path, skipped
    return None, skipped


# --------------------------------------------------------------------------- Persister
WriteFn = Callable[[int, Mapping[str, torch.Tensor], Mapping[str, Any]], Path]
TensorsProvider = Callable[[], Mapping[str, torch.Tensor]]


@dataclass(frozen=True, slots=True)
class PersistStats:
    """Counters of a `Persister` at one instant."""

    num_written: int
    num_skipped: int
    """Offers replaced by a newer offer before they started, or dropped by close(drain=False)."""
    num_failed: int
    last_step: int | None
    """Step of the last checkpoint written."""
    last_path: Path | None
    last_error: str | None
    """The latest failure (latched: it stays until a later failure replaces it)."""
    num_pending: int
    """0 or 1."""
    busy: bool
    """A write is running."""


@dataclass(frozen=True, slots=True)
class _Offer:
    step: int
    provider: TensorsProvider
    meta: Mapping[str, Any]


class Persister:
    """Writes checkpoints on one background thread behind a one-slot mailbox.

    `offer` never blocks on I/O: a newer offer replaces one that has not started, so when the
    disk is slower than the snapshot cadence intermediate snapshots are skipped and memory stays
    bounded (one write running, at most one waiting). Failures are latched in `stats` and never
    raised into the caller's thread.
    """

    def __init__(
        self,
        root: Path,
        *,
        keep_last: int,
        write: WriteFn | None = None,
        on_result: Callable[[int, Path | None, BaseException | None], None] | None = None,
        name: str = "hpt-persister",
    ) -> None:
        """Start the thread.

        Args:
            root: checkpoint directory given to `persist`.
            keep_last: retention given to `persist`.
            write: replaces `persist` (tests; other storage).
            on_result: called on the persister thread after each write with
                (step, path or None, error or None).
            name: thread name.
        """
        if keep_last < 1:
            raise ValueError(f"keep_last ({keep_last}) must be >= 1")
        self._write: WriteFn = write or functools.partial(persist, Path(root), keep_last=keep_last)
        self._on_result = on_result
        self._cond = threading.Condition()
        self._pending: _Offer | None = None
        self._busy = False
        self._closed = False
        self._num_written = self._num_skipped = self._num_failed = 0
        self._last_step: int | None = None
        self._last_path: Path | None = None
        self._last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def offer(self, step: int, tensors_provider: TensorsProvider, meta: Mapping[str, Any]) -> bool:
        """Queue a checkpoint; `tensors_provider` is called on the persister thread when the
        write starts and its tensors must stay unchanged until the write ends.

        Returns:
            False when this offer replaced an earlier one that had not started (that one is
            skipped), True otherwise.

        Raises:
            RuntimeError: the persister is closed.
        """
        _check_step(step)
        with self._cond:
            if self._closed:
                raise RuntimeError("Persister is closed")
            replaced = self._pending
            if replaced is not None:
                self._num_skipped += 1
                log.info("persist: step %d skipped for step %d (disk busy)", replaced.step, step)
            self._pending = _Offer(step, tensors_provider, meta)
            self._cond.notify_all()
        return replaced is None

    def flush(self, timeout_s: float) -> bool:
        """Wait until nothing is pending or running; False if `timeout_s` passed first."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._pending is None and not self._busy, timeout=timeout_s
            )

    def close(self, timeout_s: float = 60.0, *, drain: bool = True) -> bool:
        """Stop accepting offers; finish the running write (and the pending one when `drain`).

        Returns:
            True when the thread ended within `timeout_s`.
        """
        with self._cond:
            self._closed = True
            if not drain and self._pending is not None:
                self._pending = None
                self._num_skipped += 1
            self._cond.notify_all()
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    @property
    def stats(self) -> PersistStats:
        with self._cond:
            return PersistStats(
                num_written=self._num_written,
                num_skipped=self._num_skipped,
                num_failed=self._num_failed,
                last_step=self._last_step,
                last_path=self._last_path,
                last_error=self._last_error,
                num_pending=int(self._pending is not None),
                busy=self._busy,
            )

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                item, self._pending = self._pending, None
                if item is None:
                    return
                self._busy = True
            step = item.step
            path, error = self._write_one(item)
            del item  # drop the tensors before waiting for the next offer
            if self._on_result is not None:
                try:
                    self._on_result(step, path, error)
                except Exception:
                    log.exception("persist: on_result callback failed")
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _write_one(self, item: _Offer) -> tuple[Path | None, BaseException | None]:
        try:
            path = self._write(item.step, item.provider(), item.meta)
        except Exception as exc:  # latched for stats; raising would kill the thread
            log.error("persist: step %d failed: %s", item.step, exc)
            with self._cond:
                self._num_failed += 1
                self._last_error = f"step {item.step}: {exc}"
            return None, exc
        with self._cond:
            self._num_written += 1
            self._last_step, self._last_path = item.step, path
        return path, None
