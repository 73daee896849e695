"""Layouts: where every tensor of a rank's state lives in one flat snapshot buffer.

A training state is a nested tree of dicts, lists and tuples whose leaves are tensors or plain
values (ints, floats, strings, bools, None). `flatten` splits such a tree in two:

- a `Layout`: the ordered tensor entries (name, dtype, shape, byte offset, and where the tensor
  sits inside its global tensor), each at a 64-byte aligned offset in ONE flat byte buffer;
- a `meta` tree: the same structure with every tensor replaced by a placeholder and every plain
  value kept, encoded so that it survives JSON exactly (tuples stay tuples, int dict keys stay
  ints, NaN stays NaN). Nothing is ever pickled.

`unflatten(layout, meta, tensors)` puts the tree back together. The same model and optimizer give
the same layout, so a `Layout` is hashable and the engine (engine.py) keys its reusable buffers on
it; sinks (sink.py) receive it as JSON (`to_json`). Global shapes and offsets are what restore.py
reshards by (Universal Checkpointing: save distributed, load by global tensor offsets).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

ALIGN_BYTES = 64
"""Every tensor starts at a multiple of this many bytes in the snapshot buffer (cache line; also a
multiple of 8 so the checksum can read the buffer as int64 words)."""

LAYOUT_FORMAT = "hpt.layout.v1"

# Tags of the meta encoding. A JSON object whose keys include one of these is a tagged value;
# plain dicts whose keys start with "$" are always written in the "$dict" form, so there is no
# ambiguity.
_T_TENSOR = "$tensor"
_T_TUPLE = "$tuple"
_T_DICT = "$dict"
_T_FLOAT = "$float"
_T_DTYPE = "$dtype"

DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.complex64,
        torch.complex128,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
        *(getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n)),
        *(
            getattr(torch, n)
            for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
            if hasattr(torch, n)
        ),
    )
}
"""The one dtype table of hpt.ckpt: every dtype a snapshot may hold, by the name layouts, commit
records and on-disk manifests store. manifest.py and fmt.py use this table too, so whatever
snapshots also persists (the unsigned ints and every float8 variant included)."""
_DTYPES = DTYPES


def dtype_name(dtype: torch.dtype) -> str:
    """The name a layout stores for `dtype` ("float32", "bfloat16", ...)."""
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype {dtype} is not supported in a snapshot")
    return name


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of `dtype_name`; raises ValueError for an unknown name."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype ({name!r}) is not a known tensor dtype") from None


def align_up(n: int, align: int = ALIGN_BYTES) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True, slots=True)
class ShardInfo:
    """Where a rank's local tensor sits inside the global (unsharded) tensor."""

    global_shape: tuple[int, ...]
    """Shape of the whole tensor across all ranks."""
    global_offset: tuple[int, ...]
    """Index of the local tensor's first element in every dimension of the global tensor."""
    local_shape: tuple[int, ...]
    """Shape of this rank's piece."""

    def __post_init__(self) -> None:
        if not len(self.global_shape) == len(self.global_offset) == len(self.local_shape):
            raise ValueError(
                f"global_shape {self.global_shape}, global_offset {self.global_offset} and "
                f"local_shape {self.local_shape} must have the same number of dimensions"
            )
        for g, o, n in zip(self.global_shape, self.global_offset, self.local_shape, strict=True):
            if o < 0 or n < 0 or o + n > g:
                raise ValueError(
                    f"local piece at offset {self.global_offset} with shape {self.local_shape} "
                    f"does not fit in global shape {self.global_shape}"
                )


def dim0_split(size: int, rank: int, world: int) -> tuple[int, int]:
    """(start, length) of `rank`'s part when `size` rows are split over `world` ranks.

    Same rule as `torch.tensor_split`: the first `size % world` ranks get one extra row.
    """
    if world < 1:
        raise ValueError(f"world ({world}) must be >= 1")
    if not 0 <= rank < world:
        raise ValueError(f"rank ({rank}) must be in [0, {world})")
    base, extra = divmod(size, world)
    start = rank * base + min(rank, extra)
    return start, base + (1 if rank < extra else 0)


def shard_dim0(global_shape: Sequence[int], rank: int, world: int) -> ShardInfo:
    """The `ShardInfo` of `rank`'s piece of a tensor split on dim 0 over `world` ranks."""
    gshape = tuple(int(s) for s in global_shape)
    if not gshape:
        raise ValueError("a 0-dim tensor cannot be sharded on dim 0")
    start, length = dim0_split(gshape[0], rank, world)
    return ShardInfo(
        global_shape=gshape,
        global_offset=(start,) + (0,) * (len(gshape) - 1),
        local_shape=(length, *gshape[1:]),
    )


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of a layout."""

    fqn: str
    """Dotted path of the tensor in the state tree ("model.fc.weight", "optim.state.fc.weight.exp_avg")."""
    dtype: str
    """dtype name as returned by `dtype_name` ("float32", "bfloat16", ...)."""
    shape: tuple[int, ...]
    """Shape of the tensor this rank holds."""
    nbytes: int
    """numel * element size; the tensor occupies buffer[offset : offset + nbytes]."""
    offset: int
    """Byte offset in the snapshot buffer, a multiple of ALIGN_BYTES."""
    global_shape: tuple[int, ...]
    """Shape of the whole tensor across ranks; equals `shape` for a replicated tensor."""
    global_offset: tuple[int, ...]
    """Where this rank's piece starts in the global tensor; all zeros for a replicated tensor."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    @property
    def is_replicated(self) -> bool:
        return self.global_shape == self.shape and not any(self.global_offset)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fqn": self.fqn,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "nbytes": self.nbytes,
            "offset": self.offset,
            "global_shape": list(self.global_shape),
            "global_offset": list(self.global_offset),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> TensorEntry:
        """Parse and validate one entry read back from JSON; errors name `where` and the field."""

        def ints(name: str) -> tuple[int, ...]:
            v = d.get(name)
            if not isinstance(v, list) or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v
            ):
                raise ValueError(f"{where}.{name} ({v!r}) must be a list of ints >= 0")
            return tuple(v)

        fqn = d.get("fqn")
        if not isinstance(fqn, str) or not fqn:
            raise ValueError(f"{where}.fqn ({fqn!r}) must be a non-empty string")
        dtype = d.get("dtype")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise ValueError(f"{where}.dtype ({dtype!r}) must be one of {sorted(_DTYPES)}")
        for name in ("nbytes", "offset"):
            v = d.get(name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{where}.{name} ({v!r}) must be an int >= 0")
        shape = ints("shape")
        entry = cls(
            fqn=fqn,
            dtype=dtype,
            shape=shape,
            nbytes=d["nbytes"],
            offset=d["offset"],
            global_shape=ints("global_shape"),
            global_offset=ints("global_offset"),
        )
        expected = math.prod(shape) * _DTYPES[dtype].itemsize
        if entry.nbytes != expected:
            raise ValueError(
                f"{where}.nbytes ({entry.nbytes}) must equal numel*itemsize ({expected})"
            )
        if entry.offset % ALIGN_BYTES:
            raise ValueError(f"{where}.offset ({entry.offset}) must be a multiple of {ALIGN_BYTES}")
        ShardInfo(entry.global_shape, entry.global_offset, entry.shape)  # validates the geometry
        return entry


@dataclass(frozen=True, slots=True)
class Layout:
    """The ordered tensor entries of one rank's state and the size of its flat buffer.

    Equal states (same names, dtypes, shapes, shards) give equal layouts, so a layout is a good key
    for buffers that are allocated once and reused every save.
    """

    entries: tuple[TensorEntry, ...]
    total_bytes: int
    """Size of the flat buffer; a multiple of ALIGN_BYTES, >= the end of the last entry."""
    _digest: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        end = 0
        seen: set[str] = set()
        for i, e in enumerate(self.entries):
            if e.fqn in seen:
                raise ValueError(f"entries[{i}].fqn ({e.fqn!r}) appears twice in the layout")
            seen.add(e.fqn)
            if e.offset < end:
                raise ValueError(f"entries[{i}].offset ({e.offset}) overlaps the previous entry")
            end = e.offset + e.nbytes
        if self.total_bytes < end or self.total_bytes % ALIGN_BYTES:
            raise ValueError(
                f"total_bytes ({self.total_bytes}) must be a multiple of {ALIGN_BYTES} and "
                f">= the end of the last entry ({end})"
            )

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of the canonical JSON form; equal layouts have equal digests."""
        if not self._digest:  # computed on first use: save() builds a layout every step
            blob = json.dumps(self._json_obj(), sort_keys=True, separators=(",", ":"))
            object.__setattr__(self, "_digest", hashlib.sha256(blob.encode()).hexdigest())
        return self._digest

    @property
    def is_replica(self) -> bool:
        """Every tensor is whole, none a shard of a larger one: a data-parallel replica, whose
        state any other replica of the job holds too. A layout without tensors is none (plain
        values only, which may differ per rank)."""
        return bool(self.entries) and all(e.is_replicated for e in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[TensorEntry]:
        return iter(self.entries)

    def entry(self, fqn: str) -> TensorEntry:
        for e in self.entries:
            if e.fqn == fqn:
                return e
        raise KeyError(fqn)

    def _json_obj(self) -> dict[str, Any]:
        return {
            "format": LAYOUT_FORMAT,
            "align_bytes": ALIGN_BYTES,
            "total_bytes": self.total_bytes,
            "entries": [e.to_dict() for e in self.entries],
        }

    def to_json(self) -> str:
        return json.dumps(self._json_obj(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes | Mapping[str, Any]) -> Layout:
        """Parse a layout written by `to_json` (or its already-decoded dict); ValueError if bad."""
        obj = json.loads(text) if isinstance(text, str | bytes) else text
        if not isinstance(obj, Mapping):
            raise ValueError("layout JSON must be an object")
        if obj.get("format") != LAYOUT_FORMAT:
            raise ValueError(f"layout.format ({obj.get('format')!r}) must be {LAYOUT_FORMAT!r}")
        if obj.get("align_bytes") != ALIGN_BYTES:
            raise ValueError(
                f"layout.align_bytes ({obj.get('align_bytes')!r}) must be {ALIGN_BYTES}"
            )
        entries = obj.get("entries")
        if not isinstance(entries, list):
            raise ValueError("layout.entries must be a list")
        total = obj.get("total_bytes")
        if not isinstance(total, int) or isinstance(total, bool):
            raise ValueError(f"layout.total_bytes ({total!r}) must be an int")
        parsed = []
        for i, e in enumerate(entries):
            if not isinstance(e, Mapping):
                raise ValueError(f"layout.entries[{i}] must be an object")
            parsed.append(TensorEntry.from_dict(e, f"layout.entries[{i}]"))
        return cls(entries=tuple(parsed), total_bytes=total)


def build_layout(
    items: Sequence[tuple[str, torch.dtype, Sequence[int]]],
    shards: Mapping[str, ShardInfo] | None = None,
) -> Layout:
    """Place tensors described by (fqn, dtype, shape) one after another at aligned offsets.

    The layout of the previous call is returned again (the same object) when its items and
    shards are equal: a snapshot every step has the same layout every step, and comparing the
    items costs a tenth of building the entries again."""
    global _last_layout
    shards = shards or {}
    key = (list(items), dict(shards))
    last = _last_layout
    if last is not None and last[0] == key:
        return last[1]
    layout = _build_layout(items, shards)
    _last_layout = (key, layout)
    return layout


_last_layout: tuple[tuple[list[Any], dict[str, ShardInfo]], Layout] | None = None
"""The items, shards and layout of the newest `build_layout` call (read and replaced whole)."""


def _build_layout(
    items: Sequence[tuple[str, torch.dtype, Sequence[int]]], shards: Mapping[str, ShardInfo]
) -> Layout:
    entries = []
    offset = 0
    for fqn, dtype, shape in items:
        shape = tuple(int(s) for s in shape)
        nbytes = math.prod(shape) * dtype.itemsize
        info = shards.get(fqn)
        if info is None:
            gshape, goff = shape, (0,) * len(shape)
        else:
            if info.local_shape != shape:
                raise ValueError(
                    f"shards[{fqn!r}].local_shape {info.local_shape} does not match the tensor's "
                    f"shape {shape}"
                )
            gshape, goff = info.global_shape, info.global_offset
        entries.append(
            TensorEntry(
                fqn=fqn,
                dtype=dtype_name(dtype),
                shape=shape,
                nbytes=nbytes,
                offset=offset,
                global_shape=gshape,
                global_offset=goff,
            )
        )
        offset = align_up(offset + nbytes)
    return Layout(entries=tuple(entries), total_bytes=offset)


def pack(
    layout: Layout, tensors: Sequence[torch.Tensor], out: torch.Tensor | None = None
) -> torch.Tensor:
    """Copy `tensors` into a flat buffer laid out by `layout`, synchronously (the engine does
    the same in the background). Padding is zero when `out` is None."""
    if len(tensors) != len(layout.entries):
        raise ValueError(f"got {len(tensors)} tensors for a layout of {len(layout.entries)}")
    if out is None:
        out = torch.zeros(layout.total_bytes, dtype=torch.uint8)
    with torch.no_grad():
        for e, t in zip(layout.entries, tensors, strict=True):
            dst = out[e.offset : e.offset + e.nbytes].view(e.torch_dtype).view(e.shape)
            dst.copy_(t.detach())
    return out


def _join(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def flatten(
    state: Any, shards: Mapping[str, ShardInfo] | None = None
) -> tuple[Layout, Any, list[torch.Tensor]]:
    """Split a nested state into its layout, its JSON-safe meta tree and its tensors.

    Args:
        state: dicts (any key of type str, int, bool, None or float, or tuples of those), lists and
            tuples, with leaves that are tensors, str, int, float, bool, None or torch.dtype.
        shards: for tensors that are one rank's piece of a bigger tensor, their fqn -> ShardInfo;
            every other tensor is recorded as replicated (the whole tensor).

    Returns:
        (layout, meta, tensors) where tensors[i] is the live tensor of layout.entries[i] (not
        copied) and meta is a JSON-serialisable tree (see `encode_meta`).

    Raises:
        ValueError: for unsupported leaves (naming their path) or two tensors with the same fqn.
    """
    tensors: list[torch.Tensor] = []
    items: list[tuple[str, torch.dtype, Sequence[int]]] = []

    def on_tensor(path: str, t: torch.Tensor) -> int:
        if t.layout != torch.strided:
            raise ValueError(
                f"{path}: only strided (dense) tensors can be snapshotted, not {t.layout}"
            )
        if t.is_quantized or t.device.type == "meta":
            raise ValueError(f"{path}: quantized and meta tensors cannot be snapshotted")
        items.append((path, t.dtype, tuple(t.shape)))
        tensors.append(t)
        return len(tensors) - 1

    meta = _encode(state, "", on_tensor)
    return build_layout(items, shards), meta, tensors


def encode_meta(state: Any) -> Any:
    """The JSON-safe form of a tree without tensors (tensors raise ValueError)."""

    def no_tensor(path: str, t: torch.Tensor) -> int:
        raise ValueError(f"{path}: tensors are not allowed here")

    return _encode(state, "", no_tensor)


def decode_meta(meta: Any) -> Any:
    """Inverse of `encode_meta`."""
    return _decode(meta, None)


def unflatten(layout: Layout, meta: Any, tensors: Sequence[torch.Tensor]) -> Any:
    """Rebuild the tree `flatten` split; tensors[i] goes where layout.entries[i] was."""
    if len(tensors) != len(layout.entries):
        raise ValueError(f"got {len(tensors)} tensors for a layout of {len(layout.entries)}")
    return _decode(meta, tensors)


def _encode(obj: Any, path: str, on_tensor: Any) -> Any:
    # exact types first (a snapshot walks this every step): the isinstance chain below
    # handles their subclasses the same way
    kind = type(obj)
    if kind is str or kind is bool or kind is int or obj is None:
        return obj
    if kind is dict and all(type(k) is str and k[:1] != "$" for k in obj):
        return {k: _encode(v, f"{path}.{k}" if path else k, on_tensor) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        return {_T_TENSOR: on_tensor(path, obj)}
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int):
        return int(obj)  # IntEnum and friends become plain ints
    if isinstance(obj, float):
        if math.isfinite(obj):
            return float(obj)
        return {_T_FLOAT: repr(float(obj))}  # "nan", "inf", "-inf": not valid strict JSON
    if isinstance(obj, torch.dtype):
        return {_T_DTYPE: dtype_name(obj)}
    if isinstance(obj, list):
        return [_encode(v, _join(path, i), on_tensor) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {_T_TUPLE: [_encode(v, _join(path, i), on_tensor) for i, v in enumerate(obj)]}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode(v, _join(path, k), on_tensor) for k, v in obj.items()}
        pairs = []
        for k, v in obj.items():
            if not _is_plain_key(k):
                raise ValueError(
                    f"{path or '<root>'}: dict key {k!r} ({type(k).__name__}) is not supported"
                )
            pairs.append([_encode(k, path, _no_tensor_key), _encode(v, _join(path, k), on_tensor)])
        return {_T_DICT: pairs}
    raise ValueError(
        f"{path or '<root>'}: a value of type {type(obj).__name__} cannot be stored in a snapshot "
        "(allowed: tensors, dict, list, tuple, str, int, float, bool, None, torch.dtype)"
    )


def _is_plain_key(k: object) -> bool:
    if isinstance(k, tuple):
        return all(_is_plain_key(x) for x in k)
    return k is None or isinstance(k, str | int | float)


def _no_tensor_key(path: str, t: torch.Tensor) -> int:
    raise AssertionError("dict keys are checked before encoding")


def _decode(obj: Any, tensors: Sequence[torch.Tensor] | None) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        ((tag, value),) = obj.items()
        if tag == _T_TENSOR:
            if tensors is None:
                raise ValueError("meta holds a tensor placeholder but no tensors were given")
            return tensors[value]
        if tag == _T_TUPLE:
            return tuple(_decode(v, tensors) for v in value)
        if tag == _T_DICT:
            return {_decode(k, None): _decode(v, tensors) for k, v in value}
        if tag == _T_FLOAT:
            return float(value)
        if tag == _T_DTYPE:
            return dtype_from_name(value)
    return {k: _decode(v, tensors) for k, v in obj.items()}
