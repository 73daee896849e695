"""Rank-side instrumentation on a real single-process gloo group."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist

from hpt import _instrument as ins
from hpt.monitor.records import CollectiveRecord, SectionRecord, StepRecord, record_from_dict

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


@pytest.fixture
def group(tmp_path) -> Iterator[None]:
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        ins.uninstall(flush=False)
        dist.destroy_process_group()


class Sink:
    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []

    def __call__(self, batch: list[dict[str, Any]]) -> None:
        self.batches.append(batch)

    def records(self) -> list[Any]:
        return [record_from_dict(d) for b in self.batches for d in b]

    def of(self, cls: type) -> list[Any]:
        return [r for r in self.records() if isinstance(r, cls)]


def call_every_collective(async_op: bool = False) -> list[str]:
    """Call each wrapped collective once (world size 1); return the op names in call order."""
    t = torch.ones(4)
    calls = {
        "all_reduce": lambda: dist.all_reduce(t, async_op=async_op),
        "broadcast": lambda: dist.broadcast(t, src=0, async_op=async_op),
        "all_gather": lambda: dist.all_gather([torch.empty(4)], t, async_op=async_op),
        "all_gather_into_tensor": lambda: dist.all_gather_into_tensor(
            torch.empty(4), t, async_op=async_op
        ),
        "reduce_scatter": lambda: dist.reduce_scatter(torch.empty(4), [t], async_op=async_op),
        "reduce_scatter_tensor": lambda: dist.reduce_scatter_tensor(
            torch.empty(4), t, async_op=async_op
        ),
        "barrier": lambda: dist.barrier(async_op=async_op),
        "all_to_all": lambda: dist.all_to_all([torch.empty(4)], [t], async_op=async_op),
        "reduce": lambda: dist.reduce(t, dst=0, async_op=async_op),
        "gather": lambda: dist.gather(t, [torch.empty(4)], dst=0, async_op=async_op),
        "scatter": lambda: dist.scatter(torch.empty(4), [t], src=0, async_op=async_op),
    }
    for call in calls.values():
        work = call()
        if async_op:
            work.wait()
    return list(calls)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_every_collective_is_recorded_with_seq_op_bytes_and_times(group):
    sink = Sink()
    timer = ins.install("job-1", 3, 0, "node-a", sink)
    timer.begin_step(0)
    ops = call_every_collective()
    timer.end_step(0)
    colls = sink.of(CollectiveRecord)
    assert [c.op for c in colls] == ops
    assert [c.seq for c in colls] == list(range(len(ops)))
    assert all((c.job_id, c.attempt, c.rank, c.node) == ("job-1", 3, 0, "node-a") for c in colls)
    assert all(c.exit_s is not None and c.exit_s >= c.enter_s for c in colls)
    nbytes = {c.op: c.nbytes for c in colls}
    assert nbytes["all_reduce"] == 16
    assert nbytes["barrier"] == 0
    assert nbytes["all_gather"] == 16
    assert timer.last_error() is None
    assert ins.last_error() is None


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_async_collectives_are_recorded_with_an_exit_time(group):
    sink = Sink()
    timer = ins.install("j", 0, 0, "n", sink)
    timer.begin_step(0)
    ops = call_every_collective(async_op=True)
    timer.end_step(0)
    colls = sink.of(CollectiveRecord)
    assert sorted(c.op for c in colls) == sorted(ops)
    assert sorted(c.seq for c in colls) == list(range(len(ops)))
    assert all(c.exit_s is not None and c.exit_s >= c.enter_s for c in colls)
    assert timer.in_flight() == []


def test_uninstall_restores_the_original_functions(group):
    originals = {op: getattr(dist, op) for op in ins.COLLECTIVES if hasattr(dist, op)}
    ins.install("j", 0, 0, "n", Sink())
    assert all(getattr(dist, op) is not fn for op, fn in originals.items())
    assert ins.installed() is not None
    ins.uninstall()
    assert all(getattr(dist, op) is fn for op, fn in originals.items())
    assert ins.installed() is None
    assert ins.last_error() is None


def test_after_uninstall_collectives_are_no_longer_recorded(group):
    sink = Sink()
    timer = ins.install("j", 0, 0, "n", sink)
    ins.uninstall()
    timer.begin_step(0)
    dist.all_reduce(torch.ones(2))
    timer.end_step(0)
    assert sink.of(CollectiveRecord) == []


def test_installing_twice_is_refused(group):
    ins.install("j", 0, 0, "n", Sink())
    with pytest.raises(RuntimeError, match="already installed"):
        ins.install("j", 0, 0, "n", Sink())


def test_each_step_hands_one_batch_with_its_collectives_sections_and_step_record(group):
    sink = Sink()
    timer = ins.install("j", 0, 0, "n", sink)
    for step in range(3):
        timer.begin_step(step)
        with timer.section("data"):
            torch.ones(8).sum()
        with timer.section("forward"):
            dist.all_reduce(torch.ones(8))
        timer.end_step(step)
    assert len(sink.batches) == 3
    kinds = [type(record_from_dict(d)).__name__ for d in sink.batches[1]]
    assert kinds == ["CollectiveRecord", "SectionRecord", "SectionRecord", "StepRecord"]
    assert [s.step for s in sink.of(StepRecord)] == [0, 1, 2]
    assert [c.seq for c in sink.of(CollectiveRecord)] == [0, 1, 2]


def test_step_time_is_split_into_data_wait_collectives_and_compute(group):
    sink = Sink()
    timer = ins.install("j", 0, 0, "n", sink)
    timer.begin_step(5)
    with timer.section("data"):
        torch.randn(64, 64).sum()
    dist.all_reduce(torch.ones(1024))
    torch.randn(64, 64) @ torch.randn(64, 64)
    timer.end_step(5)
    (step,) = sink.of(StepRecord)
    (data,) = [s for s in sink.of(SectionRecord) if s.name == "data"]
    (coll,) = sink.of(CollectiveRecord)
    assert step.step == 5
    assert step.data_wait_s == pytest.approx(data.end_s - data.start_s, abs=1e-9)
    assert step.data_wait_s + coll.duration_s + step.compute_s == pytest.approx(
        step.end_s - step.start_s, abs=1e-9
    )
    assert step.start_s <= data.start_s <= coll.enter_s <= step.end_s


def test_data_ready_counts_the_time_since_begin_step_as_data_wait():
    sink = Sink()
    timer = ins.StepTimer("j", 0, 0, "n", sink)
    timer.begin_step(0)
    timer.data_ready()
    timer.data_ready()  # only the first mark counts
    timer.end_step(0)
    (step,) = sink.of(StepRecord)
    assert 0.0 <= step.data_wait_s <= step.end_s - step.start_s
    assert step.compute_s == pytest.approx(step.end_s - step.start_s - step.data_wait_s)


def test_collective_on_a_subgroup_is_timed_with_seq_minus_one(group):
    sub = dist.new_group([0])
    sink = Sink()
    timer = ins.install("j", 0, 0, "n", sink)
    timer.begin_step(0)
    dist.all_reduce(torch.ones(2), group=sub)
    dist.all_reduce(torch.ones(2))
    timer.end_step(0)
    assert [c.seq for c in sink.of(CollectiveRecord)] == [-1, 0]


def test_a_sink_that_raises_is_latched_and_never_reaches_the_training_loop(group):
    def broken(batch: list[dict[str, Any]]) -> None:
        raise OSError("agent socket closed")

    timer = ins.install("j", 0, 0, "n", broken)
    timer.begin_step(0)
    dist.all_reduce(torch.ones(2))
    timer.end_step(0)
    assert isinstance(ins.last_error(), OSError)
    assert timer.num_dropped == 2
    assert timer.num_errors == 1


def test_mismatched_end_step_is_latched_and_still_recorded():
    sink = Sink()
    timer = ins.StepTimer("j", 0, 0, "n", sink)
    timer.begin_step(1)
    timer.end_step(2)
    assert "end_step(2) does not match begin_step(1)" in str(timer.last_error())
    assert [s.step for s in sink.of(StepRecord)] == [2]


def test_errors_of_the_collective_itself_propagate_and_leave_nothing_in_flight(group):
    sink = Sink()
    timer = ins.install("j", 0, 0, "n", sink)
    with pytest.raises((ValueError, RuntimeError, TypeError)):
        dist.broadcast(torch.ones(2), src=5)
    assert timer.in_flight() == []
    assert timer.last_error() is None


def test_buffer_is_bounded_and_dropped_records_are_counted(group):
    sink = Sink()
    timer = ins.install("j", 0, 0, "n", sink, max_buffered=4)
    timer.begin_step(0)
    for _ in range(10):
        dist.all_reduce(torch.ones(1))
    timer.end_step(0)
    assert [c.seq for c in sink.of(CollectiveRecord)] == [6, 7, 8, 9]
    assert timer.num_dropped == 6


def test_in_flight_reports_the_collective_a_rank_is_blocked_in(group):
    sink = Sink()
    timer = ins.StepTimer("j", 0, 0, "n", sink)
    seen: list[list[dict[str, Any]]] = []

    def blocking_collective(tensor: torch.Tensor, group: Any = None, async_op: bool = False):
        seen.append(timer.in_flight())  # what a watchdog thread would report meanwhile

    wrapped = ins._make_wrapper(timer, "all_reduce", blocking_collective)
    wrapped(torch.ones(3))
    (inside,) = seen
    (rec,) = [record_from_dict(d) for d in inside]
    assert (rec.op, rec.seq, rec.nbytes, rec.exit_s) == ("all_reduce", 0, 12, None)
    assert timer.in_flight() == []


def test_flush_outside_a_step_hands_over_what_is_buffered(group):
    sink = Sink()
    timer = ins.install("j", 0, 0, "n", sink)
    dist.all_reduce(torch.ones(2))
    assert sink.batches == []
    timer.flush()
    assert [c.op for c in sink.of(CollectiveRecord)] == ["all_reduce"]
    timer.flush()
    assert len(sink.batches) == 1  # nothing new: the sink is not called


def test_standalone_step_timer_validates_its_buffer_size():
    with pytest.raises(ValueError, match=r"max_buffered \(0\) must be >= 1"):
        ins.StepTimer("j", 0, 0, "n", Sink(), max_buffered=0)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_record_dicts_are_exactly_the_to_dict_form_of_the_records(group):
    sink = Sink()
    timer = ins.install("j", 0, 0, "n", sink)
    timer.begin_step(0)
    with timer.section("data"):
        call_every_collective()
    dist.all_reduce(torch.ones(1), async_op=True).wait()
    timer.end_step(0)
    in_flight = timer.in_flight()
    dicts = [d for b in sink.batches for d in b] + in_flight
    assert {d["type"] for d in dicts} == {"collective", "section", "step"}
    for d in dicts:
        assert record_from_dict(d).to_dict() == d
        assert list(record_from_dict(d).to_dict()) == list(d)  # same key order


@pytest.mark.skipif(
    not (torch.cuda.is_available() and dist.is_nccl_available()), reason="needs CUDA and NCCL"
)
def test_cuda_collectives_are_timed_with_events_without_synchronising(tmp_path):
    store = dist.FileStore(str(tmp_path / "nccl-store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        sink = Sink()
        timer = ins.install("j", 0, 0, "n", sink)
        t = torch.ones(1 << 20, device="cuda")
        timer.begin_step(0)
        dist.all_reduce(t)
        timer.end_step(0)
        torch.cuda.synchronize()
        timer.flush()  # events are complete now: the record resolves
        (coll,) = sink.of(CollectiveRecord)
        assert (coll.op, coll.seq, coll.nbytes) == ("all_reduce", 0, 4 << 20)
        assert coll.exit_s is not None and coll.exit_s >= coll.enter_s
        assert timer.in_flight() == []
    finally:
        ins.uninstall(flush=False)
        dist.destroy_process_group()
