"""The agent's hang check over real (sleeping or stopped) processes, with a fake launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from hpt._rank_protocol import Finished, Hello, ProtocolError, Records, StackDump, Step
from hpt.agent.launcher import RankPhase, RankProcess
from hpt.agent.watch import RankWatch, WatchConfig, proc_state, stack_file
from hpt.monitor.detectors.hang import HangConfig

SCRIPT = """
import faulthandler, signal, sys, time
faulthandler.register(signal.SIGUSR1, file=open(sys.argv[1], "w"), all_threads=True, chain=False)
def waiting_here():
    print("ready", flush=True)
    time.sleep(60)
waiting_here()
"""

HELLO = Hello(job_id="j", attempt=1, rank=0, pid=1)


class FakeLauncher:
    def __init__(self, procs: list[RankProcess]) -> None:
        self.procs = procs

    def ranks(self) -> list[RankProcess]:
        return list(self.procs)


@pytest.fixture
def rank(tmp_path):
    path = stack_file(tmp_path, "j", 1, 0)
    path.parent.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(path)], stdout=subprocess.PIPE,
                            start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    yield proc
    proc.kill()
    proc.wait()


def make_watch(tmp_path, proc) -> RankWatch:  # type: ignore[no-untyped-def]
    rp = RankProcess(
        job_id="j", attempt=1, rank=0, local_rank=0, node="n", pid=proc.pid, phase=RankPhase.RUNNING
    )
    cfg = WatchConfig(hang=HangConfig(min_s=1.0, startup_s=1.0), stack_deadline_s=5.0)
    return RankWatch(
        node="n",
        launcher=FakeLauncher([rp]),
        run_dir=tmp_path,  # type: ignore[arg-type]
        on_change=lambda: None,
        cfg=cfg,
    )


def test_a_silent_rank_is_hung_once_and_its_stack_shows_where(tmp_path, rank):
    watch = make_watch(tmp_path, rank)
    t0 = time.monotonic()
    assert watch.check(t0) == []
    watch.on_rank_message(HELLO, StackDump(pid=rank.pid))
    watch.on_rank_message(HELLO, Step(step=1, at=time.time()))
    (finding,) = watch.check(time.monotonic() + 2.0)
    assert finding.kind == "hang" and finding.rank == 0 and finding.node == "n"
    assert "in waiting_here" in finding.stacks[0].text
    assert watch.check(time.monotonic() + 10.0) == []  # reported once per attempt
    assert watch.take().findings == [finding]


def test_a_stopped_rank_is_named_as_stopped_without_a_stack(tmp_path, rank):
    watch = make_watch(tmp_path, rank)
    watch.check(time.monotonic())
    watch.on_rank_message(HELLO, Step(step=1, at=time.time()))
    os.kill(rank.pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10
        while proc_state(rank.pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        (finding,) = watch.check(time.monotonic() + 2.0)
    finally:
        os.kill(rank.pid, signal.SIGCONT)
    assert "stopped" in finding.message and "process is stopped" in finding.stacks[0].text


def test_bad_records_are_dropped_and_counted_without_closing_the_socket(tmp_path, rank):
    watch = make_watch(tmp_path, rank)
    watch.on_rank_message(HELLO, Records(records=({"type": "step"},)))
    assert watch.take().dropped == 1
    with pytest.raises(ProtocolError, match=r"records\.records"):
        Records(records="nope")  # type: ignore[arg-type]


def test_a_rank_that_reported_finished_training_is_not_hung_while_it_shuts_down(tmp_path, rank):
    watch = make_watch(tmp_path, rank)
    watch.on_rank_message(HELLO, Step(step=5, at=time.time()))
    now = time.monotonic()
    assert watch.check(now + 60.0), "silent for a minute past a 1 s deadline: hung"
    watch = make_watch(tmp_path, rank)
    watch.on_rank_message(HELLO, Step(step=5, at=time.time()))
    watch.on_rank_message(HELLO, Finished())
    assert watch.check(time.monotonic() + 60.0) == []


def test_a_world_beyond_the_timing_budget_sends_a_mean_per_window_and_every_nth_collective(
        tmp_path, rank):
    from hpt.monitor.columns import unpack_collectives, unpack_steps
    from hpt.monitor.records import TIMING_RANKS, CollectiveRecord, StepRecord, timing_stride

    assert timing_stride(TIMING_RANKS) == 1 and timing_stride(TIMING_RANKS + 1) == 2
    assert timing_stride(80_000) == 10
    watch = make_watch(tmp_path, rank)
    world = 3 * TIMING_RANKS  # a stride of 3
    watch.expect("j", 1, world)
    watch._attempts.clear()  # what the hang check does while no rank of it runs yet
    steps = [StepRecord(job_id="j", attempt=1, rank=0, node="n", step=s, start_s=float(s),
                        end_s=s + 1.0 + 0.1 * s, data_wait_s=0.01 * s, compute_s=0.5)
             for s in (1, 2, 3, 4, 5, 6, 7, 9, 10, 11)]  # 8 missing: window 6-8 is dropped
    colls = [CollectiveRecord(job_id="j", attempt=1, rank=0, node="n", seq=q, op="all_reduce",
                              nbytes=8, enter_s=0.0, exit_s=0.25) for q in range(-1, 7)]
    watch.on_rank_message(HELLO, Records(records=tuple(r.to_dict() for r in steps + colls)))
    taken = watch.take()
    (cols,) = taken.step_columns
    rank_col, step_col, step_s, wait, compute = unpack_steps(cols.packed, 100)
    # windows 0-2 (steps 1, 2: the attempt started mid-window), 3-5, 9-11; 6-8 never ended
    assert list(step_col) == [2, 5, 11] and set(rank_col) == {0}
    assert step_s == pytest.approx([1.15, 1.4, 2.0]) and compute == pytest.approx([0.5] * 3)
    assert wait == pytest.approx([0.015, 0.04, 0.1])
    (ccols,) = taken.collective_columns
    assert list(unpack_collectives(ccols.packed, 100)[1]) == [0, 3, 6]
    # a world within the budget sends every step and collective as they come
    small = make_watch(tmp_path, rank)
    small.expect("j", 1, 16)
    small.on_rank_message(HELLO, Records(records=tuple(r.to_dict() for r in steps + colls)))
    taken = small.take()
    assert len(unpack_steps(taken.step_columns[0].packed, 100)[1]) == len(steps)
