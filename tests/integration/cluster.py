"""A real local cluster for tests and benchmarks: one controller and N agents, each its own
process (``python -m hpt.cli controller|agent``) on loopback, plus the client to drive them.

Every process started here is reaped by ``close()``, and every rank pid the cluster ever
reported is checked dead (no orphans).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hpt import _pdeathsig
from hpt._proto import common_pb2
from hpt.client import JobClient

ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "examples" / "train.py")
BIN = Path(__file__).resolve().parent / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def rendezvous(world: int) -> Iterator[dict[str, str]]:
    """The rendezvous of ``world`` ranks a test starts itself, as environment variables: a
    TCPStore this process hosts on a port the kernel picked, which every rank joins as a
    client (torchrun's agent store). A port probed free and then bound by rank 0 may be taken
    in between by anything else on the machine."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                     use_libuv=False)
    try:
        yield {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
               "TORCHELASTIC_USE_AGENT_STORE": "True", "USE_LIBUV": "0"}
    finally:
        del store


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.05):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    tick = threading.Event()
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not true within {timeout_s:g}s")
        tick.wait(poll_s)


def final_sha(cluster: LocalCluster, job_id: str) -> str:
    """Rank 0's final digest (``examples/train.py`` prints it). On a loaded machine a rank can
    take past the hang deadline to exit after its last step; the restart then restores the
    final step and prints the same digest again, so every digest printed must agree."""
    shas = {line.text.split()[-1] for line in cluster.client.logs(job_id, rank=0)
            if line.text.startswith("final sha256 ")}
    assert len(shas) == 1, shas
    return shas.pop()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def state_name(value: int) -> str:
    return common_pb2.JobState.Name(value).removeprefix("JOB_STATE_")


class LocalCluster:
    def __init__(
        self,
        workdir: Path,
        *,
        agents: int = 2,
        slots: int = 2,
        redis_url: str = "",
        token: str = "",
        warm: bool = True,
        fork_server: bool = True,
        agent_lease_s: float | None = None,
        heartbeat_period_s: float | None = None,
        controller_args: tuple[str, ...] = (),
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.redis_url = redis_url
        self.token_file = self.agent_token_file = ""
        if token:  # the client's token; agents get their own role's token
            self.token_file = str(workdir / "token")
            self.agent_token_file = str(workdir / "agent-token")
            for path, text in ((self.token_file, token), (self.agent_token_file, token + "-agent")):
                Path(path).write_text(text + "\n")
                os.chmod(path, 0o600)
        self.warm = warm
        self.fork_server = fork_server
        self.slots = slots
        self.num_agents = agents
        self.agent_lease_s = agent_lease_s
        self.heartbeat_period_s = heartbeat_period_s
        self.controller_args = list(controller_args)
        self.controller: subprocess.Popen[bytes] | None = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self._all: list[subprocess.Popen[bytes]] = []
        self._log_of: dict[int, str] = {}  # pid -> its log file in workdir
        self._rank_pids: set[int] = set()
        self._client: JobClient | None = None
        self._restarts = 0
        self._killed_agents: set[int] = set()  # pids of agents killed with -9
        self._agent_names: set[str] = set()

    # ---------------------------------------------------------------- processes

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        with open(self.workdir / log_name, "ab") as log:
            proc = subprocess.Popen(
                hpt_argv(args), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True,
            )
        self._all.append(proc)
        self._log_of[proc.pid] = log_name
        return proc

    def start_controller(self) -> None:
        args = ["controller", "--port", str(self.port)]
        if self.redis_url:
            args += ["--redis-url", self.redis_url]
        if self.token_file:
            args += ["--token-file", self.token_file, "--agent-token-file", self.agent_token_file]
        if self.agent_lease_s is not None:
            args += ["--agent-lease", str(self.agent_lease_s)]
        if self.heartbeat_period_s is not None:
            args += ["--heartbeat-period", str(self.heartbeat_period_s)]
        args += self.controller_args
        self.controller = self._spawn(args, f"controller-{self._restarts}.log")
        self._restarts += 1
        wait_for(self._serving, 60, "controller health SERVING", poll_s=0.1)

    def _serving(self) -> bool:
        if self.controller is not None and self.controller.poll() is not None:
            raise RuntimeError(f"controller exited {self.controller.returncode}: {self.logs()}")
        with grpc.insecure_channel(self.address) as channel:
            try:
                resp = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=1.0
                )
            except grpc.RpcError:
                return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    def start_agent(self, name: str) -> None:
        args = ["agent", "--controller", self.address, "--name", name, "--slots", str(self.slots),
                "--run-dir", str(self.workdir / f"run-{name}")]
        if not self.warm:
            args.append("--no-warm")
        elif not self.fork_server:
            args.append("--no-fork-server")
        if self.agent_token_file:
            args += ["--token-file", self.agent_token_file]
        self.agents[name] = self._spawn(args, f"agent-{name}.log")
        self._agent_names.add(name)

    def start(self) -> LocalCluster:
        self.start_controller()
        for i in range(self.num_agents):
            self.start_agent(f"node-{i}")
        self.wait_nodes_ready(self.num_agents)
        return self

    def wait_nodes_ready(self, count: int, timeout_s: float = 60) -> None:
        def ready() -> bool:
            nodes = self.client.nodes()
            return sum(n.state == common_pb2.NODE_STATE_READY for n in nodes) >= count

        wait_for(ready, timeout_s, f"{count} node(s) READY", poll_s=0.1)

    def kill_controller(self) -> None:
        assert self.controller is not None
        self.controller.kill()
        self.controller.wait(timeout=30)
        self._drop_client()

    def kill_agent(self, name: str) -> None:
        proc = self.agents.pop(name)
        proc.kill()
        proc.wait(timeout=30)
        self._killed_agents.add(proc.pid)

    # ---------------------------------------------------------------- client side

    @property
    def client(self) -> JobClient:
        if self._client is None:
            token = Path(self.token_file).read_text().strip() if self.token_file else ""
            self._client = JobClient.connect(self.address, token=token)
        return self._client

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def submit(self, *args: str, nodes: int = 2, procs: int = 2, **kw) -> str:  # type: ignore[no-untyped-def]
        kw.setdefault("workdir", str(ROOT))
        command = list(args) if args else ["python", TRAIN]
        return self.client.submit(command=command, nodes=nodes, procs_per_node=procs, **kw)

    def job(self, job_id: str) -> common_pb2.Job:
        job = self.client.get(job_id)
        for attempt in job.attempts:
            self._rank_pids.update(r.pid for r in attempt.ranks if r.pid > 0)
        return job

    def wait_job(self, job_id: str, predicate: Callable[[common_pb2.Job], bool], timeout_s: float,
                 what: str = "job condition") -> common_pb2.Job:
        return wait_for(lambda: (lambda j: j if predicate(j) else None)(self.job(job_id)),
                        timeout_s, what)

    def wait_terminal(self, job_id: str, timeout_s: float = 120) -> common_pb2.Job:
        terminal = {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED,
                    common_pb2.JOB_STATE_CANCELLED}
        return self.wait_job(job_id, lambda j: j.state in terminal, timeout_s, "job terminal")

    def wait_step(self, job_id: str, attempt: int, step: int, timeout_s: float = 90) -> common_pb2.Job:
        def reached(job: common_pb2.Job) -> bool:
            if len(job.attempts) < attempt:
                return False
            ranks = job.attempts[attempt - 1].ranks
            return bool(ranks) and all(r.step >= step for r in ranks)

        return self.wait_job(job_id, reached, timeout_s, f"attempt {attempt} at step {step}")

    def events(self, job_id: str = "") -> list[common_pb2.Event]:
        return list(self.client.events(follow=False, job_id=job_id))

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
            for p in sorted(self.workdir.glob("*.log"))
        )

    # ---------------------------------------------------------------- teardown

    def close(self) -> None:
        with_ranks = True
        try:
            for job in self.client.list():
                for attempt in job.attempts:
                    self._rank_pids.update(r.pid for r in attempt.ranks if r.pid > 0)
        except grpc.RpcError:
            with_ranks = False
        self._drop_client()
        for proc in reversed(self._all):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        stuck = []
        for proc in self._all:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stuck.append(proc)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        survivors = wait_for_dead(self._rank_pids, 10)
        assert not survivors, f"orphan rank processes {survivors} (ranks known: {with_ranks})"
        # an agent killed with -9 cannot release its snapshot memory (its successor on the node
        # sweeps it at start); every agent that shut down normally must have released its own
        # (files are told apart by their owner's pid, not by node name: another cluster's live
        # agents, e.g. a module-scoped fixture's, may have the same names)
        ours = {p.pid for p in self._all}
        for path in shm_files(self._agent_names, self._killed_agents):
            path.unlink(missing_ok=True)
        leaked = [p.name for p in shm_files(self._agent_names, ours)]
        assert not leaked, f"snapshot memory leaked: {leaked[:5]}" + self._stuck_logs(stuck)

    def _stuck_logs(self, stuck: list[subprocess.Popen[bytes]]) -> str:
        """The end of the log of each process that did not stop on SIGTERM (an agent that
        outlasts its grace dumps its threads' stacks there)."""
        out = []
        for proc in stuck:
            path = self.workdir / self._log_of.get(proc.pid, f"(pid {proc.pid}: no log)")
            tail = path.read_text(errors="replace")[-6000:] if path.is_file() else "(no log)"
            out.append(f"\n--- {path.name} (pid {proc.pid}) did not stop on SIGTERM:\n{tail}")
        return "".join(out)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def hpt_argv(args: list[str]) -> list[str]:
    """``python -m hpt.cli ARGS`` that gets SIGTERM when the test process dies (a test run
    killed from outside leaves no controller or agent behind)."""
    return _pdeathsig.wrap([sys.executable, "-m", "hpt.cli", *args], signal.SIGTERM)


def shm_files(names: set[str], pids: set[int]) -> list[Path]:
    """/dev/shm files of agents named ``names`` whose owner (the pid in its lock record, see
    hpt.agent.ownership) is one of ``pids``, and files of those names with no owner at all."""
    owners: dict[str, int] = {}  # "hpt-<node>--<instance>" -> pid
    for lock in Path("/dev/shm").glob("hpt-*--*.lock"):
        try:
            owners[lock.name.removesuffix(".lock")] = int(json.loads(lock.read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    found = []
    for name in names:
        for path in Path("/dev/shm").glob(f"hpt-{name}--*"):
            owner = path.name.removesuffix(".lock")[:len(f"hpt-{name}--") + 12]
            if owners.get(owner, -1) in pids or owner not in owners:
                found.append(path)
    return found


def wait_for_dead(pids: set[int], timeout_s: float) -> set[int]:
    deadline = time.monotonic() + timeout_s
    tick = threading.Event()
    while True:
        alive = {p for p in pids if pid_alive(p)}
        if not alive or time.monotonic() > deadline:
            return alive
        tick.wait(0.05)


# ---------------------------------------------------------------- one cluster, many tests

TERMINAL_STATES = frozenset({common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED,
                             common_pb2.JOB_STATE_CANCELLED})


def restore_shape(cluster: LocalCluster, ready_timeout_s: float = 180) -> None:
    """Bring a cluster that several tests share back to the shape it started in: the controller
    serving and every agent ``node-0`` .. ``node-{N-1}`` running and READY (a test may have
    killed one with ``kill_agent``; its successor sweeps what it left, as on a real node)."""
    if cluster.controller is None or cluster.controller.poll() is not None:
        cluster._drop_client()
        cluster.start_controller()
    names = [f"node-{i}" for i in range(cluster.num_agents)]
    for name in names:
        proc = cluster.agents.get(name)
        if proc is None or proc.poll() is not None:
            cluster.start_agent(name)

    def ready() -> bool:
        states = {n.name: n.state for n in cluster.client.nodes()}
        return all(states.get(name) == common_pb2.NODE_STATE_READY for name in names)

    wait_for(ready, ready_timeout_s, f"{', '.join(names)} READY", poll_s=0.1)


def settle(cluster: LocalCluster, timeout_s: float = 60) -> None:
    """What a test on a shared cluster leaves behind, checked as ``close()`` would: a job still
    running is cancelled and must end; every rank any job ever had must be dead (no orphans);
    every agent the test did not kill itself (``kill_agent``) must still be running."""
    for job in cluster.client.list():
        if job.state not in TERMINAL_STATES:
            cluster.client.cancel(job.id)
    for job in cluster.client.list():
        cluster.wait_terminal(job.id, timeout_s)  # also records the jobs' rank pids
    survivors = wait_for_dead(cluster._rank_pids, timeout_s)
    assert not survivors, f"orphan rank processes {sorted(survivors)}"
    died = {name: p.returncode for name, p in cluster.agents.items() if p.poll() is not None}
    assert not died, f"agents exited during the test: {died}"
