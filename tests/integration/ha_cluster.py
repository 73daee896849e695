"""Two controller replicas (leader election through Redis) plus agents, each its own process.

Used by tests/integration/test_ha.py and tests/bench/bench_failover.py. Agents get both
controller addresses; the client talks to whichever replica leads (health of the agent
service is SERVING on the leader only).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import redis as redis_py
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.cluster import LocalCluster, free_port, wait_for

AGENT_SERVICE = "hpt.v1.AgentService"


def serving(address: str, service: str = AGENT_SERVICE) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1.0
            )
        except grpc.RpcError:
            return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


class HACluster(LocalCluster):
    def __init__(self, workdir: Path, *, redis_url: str, lease_s: float = 1.5, **kw) -> None:  # type: ignore[no-untyped-def]
        super().__init__(workdir, redis_url=redis_url, **kw)
        self.lease_s = lease_s
        self.addresses = [f"127.0.0.1:{self.port}", f"127.0.0.1:{free_port()}"]
        self.replicas: list[subprocess.Popen[bytes] | None] = [None, None]
        self.redis = redis_py.Redis.from_url(redis_url)

    def start_replica(self, i: int) -> None:
        args = ["controller", "--port", self.addresses[i].rsplit(":", 1)[1],
                "--redis-url", self.redis_url, "--leader-lease", str(self.lease_s)]
        if self.token_file:
            args += ["--token-file", self.token_file, "--agent-token-file", self.agent_token_file]
        self.replicas[i] = self._spawn(args, f"controller{i}-{self._restarts}.log")
        self._restarts += 1
        wait_for(lambda: serving(self.addresses[i], ""), 60, f"replica {i} live", poll_s=0.1)

    def start_controller(self) -> None:
        self.start_replica(0)
        self.wait_leader(0)  # the first one leads: deterministic roles for the tests
        self.start_replica(1)

    def leader(self) -> int | None:
        for i, address in enumerate(self.addresses):
            proc = self.replicas[i]
            if proc is not None and proc.poll() is None and serving(address):
                return i
        return None

    def wait_leader(self, i: int, timeout_s: float = 60) -> None:
        wait_for(lambda: self.leader() == i, timeout_s, f"replica {i} leads", poll_s=0.02)
        if self.address != self.addresses[i]:
            self.address = self.addresses[i]
            self._drop_client()

    def start_agent(self, name: str) -> None:
        args = ["agent", "--controller", ",".join(self.addresses), "--name", name,
                "--slots", str(self.slots), "--run-dir", str(self.workdir / f"run-{name}")]
        if not self.warm:
            args.append("--no-warm")
        if self.agent_token_file:
            args += ["--token-file", self.agent_token_file]
        self.agents[name] = self._spawn(args, f"agent-{name}.log")
        self._agent_names.add(name)

    def epoch(self) -> int:
        return int(self.redis.get("{hpt}:leader:epoch") or 0)

    def record_versions(self) -> dict[bytes, tuple[int, bytes]]:
        """Every stored record's (version, writer epoch)."""
        out = {}
        for key in self.redis.scan_iter(match="{hpt}:kv:*"):
            v, e = self.redis.hmget(key, ["v", "e"])
            if v is not None:
                out[key] = (int(v), e or b"")
        return out

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.redis.close()
