"""Faults of the control plane itself: a paused controller, a Redis that dies and comes back, a
broken network between agents and controller, a controller killed between two store writes.

``ControlPlaneCluster`` is the fault suite's cluster with per-agent TCP proxies (``proxy.py``),
extra controller flags and environment (``HPT_CRASH_AT``), and helpers to pause processes.
``PersistentRedis`` is a ``redis-server`` with an fsync'ed append-only file that can be killed
with -9 and started again on the same port and directory (what a production Redis does).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.faults.faults import FaultCluster
from tests.faults.proxy import TcpProxy
from tests.integration.cluster import ROOT, free_port, hpt_argv, wait_for

# Agents' own hang detection and health check are not under test here; on a loaded machine they
# trip deadlines and slow every start.
CALM_AGENT_ARGS = ["--hang-min", "120", "--no-health-check"]


def hold(seconds: float) -> None:
    """Keep an injected fault in place for ``seconds`` (its duration, not a synchronisation)."""
    threading.Event().wait(seconds)


class ControlPlaneCluster(FaultCluster):
    def __init__(
        self,
        workdir: Path,
        *,
        proxied: bool = False,
        peer_proxied: tuple[str, ...] = (),
        controller_env: dict[str, str] | None = None,
        controller_args: list[str] | None = None,
        **kw: object,
    ) -> None:
        kw.setdefault("agent_args", CALM_AGENT_ARGS)
        super().__init__(workdir, **kw)  # type: ignore[arg-type]
        self.proxied = proxied
        self.proxies: dict[str, TcpProxy] = {}
        self.peer_proxied = set(peer_proxied)
        self.peer_proxies: dict[str, TcpProxy] = {}
        """Proxies in front of these agents' peer services (what other agents pull their
        snapshot pieces through)."""
        self.controller_env = dict(controller_env or {})
        self.controller_args = list(controller_args or [])
        self._paused: set[int] = set()

    def start(self) -> ControlPlaneCluster:
        self.start_controller()
        for i in range(self.num_agents):
            self.start_agent(f"node-{i}")
        self.wait_nodes_ready(self.expect_ready, timeout_s=180)
        return self

    def start_controller(self) -> None:
        super().start_controller()
        # "" is SERVING as soon as the process listens; the job service once it leads (loaded)
        wait_for(self._leading, 60, "controller leads (JobService SERVING)", poll_s=0.1)

    def _leading(self) -> bool:
        with grpc.insecure_channel(self.address) as channel:
            try:
                resp = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="hpt.v1.JobService"), timeout=1.0)
            except grpc.RpcError:
                return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        if args[0] == "agent":
            name = args[args.index("--name") + 1]
            env.update(self.agent_env.get(name, {}))
            args = [*args, *self.agent_args]
            if self.proxied:
                proxy = self.proxies.get(name)
                if proxy is None:
                    proxy = self.proxies[name] = TcpProxy(self.port).start()
                args[args.index("--controller") + 1] = proxy.address
            if name in self.peer_proxied:
                peer = self.peer_proxies.get(name)
                if peer is None:
                    peer = self.peer_proxies[name] = TcpProxy(free_port()).start()
                args += ["--peer-port", str(peer.upstream_port),
                         "--peer-advertise", peer.address]
        elif args[0] == "controller":
            env.update(self.controller_env)
            args = [*args, *self.controller_args]
            if self.metrics_port:
                args += ["--metrics-port", str(self.metrics_port)]
        log = open(self.workdir / log_name, "ab")  # noqa: SIM115 (the child keeps it)
        proc = subprocess.Popen(
            hpt_argv(args), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True, env=env,
        )
        log.close()
        self._all.append(proc)
        self._log_of[proc.pid] = log_name  # (a process that outlives SIGTERM: its log is shown)
        return proc

    def pause(self, proc: subprocess.Popen[bytes]) -> None:
        os.kill(proc.pid, signal.SIGSTOP)
        self._paused.add(proc.pid)

    def resume(self, proc: subprocess.Popen[bytes]) -> None:
        os.kill(proc.pid, signal.SIGCONT)
        self._paused.discard(proc.pid)

    def node_states(self) -> dict[str, str]:
        from hpt._proto import common_pb2

        return {n.name: common_pb2.NodeState.Name(n.state).removeprefix("NODE_STATE_")
                for n in self.client.nodes()}

    def event_kinds(self, job_id: str = "") -> list[str]:
        return [e.kind for e in self.events(job_id)]

    def close(self) -> None:
        for pid in list(self._paused):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        try:
            super().close()
        finally:
            for proxy in [*self.proxies.values(), *self.peer_proxies.values()]:
                proxy.close()


class PersistentRedis:
    """``redis-server`` with ``appendfsync always`` on a fixed port and directory."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server not found on PATH (Debian package 'redis-server')")
        self.binary = binary
        self.port = free_port()
        self.dir = workdir / f"redis-aof-{self.port}"
        self.dir.mkdir(parents=True)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self._starts = 0

    def start(self) -> PersistentRedis:
        log = open(self.dir / f"redis-{self._starts}.log", "wb")  # noqa: SIM115
        self._starts += 1
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        log.close()
        wait_for(self._answers, 20, "redis answers PING", poll_s=0.05)
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited {self.proc.returncode}")
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5,
                             retry=Retry(NoBackoff(), 0))
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
