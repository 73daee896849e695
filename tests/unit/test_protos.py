"""The committed generated code is exactly what the pinned generator produces."""

from __future__ import annotations

import filecmp
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools absent")
def test_generated_code_matches_protos(tmp_path):
    out = tmp_path / "_proto"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(out)],
                   check=True, capture_output=True, timeout=120)
    committed = ROOT / "hpt" / "_proto"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in committed.iterdir() if p.suffix in (".py", ".pyi"))
    _, mismatch, errors = filecmp.cmpfiles(out, committed, names, shallow=False)
    assert mismatch == [] and errors == [], "run: python scripts/gen_protos.py"
