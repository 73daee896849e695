"""The restore chain: sources tried in order, each verified, skipped with a reason when it fails."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch

from hpt.ckpt import Checkpointer, MemorySink, ShmSink
from hpt.ckpt.errors import CorruptCheckpointError, RestoreError
from hpt.ckpt.layout import shard_dim0
from hpt.ckpt.sources import (
    RestoreTarget,
    ShardRef,
    ShardSetSource,
    SinkSource,
    SourceUnavailable,
    restore_chain,
)


class FakeSource:
    """A source with fixed steps whose load returns or raises what it is told."""

    def __init__(self, name: str, steps: Sequence[int], fail: dict[int, Exception] | None = None,
                 steps_error: Exception | None = None) -> None:
        self.name = name
        self._steps = list(steps)
        self._fail = fail or {}
        self._steps_error = steps_error
        self.loaded: list[int] = []

    def steps(self, target: RestoreTarget) -> Sequence[int]:
        if self._steps_error is not None:
            raise self._steps_error
        return self._steps

    def load(self, step: int, target: RestoreTarget) -> Any:
        self.loaded.append(step)
        if step in self._fail:
            raise self._fail[step]
        return {"step": step, "source": self.name}


def run(sources: list[FakeSource], check=None, apply=None):  # type: ignore[no-untyped-def]
    events: list[tuple[str, str]] = []
    outcome = restore_chain(
        sources, RestoreTarget(0, 1),
        check=check or (lambda state: None),
        apply=apply or (lambda state: state["step"]),
        on_event=lambda kind, msg: events.append((kind, msg)),
    )
    return outcome, events


def test_the_first_source_that_serves_wins_and_later_ones_are_not_read() -> None:
    first, second = FakeSource("memory", [7]), FakeSource("disk", [5])
    outcome, events = run([first, second])
    assert (outcome.step, outcome.source) == (7, "memory")
    assert second.loaded == [] and events == []


def test_a_checksum_mismatch_falls_back_to_the_next_source_with_an_event_naming_it() -> None:
    shm = FakeSource("shm", [9], fail={9: CorruptCheckpointError("checksum mismatch in [0, 64)")})
    disk = FakeSource("disk", [5])
    outcome, events = run([shm, disk])
    assert (outcome.step, outcome.source) == (5, "disk")
    assert events == [("checkpoint_skipped",
                       "shm: step 9: CorruptCheckpointError: checksum mismatch in [0, 64)")]


def test_a_missing_source_and_a_state_that_does_not_fit_fall_through_to_older_steps() -> None:
    missing = FakeSource("shm", [], steps_error=SourceUnavailable("step 9 is not held"))
    disk = FakeSource("disk", [10, 5, 2])

    def check(state: dict[str, Any]) -> None:
        if state["step"] == 10:
            raise RestoreError("model.w: snapshot has float32[4], model has float32[8]")

    outcome, events = run([missing, disk], check=check)
    assert (outcome.step, outcome.source) == (5, "disk")
    assert disk.loaded == [10, 5]
    assert [m.split(":")[0] for _, m in events] == ["shm", "disk"]
    assert "step 10: RestoreError: model.w" in events[1][1]


def test_nothing_anywhere_is_scratch() -> None:
    outcome, events = run([FakeSource("memory", []), FakeSource("disk", [])])
    assert (outcome.step, outcome.source, events) == (0, "scratch", [])


def test_a_failed_apply_moves_on_and_a_failed_apply_with_no_later_source_raises() -> None:
    def apply(state: dict[str, Any]) -> int:
        if state["source"] == "shm":
            raise RestoreError("size mismatch")
        return state["step"]

    outcome, _ = run([FakeSource("shm", [9]), FakeSource("disk", [4])], apply=apply)
    assert (outcome.step, outcome.source) == (4, "disk")
    with pytest.raises(RestoreError, match="partly overwritten"):
        run([FakeSource("shm", [9])], apply=apply)


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 6)
    return model, torch.optim.Adam(model.parameters(), lr=0.1)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.ones(2, 4)).sum().backward()
    opt.step()


def test_in_process_memory_is_the_first_source_of_a_standalone_checkpointer() -> None:
    # Before: restore() of a Checkpointer without an agent ignored its own memory and returned 0.
    from hpt.checkpoint import Checkpointer as AgentCheckpointer

    model, opt = _model()
    with AgentCheckpointer(model, opt) as ckpt:
        assert ckpt.restore() == 0
        _train(model, opt)
        ckpt.save(1)
        ckpt.wait()
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        _train(model, opt)
        assert not torch.equal(model.weight, saved["weight"])
        outcome = ckpt.restore_outcome()
        assert (outcome.step, outcome.source) == (1, "memory")
        for k, v in model.state_dict().items():
            assert torch.equal(v, saved[k]), k


def test_memory_source_restores_a_step_every_rank_holds_not_only_the_newest() -> None:
    model, opt = _model()
    with Checkpointer(model, opt, sink=MemorySink(), num_generations=3) as ckpt:
        for step in (1, 2, 3):
            _train(model, opt)
            ckpt.save(step)
        ckpt.wait()
        source = SinkSource(ckpt.sink, "memory")
        assert list(source.steps(RestoreTarget(0, 1))) == [3, 2, 1]
        assert source.load(2, RestoreTarget(0, 1))["step"] == 2


def _snapshot_ranks(prefixes: list[str], world: int, step: int) -> dict[int, torch.Tensor]:
    """Write one snapshot per old rank of a row-sharded weight; returns the global weight."""
    torch.manual_seed(1)
    full = torch.randn(10, 3)
    for rank, prefix in enumerate(prefixes):
        info = shard_dim0(full.shape, rank, world)
        lo = info.global_offset[0]
        model = torch.nn.Linear(3, info.local_shape[0], bias=False)
        with torch.no_grad():
            model.weight.copy_(full[lo:lo + info.local_shape[0]])
        with Checkpointer(model, None, sink=ShmSink(prefix), shards={"weight": info}) as ckpt:
            ckpt.save(step)
    return {0: full}


def test_a_shard_set_of_another_world_size_reshards_by_global_offset(shm_prefix: str) -> None:
    prefixes = [f"{shm_prefix}-r{r}" for r in range(4)]
    full = _snapshot_ranks(prefixes, 4, 6)[0]
    try:
        shards = {r: ShardRef(p, 0) for r, p in enumerate(prefixes)}
        for new_rank in range(3):
            info = shard_dim0(full.shape, new_rank, 3)
            model = torch.nn.Linear(3, info.local_shape[0], bias=False)
            ckpt = Checkpointer(model, None, shards={"weight": info})
            target = RestoreTarget(new_rank, 3, placement=ckpt._placement)
            state = ShardSetSource(6, 4, "/dev/shm", shards).load(6, target)
            ckpt.check_state(state)
            assert ckpt.apply_state(state) == 6
            lo = info.global_offset[0]
            assert torch.equal(model.weight, full[lo:lo + info.local_shape[0]])
            ckpt.close()
        # without old rank 3, new rank 2 (rows 7..9) lacks a piece
        partial = ShardSetSource(6, 4, "/dev/shm", {r: shards[r] for r in range(3)})
        info = shard_dim0(full.shape, 2, 3)
        ckpt = Checkpointer(torch.nn.Linear(3, info.local_shape[0], bias=False), None,
                            shards={"weight": info})
        with pytest.raises(RestoreError, match="do not cover region offset \\[7, 0\\]"):
            partial.load(6, RestoreTarget(2, 3, placement=ckpt._placement))
        ckpt.close()
    finally:
        for p in prefixes:
            ShmSink.remove(p)


def test_a_replica_stands_in_for_a_lost_preferred_rank_that_the_rank_then_finds() -> None:
    from hpt.ckpt.sources import replica_rank

    # its own old rank when held: at the same number every rank keeps its own state
    assert replica_rank(1, 4, held={1, 3}) == 1
    # old ranks 0 and 1 lost, old ranks 2 and 3 held here: new ranks 0 and 1 take one each
    assert [replica_rank(r, 4, held={2, 3}) for r in (0, 1)] == [2, 3]
    # nothing held (a fresh node): the preferred one if its node survived, else a survivor
    # spread by the new rank's number: new ranks 0 and 1 of a fresh node read distinct ones
    assert replica_rank(0, 4, held=set(), alive={0, 3}) == 0
    assert replica_rank(1, 4, held=set(), alive={0, 3}) == 3
    fetched = {replica_rank(r, 4, held=set(), alive={2, 3}) for r in (0, 1, 2)}
    assert fetched == {2, 3}
    # the rank side picks among what was fetched, with the same spread
    assert [replica_rank(r, 4, held=fetched) for r in (0, 1, 2)] == [2, 3, 2]
    # whatever the agent fetched, a rank picks among it
    fetched = {replica_rank(r, 4, held=set(), alive={0, 3}) for r in (1, 3)}
    assert fetched == {3} and all(replica_rank(r, 4, held=fetched) in fetched for r in (1, 3))
    # a new rank past the old world prefers old rank 0
    assert replica_rank(5, 4, held={0, 2}) == 0
