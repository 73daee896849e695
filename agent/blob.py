"""A node's blob: the snapshots its ranks hold for one step, seen as one byte string.

Snapshot protection (protect.py) codes whole nodes, not ranks: the unit a node loss takes away
is everything the node held. The blob of (node, step) is defined by the attempt's rank list for
that node, so any agent can name it and the owner can serve any byte range of it without
copying it first (the ranks' buffers are read straight from their shared-memory files)::

    bytes 0..7        b"HPTBLOB1"
    bytes 8..15       header length H, little-endian
    bytes 16..16+H    header JSON: {"step": s, "ranks": [{"rank": r, "offset": o, "bytes": n,
                      "layout": {...}, "meta_json": "...", "checksums": [[start, len, hex]]}]}
    zero padding to a multiple of 64, then each rank's buffer at its offset (64-aligned)

A blob cut into ``k`` segments (``segment_bytes``) is what a stripe of the erasure code holds of
the node. ``materialise`` goes the other way: the ranks of a (decoded or fetched) blob become
ordinary ``ShmSink`` files that a rank restores from, verified against their checksums first.
"""

from __future__ import annotations

import ctypes
import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from hpt.agent import chunks
from hpt.ckpt.checksum import RangeChecksum, verify
from hpt.ckpt.errors import CkptError
from hpt.ckpt.layout import ALIGN_BYTES, Layout
from hpt.ckpt.sink import ShmSink, Snapshot, SnapshotRef

log = logging.getLogger(__name__)

MAGIC = b"HPTBLOB1"
_MAX_HEADER_BYTES = 256 * 2**20
_MAX_GENERATIONS = 64
RESTORE_GENERATIONS = 3
"""Generations a materialised snapshot may take in its prefix (what the rank's engine uses)."""


class BlobError(Exception):
    """A blob is missing, incomplete or does not verify."""


def _align(n: int) -> int:
    return -(-n // ALIGN_BYTES) * ALIGN_BYTES


def segment_bytes(blob_bytes: int, k: int) -> int:
    """Length of each of the k segments a blob of ``blob_bytes`` is cut into (64-aligned)."""
    return _align(-(-blob_bytes // k)) if blob_bytes else 0


def find_generation(sink: ShmSink, step: int) -> int | None:
    """The generation of ``sink`` whose commit record holds ``step``, if any."""
    for path in sink.files():
        if not path.name.endswith(".json"):
            continue
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and rec.get("step") == step:
            generation = rec.get("generation")
            if isinstance(generation, int) and 0 <= generation < _MAX_GENERATIONS:
                return generation
    return None


def held_steps(shm_dir: str, prefix: str) -> set[int]:
    """Steps with a commit record under ``prefix`` (cheap: records only, no verification)."""
    out = set()
    for path in ShmSink(prefix, directory=shm_dir).files():
        if path.name.endswith(".json"):
            try:
                step = json.loads(path.read_text()).get("step")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(step, int):
                out.add(step)
    return out


@dataclass(slots=True)
class _Part:
    rank: int
    sink: ShmSink
    generation: int
    snap: Snapshot
    offset: int


class NodeBlob:
    """The blob of some ranks' snapshots of one step, read from shared memory in place."""

    def __init__(self, shm_dir: str, prefixes: list[tuple[int, str]], step: int) -> None:
        self.step = step
        self._parts: list[_Part] = []
        entries = []
        for rank, prefix in sorted(prefixes):
            sink = ShmSink(prefix, directory=shm_dir)
            generation = find_generation(sink, step)
            if generation is None:
                raise BlobError(f"rank {rank} holds no snapshot of step {step}")
            try:
                snap = sink.read(SnapshotRef(step=step, generation=generation))
            except (CkptError, OSError, ValueError) as exc:
                raise BlobError(f"rank {rank}'s snapshot of step {step} unreadable: {exc}") from exc
            self._parts.append(_Part(rank, sink, generation, snap, 0))
            entries.append({"rank": rank, "offset": 0, "bytes": snap.layout.total_bytes,
                            "layout": json.loads(snap.layout.to_json()),
                            "meta_json": snap.meta_json,
                            "checksums": [c.to_json() for c in snap.checksums]})
        # offsets depend on the header's length, which depends on the offsets' digits: iterate
        header = b""
        for _ in range(4):
            offset = _align(16 + len(header))
            for part, entry in zip(self._parts, entries, strict=True):
                part.offset = entry["offset"] = offset
                offset = _align(offset + entry["bytes"])
            new = json.dumps({"step": step, "ranks": entries}, separators=(",", ":")).encode()
            if new == header:
                break
            header = new
        self._head = torch.zeros(_align(16 + len(header)), dtype=torch.uint8)
        self._head[:16] = torch.frombuffer(bytearray(MAGIC + struct.pack("<Q", len(header))),
                                           dtype=torch.uint8)
        self._head[16:16 + len(header)] = torch.frombuffer(bytearray(header), dtype=torch.uint8)
        last = self._parts[-1] if self._parts else None
        self.nbytes = (last.offset + last.snap.layout.total_bytes) if last else self._head.numel()

    def read_into(self, start: int, out: torch.Tensor) -> None:
        """Copy blob bytes [start, start + len(out)) into ``out``; zeros past the end."""
        end = start + out.numel()
        if end > self.nbytes:
            out[max(self.nbytes - start, 0):].zero_()
        spans = [(0, self._head)] + [(p.offset, p.snap.buffer) for p in self._parts]
        for base, buf in spans:
            lo, hi = max(start, base), min(end, base + buf.numel())
            if lo < hi:
                out[lo - start:hi - start].copy_(buf[lo - base:hi - base])

    def read_bytes(self, start: int, n: int) -> bytes:
        """Blob bytes [start, start + n) as ``bytes``: one copy straight from shared memory
        when the range lies in one rank's buffer (the common case for large chunks)."""
        for base, buf in [(p.offset, p.snap.buffer) for p in self._parts]:
            if base <= start and start + n <= base + buf.numel():
                return ctypes.string_at(buf.data_ptr() + start - base, n)
        out = torch.empty(n, dtype=torch.uint8)
        self.read_into(start, out)
        return tensor_bytes(out)

    def view(self, start: int, n: int) -> bytes | memoryview:
        """Blob bytes [start, start + n) without a copy when the range lies in one rank's
        buffer (a view of its shared memory, valid while this blob lives), else a copy."""
        for base, buf in [(p.offset, p.snap.buffer) for p in self._parts]:
            if base <= start and start + n <= base + buf.numel():
                return chunks.shm_view(buf.data_ptr() + start - base, n)
        return self.read_bytes(start, n)

    def verify(self) -> list[int]:
        """Ranks whose buffer no longer matches the checksums of its commit record."""
        return [p.rank for p in self._parts if verify(p.snap.buffer, list(p.snap.checksums))]

    def intact(self) -> bool:
        """Every rank's commit record still names this step: nothing was overwritten (a rank
        removes the record before it writes into a generation again)."""
        for p in self._parts:
            try:
                rec = json.loads(p.sink.record_path(p.generation).read_text())
            except (OSError, ValueError):
                return False
            if not isinstance(rec, dict) or rec.get("step") != self.step:
                return False
        return True


@dataclass(frozen=True, slots=True)
class Part:
    """One rank's entry in a blob's header: where its buffer lies and how to check it."""

    rank: int
    layout: Layout
    meta_json: str
    checksums: tuple[RangeChecksum, ...]
    offset: int
    nbytes: int


def header_length(prefix: bytes) -> int:
    """The header length a blob's first 16 bytes give.

    Raises:
        BlobError: bad magic, or a length out of range.
    """
    if len(prefix) < 16 or prefix[:8] != MAGIC:
        raise BlobError("not a snapshot blob (bad magic)")
    (length,) = struct.unpack("<Q", prefix[8:16])
    if length > _MAX_HEADER_BYTES:
        raise BlobError(f"blob header length ({length}) out of range")
    return int(length)


def parse_header(head: bytes, blob_bytes: int) -> tuple[int, list[Part]]:
    """(step, parts) from a blob's first ``16 + header_length`` bytes.

    Raises:
        BlobError: the bytes are not a blob header, or a part lies outside ``blob_bytes``.
    """
    length = header_length(head[:16])
    if 16 + length > min(len(head), blob_bytes):
        raise BlobError(f"blob header length ({length}) out of range")
    try:
        header = json.loads(head[16:16 + length])
        step = header["step"]
        out = []
        for i, entry in enumerate(header["ranks"]):
            layout = Layout.from_json(entry["layout"])
            offset, nbytes = entry["offset"], entry["bytes"]
            if (nbytes != layout.total_bytes or offset < 16 + length
                    or offset + nbytes > blob_bytes):
                raise ValueError(f"ranks[{i}] offset/bytes out of range")
            checksums = tuple(RangeChecksum.from_json(c, f"ranks[{i}].checksums")
                              for c in entry["checksums"])
            out.append(Part(int(entry["rank"]), layout, str(entry["meta_json"]), checksums,
                            int(offset), int(nbytes)))
    except (KeyError, TypeError, ValueError) as exc:
        raise BlobError(f"blob header invalid: {exc}") from exc
    if not isinstance(step, int):
        raise BlobError("blob header step must be an int")
    return step, out


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The bytes of a contiguous uint8 CPU tensor (one copy; no numpy at run time)."""
    t = t.contiguous()
    return ctypes.string_at(t.data_ptr(), t.numel()) if t.numel() else b""


class Landing:
    """A rank's snapshot of ``step`` being written under ``prefix`` (an ordinary ShmSink
    generation, no commit record yet): fill ``buf``, then ``commit``."""

    def __init__(self, shm_dir: str, prefix: str, step: int, layout: Layout) -> None:
        self.sink = ShmSink(prefix, directory=shm_dir)
        existing = find_generation(self.sink, step)
        if existing is not None:
            self.sink.discard(existing)
        self.prefix, self.step, self.layout = prefix, step, layout
        self.generation = _free_generation(self.sink)
        self.buf = self.sink.acquire(layout, self.generation)

    def commit(self, meta_json: str, checksums: tuple[RangeChecksum, ...]) -> int:
        """Verify what landed and commit it; returns the generation.

        Raises:
            BlobError: the bytes do not match their checksums (nothing is committed).
        """
        if verify(self.buf, list(checksums)):  # rebuilt or fetched bytes, checked where they land
            self.sink.discard(self.generation)
            raise BlobError(f"snapshot of step {self.step} for {self.prefix} does not match "
                            "its checksums")
        self.sink.commit(self.step, self.generation, self.layout, meta_json, checksums)
        return self.generation


def _free_generation(sink: ShmSink) -> int:
    """A generation without a commit record, else the one holding the oldest step."""
    steps: dict[int, int] = {}
    for g in range(RESTORE_GENERATIONS):
        path = sink.record_path(g)
        if not path.exists():
            return g
        try:
            steps[g] = int(json.loads(path.read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return g
    return min(steps, key=lambda g: steps[g])


def remove_files(shm_dir: str, prefix: str) -> int:
    """Unlink every file whose name starts with ``prefix`` (protection pieces of a job)."""
    removed = 0
    for path in Path(shm_dir).glob(f"{prefix}*"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed
