"""Many agents on one controller: simulated agents (tests/simagents.py, the real gRPC
protocol, all on one asyncio loop here) against a real controller's gRPC server.

140 agents is more than the old server's thread pool held (it had a thread per agent stream and
stopped at 127 registrations); the figures at thousands of agents are in
tests/bench/bench_scale.py.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from hpt.controller.app import Controller
from hpt.controller.config import ControllerConfig
from hpt.controller.model import JobSpec, NodeState
from tests.simagents import Fleet, FleetConfig

NUM_AGENTS = 140
DEADLINE_S = 60.0


@pytest.fixture
def controller():
    ctl = Controller(ControllerConfig(port=0, heartbeat_period_s=0.5))
    ctl.start()
    try:
        yield ctl
    finally:
        ctl.stop()


async def _until(pred, deadline_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + deadline_s
    while not pred():
        if time.monotonic() > end:
            raise TimeoutError(f"{what} not within {deadline_s} s")
        await asyncio.sleep(0.05)


def _states(ctl: Controller) -> dict[str, NodeState]:
    with ctl.reconciler.lock:
        return {name: rt.node.state for name, rt in ctl.reconciler.nodes.items()}


def test_many_agents_register_heartbeat_and_none_is_lost(controller) -> None:
    async def run() -> None:
        cfg = FleetConfig(target=f"127.0.0.1:{controller.port}", num_agents=NUM_AGENTS, slots=1)
        async with Fleet(cfg) as fleet:
            assert await fleet.wait_registered(DEADLINE_S) == NUM_AGENTS, fleet.errors()[:3]
            # every agent gets at least three heartbeats acknowledged
            await _until(lambda: len(fleet.latencies) >= 3 * NUM_AGENTS, DEADLINE_S,
                         "three acks per agent")
            states = _states(controller)
            assert len(states) == NUM_AGENTS
            assert set(states.values()) == {NodeState.READY}
            assert fleet.errors() == []

    asyncio.run(run())


def test_a_job_over_every_agent_launches_everywhere_and_a_silent_one_is_lost(controller) -> None:
    async def run() -> None:
        cfg = FleetConfig(target=f"127.0.0.1:{controller.port}", num_agents=NUM_AGENTS, slots=2,
                          collectives_per_step=1)
        async with Fleet(cfg) as fleet:
            assert await fleet.wait_registered(DEADLINE_S) == NUM_AGENTS, fleet.errors()[:3]
            job_id = controller.reconciler.submit(JobSpec(
                command=("python", "train.py"), nodes=NUM_AGENTS, procs_per_node=2,
                min_nodes=NUM_AGENTS - 1))
            await _until(lambda: len(fleet.launches(job_id, 1)) == NUM_AGENTS, DEADLINE_S,
                         "a Launch on every agent")
            await _until(lambda: controller.reconciler.detection.num_records > 0, DEADLINE_S,
                         "timing records reach the detectors")
            victim = fleet.agents[-1]
            victim.silence()
            await _until(lambda: _states(controller)[victim.name] == NodeState.LOST, DEADLINE_S,
                         "the silent agent declared lost")
            # the job goes on without it: attempt 2 on every other agent
            await _until(lambda: len(fleet.launches(job_id, 2)) == NUM_AGENTS - 1, DEADLINE_S,
                         "attempt 2 launched on the others")
            lost = [n for n, s in _states(controller).items() if s == NodeState.LOST]
            assert lost == [victim.name]

    asyncio.run(run())
