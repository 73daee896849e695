"""The fork server: warm interpreters forked from one Python that imported torch once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from hpt.agent.spawn import Spawner
from hpt.agent.warm import WarmPool
from hpt.agent.zygote import Forked
from tests.integration.cluster import pid_alive, wait_for, wait_for_dead

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def forking():
    """A pool that keeps no idle interpreter: every take() forks one on the spot."""
    spawner = Spawner()
    pool = WarmPool(0, spawner)
    assert pool.zygote is not None and pool.zygote.wait_ready(120)
    yield pool
    pool.close()
    spawner.close()


def test_forked_ranks_are_fresh_processes_that_run_parallel_torch(forking, tmp_path):
    # each fork: its own session, its own numpy sequence, torch's thread pools usable (a
    # zygote that had run OpenMP regions or autograd would hand its children dead pools)
    script = tmp_path / "rank.py"
    script.write_text(
        "import os, sys, numpy, torch\n"
        "model = torch.nn.Linear(256, 256)\n"
        "for _ in range(3):\n"
        "    model(torch.randn(1024, 256)).sum().backward()\n"
        "opt = torch.optim.Adam(model.parameters()); opt.step()\n"
        "print(os.getsid(0) == os.getpid(), numpy.random.randint(1 << 62), flush=True)\n"
        "sys.exit(int(sys.argv[1]))\n")
    ranks = [forking.take([sys.executable, str(script), str(code)], dict(os.environ), None)
             for code in (0, 3)]
    assert all(isinstance(r, Forked) for r in ranks), ranks
    assert forking.zygote is not None and forking.zygote.ready()
    outs = [r.communicate(timeout=120) for r in ranks]
    assert [r.returncode for r in ranks] == [0, 3], outs
    lines = [out.decode().split() for out, _ in outs]
    assert [line[0] for line in lines] == ["True", "True"], outs
    assert lines[0][1] != lines[1][1], "forked ranks share numpy's global generator"


def test_a_launch_never_waits_for_a_zygote_still_importing(tmp_path):
    # the zygote's interpreter start blocks on a FIFO until the test opens it: its import
    # cannot finish before the take below
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"open({str(gate)!r}).read()\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    spawner = Spawner()
    pool = WarmPool(1, spawner, base_env=env)
    try:
        zygote = pool.zygote
        assert zygote is not None
        taken: list[object] = []
        launch = threading.Thread(target=lambda: taken.append(
            pool.take([sys.executable, str(tmp_path / "x.py")], env, None)), daemon=True)
        launch.start()
        launch.join(30)  # a deadline: the zygote cannot finish importing before the gate opens
        assert not launch.is_alive(), "take() waited for the zygote's import"
        assert taken == [None]  # the launch starts the rank cold
        assert not zygote.ready()
        assert _release(gate, 60), "the zygote never opened the gate"
        assert zygote.wait_ready(120)
        wait_for(lambda: pool.ready() >= 1, 120, "the pool filled from the ready zygote")
        assert isinstance(pool.take([sys.executable, str(tmp_path / "x.py")], env, None), Forked)
    finally:
        _release(gate)
        pool.close()
        spawner.close()


def _release(fifo, timeout_s: float = 0.0) -> bool:  # type: ignore[no-untyped-def]
    """Let the reader of ``fifo`` go (EOF), waiting up to ``timeout_s`` for it to open it."""

    def opened() -> bool:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO: no reader yet
        except OSError:
            return False
        os.close(fd)
        return True

    try:
        wait_for(opened, timeout_s, "a reader of the gate")
    except TimeoutError:
        return False
    return True


def _sleeper(pool: WarmPool, tmp_path) -> Forked:  # type: ignore[no-untyped-def]
    """A forked rank that has started and sleeps."""
    script = tmp_path / "sleep.py"
    script.write_text("import time\nprint('up', flush=True)\ntime.sleep(300)\n")
    rank = pool.take([sys.executable, str(script)], dict(os.environ), None)
    assert isinstance(rank, Forked) and rank.stdout is not None
    assert rank.stdout.readline() == b"up\n"
    return rank


def test_a_signal_ends_a_forked_rank_with_popens_return_code(forking, tmp_path):
    rank = _sleeper(forking, tmp_path)
    with pytest.raises(subprocess.TimeoutExpired):
        rank.wait(0.05)
    rank.send_signal(signal.SIGTERM)
    assert rank.wait(60) == -signal.SIGTERM
    assert rank.poll() == -signal.SIGTERM
    rank.kill()  # after the end: no effect, no error


def test_a_killed_zygote_takes_its_children_and_says_how_they_ended(forking, tmp_path):
    rank = _sleeper(forking, tmp_path)
    zygote = forking.zygote
    assert zygote is not None
    os.kill(zygote.pid, signal.SIGKILL)
    assert rank.wait(60) == -signal.SIGKILL
    assert not wait_for_dead({rank.pid}, 30)
    # the pool starts the next rank without the fork server: cold, from its own interpreter
    assert not zygote.alive()
    assert forking.take([sys.executable, str(tmp_path / "sleep.py")], dict(os.environ),
                        None) is None


def test_a_fork_server_that_died_is_replaced_and_forks_again(tmp_path):
    spawner = Spawner()
    pool = WarmPool(0, spawner, zygote_restart_s=0.0)
    try:
        first = pool.zygote
        assert first is not None and first.wait_ready(120)
        os.kill(first.pid, signal.SIGKILL)
        wait_for(lambda: not first.alive(), 60, "the pool saw its fork server die")
        script = tmp_path / "ok.py"
        script.write_text("print('ok', flush=True)\n")
        argv = [sys.executable, str(script)]
        assert pool.take(argv, dict(os.environ), None) is None  # cold meanwhile
        wait_for(lambda: pool.zygote is not first and pool.zygote.ready(),  # type: ignore[union-attr]
                 120, "a new fork server, ready")
        rank = pool.take(argv, dict(os.environ), None)
        assert isinstance(rank, Forked)
        assert rank.communicate(timeout=60)[0] == b"ok\n" and rank.returncode == 0
    finally:
        pool.close()
        spawner.close()


def test_an_agent_killed_with_9_takes_the_zygote_and_every_forked_rank(tmp_path):
    code = (
        "import os, sys, time\n"
        "from hpt.agent.spawn import Spawner\n"
        "from hpt.agent.warm import WarmPool\n"
        "pool = WarmPool(0, Spawner())\n"
        "assert pool.zygote.wait_ready(120)\n"
        f"rank = pool.take([sys.executable, {str(tmp_path / 'sleep.py')!r}], dict(os.environ),"
        " None)\n"
        "print(pool.zygote.pid, rank.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    (tmp_path / "sleep.py").write_text("import time\ntime.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(pid_alive(p) for p in pids), pids
        parent.kill()
        parent.wait(timeout=30)
        assert not wait_for_dead(set(pids), 30)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()


def test_closing_the_pool_ends_the_zygote_and_its_idle_interpreters():
    spawner = Spawner()
    pool = WarmPool(2, spawner, settle_timeout_s=0.0)
    wait_for(lambda: pool.ready() >= 2, 120, "the pool filled")
    zygote = pool.zygote
    assert zygote is not None
    pids = [zygote.pid, *(p.pid for p in pool._idle)]
    pool.close()
    spawner.close()
    assert not wait_for_dead(set(pids), 30)
