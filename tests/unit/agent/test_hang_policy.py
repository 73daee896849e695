"""The agent's hang policy: who is judged, by which deadline, and who may be sent SIGUSR1.

Real processes (sleepers) stand in for ranks; the watch's clock is passed in, so "later" is a
number, not a wait.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from hpt._rank_protocol import (
    Hello,
    InFlight,
    Records,
    SectionBegin,
    SectionEnd,
    StackDump,
    Step,
)
from hpt.agent.launcher import RankPhase, RankProcess
from hpt.agent.watch import RankWatch, WatchConfig, stack_file
from hpt.monitor.detectors.hang import HangConfig

HELLO = Hello(job_id="j", attempt=1, rank=0, pid=1)
DEADLINE_S = 5.0  # the watch's min_s: a job with fast steps is hung after 5 s of silence


class FakeLauncher:
    def __init__(self, procs: list[RankProcess]) -> None:
        self.procs = procs

    def ranks(self) -> list[RankProcess]:
        return list(self.procs)


@pytest.fixture
def sleeper():
    """A rank without any signal handler: SIGUSR1 would kill it."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); "
                             "time.sleep(120)"], stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    yield proc
    proc.kill()
    proc.wait()
    proc.stdout.close()


def make_watch(tmp_path, proc, *, hang_timeout_s: float = 0.0, startup_s: float = DEADLINE_S):  # type: ignore[no-untyped-def]
    rp = RankProcess(job_id="j", attempt=1, rank=0, local_rank=0, node="n", pid=proc.pid,
                     phase=RankPhase.RUNNING, hang_timeout_s=hang_timeout_s)
    cfg = WatchConfig(hang=HangConfig(min_s=DEADLINE_S, startup_s=startup_s),
                      stack_deadline_s=0.5)
    return RankWatch(node="n", launcher=FakeLauncher([rp]), run_dir=tmp_path,
                     on_change=lambda: None, cfg=cfg)


def steps(watch: RankWatch, n: int = 3) -> None:
    for s in range(1, n + 1):
        watch.on_rank_message(HELLO, Step(step=s, at=time.time()))


def test_a_section_with_its_own_timeout_is_not_a_hang_until_that_timeout(tmp_path, sleeper):
    watch = make_watch(tmp_path, sleeper)
    steps(watch)
    watch.on_rank_message(HELLO, SectionBegin(name="eval", timeout_s=3 * DEADLINE_S))
    t0 = time.monotonic()
    assert watch.check(t0 + 2 * DEADLINE_S) == []  # past the usual deadline: inside the section
    (finding,) = watch.check(t0 + 3 * DEADLINE_S + 1.0)
    assert "section 'eval' timeout 15 s" in finding.message


def test_leaving_the_section_is_progress_and_the_usual_deadline_applies_again(tmp_path, sleeper):
    watch = make_watch(tmp_path, sleeper)
    steps(watch)
    watch.on_rank_message(HELLO, SectionBegin(name="eval", timeout_s=100.0))
    watch.on_rank_message(HELLO, SectionEnd(name="eval"))
    t0 = time.monotonic()
    assert watch.check(t0 + DEADLINE_S - 1.0) == []
    (finding,) = watch.check(t0 + DEADLINE_S + 1.0)
    assert "made no progress" in finding.message


def test_a_script_that_never_reports_a_step_is_not_judged_by_its_silence(tmp_path, sleeper):
    watch = make_watch(tmp_path, sleeper, startup_s=10.0)
    t0 = time.monotonic()
    assert watch.check(t0) == []
    assert watch.check(t0 + 1000.0) == []  # far past the start-up deadline


def test_the_jobs_hang_timeout_judges_a_script_without_hooks_when_asked(tmp_path, sleeper):
    watch = make_watch(tmp_path, sleeper, hang_timeout_s=8.0, startup_s=DEADLINE_S)
    t0 = time.monotonic()
    assert watch.check(t0) == []
    assert watch.check(t0 + 7.0) == []
    (finding,) = watch.check(t0 + 9.0)
    assert "deadline 8.0 s" in finding.message


def test_start_up_keeps_its_own_deadline_when_the_hang_timeout_is_shorter(tmp_path, sleeper):
    watch = make_watch(tmp_path, sleeper, hang_timeout_s=3.0, startup_s=60.0)
    t0 = time.monotonic()
    assert watch.check(t0) == []
    assert watch.check(t0 + 30.0) == []  # importing torch on a loaded node is not a hang
    assert len(watch.check(t0 + 61.0)) == 1


def test_the_jobs_hang_timeout_replaces_the_automatic_deadline(tmp_path, sleeper):
    watch = make_watch(tmp_path, sleeper, hang_timeout_s=30.0)
    steps(watch)
    t0 = time.monotonic()
    assert watch.check(t0 + 2 * DEADLINE_S) == []  # the automatic 5 s would have fired
    assert len(watch.check(t0 + 31.0)) == 1


def test_a_stuck_collective_is_the_second_signal_for_a_rank_without_steps(tmp_path, sleeper):
    watch = make_watch(tmp_path, sleeper, startup_s=10.0)
    inflight = {"type": "collective", "job_id": "j", "attempt": 1, "rank": 0, "node": "n",
                "seq": 4, "op": "all_reduce", "nbytes": 8, "enter_s": 1.0, "exit_s": None}
    watch.on_rank_message(HELLO, InFlight(records=(inflight,)))
    t0 = time.monotonic()
    assert watch.check(t0 + 5.0) == []
    (finding,) = watch.check(t0 + 11.0)
    assert "all_reduce seq 4 in flight" in finding.message
    # out of the collective again: nothing is judged any more
    watch2 = make_watch(tmp_path, sleeper, startup_s=10.0)
    watch2.on_rank_message(HELLO, InFlight(records=(inflight,)))
    watch2.on_rank_message(HELLO, InFlight(records=()))
    assert watch2.check(time.monotonic() + 100.0) == []


def test_sigusr1_goes_only_to_the_process_that_registered_the_dump(tmp_path, sleeper):
    # The stack file exists (say a child of a wrapper script called hpt.init and wrote it), but
    # the rank's own process never registered the handler: it must not be signalled.
    path = stack_file(tmp_path, "j", 1, 0)
    path.parent.mkdir(parents=True)
    path.write_text("")
    watch = make_watch(tmp_path, sleeper)
    steps(watch)
    (finding,) = watch.check(time.monotonic() + DEADLINE_S + 1.0)
    assert "registered the SIGUSR1 stack dump" in finding.stacks[0].text
    assert sleeper.poll() is None, "the diagnostic killed the rank"


def test_a_registration_naming_a_process_outside_the_rank_is_not_signalled(tmp_path, sleeper):
    path = stack_file(tmp_path, "j", 1, 0)
    path.parent.mkdir(parents=True)
    path.write_text("")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                             start_new_session=True)
    try:
        watch = make_watch(tmp_path, sleeper)
        watch.on_rank_message(HELLO, StackDump(pid=other.pid))
        steps(watch)
        watch.check(time.monotonic() + DEADLINE_S + 1.0)
        assert other.poll() is None and sleeper.poll() is None
    finally:
        other.kill()
        other.wait()


class FrozenTime:
    """The watch's clock, moved by the test only (``hpt.agent.watch.time``)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now


def two_rank_watch(tmp_path, sleeper, monkeypatch, *, hang_timeout_s: float = 0.0):  # type: ignore[no-untyped-def]
    """Ranks 0 and 1 of one attempt on this node (one sleeper stands for both), frozen clock."""
    import hpt.agent.watch as watch_mod

    clock = FrozenTime(1000.0)
    monkeypatch.setattr(watch_mod, "time", clock)
    procs = [RankProcess(job_id="j", attempt=1, rank=r, local_rank=r, node="n", pid=sleeper.pid,
                         phase=RankPhase.RUNNING, hang_timeout_s=hang_timeout_s) for r in (0, 1)]
    cfg = WatchConfig(hang=HangConfig(min_s=DEADLINE_S, startup_s=60.0), stack_deadline_s=0.0)
    watch = RankWatch(node="n", launcher=FakeLauncher(procs), run_dir=tmp_path,
                      on_change=lambda: None, cfg=cfg)
    return watch, clock


def peer_steps(watch: RankWatch, clock: FrozenTime, n: int) -> None:
    """Rank 1 makes ``n`` fast steps (0.1 s each), reporting them as hpt.step does."""
    peer = Hello(job_id="j", attempt=1, rank=1, pid=2)
    for s in range(1, n + 1):
        clock.now += 0.1
        rec = {"type": "step", "job_id": "j", "attempt": 1, "rank": 1, "node": "n", "step": s,
               "start_s": clock.now - 0.1, "end_s": clock.now, "data_wait_s": 0.0,
               "compute_s": 0.1}
        watch.on_rank_message(peer, Records(records=(rec,)))
        watch.on_rank_message(peer, Step(step=s, at=clock.now))


@pytest.mark.parametrize("hang_timeout_s", [0.0, 3.0])
def test_a_rank_still_starting_is_not_judged_by_a_peers_step_deadline(
        tmp_path, sleeper, monkeypatch, hang_timeout_s):
    # Loaded machine: rank 1 is at step 3 while rank 0 is still importing torch. Rank 0 has
    # made no step: only the start-up deadline (or a section's) judges it, never the 5 s one.
    watch, clock = two_rank_watch(tmp_path, sleeper, monkeypatch, hang_timeout_s=hang_timeout_s)
    t0 = clock.now
    assert watch.check(t0) == []  # both launched, first seen now
    clock.now = t0 + 5.5
    peer_steps(watch, clock, 3)  # rank 1 at step 3, fresh
    assert watch.check(clock.now) == []  # rank 0 silent 5.8 s: still starting, no hang
    clock.now = t0 + 59.0
    peer_steps(watch, clock, 3)
    assert watch.check(clock.now) == []
    clock.now = t0 + 61.0
    peer_steps(watch, clock, 3)
    (finding,) = watch.check(clock.now)  # past the start-up deadline: rank 0 never started
    assert finding.rank == 0
    assert "startup deadline 60.0 s" in finding.message
    assert finding.evidence["phase"] == "startup"


def test_a_rank_that_stepped_is_judged_by_the_step_deadline(tmp_path, sleeper, monkeypatch):
    watch, clock = two_rank_watch(tmp_path, sleeper, monkeypatch)
    t0 = clock.now
    assert watch.check(t0) == []
    watch.on_rank_message(HELLO, Step(step=1, at=clock.now))  # rank 0 started, went silent
    peer_steps(watch, clock, 3)
    clock.now = t0 + DEADLINE_S - 0.5
    peer_steps(watch, clock, 3)
    assert watch.check(clock.now) == []
    clock.now = t0 + DEADLINE_S + 1.0
    peer_steps(watch, clock, 3)
    (finding,) = watch.check(clock.now)
    assert finding.rank == 0 and finding.evidence["phase"] == "steady"
