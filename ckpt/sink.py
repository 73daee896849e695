"""Where snapshots go: the `SnapshotSink` seam between the engine and whoever owns the memory.

The engine (engine.py) never allocates snapshot memory itself. It asks a sink for one flat buffer
per (layout, generation), copies the rank's tensors into it, and tells the sink when a generation
holds a complete snapshot. The agent implements this protocol over memory it owns, so a snapshot
outlives a crashed rank; this module has two implementations that need nothing but torch:

- `MemorySink`: plain process memory, for tests and for standalone runs without an agent.
- `ShmSink`: files in /dev/shm (see its docstring for the names and the commit record), so that
  another process can read the newest complete snapshot after the rank that wrote it died.

Generations: the engine writes into at least two buffers in turn and never into the one holding
the newest complete snapshot, so a crash in the middle of a copy cannot destroy the last good
snapshot.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from hpt.ckpt.checksum import CHECKSUM_ALGO, RangeChecksum
from hpt.ckpt.errors import CorruptCheckpointError, RestoreError
from hpt.ckpt.layout import Layout

log = logging.getLogger(__name__)

RECORD_FORMAT = "hpt.snapshot-record.v2"


@dataclass(frozen=True, slots=True)
class SnapshotRef:
    """Names one complete snapshot held by a sink."""

    step: int
    """Number of completed training steps in the snapshot."""
    generation: int
    """The buffer slot that holds it."""


@dataclass(frozen=True, slots=True, eq=False)
class Snapshot:
    """A complete snapshot as read back from a sink. `buffer` may be the sink's own memory: copy
    out of it, do not keep views of it past the next save."""

    step: int
    generation: int
    layout: Layout
    meta_json: str
    """The JSON meta tree (layout.flatten's `meta`), as committed."""
    checksums: tuple[RangeChecksum, ...]
    buffer: torch.Tensor
    """1-D uint8 tensor of layout.total_bytes."""


@runtime_checkable
class SnapshotSink(Protocol):
    """Owner of snapshot buffers and of the knowledge which of them is complete.

    Call order, all from the training process: `acquire` and `discard` from the thread that calls
    `SnapshotEngine.save`; `commit` from an engine worker thread once that snapshot's copies and
    checksums are done; `latest` and `read` when restoring (never while a snapshot is in flight);
    `close` last. The engine never calls `acquire`, `discard` or `read` while a `commit` may run.
    """

    def acquire(self, layout: Layout, generation: int) -> torch.Tensor:
        """Return a writable 1-D uint8 CPU tensor of `layout.total_bytes` for `generation`.

        Called once per (layout, generation); the engine keeps and reuses the buffer for every
        later save into that generation until the layout changes. The engine zeroes (touches) it
        once. The engine never acquires the generation holding the newest complete snapshot; any
        older snapshot in `generation` is no longer complete after this call.
        """
        ...

    def discard(self, generation: int) -> None:
        """Forget the snapshot held in `generation` (if any): called before every save starts
        overwriting that generation's buffer, so `latest` never returns a torn snapshot."""
        ...

    def commit(
        self,
        step: int,
        generation: int,
        layout: Layout,
        meta_json: str,
        checksums: Sequence[RangeChecksum],
    ) -> None:
        """Mark `generation` as holding the complete snapshot of `step`: every copy has finished
        and `checksums` cover the whole buffer. Called from an engine worker thread."""
        ...

    def latest(self) -> SnapshotRef | None:
        """The complete snapshot with the highest step, or None when there is none."""
        ...

    def held(self) -> list[SnapshotRef]:
        """Every complete snapshot, newest step first (the restore chain looks a step up)."""
        ...

    def read(self, ref: SnapshotRef) -> Snapshot:
        """The snapshot `ref` names. Raises RestoreError if it is no longer held."""
        ...

    def close(self) -> None:
        """Release what the sink holds in this process."""
        ...


class MemorySink:
    """A `SnapshotSink` in plain process memory: for tests and standalone runs.

    Buffers are pinned when CUDA is available so GPU copies into them are asynchronous.
    """

    def __init__(self, *, pin_memory: bool | None = None) -> None:
        self._pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._lock = threading.Lock()
        self._buffers: dict[int, tuple[Layout, torch.Tensor]] = {}
        self._complete: dict[int, Snapshot] = {}
        self.num_acquired = 0
        """How many buffers were allocated (tests check buffer reuse with it)."""

    def acquire(self, layout: Layout, generation: int) -> torch.Tensor:
        buf = torch.empty(layout.total_bytes, dtype=torch.uint8, pin_memory=self._pin)
        with self._lock:
            self._complete.pop(generation, None)
            self._buffers[generation] = (layout, buf)
            self.num_acquired += 1
        return buf

    def discard(self, generation: int) -> None:
        with self._lock:
            self._complete.pop(generation, None)

    def commit(
        self,
        step: int,
        generation: int,
        layout: Layout,
        meta_json: str,
        checksums: Sequence[RangeChecksum],
    ) -> None:
        with self._lock:
            held_layout, buf = self._buffers[generation]
            assert held_layout == layout, "commit for a layout this generation was not acquired for"
            self._complete[generation] = Snapshot(
                step=step,
                generation=generation,
                layout=layout,
                meta_json=meta_json,
                checksums=tuple(checksums),
                buffer=buf,
            )

    def latest(self) -> SnapshotRef | None:
        with self._lock:
            if not self._complete:
                return None
            snap = max(self._complete.values(), key=lambda s: s.step)
            return SnapshotRef(step=snap.step, generation=snap.generation)

    def held(self) -> list[SnapshotRef]:
        with self._lock:
            snaps = sorted(self._complete.values(), key=lambda s: s.step, reverse=True)
            return [SnapshotRef(step=s.step, generation=s.generation) for s in snaps]

    def read(self, ref: SnapshotRef) -> Snapshot:
        with self._lock:
            snap = self._complete.get(ref.generation)
        if snap is None or snap.step != ref.step:
            raise RestoreError(f"snapshot of step {ref.step} (generation {ref.generation}) is gone")
        return snap

    def close(self) -> None:
        with self._lock:
            self._buffers.clear()
            self._complete.clear()


_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,200}$")


class ShmSink:
    """A `SnapshotSink` over files in /dev/shm that outlive the process that wrote them.

    Files, all in `directory` (default /dev/shm) and all starting with `prefix`:

    - ``{prefix}.g{generation}.{digest16}.buf``: the buffer of one generation, `total_bytes` long,
      mmap'ed shared; `digest16` is the first 16 hex digits of `Layout.digest`.
    - ``{prefix}.g{generation}.json``: the commit record, present only while that generation holds
      a complete snapshot. Written to ``.json.tmp`` and renamed into place, so a reader sees a
      whole record or none. It is a JSON object::

          {"format": "hpt.snapshot-record.v1", "prefix": str, "step": int, "generation": int,
           "buffer": "<file name of the .buf>", "total_bytes": int,
           "layout": {Layout.to_json() object}, "meta": {the meta tree (layout.flatten's meta)},
           "checksum_algo": "hpt.wsum64.v1", "checksums": [[start, length, "hex64"], ...],
           "committed_unix_s": float, "pid": int}

    - ``{prefix}.pins``: the generations the owner of the memory (the node agent) keeps from
      being overwritten for now, a JSON list of ints (`pin`, `pinned`); written whole by rename.
    - ``{prefix}.cadence``: the snapshot cadence the owner asks for (the controller retunes
      it, ``adapt_cadence``): ``{"every": N, "from": S, "before": B}``, snapshot the steps
      divisible by N from step S on, and before S those divisible by B (0: the writer's own
      cadence) (`set_cadence`, `cadence`); written whole by rename. Absent: the writer's own.

    Plain files rather than `multiprocessing.shared_memory`: on Python 3.11 a SharedMemory segment
    is registered with the creator's resource tracker, which unlinks it when the creator dies; the
    whole point here is that the snapshot survives the rank. Nothing is removed automatically:
    `close(unlink=True)` (or `ShmSink.remove(prefix)`) deletes every file of the prefix. The
    prefix must be unique per rank (e.g. ``hpt-<job>-r<rank>``); a new process with the same
    prefix sees, and keeps, the snapshots of its predecessor.
    """

    def __init__(self, prefix: str, *, directory: str | os.PathLike[str] = "/dev/shm") -> None:
        if not _PREFIX_RE.match(prefix):
            raise ValueError(
                f"prefix ({prefix!r}) must be 1-201 characters of letters, digits, '_' and '-', "
                "starting with a letter or digit"
            )
        self.prefix = prefix
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ValueError(f"directory ({str(self.directory)!r}) does not exist")
        self._file_re = re.compile(
            rf"^{re.escape(prefix)}\.(?:g(\d+)\.(?:[0-9a-f]{{16}}\.buf|json|json\.tmp|thin|thin\.tmp)"
            rf"|pins|pins\.tmp|cadence|cadence\.tmp)$"
        )
        self._cadence_key: tuple[int, int, int] | None = None  # the file's (inode, mtime, size)
        self._cadence: tuple[int, int, int] | None = None

    # -- paths -------------------------------------------------------------------------------

    def buffer_path(self, layout: Layout, generation: int) -> Path:
        return self.directory / f"{self.prefix}.g{generation}.{layout.digest[:16]}.buf"

    def record_path(self, generation: int) -> Path:
        return self.directory / f"{self.prefix}.g{generation}.json"

    def thin_path(self, generation: int) -> Path:
        """Where the agent keeps which blocks of this generation its protection leaves out."""
        return self.directory / f"{self.prefix}.g{generation}.thin"

    def pins_path(self) -> Path:
        return self.directory / f"{self.prefix}.pins"

    def pin(self, generations: Collection[int]) -> None:
        """Ask the writer not to overwrite ``generations`` for now (replaces earlier pins)."""
        path = self.pins_path()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(sorted(set(generations))))
        os.replace(tmp, path)

    def pinned(self) -> set[int]:
        """The generations pinned now (the engine's ``pinned``); none when unreadable."""
        try:
            raw = json.loads(self.pins_path().read_text())
        except FileNotFoundError:
            return set()
        except (OSError, ValueError) as e:
            log.warning("[ckpt %s] ignoring unreadable pins: %s", self.prefix, e)
            return set()
        if not isinstance(raw, list):
            return set()
        return {g for g in raw if isinstance(g, int) and not isinstance(g, bool) and g >= 0}

    def cadence_path(self) -> Path:
        return self.directory / f"{self.prefix}.cadence"

    def set_cadence(self, every: int, from_step: int = 0, before: int = 0) -> None:
        """Ask the writer to snapshot the steps divisible by ``every`` from ``from_step`` on,
        and before it those divisible by ``before`` (0: its own cadence); replaces an earlier
        cadence."""
        if every < 1 or from_step < 0 or before < 0:
            raise ValueError(f"cadence every {every} from step {from_step} (before: {before}): "
                             "every must be >= 1, from and before >= 0")
        path = self.cadence_path()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"every": every, "from": from_step, "before": before}))
        os.replace(tmp, path)

    def clear_cadence(self) -> None:
        """The writer's own cadence applies again."""
        self.cadence_path().unlink(missing_ok=True)

    def cadence(self) -> tuple[int, int, int] | None:
        """``(every, from_step, before)`` the owner asked for (`set_cadence`), or None: the
        writer's own. One ``stat`` per call; the file is read again only when it was
        replaced."""
        path = self.cadence_path()
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._cadence_key = self._cadence = None
            return None
        except OSError:
            return self._cadence
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key == self._cadence_key:
            return self._cadence
        self._cadence_key, self._cadence = key, None
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("[ckpt %s] ignoring unreadable cadence: %s", self.prefix, e)
            return None
        got = raw if isinstance(raw, dict) else {}
        values: list[int] = []
        for name, lowest in (("every", 1), ("from", 0), ("before", 0)):
            v = got.get(name, 0 if name == "before" else None)
            if not isinstance(v, int) or isinstance(v, bool) or v < lowest:
                log.warning("[ckpt %s] ignoring cadence %r: needs every >= 1, from and before "
                            ">= 0", self.prefix, raw)
                return None
            values.append(v)
        self._cadence = (values[0], values[1], values[2])
        return self._cadence

    def files(self) -> list[Path]:
        """Every file of this prefix in the directory."""
        return sorted(p for p in self.directory.iterdir() if self._file_re.match(p.name))

    # -- SnapshotSink ------------------------------------------------------------------------

    def acquire(self, layout: Layout, generation: int) -> torch.Tensor:
        self.discard(generation)
        path = self.buffer_path(layout, generation)
        stem = f"{self.prefix}.g{generation}."
        for stale in self.files():  # buffers of this generation for an older layout
            if stale.name.startswith(stem) and stale.suffix == ".buf" and stale != path:
                stale.unlink(missing_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size != layout.total_bytes:
                os.ftruncate(fd, layout.total_bytes)
            if layout.total_bytes == 0:
                return torch.empty(0, dtype=torch.uint8)
            mm = mmap.mmap(fd, layout.total_bytes, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)
        # The tensor holds the mapping: it is unmapped when the last tensor using it is gone.
        return torch.frombuffer(mm, dtype=torch.uint8)

    def discard(self, generation: int) -> None:
        self.record_path(generation).unlink(missing_ok=True)

    def commit(
        self,
        step: int,
        generation: int,
        layout: Layout,
        meta_json: str,
        checksums: Sequence[RangeChecksum],
    ) -> None:
        record = {
            "format": RECORD_FORMAT,
            "prefix": self.prefix,
            "step": step,
            "generation": generation,
            "buffer": self.buffer_path(layout, generation).name,
            "total_bytes": layout.total_bytes,
            "layout": json.loads(layout.to_json()),
            "meta": json.loads(meta_json),
            "checksum_algo": CHECKSUM_ALGO,
            "checksums": [c.to_json() for c in checksums],
            "committed_unix_s": time.time(),
            "pid": os.getpid(),
        }
        path = self.record_path(generation)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def latest(self) -> SnapshotRef | None:
        held = self.held()
        return held[0] if held else None

    def held(self) -> list[SnapshotRef]:
        refs = []
        for path in self.files():
            if not path.name.endswith(".json"):
                continue
            try:
                rec = self._load_record(path)
            except (OSError, ValueError) as e:
                log.warning(
                    "[ckpt %s] ignoring unreadable commit record %s: %s", self.prefix, path, e
                )
                continue
            refs.append(SnapshotRef(step=rec["step"], generation=rec["generation"]))
        return sorted(refs, key=lambda r: r.step, reverse=True)

    def read(self, ref: SnapshotRef) -> Snapshot:
        rec = self._record_of(ref)
        layout: Layout = rec["layout"]
        if layout.total_bytes == 0:
            buf = torch.empty(0, dtype=torch.uint8)
        else:
            with open(self.directory / rec["buffer"], "rb") as f:
                # ACCESS_COPY: a private copy-on-write view; readers never write the snapshot.
                mm = mmap.mmap(f.fileno(), layout.total_bytes, access=mmap.ACCESS_COPY)
            buf = torch.frombuffer(mm, dtype=torch.uint8)
        return Snapshot(
            step=rec["step"],
            generation=rec["generation"],
            layout=layout,
            meta_json=json.dumps(rec["meta"], separators=(",", ":"), allow_nan=False),
            checksums=rec["checksums"],
            buffer=buf,
        )

    def layout(self, ref: SnapshotRef) -> Layout:
        """The layout of snapshot `ref`, from its commit record alone (the buffer is not mapped).
        Raises RestoreError if it is no longer held, CorruptCheckpointError if unreadable."""
        layout: Layout = self._record_of(ref)["layout"]
        return layout

    def _record_of(self, ref: SnapshotRef) -> dict[str, Any]:
        """The validated commit record of `ref`; raises as `read` does."""
        path = self.record_path(ref.generation)
        try:
            rec = self._load_record(path)
        except FileNotFoundError:
            raise RestoreError(
                f"snapshot of step {ref.step} (generation {ref.generation}) is gone: no {path}"
            ) from None
        except (OSError, ValueError) as e:
            raise CorruptCheckpointError(f"commit record {path} is unreadable: {e}") from e
        if rec["step"] != ref.step:
            raise RestoreError(
                f"generation {ref.generation} now holds step {rec['step']}, not step {ref.step}"
            )
        return rec

    def close(self, unlink: bool = False) -> None:
        """With `unlink`, delete every file of the prefix. Mappings need no closing: each goes
        away with the last tensor that uses it (an unlinked file's memory is freed then)."""
        if unlink:
            self.remove(self.prefix, directory=self.directory)

    @staticmethod
    def remove(prefix: str, *, directory: str | os.PathLike[str] = "/dev/shm") -> int:
        """Delete every file of `prefix` in `directory`; returns how many were deleted."""
        sink = ShmSink(prefix, directory=directory)
        removed = 0
        for path in sink.files():
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    def _load_record(self, path: Path) -> dict[str, Any]:
        """Read and validate one commit record; `layout` and `checksums` come back parsed."""
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
        if not isinstance(rec, dict) or rec.get("format") != RECORD_FORMAT:
            raise ValueError(
                f"format ({rec.get('format') if isinstance(rec, dict) else rec!r}) "
                f"must be {RECORD_FORMAT!r}"
            )
        for name in ("step", "generation", "total_bytes"):
            v = rec.get(name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} ({v!r}) must be an int >= 0")
        if rec.get("checksum_algo") != CHECKSUM_ALGO:
            raise ValueError(
                f"checksum_algo ({rec.get('checksum_algo')!r}) must be {CHECKSUM_ALGO!r}"
            )
        if "meta" not in rec:
            raise ValueError("meta is missing")
        buffer = rec.get("buffer")
        if (
            not isinstance(buffer, str)
            or not self._file_re.match(buffer)
            or not buffer.endswith(".buf")
        ):
            raise ValueError(f"buffer ({buffer!r}) must name a .buf file of prefix {self.prefix!r}")
        layout_obj = rec.get("layout")
        if not isinstance(layout_obj, dict):
            raise ValueError("layout must be an object")
        layout = Layout.from_json(layout_obj)
        if layout.total_bytes != rec["total_bytes"]:
            raise ValueError(f"total_bytes ({rec['total_bytes']}) != layout.total_bytes")
        raw = rec.get("checksums")
        if not isinstance(raw, list):
            raise ValueError("checksums must be a list")
        checksums = tuple(RangeChecksum.from_json(c, f"checksums[{i}]") for i, c in enumerate(raw))
        size = os.stat(self.directory / buffer).st_size
        if size < layout.total_bytes:
            raise ValueError(f"buffer file {buffer} has {size} bytes, needs {layout.total_bytes}")
        rec["layout"] = layout
        rec["checksums"] = checksums
        return rec
