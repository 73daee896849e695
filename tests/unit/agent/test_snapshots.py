"""The agent's snapshot keeper: names, reports from ranks, sweep of a dead predecessor's files."""

from __future__ import annotations

import threading

import pytest

from hpt.agent.snapshots import SnapshotKeeper
from hpt.ckpt import fmt
from hpt.ckpt.sink import ShmSink, SnapshotRef


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
    assert keeper.steps("j", 3) == ([10, 11], [], 4096, 0.0)
    assert keeper.blocked("j", 3) == 0.0  # the rank measured nothing
    keeper.committed("j", 3, 12, 2, 4096, blocked_s=0.010)
    keeper.committed("j", 3, 13, 3, 4096, blocked_s=0.060)  # one slow save moves it a fifth
    assert keeper.blocked("j", 3) == pytest.approx(0.020)
    keeper.discarded("j", 3, 2)
    keeper.discarded("j", 3, 3)
    keeper.discarded("j", 3, 0)
    assert keeper.steps("j", 3) == ([11], [], 4096, 0.0)
    with pytest.raises(ValueError, match="unknown rank"):
        keeper.committed("j", 7, 1, 0)



def test_a_rank_is_reported_a_replica_only_when_no_tensor_of_its_snapshot_is_a_shard(tmp_path):
    import torch

    from hpt.ckpt.engine import SnapshotEngine
    from hpt.ckpt.layout import ShardInfo

    keeper = SnapshotKeeper("n", shm_dir=str(tmp_path))
    states = {0: ({"w": torch.ones(8), "step": 3}, None),
              1: ({"w": torch.ones(8)}, {"w": ShardInfo((16,), (8,), (8,))}),
              2: ({"step": 3}, None)}  # plain values only: they may differ per rank
    for rank, (state, shards) in states.items():
        keeper.prepare("j", rank, world_size=3, persist_dir="", persist_every=0,
                       keep_persisted=3)
        assert not keeper.replicated("j", rank)  # nothing read yet
        engine = SnapshotEngine(ShmSink(keeper.prefix("j", rank), directory=str(tmp_path)))
        engine.save(3, state, shards=shards)
        engine.close()
        keeper.committed("j", rank, 3, 0, 64)
    assert [keeper.replicated("j", r) for r in (0, 1, 2)] == [True, False, False]
    # (rank 1's record is readable: it is its shard that makes it no replica)
    layout = ShmSink(keeper.prefix("j", 1), directory=str(tmp_path)).layout(SnapshotRef(3, 0))
    assert [e.is_replicated for e in layout.entries] == [False]
    keeper.prepare("j", 0, world_size=3, persist_dir="", persist_every=0, keep_persisted=3)
    assert not keeper.replicated("j", 0)  # a new attempt is read again
    keeper.release("j")


def test_a_rank_reports_the_even_split_its_shards_follow(tmp_path):
    import torch

    from hpt.ckpt.engine import SnapshotEngine
    from hpt.ckpt.layout import ShardInfo
    from hpt.splits import EvenSplit

    keeper = SnapshotKeeper("n", shm_dir=str(tmp_path))
    # rank 1 of 2 holds rows 8..15 of 16 and columns 5..9 of a 4 x 10 (cut on dim 1);
    # rank 1 of 3 holding rows 8..15 of 16 is no even split (6, 5, 5 or 6, 6, 4 or 5, 5, 6)
    cases = {("a", 2): ({"w": torch.ones(8), "c": torch.ones(4, 5), "step": 3},
                        {"w": ShardInfo((16,), (8,), (8,)), "c": ShardInfo((4, 10), (0, 5),
                                                                           (4, 5))}),
             ("b", 3): ({"w": torch.ones(8)}, {"w": ShardInfo((16,), (8,), (8,))}),
             ("c", 2): ({"w": torch.ones(8)}, None)}  # a replica: no split to report
    for (job, world), (state, shards) in cases.items():
        keeper.prepare(job, 1, world_size=world, persist_dir="", persist_every=0,
                       keep_persisted=3)
        assert keeper.split(job, 1) == ""  # nothing read yet
        engine = SnapshotEngine(ShmSink(keeper.prefix(job, 1), directory=str(tmp_path)))
        engine.save(3, state, shards=shards)
        engine.close()
        keeper.committed(job, 1, 3, 0, 64)
    assert EvenSplit.decode(keeper.split("a", 1)) == EvenSplit(
        frozenset({"chunk", "floor", "tensor_split"}), frozenset({10, 16}))
    assert keeper.split("b", 1) == "" and keeper.split("c", 1) == ""
    keeper.prepare("a", 1, world_size=2, persist_dir="", persist_every=0, keep_persisted=3)
    assert keeper.split("a", 1) == ""  # a new attempt is read again
    for job in ("a", "b", "c"):
        keeper.release(job)


def test_a_round_pins_its_target_and_the_newest_protected_step_on_every_rank(tmp_path):
    keeper = SnapshotKeeper("n", shm_dir=str(tmp_path))
    for rank in (0, 1):
        keeper.prepare("j", rank, world_size=2, persist_dir="", persist_every=0,
                       keep_persisted=3)
    for generation, step in enumerate((10, 11, 12)):
        for rank in (0, 1):
            keeper.committed("j", rank, step, generation, 64)

    def pins(rank: int) -> set[int]:
        return ShmSink(keeper.prefix("j", rank), directory=str(tmp_path)).pinned()

    keeper.pin_rounds([("j", 10, -1)])
    assert pins(0) == pins(1) == {0}
    keeper.pin_rounds([("j", 12, 10)])
    assert pins(0) == pins(1) == {0, 2}
    keeper.pin_rounds([("j", 14, 12)])  # a target ahead of the ranks: pinned when committed
    assert pins(0) == pins(1) == {2}
    keeper.committed("j", 0, 13, 0, 64)
    keeper.committed("j", 0, 14, 1, 64)
    assert pins(0) == {1, 2} and pins(1) == {2}
    keeper.pin_rounds([])  # no round now (the attempt ended): the pins stay for a restore
    assert pins(0) == {1, 2}
    keeper.release("j")
    assert not list(tmp_path.iterdir())


def test_release_later_returns_while_a_persister_closes_and_close_waits_for_it(tmp_path,
                                                                                monkeypatch):
    shm = tmp_path / "shm"
    shm.mkdir()
    entered, go = threading.Event(), threading.Event()
    real_close = fmt.Persister.close

    def slow_close(self, timeout_s=60.0, *, drain=True):  # type: ignore[no-untyped-def]
        entered.set()
        assert go.wait(30), "never released"
        return real_close(self, timeout_s, drain=drain)

    monkeypatch.setattr(fmt.Persister, "close", slow_close)
    keeper = SnapshotKeeper("n", shm_dir=str(shm))
    keeper.prepare("j", 0, world_size=1, persist_dir=str(tmp_path / "persist"),
                   persist_every=1, keep_persisted=3)
    ShmSink(keeper.prefix("j", 0), directory=str(shm)).pin([0])  # one file of the job
    keeper.release_later("j")  # returns although the persister's close blocks
    assert entered.wait(30)
    assert keeper.steps("j", 0) == ([], [], 0, 0.0)  # no longer reported
    assert list(shm.iterdir())  # its memory goes once the persister is done
    go.set()
    keeper.close()
    assert not list(shm.iterdir())


def test_a_retuned_cadence_applies_to_the_jobs_persisting_ranks_only(tmp_path):
    keeper = SnapshotKeeper("n", shm_dir=str(tmp_path))
    try:
        for rank in (0, 1):
            keeper.prepare("j", rank, world_size=2, persist_dir=str(tmp_path / "persist"),
                           persist_every=1, keep_persisted=3)
        keeper.prepare("k", 0, world_size=1, persist_dir="", persist_every=0, keep_persisted=3)
        assert keeper.set_persist_every("j", 50) == 2
        assert keeper.set_persist_every("k", 50) == 0  # it persists nothing: stays so
        assert keeper.set_persist_every("gone", 50) == 0
        with pytest.raises(ValueError, match=r"persist_every \(0\)"):
            keeper.set_persist_every("j", 0)
    finally:
        keeper.close()


def test_the_snapshot_cadence_reaches_the_ranks_sinks_at_launch_and_when_retuned(tmp_path):
    keeper = SnapshotKeeper("n", shm_dir=str(tmp_path))
    sinks = [ShmSink(keeper.prefix("j", r), directory=str(tmp_path)) for r in (0, 1)]
    for rank in (0, 1):  # the job's spec (or the controller) sets one: from the first step
        keeper.prepare("j", rank, world_size=2, persist_dir="", persist_every=0,
                       keep_persisted=3, snapshot_every=7)
    assert [s.cadence() for s in sinks] == [(7, 0, 0), (7, 0, 0)]
    assert keeper.set_snapshot_cadence("j", 300, 420, before=7) == 2
    assert [s.cadence() for s in sinks] == [(300, 420, 7), (300, 420, 7)]
    keeper.prepare("j", 0, world_size=2, persist_dir="", persist_every=0, keep_persisted=3)
    assert sinks[0].cadence() is None  # a launch without one: the script's own again
