"""The agent's snapshot keeper: names, reports from ranks, sweep of a dead predecessor's files."""

from __future__ import annotations

import pytest

from hpt.agent.snapshots import SnapshotKeeper


def test_snapshot_names_carry_the_owning_agent_instance(tmp_path):
    a = SnapshotKeeper("node-1", shm_dir=str(tmp_path), owner="aaaa")
    b = SnapshotKeeper("node-1", shm_dir=str(tmp_path), owner="bbbb")
    assert a.prefix("job", 0) != b.prefix("job", 0)
    assert a.prefix("job", 0).startswith("hpt-node-1--aaaa-")


def test_reported_steps_follow_commits_and_discards(tmp_path):
    keeper = SnapshotKeeper("n", shm_dir=str(tmp_path))
    keeper.prepare("j", 3, world_size=4, persist_dir="", persist_every=0, keep_persisted=3)
    keeper.committed("j", 3, 10, 0, 4096)
    keeper.committed("j", 3, 11, 1, 4096)
    assert keeper.steps("j", 3) == ([10, 11], [], 4096)
    keeper.discarded("j", 3, 0)
    assert keeper.steps("j", 3) == ([11], [], 4096)
    with pytest.raises(ValueError, match="unknown rank"):
        keeper.committed("j", 7, 1, 0)

