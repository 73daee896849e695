"""Fault injection for the fault matrix: a fluent injector and a cluster that takes it.

``Faults().slow_rank(1, factor=1.3).stop_rank(2, step=5)`` builds the environment that
``bin/faulty_train.py`` reads; ``FaultCluster`` is the integration suite's ``LocalCluster`` with
per-agent environment and options (a node whose health check fails, a controller serving
``/metrics``, a shorter hang deadline).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.integration.cluster import ROOT, LocalCluster, free_port, hpt_argv

FAULTY = str(Path(__file__).resolve().parent / "bin" / "faulty_train.py")
FINDING_KINDS = (
    "straggler",
    "straggler_cleared",
    "collective_laggard",
    "collective_missing",
    "hang",
)


class Faults:
    """What to break, as the job environment ``faulty_train.py`` reads (attempt 1 only)."""

    def __init__(self) -> None:
        self._env: dict[str, str] = {}

    def slow_rank(self, rank: int, *, factor: float) -> Faults:
        self._env.update(FI_SLOW_RANK=str(rank), FI_SLOW_FACTOR=str(factor))
        return self

    def stop_rank(self, rank: int, *, step: int) -> Faults:
        self._env.update(FI_STOP_RANK=str(rank), FI_STOP_STEP=str(step))
        return self

    def stall_before_collective(self, rank: int, *, step: int) -> Faults:
        self._env.update(FI_STALL_RANK=str(rank), FI_STALL_STEP=str(step))
        return self

    def spin_holding_gil(self, rank: int, *, step: int) -> Faults:
        self._env.update(FI_SPIN_RANK=str(rank), FI_SPIN_STEP=str(step))
        return self

    def in_attempt(self, attempt: int) -> Faults:
        self._env["FI_ATTEMPT"] = str(attempt)
        return self

    def env(self) -> dict[str, str]:
        return dict(self._env)


class FaultCluster(LocalCluster):
    """A LocalCluster whose agents can get their own environment and extra options."""

    def __init__(
        self,
        workdir: Path,
        *,
        agent_env: dict[str, dict[str, str]] | None = None,
        agent_args: list[str] | None = None,
        metrics: bool = False,
        expect_ready: int | None = None,
        **kw: object,
    ) -> None:
        super().__init__(workdir, **kw)  # type: ignore[arg-type]
        self.expect_ready = self.num_agents if expect_ready is None else expect_ready
        self.agent_env = agent_env or {}
        self.agent_args = agent_args or []
        self.metrics_port = free_port() if metrics else 0

    def start(self) -> FaultCluster:
        self.start_controller()
        for i in range(self.num_agents):
            self.start_agent(f"node-{i}")
        self.wait_nodes_ready(self.expect_ready)
        return self

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        if args[0] == "agent":
            name = args[args.index("--name") + 1]
            env.update(self.agent_env.get(name, {}))
            args = [*args, *self.agent_args]
        elif args[0] == "controller" and self.metrics_port:
            args = [*args, "--metrics-port", str(self.metrics_port)]
        log = open(self.workdir / log_name, "ab")  # noqa: SIM115 (the child keeps it)
        proc = subprocess.Popen(
            hpt_argv(args),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            start_new_session=True,
            env=env,
        )
        log.close()
        self._all.append(proc)
        return proc
