"""Random number generator state: capture it with a snapshot and put it back on restore.

Deterministic resumption needs every RNG the training loop draws from: Python's `random`, numpy's
legacy global generator (when numpy is importable), torch's CPU generator and every CUDA device's
generator (when CUDA is available). `capture_rng` returns a small tree that layout.flatten can
store without pickling: one tensor per generator and two short strings. A generator's state goes
in a tensor, not as plain values, because a snapshot is taken every step and every plain value
is a leaf that layout.flatten walks and JSON encodes: Python's Mersenne Twister state alone is
625 ints, numpy's another 624. `restore_rng` applies such a tree. The Checkpointer
(checkpointer.py) calls both.

Packing (int64 tensors, every word written as is):

- ``python``: ``[version, has_gauss, gauss_bits, *internal]`` where ``internal`` is the 625-int
  tuple of ``random.getstate()`` (624 words and the position) and ``gauss_bits`` the IEEE-754
  bits of ``gauss_next`` (0 when it is None);
- ``numpy``: ``[pos, has_gauss, gauss_bits, *keys]`` (the legacy global generator's 624 keys);
  its bit generator's name is kept as the plain string ``numpy_name``;
- ``torch_cpu`` and ``torch_cuda``: the uint8 states torch returns.
"""

from __future__ import annotations

import array
import importlib
import logging
import random
import struct
from types import ModuleType
from typing import Any

import torch

log = logging.getLogger(__name__)


def _import_numpy() -> ModuleType | None:
    """numpy is optional: hpt.ckpt depends on torch only."""
    try:
        return importlib.import_module("numpy")
    except ImportError:
        return None


_np = _import_numpy()


_PY_HEAD = 3
_NP_HEAD = 3


def _float_bits(x: float) -> int:
    bits: int = struct.unpack("<q", struct.pack("<d", x))[0]
    return bits


def _bits_float(n: int) -> float:
    x: float = struct.unpack("<d", struct.pack("<q", n))[0]
    return x


def capture_rng() -> dict[str, Any]:
    """The current state of every global RNG, as a few tensors and strings (see the module doc)."""
    version, internal, gauss_next = random.getstate()
    has_gauss = gauss_next is not None
    py = _packed((version, int(has_gauss), _float_bits(gauss_next) if has_gauss else 0), internal)
    state: dict[str, Any] = {"python": py, "torch_cpu": torch.get_rng_state()}
    if _np is not None:
        name, keys, pos, has_np_gauss, cached = _np.random.get_state(legacy=True)
        # one numpy buffer, wrapped: torch's indexed assignment cost ~100 us a snapshot
        packed = _np.empty(_NP_HEAD + len(keys), dtype=_np.int64)
        packed[:_NP_HEAD] = (int(pos), int(has_np_gauss), _float_bits(float(cached)))
        packed[_NP_HEAD:] = keys
        state["numpy"] = torch.from_numpy(packed)
        state["numpy_name"] = str(name)
    if torch.cuda.is_available():
        state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set every global RNG from a tree made by `capture_rng` (possibly in another process).

    Parts this process cannot use (numpy state without numpy, CUDA states without CUDA or for a
    different number of devices) are skipped with a warning.

    Raises:
        ValueError: a packed state has the wrong length or dtype (names the generator).
    """
    py = _words(state["python"], "python", _PY_HEAD + 625)
    version, has_gauss, gauss_bits = py[:_PY_HEAD]
    random.setstate((version, tuple(py[_PY_HEAD:]), _bits_float(gauss_bits) if has_gauss else None))
    torch.set_rng_state(state["torch_cpu"].to(dtype=torch.uint8, device="cpu").clone())
    np_state = state.get("numpy")
    if np_state is not None:
        if _np is None:
            log.warning("[ckpt] snapshot holds a numpy RNG state but numpy is not importable")
        else:
            words = _words(np_state, "numpy", _NP_HEAD + 624)
            pos, has_np_gauss, cached_bits = words[:_NP_HEAD]
            keys = _np.array(words[_NP_HEAD:], dtype=_np.uint32)
            _np.random.set_state((state.get("numpy_name", "MT19937"), keys, pos, has_np_gauss,
                                  _bits_float(cached_bits)))
    cuda = state.get("torch_cuda")
    if cuda is not None:
        if not torch.cuda.is_available():
            log.warning("[ckpt] snapshot holds CUDA RNG states but CUDA is not available")
        elif len(cuda) != torch.cuda.device_count():
            log.warning(
                "[ckpt] snapshot holds %d CUDA RNG states, this process sees %d devices; "
                "CUDA RNG not restored",
                len(cuda),
                torch.cuda.device_count(),
            )
        else:
            torch.cuda.set_rng_state_all(
                [t.to(dtype=torch.uint8, device="cpu").clone() for t in cuda]
            )


def _packed(head: tuple[int, ...], words: tuple[int, ...]) -> torch.Tensor:
    """One int64 tensor of ``head + words`` (array.array converts in C; torch.tensor on a
    list of Python ints is about three times slower)."""
    return torch.frombuffer(array.array("q", head + words), dtype=torch.int64)


def _words(packed: Any, name: str, length: int) -> list[int]:
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.int64 or packed.shape != (
        length,
    ):
        got = f"{packed.dtype}{list(packed.shape)}" if isinstance(packed, torch.Tensor) else type(
            packed).__name__
        raise ValueError(f"rng.{name} must be an int64 tensor of {length} words, not {got}")
    return packed.tolist()
