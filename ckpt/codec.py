"""Systematic Reed-Solomon erasure coding over GF(2^8): k data shards + m parity shards.

The agent erasure-codes every snapshot across its node group so that losing any m nodes loses
nothing (DESIGN.md, "Checkpoint path"); restore decodes the pieces that are gone. This module is
pure computation on byte buffers: it knows nothing about snapshots, agents or the wire.

The code, fixed for every implementation so that their outputs are byte-identical:

- Field: GF(2^8) with the polynomial x^8 + x^4 + x^3 + x^2 + 1 (0x11d), generator 2, the field
  of Intel ISA-L, Jerasure and most storage systems.
- Encoding matrix: ISA-L's ``gf_gen_cauchy1_matrix``. The top k rows are the identity
  (systematic: data shards are stored as they are); parity row ``p`` has coefficient
  ``1 / ((k + p) XOR j)`` for data shard ``j``. The lower block is a Cauchy matrix (x_p = k + p
  and y_j = j are distinct field elements, and x_p + y_j = x_p XOR y_j is never 0), and every
  square submatrix of a Cauchy matrix is invertible, so ANY k of the k + m shards decode. This
  needs ``k + m <= 256``. (ISA-L's other generator, ``gf_gen_rs_matrix``, is not MDS for every
  (k, m), which is why it is not used.)

Implementations of `Codec`:

- `IsalCodec`: ctypes calls into Intel ISA-L (Debian ``libisal2``) on the caller's buffers
  (``ec_init_tables`` + ``ec_encode_data``, ``gf_invert_matrix`` for decode). No copies.
- `TorchCodec`: vectorised torch (table gathers), the same bytes where ISA-L is absent; runs on
  CPU or CUDA tensors.
- `PyCodec`: the small reference in plain Python (``bytes.translate`` as the multiply); slow on
  large inputs, used by the tests to check the others.

`best_codec()` returns ISA-L when it loads and torch otherwise. `split`/`join` cut a byte buffer
into k equal data shards (the last one zero-padded) and put it back together.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import threading
import warnings
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from hpt.ckpt.errors import DecodeError

__all__ = [
    "Buffer",
    "Codec",
    "IsalCodec",
    "PyCodec",
    "TorchCodec",
    "best_codec",
    "encode_matrix",
    "gf_inv",
    "gf_mul",
    "join",
    "split",
]

log = logging.getLogger(__name__)

# Anything exposing the buffer protocol (bytes, bytearray, memoryview, mmap) or a uint8 tensor.
Buffer = Any

_POLY = 0x11D
MAX_SHARDS = 256


# --------------------------------------------------------------------------- GF(2^8) arithmetic
def _build_tables() -> tuple[list[int], list[int]]:
    exp = [0] * 512
    logt = [0] * 256
    x = 1
    for i in range(255):
        exp[i] = x
        logt[x] = i
        x <<= 1
        if x & 0x100:
            x ^= _POLY
    for i in range(255, 512):
        exp[i] = exp[i - 255]
    return exp, logt


_EXP, _LOG = _build_tables()


def gf_mul(a: int, b: int) -> int:
    """Product of two field elements (ints in 0..255)."""
    if a == 0 or b == 0:
        return 0
    return _EXP[_LOG[a] + _LOG[b]]


def gf_inv(a: int) -> int:
    """Multiplicative inverse of a non-zero field element."""
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(2^8)")
    return _EXP[255 - _LOG[a]]


@functools.cache
def _mul_table_bytes(c: int) -> bytes:
    """The 256-byte table x -> c * x, usable with bytes.translate."""
    return bytes(gf_mul(c, x) for x in range(256))


def _check_km(k: int, m: int) -> None:
    if k < 1:
        raise ValueError(f"k ({k}) must be >= 1")
    if m < 0:
        raise ValueError(f"m ({m}) must be >= 0")
    if k + m > MAX_SHARDS:
        raise ValueError(f"k + m ({k + m}) must be <= {MAX_SHARDS} for GF(2^8)")


@functools.cache
def encode_matrix(k: int, m: int) -> tuple[tuple[int, ...], ...]:
    """The (k + m) x k systematic Cauchy encoding matrix, row-major (see the module docstring).

    Equal to ISA-L's ``gf_gen_cauchy1_matrix(a, k + m, k)``; a test checks that.
    """
    _check_km(k, m)
    rows = [tuple(1 if i == j else 0 for j in range(k)) for i in range(k)]
    rows += [tuple(gf_inv((k + p) ^ j) for j in range(k)) for p in range(m)]
    return tuple(rows)


def _gf_invert(matrix: list[list[int]]) -> list[list[int]]:
    """Gauss-Jordan inverse of a square matrix over GF(2^8)."""
    n = len(matrix)
    a = [list(row) + [1 if i == j else 0 for j in range(n)] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = next((r for r in range(col, n) if a[r][col]), None)
        if pivot is None:
            raise DecodeError("decoding matrix is singular")
        a[col], a[pivot] = a[pivot], a[col]
        inv = gf_inv(a[col][col])
        a[col] = [gf_mul(inv, v) for v in a[col]]
        for r in range(n):
            f = a[r][col]
            if r != col and f:
                a[r] = [v ^ gf_mul(f, w) for v, w in zip(a[r], a[col], strict=True)]
    return [row[n:] for row in a]


# --------------------------------------------------------------------------- buffers
def _as_u8(buf: Buffer, what: str, *, writable: bool = False) -> torch.Tensor:
    """A flat uint8 tensor viewing `buf` (never a copy)."""
    if isinstance(buf, torch.Tensor):
        if buf.dtype != torch.uint8:
            raise ValueError(f"{what} has dtype {buf.dtype}; shards must be uint8")
        if not buf.is_contiguous():
            raise ValueError(f"{what} is not contiguous")
        return buf.view(-1)
    mv = memoryview(buf)
    if not mv.contiguous:
        raise ValueError(f"{what} is not a contiguous buffer")
    if writable and mv.readonly:
        raise ValueError(f"{what} is read-only")
    if mv.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    mv = mv.cast("B")
    if mv.readonly:
        # We only ever read inputs, so torch's "buffer is not writable" warning does not apply.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(mv, dtype=torch.uint8)
    return torch.frombuffer(mv, dtype=torch.uint8)


def _shard_len(shards: Sequence[torch.Tensor], names: Sequence[str]) -> int:
    size = shards[0].numel()
    for t, name in zip(shards, names, strict=True):
        if t.numel() != size:
            raise ValueError(f"{name} has {t.numel()} bytes, expected {size} (shards are equal)")
    return size


def split(buf: Buffer, k: int) -> list[torch.Tensor]:
    """Cut `buf` into k equal data shards of ceil(len / k) bytes.

    Full shards are views of `buf`; a shard that runs past the end is a new zero-padded tensor.
    Keep the original length to `join` them again.
    """
    _check_km(k, 0)
    data = _as_u8(buf, "buf")
    n = data.numel()
    size = -(-n // k)
    shards = []
    for i in range(k):
        start, end = min(i * size, n), min((i + 1) * size, n)
        if end - start == size:
            shards.append(data[start:end])
        else:
            padded = torch.zeros(size, dtype=torch.uint8, device=data.device)
            padded[: end - start].copy_(data[start:end])
            shards.append(padded)
    return shards


def join(shards: Sequence[Buffer], nbytes: int, out: Buffer | None = None) -> torch.Tensor:
    """Concatenate data shards and drop the padding: the inverse of `split`.

    Args:
        shards: the k data shards, in order.
        nbytes: the length of the original buffer.
        out: optional preallocated destination of `nbytes` bytes.

    Returns:
        `out` as a uint8 tensor, or a new tensor.
    """
    views = [_as_u8(s, f"shards[{i}]") for i, s in enumerate(shards)]
    size = _shard_len(views, [f"shards[{i}]" for i in range(len(views))])
    if not 0 <= nbytes <= size * len(views):
        raise ValueError(f"nbytes ({nbytes}) must be in 0..{size * len(views)}")
    dest = (
        torch.empty(nbytes, dtype=torch.uint8, device=views[0].device if views else "cpu")
        if out is None
        else _as_u8(out, "out", writable=True)
    )
    if dest.numel() != nbytes:
        raise ValueError(f"out has {dest.numel()} bytes, expected nbytes ({nbytes})")
    for i, v in enumerate(views):
        start, end = i * size, min((i + 1) * size, nbytes)
        if start >= end:
            break
        dest[start:end].copy_(v[: end - start])
    return dest


# --------------------------------------------------------------------------- the protocol
@runtime_checkable
class Codec(Protocol):
    """Systematic Reed-Solomon codec (one per process is enough; implementations are
    thread-safe).

    Called by the agent after a rank's shard is in shared memory (`encode`) and on restore when
    pieces are missing (`decode`). All shards of one call have the same length.
    """

    name: str

    def encode(self, data: Sequence[Buffer], parity_out: Sequence[Buffer]) -> None:
        """Compute m = len(parity_out) parity shards of k = len(data) data shards into the
        preallocated `parity_out` buffers."""
        ...

    def decode(
        self,
        shards: Sequence[Buffer | None],
        k: int,
        m: int,
        out: Sequence[Buffer | None] | None = None,
        rebuild: Sequence[int] | None = None,
    ) -> list[torch.Tensor | None]:
        """Rebuild the missing (None) shards of a stripe of k + m shards (data first, then
        parity) from any k present ones. Returns all k + m shards as uint8 tensors: the present
        ones as views of the inputs, the rebuilt ones in ``out[i]`` when given, else new.
        ``rebuild`` names the missing shards wanted (default: every one); the others stay
        None and cost nothing. Raises `DecodeError` when more than m are missing."""
        ...


class _MatrixCodec:
    """Shared matrix logic; subclasses supply the bulk multiply (and may replace inversion)."""

    name = "abstract"

    def encode(self, data: Sequence[Buffer], parity_out: Sequence[Buffer]) -> None:
        k, m = len(data), len(parity_out)
        _check_km(k, m)
        srcs = [_as_u8(b, f"data[{i}]") for i, b in enumerate(data)]
        dsts = [_as_u8(b, f"parity_out[{i}]", writable=True) for i, b in enumerate(parity_out)]
        names = [f"data[{i}]" for i in range(k)] + [f"parity_out[{i}]" for i in range(m)]
        if _shard_len(srcs + dsts, names) == 0 or m == 0:
            return
        self._apply(encode_matrix(k, m)[k:], srcs, dsts)

    def decode(
        self,
        shards: Sequence[Buffer | None],
        k: int,
        m: int,
        out: Sequence[Buffer | None] | None = None,
        rebuild: Sequence[int] | None = None,
    ) -> list[torch.Tensor | None]:
        _check_km(k, m)
        if len(shards) != k + m:
            raise ValueError(f"shards has {len(shards)} entries, expected k + m ({k + m})")
        if out is not None and len(out) != k + m:
            raise ValueError(f"out has {len(out)} entries, expected k + m ({k + m})")
        views: list[torch.Tensor | None] = [
            None if s is None else _as_u8(s, f"shards[{i}]") for i, s in enumerate(shards)
        ]
        present = [i for i, v in enumerate(views) if v is not None]
        missing = [i for i, v in enumerate(views) if v is None]
        if len(missing) > m:
            raise DecodeError(
                f"cannot decode: {len(missing)} shards missing ({missing}) but only m={m} "
                f"parity shards; any {k} of {k + m} are needed"
            )
        if rebuild is not None:
            wanted = set(rebuild)
            if not wanted <= set(missing):
                raise ValueError(f"rebuild ({sorted(wanted)}) must name missing shards only "
                                 f"({missing})")
            missing = [i for i in missing if i in wanted]
        if not missing:
            return views
        size = _shard_len(
            [views[i] for i in present],  # type: ignore[misc]
            [f"shards[{i}]" for i in present],
        )
        chosen = present[:k]  # data shards first: for them the decoding rows are cheapest
        srcs = [views[i] for i in chosen]
        device = srcs[0].device  # type: ignore[union-attr]
        dsts = []
        for i in missing:
            given = None if out is None else out[i]
            if given is None:
                dsts.append(torch.empty(size, dtype=torch.uint8, device=device))
            else:
                dst = _as_u8(given, f"out[{i}]", writable=True)
                if dst.numel() != size:
                    raise ValueError(f"out[{i}] has {dst.numel()} bytes, expected {size}")
                dsts.append(dst)
        full = encode_matrix(k, m)
        inv = self._invert([list(full[i]) for i in chosen])
        # Shard t = E[t] . d and d = inv . (chosen shards), so shard t = (E[t] . inv) . chosen.
        coeffs = [
            tuple(_dot_col(full[t], inv, j) for j in range(k)) if t >= k else tuple(inv[t])
            for t in missing
        ]
        if size:
            self._apply(coeffs, srcs, dsts)  # type: ignore[arg-type]
        for i, d in zip(missing, dsts, strict=True):
            views[i] = d
        return views

    def _invert(self, matrix: list[list[int]]) -> list[list[int]]:
        return _gf_invert(matrix)

    def _apply(
        self,
        coeffs: Sequence[Sequence[int]],
        srcs: Sequence[torch.Tensor],
        dsts: Sequence[torch.Tensor],
    ) -> None:
        """dsts[r] = XOR_j coeffs[r][j] * srcs[j], byte-wise in GF(2^8)."""
        raise NotImplementedError


def _dot_col(row: Sequence[int], matrix: Sequence[Sequence[int]], j: int) -> int:
    acc = 0
    for r, c in enumerate(row):
        acc ^= gf_mul(c, matrix[r][j])
    return acc


# --------------------------------------------------------------------------- pure Python
class PyCodec(_MatrixCodec):
    """Reference codec in plain Python: multiply is ``bytes.translate`` with a 256-byte table,
    add is XOR of big integers. CPU only; copies its inputs."""

    name = "python"

    def _apply(
        self,
        coeffs: Sequence[Sequence[int]],
        srcs: Sequence[torch.Tensor],
        dsts: Sequence[torch.Tensor],
    ) -> None:
        size = srcs[0].numel()
        on_cpu = [s.cpu() for s in srcs]  # keep them alive while string_at reads
        raw = [ctypes.string_at(s.data_ptr(), size) for s in on_cpu]
        for row, dst in zip(coeffs, dsts, strict=True):
            acc = 0
            for c, src in zip(row, raw, strict=True):
                if c:
                    acc ^= int.from_bytes(src.translate(_mul_table_bytes(c)), "little")
            result = acc.to_bytes(size, "little")
            dst.copy_(torch.frombuffer(bytearray(result), dtype=torch.uint8))


# --------------------------------------------------------------------------- torch
class TorchCodec(_MatrixCodec):
    """Vectorised torch codec for CPU and CUDA tensors.

    For each source shard j and a group of up to 8 output rows, a 256-entry table holds the
    products ``coeffs[r][j] * x`` of all rows packed side by side in one 1/2/4/8-byte word; one
    ``index_select`` gathers the products of every row at once, XOR accumulates, and the rows
    are un-interleaved at the end. Work proceeds in chunks that stay in cache.
    """

    name = "torch"

    _WORD = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

    def __init__(self, chunk_bytes: int | None = None) -> None:
        if chunk_bytes is not None and chunk_bytes < 1:
            raise ValueError(f"chunk_bytes ({chunk_bytes}) must be >= 1")
        self._chunk = chunk_bytes

    def _apply(
        self,
        coeffs: Sequence[Sequence[int]],
        srcs: Sequence[torch.Tensor],
        dsts: Sequence[torch.Tensor],
    ) -> None:
        device = srcs[0].device
        for i, t in enumerate(list(srcs) + list(dsts)):
            if t.device != device:
                raise ValueError(f"shard {i} is on {t.device}, expected {device}")
        chunk = self._chunk or (1 << 19 if device.type == "cpu" else 1 << 26)
        for g in range(0, len(coeffs), 8):
            self._apply_group(coeffs[g : g + 8], srcs, dsts[g : g + 8], chunk)

    def _apply_group(
        self,
        rows: Sequence[Sequence[int]],
        srcs: Sequence[torch.Tensor],
        dsts: Sequence[torch.Tensor],
        chunk: int,
    ) -> None:
        device, size = srcs[0].device, srcs[0].numel()
        width = next(w for w in (1, 2, 4, 8) if w >= len(rows))
        word = self._WORD[width]
        tables = [
            _packed_table(tuple(r[j] for r in rows), width).to(device) for j in range(len(srcs))
        ]
        step = min(chunk, size)
        idx = torch.empty(step, dtype=torch.int32, device=device)
        acc = torch.empty(step, dtype=word, device=device)
        tmp = torch.empty(step, dtype=word, device=device)
        for start in range(0, size, step):
            n = min(step, size - start)
            a, t, ix = acc[:n], tmp[:n], idx[:n]
            for j, src in enumerate(srcs):
                ix.copy_(src[start : start + n])
                torch.index_select(tables[j], 0, ix, out=a if j == 0 else t)
                if j:
                    a.bitwise_xor_(t)
            lanes = a.view(torch.uint8).view(n, width)
            for r, dst in enumerate(dsts):
                dst[start : start + n].copy_(lanes[:, r])


@functools.lru_cache(maxsize=4096)
def _packed_table(column: tuple[int, ...], width: int) -> torch.Tensor:
    """256 words; byte r of word x is column[r] * x (native byte order via a uint8 view)."""
    lanes = torch.zeros(256, width, dtype=torch.uint8)
    for r, c in enumerate(column):
        lanes[:, r] = torch.frombuffer(bytearray(_mul_table_bytes(c)), dtype=torch.uint8)
    return lanes.view(TorchCodec._WORD[width]).reshape(256)


# --------------------------------------------------------------------------- ISA-L
_ISAL_MAX_LEN = 1 << 30  # ec_encode_data takes an int length; stay well below 2^31


class IsalCodec(_MatrixCodec):
    """Intel ISA-L through ctypes on the caller's buffers (CPU only).

    ctypes releases the GIL during the calls, so several threads can encode in parallel.
    """

    name = "isal"

    def __init__(self, lib_path: str | None = None) -> None:
        """Load ISA-L.

        Args:
            lib_path: the shared library; default: ``HPT_ISAL_LIB``, then ``libisal.so.2``.

        Raises:
            OSError: the library or one of its symbols is missing.
        """
        path = lib_path or os.environ.get("HPT_ISAL_LIB") or _find_isal()
        lib = ctypes.CDLL(path)
        u8p = ctypes.POINTER(ctypes.c_ubyte)
        ptrs = ctypes.POINTER(ctypes.c_void_p)
        lib.gf_gen_cauchy1_matrix.argtypes = [u8p, ctypes.c_int, ctypes.c_int]
        lib.gf_gen_cauchy1_matrix.restype = None
        lib.gf_invert_matrix.argtypes = [u8p, u8p, ctypes.c_int]
        lib.gf_invert_matrix.restype = ctypes.c_int
        lib.ec_init_tables.argtypes = [ctypes.c_int, ctypes.c_int, u8p, u8p]
        lib.ec_init_tables.restype = None
        lib.ec_encode_data.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            u8p,
            ptrs,
            ptrs,
        ]
        lib.ec_encode_data.restype = None
        self._lib = lib
        self.path = path
        self._lock = threading.Lock()
        self._tables: dict[tuple[tuple[int, ...], ...], ctypes.Array[ctypes.c_ubyte]] = {}

    def cauchy_matrix(self, k: int, m: int) -> list[int]:
        """ISA-L's own ``gf_gen_cauchy1_matrix`` (row-major (k + m) x k), for cross-checks."""
        _check_km(k, m)
        a = (ctypes.c_ubyte * ((k + m) * k))()
        self._lib.gf_gen_cauchy1_matrix(a, k + m, k)
        return list(a)

    def _invert(self, matrix: list[list[int]]) -> list[list[int]]:
        n = len(matrix)
        src = (ctypes.c_ubyte * (n * n))(*[v for row in matrix for v in row])
        dst = (ctypes.c_ubyte * (n * n))()
        if self._lib.gf_invert_matrix(src, dst, n) != 0:
            raise DecodeError("decoding matrix is singular")
        return [list(dst[r * n : (r + 1) * n]) for r in range(n)]

    def _gtbls(self, coeffs: Sequence[Sequence[int]]) -> ctypes.Array[ctypes.c_ubyte]:
        key = tuple(tuple(r) for r in coeffs)
        with self._lock:
            tbl = self._tables.get(key)
            if tbl is None:
                rows, k = len(key), len(key[0])
                flat = (ctypes.c_ubyte * (rows * k))(*[c for r in key for c in r])
                tbl = (ctypes.c_ubyte * (32 * k * rows))()
                self._lib.ec_init_tables(k, rows, flat, tbl)
                if len(self._tables) >= 1024:  # decode patterns are few; bound it anyway
                    self._tables.clear()
                self._tables[key] = tbl
            return tbl

    def _apply(
        self,
        coeffs: Sequence[Sequence[int]],
        srcs: Sequence[torch.Tensor],
        dsts: Sequence[torch.Tensor],
    ) -> None:
        for i, t in enumerate(list(srcs) + list(dsts)):
            if t.device.type != "cpu":
                raise ValueError(f"IsalCodec needs CPU buffers; shard {i} is on {t.device}")
        size, k, rows = srcs[0].numel(), len(srcs), len(dsts)
        tbl = self._gtbls(coeffs)
        src_base = [t.data_ptr() for t in srcs]
        dst_base = [t.data_ptr() for t in dsts]
        src_ptrs = (ctypes.c_void_p * k)()
        dst_ptrs = (ctypes.c_void_p * rows)()
        for off in range(0, size, _ISAL_MAX_LEN):
            n = min(_ISAL_MAX_LEN, size - off)
            for j, p in enumerate(src_base):
                src_ptrs[j] = p + off
            for j, p in enumerate(dst_base):
                dst_ptrs[j] = p + off
            self._lib.ec_encode_data(n, k, rows, tbl, src_ptrs, dst_ptrs)


def _find_isal() -> str:
    found = ctypes.util.find_library("isal")
    return found or "libisal.so.2"


@functools.cache
def best_codec() -> Codec:
    """ISA-L when it loads, else the torch codec (same bytes either way)."""
    try:
        return IsalCodec()
    except (OSError, AttributeError) as exc:
        log.warning("ISA-L unavailable (%s); erasure coding falls back to torch", exc)
        return TorchCodec()
