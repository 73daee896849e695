"""Processes the agent and ``hptctl up`` start: no Python between fork and exec, the parent
death signal still armed, and the warm pool recognising its interpreter under another name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpt.agent.spawn import Spawner
from hpt.agent.warm import WarmPool, same_interpreter

# A parent with an at-fork handler (gRPC registers such handlers): the handler leaves a file
# behind if it ever runs in a forked child, which happens only when Python runs between fork
# and exec (``preexec_fn``).
_PARENT = """
import os, sys, pathlib
marker = pathlib.Path(sys.argv[1])
os.register_at_fork(after_in_child=lambda: marker.write_text(str(os.getpid())))
{spawn}
child.wait(timeout=60)
print("child exited", child.returncode)
"""
_SPAWNER = (
    "from hpt.agent.spawn import Spawner\n"
    "child = Spawner().popen([sys.executable, '-c', 'import time; time.sleep(0.2)'])\n"
)
_DAEMONS = (
    "from hpt.cli.boot import spawn\n"
    "child = spawn([sys.executable, '-c', 'import time; time.sleep(0.2)'])\n"
)


@pytest.mark.parametrize("spawn", [_SPAWNER, _DAEMONS], ids=["agent-spawner", "hptctl-up"])
def test_no_python_runs_in_the_child_between_fork_and_exec(tmp_path, spawn):
    marker = tmp_path / "forked-child-ran-python"
    out = subprocess.run(
        [sys.executable, "-c", _PARENT.format(spawn=spawn), str(marker)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "child exited 0" in out.stdout
    assert not marker.exists(), "an at-fork handler ran in the child (Python before exec)"


def test_the_death_signal_is_armed_in_the_exec_wrapper():
    # the child asks the kernel itself: prctl(PR_GET_PDEATHSIG)
    probe = (
        "import ctypes\n"
        "v = ctypes.c_int()\n"
        "ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0)\n"
        "print(v.value)\n"
    )
    spawner = Spawner()
    try:
        child = spawner.popen([sys.executable, "-c", probe], stdout=subprocess.PIPE)
        out, _ = child.communicate(timeout=60)
    finally:
        spawner.close()
    assert int(out) == 9  # SIGKILL


def test_warm_pool_takes_the_same_interpreter_named_by_another_path(tmp_path):
    # a directory of links, as a venv's bin/ is: python, python3, python3.X -> one interpreter
    bindir = tmp_path / "venv" / "bin"
    bindir.mkdir(parents=True)
    real = os.path.realpath(sys.executable)
    for name in ("python", "python3"):
        (bindir / name).symlink_to(real)
    assert same_interpreter(str(bindir / "python3"), str(bindir / "python"), None, None)
    assert same_interpreter("python3", str(bindir / "python"), str(bindir), None)
    assert same_interpreter("venv/bin/python3", str(bindir / "python"), None, str(tmp_path))
    # the interpreter the links point to lives elsewhere: other site-packages, not the same
    assert not same_interpreter(real, str(bindir / "python"), None, None)
    assert not same_interpreter("no-such-python", str(bindir / "python"), str(bindir), None)


def test_warm_pool_can_run_a_command_naming_its_interpreter_by_another_name():
    here = Path(sys.executable).parent
    others = [str(here / n) for n in ("python", "python3", f"python3.{sys.version_info.minor}")
              if (here / n).exists() and str(here / n) != sys.executable]
    if not others:
        pytest.skip(f"{here} has one name for the interpreter")
    spawner = Spawner()
    pool = WarmPool(0, spawner)
    try:
        for other in others:
            assert pool.can_run([other, "x.py"], dict(os.environ), None), other
    finally:
        pool.close()
        spawner.close()
