"""Warm interpreters: a rank started from one behaves like ``python script.py``."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from hpt.agent.spawn import Spawner
from hpt.agent.warm import WarmPool


@pytest.fixture(params=[True, False], ids=["forked", "own-interpreter"])
def pool(request):
    """A pool of one: forked by the zygote, or (no fork server) a Python of its own."""
    spawner = Spawner()
    pool = WarmPool(1, spawner, settle_timeout_s=0.0, fork_server=request.param)
    yield pool
    pool.close()
    spawner.close()


def wait_ready(pool: WarmPool, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    tick = threading.Event()
    while pool.ready() < 1:
        assert time.monotonic() < deadline, "warm interpreter not ready in time"
        tick.wait(0.05)


def test_script_runs_as_main_with_argv_env_cwd_and_exit_code(pool, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(
        "import os, sys\n"
        "print(__name__, sys.argv[1:], os.environ['JOB_VAR'], os.getcwd(), flush=True)\n"
        "print(sys.path[0], file=sys.stderr, flush=True)\n"
        "sys.exit(7)\n"
    )
    wait_ready(pool)
    env = {**os.environ, "JOB_VAR": "hello"}
    proc = pool.take([sys.executable, str(script), "--a", "1"], env, str(tmp_path))
    assert proc is not None
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 7
    assert out.decode().split() == ["__main__", "['--a',", "'1']", "hello", str(tmp_path)]
    assert err.decode().strip() == str(tmp_path)


def test_uncaught_exception_exits_1_with_traceback(pool, tmp_path):
    script = tmp_path / "boom.py"
    script.write_text("raise RuntimeError('boom')\n")
    wait_ready(pool)
    proc = pool.take([sys.executable, str(script)], dict(os.environ), None)
    assert proc is not None
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert b"RuntimeError: boom" in err


@pytest.mark.parametrize(
    "argv,env_change",
    [
        (["/usr/bin/python3", "x.py"], {}),  # another interpreter
        ([sys.executable, "-c", "print(1)"], {}),  # interpreter flags
        ([sys.executable, "x.py"], {"PYTHONHASHSEED": "123"}),  # read only at start-up
        ([sys.executable, "x.py"], {"OMP_NUM_THREADS": "77"}),
    ],
)
def test_what_a_warm_interpreter_cannot_reproduce_starts_cold(pool, argv, env_change):
    env = {**os.environ, **env_change}
    assert pool.take(argv, env, None) is None


def test_closing_the_pool_reaps_idle_interpreters():
    spawner = Spawner()
    pool = WarmPool(2, spawner, fork_server=False)
    pids = [p.pid for p in pool._idle]
    pool.close()
    spawner.close()
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def test_child_of_the_spawner_dies_with_its_parent(tmp_path):
    # a parent that starts a sleeper through the Spawner, then is SIGKILLed
    code = (
        "import sys, time\n"
        "from hpt.agent.spawn import Spawner\n"
        "p = Spawner().popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        child = int(parent.stdout.readline())
        parent.kill()
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        tick = threading.Event()
        while _alive(child):
            assert time.monotonic() < deadline, "child outlived its parent"
            tick.wait(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
