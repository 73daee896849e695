"""``hptctl up`` started and stopped in a loop loses no agent (50 rounds:
``tests/bench/bench_up_loop.py``)."""

from __future__ import annotations

import pytest

from tests.integration.up_loop import one_round

ROUNDS = 2


@pytest.mark.timeout(400)  # each round starts agents that import torch; slow on a loaded machine
def test_up_started_and_stopped_repeatedly_loses_no_agent_and_prints_no_fork_noise():
    for i in range(ROUNDS):
        r = one_round()
        assert r.ready, f"round {i}: agents never ready:\n" + "\n".join(r.lines)
        assert r.lost_agents == [], f"round {i}:\n" + "\n".join(r.lines)
        assert r.fork_noise == [], f"round {i}:\n" + "\n".join(r.lines)
        assert r.returncode == 0 and r.lines[-1] == "stopped", "\n".join(r.lines)
        assert len(r.agent_pids) == 2
