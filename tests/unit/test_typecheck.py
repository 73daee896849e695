"""ckpt/ and monitor/ pass ``mypy --strict`` (configured in pyproject.toml).

The folders import as ``hpt.ckpt`` and ``hpt.monitor`` (pyproject maps them), a mapping mypy
cannot see through the editable install's import hook; so the test links them into a small
``hpt`` tree and points mypy there. Their imports (torch, the standard library, each other) are
followed, not skipped. The cache lives in the checkout's .venv when there is one (a tmp dir
otherwise): cold, mypy reads torch's annotations once; warm runs take about a second.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# mypy is a console script of the interpreter running the tests (the checkout's venv)
MYPY = shutil.which("mypy", path=str(Path(sys.executable).parent)) or shutil.which("mypy")
STRICT_PARTS = ("ckpt", "monitor")


@pytest.mark.skipif(MYPY is None, reason="mypy (a dev dependency) is absent")
@pytest.mark.timeout(300)  # cold (fresh cache) on a loaded 2-core machine
def test_mypy_strict_passes_on_ckpt_and_monitor(tmp_path):
    work = ROOT / ".venv" / "mypy" if (ROOT / ".venv").is_dir() else tmp_path
    pkg = work / "src" / "hpt"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    for part in STRICT_PARTS:
        link = pkg / part
        if link.is_symlink() and link.resolve() != (ROOT / part).resolve():
            link.unlink()
        if not link.is_symlink():
            link.symlink_to(ROOT / part, target_is_directory=True)
    cmd = [MYPY, "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir",
           str(work / "cache"), "--no-error-summary"]
    for part in STRICT_PARTS:
        cmd += ["-p", f"hpt.{part}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280,
                         env={**os.environ, "MYPYPATH": str(work / "src")})
    report = (out.stdout + out.stderr).replace(str(pkg) + "/", "")
    assert out.returncode == 0, report
