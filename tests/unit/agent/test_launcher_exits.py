"""How the launcher names the way a rank ended: real processes, the agent's real launcher."""

from __future__ import annotations

import socket
import sys
import threading
import time

import pytest

from hpt.agent import launcher as launcher_mod
from hpt.agent import oom
from hpt.agent.launcher import Launcher, LaunchSpec, RankPhase
from hpt.agent.snapshots import SnapshotKeeper
from hpt.agent.spawn import Spawner
from hpt.cli.boot import free_port
from hpt.jobspec import JobSpec


@pytest.fixture
def launcher(tmp_path):
    spawner = Spawner()
    snapshots = SnapshotKeeper("n", shm_dir=str(tmp_path / "shm"))
    (tmp_path / "shm").mkdir()
    changed = threading.Event()
    la = Launcher(node="n", run_dir=tmp_path / "run", agent_socket=str(tmp_path / "agent.sock"),
                  on_change=changed.set, spawner=spawner, snapshots=snapshots)
    yield la
    la.stop_all(grace_s=0.0, reason="test over")
    la.wait_all(30.0)
    snapshots.close()
    spawner.close()


def run_rank(la: Launcher, code: str, tmp_path) -> object:  # type: ignore[no-untyped-def]
    job = JobSpec(command=(sys.executable, "-c", code), workdir=str(tmp_path))
    spec = LaunchSpec(job_id="j", attempt=1, job=job, ranks=((0, 0),), world_size=1,
                      local_world_size=1, master_addr="127.0.0.1", master_port=free_port(),
                      node_rank=0, num_nodes=1)
    (proc,) = la.launch(spec)
    deadline = time.monotonic() + 60
    tick = threading.Event()
    while not proc.ended:
        assert time.monotonic() < deadline, "rank did not end"
        tick.wait(0.02)
    return proc


KILL_SELF = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"


def test_a_sigkill_while_the_nodes_oom_kill_count_rose_is_named_out_of_memory(
        launcher, tmp_path, monkeypatch):
    counts = iter([7, 8])
    monkeypatch.setattr(launcher_mod.oom, "oom_kills", lambda: next(counts))
    proc = run_rank(launcher, KILL_SELF, tmp_path)
    assert proc.phase == RankPhase.FAILED and proc.signal == "SIGKILL"
    assert proc.error_type == oom.ERROR_TYPE
    assert "OOM killer" in proc.exit_reason() and "from 7 to 8" in proc.exit_reason()


def test_a_sigkill_without_oom_kills_stays_a_plain_sigkill(launcher, tmp_path, monkeypatch):
    monkeypatch.setattr(launcher_mod.oom, "oom_kills", lambda: 7)
    proc = run_rank(launcher, KILL_SELF, tmp_path)
    assert proc.error_type == "" and proc.exit_reason() == "killed by SIGKILL"


def test_the_oom_kill_counter_is_read_from_vmstat(tmp_path):
    path = tmp_path / "vmstat"
    path.write_text("nr_free_pages 10\noom_kill 42\n")
    assert oom.oom_kills(str(path)) == 42
    assert oom.oom_kills(str(tmp_path / "missing")) == -1


def launch_waiting(la: Launcher, code: str, tmp_path):  # type: ignore[no-untyped-def]
    """A rank that waits for ``go`` to exist, then runs ``code``."""
    go = tmp_path / "go"
    script = (f"import os, sys, time, pathlib\n"
              f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.01)\n{code}\n")
    job = JobSpec(command=(sys.executable, "-c", script), workdir=str(tmp_path))
    spec = LaunchSpec(job_id="j", attempt=1, job=job, ranks=((0, 0),), world_size=1,
                      local_world_size=1, master_addr="127.0.0.1", master_port=free_port(),
                      node_rank=0, num_nodes=1)
    (proc,) = la.launch(spec)
    return proc, go


def wait_ended(proc) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 60
    tick = threading.Event()
    while not proc.ended:
        assert time.monotonic() < deadline, "rank did not end"
        tick.wait(0.02)


def test_a_crash_in_teardown_after_the_script_finished_counts_as_success(launcher, tmp_path):
    proc, go = launch_waiting(launcher, "os.abort()", tmp_path)
    launcher.script_finished("j", 1, 0)  # what the agent does on the rank's "exiting"
    go.touch()
    wait_ended(proc)
    assert proc.phase == RankPhase.SUCCEEDED and proc.signal == "SIGABRT"
    assert "interpreter teardown" in proc.exit_reason()
    (event,) = launcher._snapshots.take_events()
    assert event.kind == "teardown_crash" and "SIGABRT" in event.message


def test_the_same_crash_before_the_script_finished_is_a_failure(launcher, tmp_path):
    proc, go = launch_waiting(launcher, "os.abort()", tmp_path)
    go.touch()
    wait_ended(proc)
    assert proc.phase == RankPhase.FAILED and proc.exit_reason() == "killed by SIGABRT"


def test_an_exit_code_the_finished_script_chose_stays_a_failure(launcher, tmp_path):
    proc, go = launch_waiting(launcher, "sys.exit(3)", tmp_path)
    launcher.script_finished("j", 1, 0)
    go.touch()
    wait_ended(proc)
    assert proc.phase == RankPhase.FAILED and proc.exit_code == 3


def test_a_rank_log_stops_at_the_jobs_byte_limit_and_the_output_still_ships(launcher, tmp_path):
    code = "import sys\nfor i in range(40):\n    print(f'line {i:03d} ' + 'x' * 40)\n" \
           "print('to stderr', file=sys.stderr)\n"
    job = JobSpec(command=(sys.executable, "-c", code), workdir=str(tmp_path),
                  rank_log_max_bytes=500)
    spec = LaunchSpec(job_id="j", attempt=1, job=job, ranks=((0, 0),), world_size=1,
                      local_world_size=1, master_addr="127.0.0.1", master_port=free_port(),
                      node_rank=0, num_nodes=1)
    launcher.launch(spec)
    shipped: list[str] = []
    deadline = time.monotonic() + 60
    tick = threading.Event()
    while len(shipped) < 41:
        assert time.monotonic() < deadline, f"only {len(shipped)} lines shipped"
        shipped += [chunk[4] for chunk in launcher.outbox.take(1 << 20)[0]]
        tick.wait(0.02)
    assert sum("line" in s for s in shipped) == 40 and "to stderr\n" in shipped
    log = tmp_path / "run" / "jobs" / "j" / "attempt-1" / "rank-0.log"
    lines = log.read_text().splitlines()
    # stdout and stderr are read by two threads, so "to stderr" may land anywhere in the file;
    # what the limit decides: whole lines up to 500 bytes kept in order, then the one line that
    # says why the file stops (49 bytes a stdout line: 9 or 10 of them fit)
    kept, last = lines[:-1], lines[-1]
    assert "rank_log_max_bytes (500)" in last
    assert 450 < sum(len(line) + 1 for line in kept) <= 500
    stdout_lines = [line for line in kept if line.startswith("line ")]
    assert stdout_lines == [f"line {i:03d} " + "x" * 40 for i in range(len(stdout_lines))]
    assert set(kept) - set(stdout_lines) <= {"to stderr"}


def test_fence_kills_an_older_attempt_that_ignores_sigterm_and_returns_once_it_is_gone(
        launcher, tmp_path):
    # A Lightning rank turns SIGTERM into a graceful stop that keeps running hooks (and saving
    # snapshots); the agent reads the old snapshots for the next attempt only after fence().
    ready = tmp_path / "ready"
    script = ("import pathlib, signal, time\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              f"pathlib.Path({str(ready)!r}).touch()\n"
              "while True: time.sleep(0.05)\n")
    job = JobSpec(command=(sys.executable, "-c", script), workdir=str(tmp_path))
    spec = LaunchSpec(job_id="j", attempt=1, job=job, ranks=((0, 0),), world_size=1,
                      local_world_size=1, master_addr="127.0.0.1", master_port=free_port(),
                      node_rank=0, num_nodes=1)
    (old,) = launcher.launch(spec)
    deadline = time.monotonic() + 60
    tick = threading.Event()
    while not ready.exists():
        assert time.monotonic() < deadline, "rank did not start"
        tick.wait(0.02)
    launcher.stop("j", 1, grace_s=30.0, reason="attempt failed")  # SIGTERM, ignored
    launcher.fence("j", 2, timeout_s=30.0)
    assert old.proc.poll() is not None, "fence returned while the old rank still ran"


def test_node_rank_0s_agent_serves_the_rendezvous_store_until_its_ranks_end(launcher, tmp_path):
    port = free_port()
    # the rank connects as a client at once: nobody but the agent serves that port
    code = ("import os, datetime\n"
            "from torch.distributed import TCPStore\n"
            "assert os.environ['TORCHELASTIC_USE_AGENT_STORE'] == 'True'\n"
            "s = TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), 2, False,\n"
            "             datetime.timedelta(seconds=30))\n"
            "s.set('seen', 'yes')\n"
            "print('store says', s.get('seen').decode(), flush=True)\n")
    job = JobSpec(command=(sys.executable, "-c", code), workdir=str(tmp_path))
    spec = LaunchSpec(job_id="j", attempt=1, job=job, ranks=((0, 0),), world_size=2,
                      local_world_size=1, master_addr="127.0.0.1", master_port=port,
                      node_rank=0, num_nodes=2)
    (proc,) = launcher.launch(spec)
    wait_ended(proc)
    assert proc.phase == RankPhase.SUCCEEDED, proc.exit_reason()
    log = (tmp_path / "run" / "jobs" / "j" / "attempt-1" / "rank-0.log").read_text()
    assert "store says yes" in log

    def refused() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) != 0

    deadline = time.monotonic() + 30
    tick = threading.Event()
    while not refused():  # the store goes with the attempt's last rank on this node
        assert time.monotonic() < deadline, "the store still listens after its ranks ended"
        tick.wait(0.02)


def test_other_nodes_agents_serve_no_store(launcher, tmp_path):
    port = free_port()
    job = JobSpec(command=(sys.executable, "-c", "print('hi')"), workdir=str(tmp_path))
    spec = LaunchSpec(job_id="j", attempt=1, job=job, ranks=((1, 0),), world_size=2,
                      local_world_size=1, master_addr="127.0.0.1", master_port=port,
                      node_rank=1, num_nodes=2)
    (proc,) = launcher.launch(spec)
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0
    wait_ended(proc)


def test_a_rendezvous_port_already_taken_fails_the_launch_instead_of_joining_it(launcher,
                                                                                 tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        job = JobSpec(command=(sys.executable, "-c", "print('hi')"), workdir=str(tmp_path))
        spec = LaunchSpec(job_id="j", attempt=1, job=job, ranks=((0, 0), (1, 1)), world_size=2,
                          local_world_size=2, master_addr="127.0.0.1", master_port=port,
                          node_rank=0, num_nodes=1)
        procs = launcher.launch(spec)
    assert [p.phase for p in procs] == [RankPhase.FAILED, RankPhase.FAILED]
    assert all(p.pid == 0 and p.error_type == "LaunchError" for p in procs)
    assert f"rendezvous store on port {port}" in procs[0].error_message
