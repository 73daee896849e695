"""Random number generator state: capture it with a snapshot and put it back on restore.

Deterministic resumption needs every RNG the training loop draws from: Python's `random`, numpy's
legacy global generator (when numpy is importable), torch's CPU generator and every CUDA device's
generator (when CUDA is available). `capture_rng` returns a tree that layout.flatten can store
without pickling (torch states are uint8 tensors, the rest plain ints, floats and tuples);
`restore_rng` applies such a tree. The Checkpointer (checkpointer.py) calls both.
"""

from __future__ import annotations

import importlib
import logging
import random
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


def capture_rng() -> dict[str, Any]:
    """The current state of every global RNG, as a tree of tensors and plain values."""
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "torch_cpu": torch.get_rng_state(),
    }
    if _np is not None:
        name, keys, pos, has_gauss, cached = _np.random.get_state(legacy=True)
        state["numpy"] = {
            "name": str(name),
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    if torch.cuda.is_available():
        state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set every global RNG from a tree made by `capture_rng` (possibly in another process).

    Parts this process cannot use (numpy state without numpy, CUDA states without CUDA or for a
    different number of devices) are skipped with a warning.
    """
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    torch.set_rng_state(state["torch_cpu"].to(dtype=torch.uint8, device="cpu").clone())
    np_state = state.get("numpy")
    if np_state is not None:
        if _np is None:
            log.warning("[ckpt] snapshot holds a numpy RNG state but numpy is not importable")
        else:
            _np.random.set_state(
                (
                    np_state["name"],
                    _np.array(np_state["keys"], dtype=_np.uint32),
                    np_state["pos"],
                    np_state["has_gauss"],
                    np_state["cached_gaussian"],
                )
            )
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
