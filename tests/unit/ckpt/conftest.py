"""Fixtures of the hpt.ckpt unit tests: unique shared-memory prefixes and a leak check."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

SHM_DIR = Path("/dev/shm")
TEST_PREFIX = f"hpt-ut-{os.getpid()}"


def _ours() -> set[str]:
    if not SHM_DIR.is_dir():
        return set()
    return {p.name for p in SHM_DIR.iterdir() if p.name.startswith(TEST_PREFIX)}


@pytest.fixture(autouse=True)
def no_leaked_shm() -> Iterator[None]:
    """Every test leaves /dev/shm as it found it (files of this session's prefix)."""
    before = _ours()
    yield
    leaked = _ours() - before
    assert not leaked, f"test leaked shared memory files: {sorted(leaked)}"


@pytest.fixture
def shm_prefix() -> Iterator[str]:
    """A ShmSink prefix unique to the test; its files are removed afterwards (the leak check
    above still fails the test if the test itself forgot to clean up)."""
    from hpt.ckpt import ShmSink

    prefix = f"{TEST_PREFIX}-{uuid.uuid4().hex[:8]}"
    yield prefix
    leftover = ShmSink(prefix).files()
    for path in leftover:
        path.unlink(missing_ok=True)
    assert not leftover, f"test did not clean up {[p.name for p in leftover]}"
