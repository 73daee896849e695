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

A *thin* blob leaves out blocks of a rank's buffer that a replica on another node holds byte
for byte (data-parallel state: every rank holds the same model and optimizer; only the RNG
states and the like differ). Its header entry then also has ``"block": B`` (the block size),
``"omit": [[index, "checksum"], ...]`` (the blocks left out, each with its ``checksum``),
``"ref"`` (the old rank they were compared with) and ``"stored"`` (the bytes the rank takes in
the blob): the kept blocks follow each other from the rank's offset. Protection codes the
thin blob, so parity costs what is unique to a node, not (1 + m/k) x its state; a rebuild
decodes the thin blob and copies each left-out block from a surviving replica whose block has
the same checksum (``Thin``; materialise.py).
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
from hpt.ckpt.checksum import RangeChecksum, block_checksums, verify
from hpt.ckpt.errors import CkptError
from hpt.ckpt.layout import ALIGN_BYTES, Layout
from hpt.ckpt.sink import ShmSink, Snapshot, SnapshotRef

log = logging.getLogger(__name__)

MAGIC = b"HPTBLOB1"
_MAX_HEADER_BYTES = 256 * 2**20
_MAX_GENERATIONS = 64
RESTORE_GENERATIONS = 3
"""Generations a materialised snapshot may take in its prefix (what the rank's engine uses)."""


THIN_MIN_BLOCK = 4 << 10
_THIN_MAX_BLOCKS = 1024


def block_bytes(total: int) -> int:
    """Block size of a thin blob's rank of ``total`` bytes: 4 KiB, doubled until the rank
    has at most 1,024 blocks (the header lists the left-out ones: ~25 KB of JSON at most)."""
    block = THIN_MIN_BLOCK
    while block * _THIN_MAX_BLOCKS < total:
        block *= 2
    return block


@dataclass(frozen=True, slots=True)
class Thin:
    """The blocks of one rank's buffer a thin blob leaves out (a replica holds them)."""

    block: int
    omit: tuple[tuple[int, int], ...]
    """(block index, its checksum), ascending by index."""
    ref: int
    """The old rank whose replica matched them when the blob was first served."""

    def runs(self, total: int) -> list[tuple[int, int]]:
        """The kept byte ranges [start, end) of a buffer of ``total`` bytes, in order."""
        out: list[tuple[int, int]] = []
        at = 0
        for index, _ in self.omit:
            start = index * self.block
            if start > at:
                out.append((at, start))
            at = min(start + self.block, total)
        if at < total:
            out.append((at, total))
        return out

    def stored(self, total: int) -> int:
        return sum(end - start for start, end in self.runs(total))

    def to_json(self) -> dict[str, object]:
        return {"block": self.block, "ref": self.ref,
                "omit": [[i, f"{v:016x}"] for i, v in self.omit]}

    @classmethod
    def from_json(cls, obj: object, total: int, where: str) -> Thin:
        """Parse and check a thin entry against a buffer of ``total`` bytes.

        Raises:
            ValueError: a field is missing or out of range (named).
        """
        if not isinstance(obj, dict):
            raise ValueError(f"{where} must be an object")
        block, ref, omit = obj.get("block"), obj.get("ref"), obj.get("omit")
        if not isinstance(block, int) or block < THIN_MIN_BLOCK or block % THIN_MIN_BLOCK:
            raise ValueError(f"{where}.block ({block!r}) must be a multiple of {THIN_MIN_BLOCK}")
        if not isinstance(ref, int) or ref < 0:
            raise ValueError(f"{where}.ref ({ref!r}) must be an int >= 0")
        if not isinstance(omit, list):
            raise ValueError(f"{where}.omit must be a list")
        blocks, out, last = -(-total // block), [], -1
        for item in omit:
            if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], int)
                    or not last < item[0] < blocks or not isinstance(item[1], str)):
                raise ValueError(f"{where}.omit ({item!r}) must be [block index, 'hex'] with "
                                 f"indices ascending below {blocks}")
            out.append((item[0], int(item[1], 16)))
            last = item[0]
        return cls(block, tuple(out), ref)


def kept_runs(thin: Thin | None, total: int) -> list[tuple[int, int]]:
    """The byte ranges of a buffer of ``total`` bytes that its blob holds (all of it unless
    ``thin`` leaves blocks out)."""
    return thin.runs(total) if thin else [(0, total)]


def thin_against(buf: torch.Tensor, ref_sums: list[int], ref: int,
                 own: list[int] | None = None) -> Thin | None:
    """The blocks of ``buf`` equal (by checksum) to the same blocks of a replica whose block
    checksums are ``ref_sums``; None when none is (or the sizes differ). ``own``: the block
    checksums of ``buf``, when known."""
    block = block_bytes(buf.numel())
    own = own if own is not None else block_checksums(buf, block)
    if len(own) != len(ref_sums):
        return None
    omit = tuple((i, v) for i, (v, r) in enumerate(zip(own, ref_sums, strict=True)) if v == r)
    return Thin(block, omit, ref) if omit else None


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
    thin: Thin | None = None

    @property
    def stored(self) -> int:
        return sum(end - start for start, end in self.runs())

    def runs(self) -> list[tuple[int, int]]:
        return kept_runs(self.thin, self.snap.layout.total_bytes)


class NodeBlob:
    """The blob of some ranks' snapshots of one step, read from shared memory in place."""

    def __init__(self, shm_dir: str, prefixes: list[tuple[int, str]], step: int) -> None:
        self.step = step
        self._parts: list[_Part] = []
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
        self._layout()

    def _layout(self) -> None:
        """The header and where each rank's (kept) bytes lie in the blob."""
        entries = []
        for part in self._parts:
            snap = part.snap
            entry = {"rank": part.rank, "offset": 0, "bytes": snap.layout.total_bytes,
                     "layout": json.loads(snap.layout.to_json()), "meta_json": snap.meta_json,
                     "checksums": [c.to_json() for c in snap.checksums]}
            if part.thin is not None:
                entry.update(part.thin.to_json(), stored=part.stored)
            entries.append(entry)
        # offsets depend on the header's length, which depends on the offsets' digits: iterate
        header = b""
        for _ in range(4):
            offset = _align(16 + len(header))
            for part, entry in zip(self._parts, entries, strict=True):
                part.offset = entry["offset"] = offset
                offset = _align(offset + part.stored)
            new = json.dumps({"step": self.step, "ranks": entries},
                             separators=(",", ":")).encode()
            if new == header:
                break
            header = new
        self._head = torch.zeros(_align(16 + len(header)), dtype=torch.uint8)
        self._head[:16] = torch.frombuffer(bytearray(MAGIC + struct.pack("<Q", len(header))),
                                           dtype=torch.uint8)
        self._head[16:16 + len(header)] = torch.frombuffer(bytearray(header), dtype=torch.uint8)
        self._spans: list[tuple[int, torch.Tensor]] = []  # (blob offset, bytes there)
        for part in self._parts:
            at = part.offset
            for start, end in part.runs():
                self._spans.append((at, part.snap.buffer[start:end]))
                at += end - start
        last = self._parts[-1] if self._parts else None
        self.nbytes = (last.offset + last.stored) if last else self._head.numel()

    def parts(self) -> list[tuple[int, ShmSink, int, Snapshot]]:
        """(rank, sink, generation, snapshot) of every rank in the blob."""
        return [(p.rank, p.sink, p.generation, p.snap) for p in self._parts]

    def thin(self, plans: dict[int, Thin]) -> None:
        """Leave out the blocks ``plans`` names (rank -> Thin) from now on."""
        for part in self._parts:
            part.thin = plans.get(part.rank)
        self._layout()

    def read_into(self, start: int, out: torch.Tensor) -> None:
        """Copy blob bytes [start, start + len(out)) into ``out``; zeros past the end."""
        end = start + out.numel()
        out.zero_()
        for base, buf in [(0, self._head), *self._spans]:
            lo, hi = max(start, base), min(end, base + buf.numel())
            if lo < hi:
                out[lo - start:hi - start].copy_(buf[lo - base:hi - base])

    def read_bytes(self, start: int, n: int) -> bytes:
        """Blob bytes [start, start + n) as ``bytes``: one copy straight from shared memory
        when the range lies in one rank's buffer (the common case for large chunks)."""
        for base, buf in self._spans:
            if base <= start and start + n <= base + buf.numel():
                return ctypes.string_at(buf.data_ptr() + start - base, n)
        out = torch.empty(n, dtype=torch.uint8)
        self.read_into(start, out)
        return tensor_bytes(out)

    def view(self, start: int, n: int) -> bytes | memoryview:
        """Blob bytes [start, start + n) without a copy when the range lies in one rank's
        buffer (a view of its shared memory, valid while this blob lives), else a copy."""
        for base, buf in self._spans:
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
    thin: Thin | None = None

    @property
    def stored(self) -> int:
        """Bytes the rank takes in the blob (its buffer less the blocks left out)."""
        return sum(end - start for start, end in kept_runs(self.thin, self.nbytes))

    def spans(self) -> list[tuple[int, int, int]]:
        """(blob offset, buffer start, buffer end) of each kept run of the rank's buffer."""
        out, at = [], self.offset
        for start, end in kept_runs(self.thin, self.nbytes):
            out.append((at, start, end))
            at += end - start
        return out


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
            thin = (Thin.from_json(entry, nbytes, f"ranks[{i}]") if "omit" in entry else None)
            stored = thin.stored(nbytes) if thin else nbytes
            if thin and entry.get("stored") != stored:
                raise ValueError(f"ranks[{i}].stored ({entry.get('stored')!r}) must be "
                                 f"{stored}")
            if (nbytes != layout.total_bytes or offset < 16 + length
                    or offset + stored > blob_bytes):
                raise ValueError(f"ranks[{i}] offset/bytes out of range")
            checksums = tuple(RangeChecksum.from_json(c, f"ranks[{i}].checksums")
                              for c in entry["checksums"])
            out.append(Part(int(entry["rank"]), layout, str(entry["meta_json"]), checksums,
                            int(offset), int(nbytes), thin))
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
