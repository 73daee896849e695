"""Ownership of an agent's leftovers: a sweep removes a dead owner's files, never a live one's."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from hpt.agent.ownership import Ownership, node_prefix, sweep_dead_owners

_HOLD = """
import sys
from hpt.agent.ownership import Ownership
o = Ownership.claim(sys.argv[1], shm_dir=sys.argv[2], run_dir=sys.argv[3], owns_run_dir=True)
print(o.instance_id, flush=True)
sys.stdin.read()
"""


def _owner_process(tmp_path: Path, node: str, run_dir: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, node, str(tmp_path), run_dir],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def test_sweep_spares_a_live_owner_even_under_the_same_node_name(tmp_path):
    live = Ownership.claim("node-0", shm_dir=str(tmp_path), run_dir="", owns_run_dir=False)
    mine = tmp_path / f"{live.prefix}job-r0.g0.buf"
    mine.write_bytes(b"x")
    assert sweep_dead_owners(str(tmp_path)) == []
    assert mine.exists() and live.lock_path.exists()
    live.release()
    assert not live.lock_path.exists()


def test_sweep_removes_what_a_killed_owner_left_and_its_temp_run_dir(tmp_path):
    run_dir = tempfile.mkdtemp(prefix="hpt-agent-")
    proc, instance = _owner_process(tmp_path, "node-0", run_dir)
    theirs = tmp_path / f"{node_prefix('node-0', instance)}job-r0.g0.buf"
    theirs.write_bytes(b"x")
    live = Ownership.claim("node-0", shm_dir=str(tmp_path), run_dir="", owns_run_dir=False)
    kept = tmp_path / f"{live.prefix}job-r0.g0.buf"
    kept.write_bytes(b"y")
    try:
        assert sweep_dead_owners(str(tmp_path)) == []  # still alive: untouched
        assert theirs.exists() and Path(run_dir).is_dir()
        proc.kill()
        proc.wait(timeout=10)
        assert sweep_dead_owners(str(tmp_path)) == [instance]
        assert not theirs.exists() and not Path(run_dir).exists()
        assert kept.exists() and live.lock_path.exists()
    finally:
        proc.kill()
        proc.wait(timeout=10)
        live.release()
