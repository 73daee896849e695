"""On-disk checkpoints: torch.distributed.checkpoint (DCP) files plus a verified hpt manifest.

The agent persists every Nth complete snapshot in the background (DESIGN.md, "Checkpoint path");
restore falls back to these directories when neither local memory nor peers have the state. A
checkpoint is one directory ``root/step-NNNNNNNNNN/`` holding:

- the DCP files (``.metadata`` and ``__0_*.distcp``), so that plain
  ``torch.distributed.checkpoint.load(state_dict, checkpoint_id=path)`` reads it without hpt;
- ``hpt-meta.json``: the caller's JSON metadata (step, layout, RNG state, ...);
- ``hpt-manifest.json``: format version, step, the dtype and shape of every tensor, and the size
  and SHA-256 of every other file, ``.metadata`` included. It is written last.

Publishing is atomic: everything is written and fsync'd in a hidden temporary directory that is
then renamed to its final ``step-`` name. A ``step-`` directory whose manifest is missing or does
not match the files is never treated as a checkpoint (`latest_good` skips it with a reason).

`Persister` runs `persist` on a background thread behind a one-slot mailbox, so a disk slower than
the snapshot cadence skips intermediate snapshots instead of queueing them in memory.

The manifest itself (format, parsing, hashing) lives in manifest.py.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import inspect
import json
import logging
import os
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
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from hpt.ckpt.errors import CorruptCheckpointError, PersistError
from hpt.ckpt.manifest import (
    DTYPES,
    FORMAT_VERSION,
    HASH_ALGO,
    FileEntry,
    Manifest,
    TensorEntry,
    hash_files,
    is_plain_name,
)

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
FAULT_STAGES = ("dcp_saved", "meta_written", "files_hashed", "manifest_written")


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
    """Write `tensors` and `meta` as checkpoint ``root/step-{step:010d}`` and apply retention.

    An existing checkpoint of the same step is replaced. After publishing, all but the newest
    `keep_last` checkpoints whose manifest is intact are deleted (checkpoint directories older
    than those go too, whether intact or not); the one just written is never deleted. Scratch
    directories that crashed writers left behind are swept at the same time.

    Args:
        root: directory holding the checkpoints; created if missing.
        step: training step, 0..9999999999.
        tensors: flat state dict (name -> tensor, any device, any layout).
        meta: JSON-safe metadata, stored as ``hpt-meta.json`` and returned by `load_verified`.
        keep_last: how many checkpoints to keep, >= 1.
        thread_count: DCP writer threads, one data file each; the files are then hashed in
            parallel too. 4 beat 1 in each of three runs of tests/bench/bench_persist.py on
            the 2-core dev box (0.68-1.02 GB/s against 0.58-0.74 GB/s for 1 GiB).
        fault_hook: test seam, called with each name in `FAULT_STAGES`; what it raises is
            treated as an I/O failure at that point.

    Returns:
        The published checkpoint directory.

    Raises:
        ValueError: bad arguments (nothing was written).
        PersistError: an I/O error (disk full, ...); nothing was published, the temporary
            directory is gone and the earlier checkpoints are untouched.
    """
    _check_step(step)
    if keep_last < 1:
        raise ValueError(f"keep_last ({keep_last}) must be >= 1")
    if thread_count < 1:
        raise ValueError(f"thread_count ({thread_count}) must be >= 1")
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor name {name!r} must be a non-empty str")
        if not isinstance(t, torch.Tensor) or str(t.dtype).removeprefix("torch.") not in DTYPES:
            raise ValueError(f"tensors[{name!r}] must be a tensor of a dtype in {list(DTYPES)}")
    try:
        meta_json = json.dumps(dict(meta), sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"meta is not JSON-safe: {exc}") from exc
    hook = fault_hook or (lambda stage: None)
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / _scratch_name("tmp", final.name)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        # We fsync every file ourselves below, overlapped with hashing them.
        writer = FileSystemWriter(tmp, sync_files=False, thread_count=thread_count)
        with _single_process_dcp():
            dcp_save(dict(tensors), storage_writer=writer, **_dcp_kwargs())
        hook("dcp_saved")
        _write_file(tmp / META_NAME, meta_json)
        hook("meta_written")
        names = sorted(e.name for e in os.scandir(tmp))
        bad = [n for n in names if not is_plain_name(n) or n == MANIFEST_NAME]
        if bad or DCP_METADATA not in names:
            raise OSError(errno.EIO, f"unexpected files after DCP save: {names}")
        hashed = hash_files([tmp / n for n in names], HASH_ALGO, fsync=True)
        files = tuple(FileEntry(n, s, d) for n, (s, d) in zip(names, hashed, strict=True))
        hook("files_hashed")
        manifest = Manifest(
            version=FORMAT_VERSION,
            step=step,
            hash_algo=HASH_ALGO,
            files=files,
            tensors=tuple(
                TensorEntry(n, str(t.dtype).removeprefix("torch."), tuple(t.shape))
                for n, t in tensors.items()
            ),
            metadata_digest=next(f.digest for f in files if f.name == DCP_METADATA),
            created_unix_s=time.time(),
        )
        _write_file(tmp / MANIFEST_NAME, manifest.to_json())  # last: it makes tmp a checkpoint
        hook("manifest_written")
        _fsync_dir(tmp)
        _publish(tmp, final)
    except BaseException as exc:
        _remove(tmp)
        # DCP wraps I/O errors in CheckpointException, which derives from BaseException.
        if isinstance(exc, Exception | CheckpointException):
            raise PersistError(
                f"persisting step {step} to {final} failed: {_summary(exc)}"
            ) from exc
        raise
    try:
        _retain(root, keep_last, final)
        _sweep_leftovers(root)
    except OSError as exc:
        log.warning("retention in %s failed (keep_last=%d): %s", root, keep_last, exc)
    return final


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


def _sweep_leftovers(root: Path) -> None:
    """Remove scratch directories of crashed writers: every "del" one, and "tmp"/"old" ones of
    this host whose process is gone (another host's pids mean nothing here)."""
    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"
    for entry in os.scandir(root):
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
    """Verify a checkpoint, then load it through DCP into new CPU tensors.

    Returns:
        (state dict name -> tensor, the ``meta`` given to `persist`).

    Raises:
        ValueError: bad directory name.
        CorruptCheckpointError: verification or loading failed.
    """
    path = Path(path)
    # DCP's .metadata is a pickle and unpickling runs code, so it is read (by dcp.load below)
    # only after `verify` matched its SHA-256 against our manifest. The manifest is JSON that
    # hpt wrote last, after fsync'ing .metadata, and JSON parsing runs no code. So a .metadata
    # that was damaged, swapped or planted after hpt wrote the checkpoint is never unpickled.
    # The data files are read by DCP with torch.load(weights_only=True). What this does not
    # stop is someone who can rewrite the manifest as well: the directory's write permission
    # is the trust boundary, as it is for the code the job imports.
    manifest = verify(path)
    try:
        meta_raw = (path / META_NAME).read_bytes()
        meta_entry = next(f for f in manifest.files if f.name == META_NAME)
        if hashlib.new(manifest.hash_algo, meta_raw).hexdigest() != meta_entry.digest:
            raise CorruptCheckpointError(f"{path}: {META_NAME} changed after verification")
        meta = json.loads(meta_raw)
        if not isinstance(meta, dict):
            raise CorruptCheckpointError(f"{path}: {META_NAME} is not a JSON object")
        state = {t.name: torch.empty(t.shape, dtype=DTYPES[t.dtype]) for t in manifest.tensors}
        with _single_process_dcp():
            dcp_load(state, storage_reader=FileSystemReader(path), **_dcp_kwargs())
    except CorruptCheckpointError:
        raise
    except (Exception, CheckpointException) as exc:  # the latter is a BaseException
        raise CorruptCheckpointError(
            f"{path}: loading through DCP failed: {_summary(exc)}"
        ) from exc
    return state, meta


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
