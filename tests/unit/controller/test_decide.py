"""``decide(job, view, now)``: given a job, what the pass observed and the time, the decisions.

One small test per decision kind ("given X at T, expect Y"), with no clock, lock or socket:
``decide`` is pure. ``test_execute.py`` drives the executor one pass at a time.
"""

from __future__ import annotations

from hpt.controller.decide import (
    RESEND_STOP_AFTER_S,
    Cancel,
    EndAttempt,
    ExcludeNode,
    Fail,
    Grow,
    Launch,
    Restart,
    Shrink,
    Stop,
    StopSent,
    Succeed,
    View,
    WaitForNodes,
    Why,
    decide,
)
from hpt.controller.model import (
    Attempt,
    AttemptState,
    Fault,
    FaultKind,
    Job,
    JobSpec,
    JobState,
    Rank,
    RankState,
    StopCause,
)
from hpt.controller.scheduler import Capacity

NOW = 1_000.0
MONO = 50.0


def job(state: JobState = JobState.RUNNING, **spec) -> Job:  # type: ignore[no-untyped-def]
    spec.setdefault("command", ("python", "t.py"))
    return Job(id="j", spec=JobSpec(**spec), state=state)


def attempt(j: Job, nodes: tuple[str, ...] = ("a",), ppn: int = 1,
            state: AttemptState = AttemptState.RUNNING,
            rank_state: RankState = RankState.RUNNING) -> Attempt:
    ranks = [Rank(rank=i * ppn + k, local_rank=k, node=n, state=rank_state)
             for i, n in enumerate(nodes) for k in range(ppn)]
    a = Attempt(number=len(j.attempts) + 1, nodes=list(nodes), master_addr="h", master_port=1,
                world_size=len(ranks), ranks=ranks, state=state)
    j.attempts.append(a)
    return a


def crash(kind: FaultKind = FaultKind.RANK_EXIT, node: str = "a") -> Fault:
    return Fault(kind=kind, attempt=1, node=node, rank=0, message="exited with code 1",
                 detected_at=NOW, occurred_at=NOW)


def test_a_pending_job_with_room_is_launched_on_the_nodes_placed():
    d = decide(job(JobState.PENDING, nodes=2), View(mono=MONO, capacity=(
        Capacity("a", 1), Capacity("b", 1))), NOW)
    assert d == [Launch(nodes=("a", "b"), message=d[0].message)]  # type: ignore[union-attr]
    assert d[0].why is Why.PLACED


def test_a_pending_job_without_room_waits_for_nodes_until_its_deadline():
    j = job(JobState.PENDING, node_wait_timeout_s=30.0)
    d = decide(j, View(mono=MONO, capacity=()), NOW)
    assert len(d) == 1 and isinstance(d[0], WaitForNodes) and d[0].deadline_at == NOW + 30.0
    j.deadline_at = NOW + 30.0
    assert decide(j, View(mono=MONO), NOW + 1.0) == []  # already waiting: nothing new


def test_a_pending_job_past_its_node_wait_deadline_fails():
    j = job(JobState.PENDING, node_wait_timeout_s=30.0)
    j.deadline_at = NOW
    d = decide(j, View(mono=MONO), NOW)
    assert len(d) == 1 and isinstance(d[0], Fail) and d[0].why is Why.NO_PLACEMENT
    assert "node_wait_timeout_s (30)" in d[0].message


def test_a_fault_with_restarts_left_stops_the_attempt_with_grace_then_restarts():
    j = job(max_restarts=2, stop_grace_s=7.0)
    a = attempt(j)
    a.first_step_at = NOW - 10
    fault = crash()
    d = decide(j, View(mono=MONO, fault=fault), NOW)
    assert d == [
        Stop(attempt=1, grace_s=7.0, cause=StopCause.FAULT, message="fault: rank_exit of rank 0 on a",
             why=Why.FAULT, fault=fault),
        Restart(fault=fault, message="restart 1/2 after rank_exit of rank 0 on a: exited with "
                "code 1"),
    ]


def test_a_crash_loop_restart_says_how_long_it_backs_off():
    j = job(max_restarts=5)
    attempt(j, state=AttemptState.FAILED).cause = crash()
    attempt(j)
    restart = decide(j, View(mono=MONO, fault=crash()), NOW)[-1]
    assert isinstance(restart, Restart) and "next attempt 1 s after" in restart.message
    assert "crash loop: 2 attempt(s)" in restart.message


def test_a_hang_stops_the_attempt_without_grace():
    j = job(stop_grace_s=30.0)
    attempt(j)
    stop = decide(j, View(mono=MONO, fault=crash(FaultKind.HANG)), NOW)[0]
    assert isinstance(stop, Stop) and stop.grace_s == 0.0 and stop.cause is StopCause.FAULT


def test_a_fault_with_no_restarts_left_fails_the_job_after_stopping_the_attempt():
    j = job(max_restarts=1)
    j.restarts = 1
    attempt(j)
    d = decide(j, View(mono=MONO, fault=crash()), NOW)
    assert [type(x) for x in d] == [Stop, Fail]
    assert d[1].why is Why.MAX_RESTARTS_REACHED  # type: ignore[union-attr]


def test_a_straggler_fault_excludes_its_node_once_before_the_stop():
    j = job(nodes=2, min_nodes=1, straggler_restart_after=3)
    attempt(j, nodes=("a", "b"))
    d = decide(j, View(mono=MONO, fault=crash(FaultKind.STRAGGLER, node="b")), NOW)
    assert [type(x) for x in d] == [ExcludeNode, Stop, Restart]
    assert d[0] == ExcludeNode(node="b", message="straggler policy: job no longer runs on b "
                               "(straggler_restart_after=3)")
    j.excluded_nodes.append("b")
    again = decide(j, View(mono=MONO, fault=crash(FaultKind.STRAGGLER, node="b")), NOW)
    assert not any(isinstance(x, ExcludeNode) for x in again)


def test_every_rank_succeeded_succeeds_the_job():
    j = job()
    attempt(j, rank_state=RankState.SUCCEEDED)
    assert decide(j, View(mono=MONO), NOW) == [Succeed(attempt=1)]


def test_a_job_below_its_node_count_grows_once_a_node_was_free_for_the_hysteresis():
    j = job(nodes=2, min_nodes=1)
    a = attempt(j)
    a.first_step_at = NOW - 100
    a.ranks[0].snapshot_steps = (4,)
    young = View(mono=MONO, free_since={"b": NOW - 5.0}, grow_hysteresis_s=10.0)
    assert decide(j, young, NOW) == []
    settled = View(mono=MONO, free_since={"b": NOW - 10.0}, grow_hysteresis_s=10.0)
    d = decide(j, settled, NOW)
    assert len(d) == 1 and isinstance(d[0], Grow) and d[0].attempt == 1
    assert "grow 1 -> 2 nodes" in d[0].message


def test_a_recovering_job_relaunches_on_fewer_nodes_as_a_shrink():
    j = job(JobState.RECOVERING, nodes=2, min_nodes=1)
    a = attempt(j, nodes=("a", "b"), state=AttemptState.FAILED, rank_state=RankState.FAILED)
    a.first_step_at, a.ended_at = NOW - 50, NOW - 1
    d = decide(j, View(mono=MONO, capacity=(Capacity("a", 1),)), NOW)
    assert len(d) == 1 and isinstance(d[0], Shrink) and d[0].nodes == ("a",)


def test_a_recovering_job_in_a_crash_loop_waits_out_its_backoff():
    j = job(JobState.RECOVERING)
    attempt(j, state=AttemptState.FAILED, rank_state=RankState.FAILED).ended_at = NOW
    attempt(j, state=AttemptState.FAILED, rank_state=RankState.FAILED).ended_at = NOW
    view = View(mono=MONO, capacity=(Capacity("a", 1),))
    assert decide(j, view, NOW + 0.5) == []  # second attempt in a row without a step: 1 s
    assert isinstance(decide(j, view, NOW + 1.0)[0], Launch)


def test_a_stopping_attempt_whose_ranks_all_ended_ends_and_the_job_relaunches_in_the_same_pass():
    j = job(JobState.RECOVERING)
    a = attempt(j, state=AttemptState.STOPPING, rank_state=RankState.STOPPED)
    a.first_step_at = NOW - 10
    d = decide(j, View(mono=MONO, capacity=(Capacity("a", 1),)), NOW)
    assert [type(x) for x in d] == [EndAttempt, Launch]


def test_a_stop_not_confirmed_past_its_grace_is_sent_again():
    j = job(JobState.RECOVERING, stop_grace_s=5.0)
    attempt(j, state=AttemptState.STOPPING)
    within = View(mono=MONO, stops={1: StopSent(MONO - 5.0 - RESEND_STOP_AFTER_S, 5.0)})
    assert decide(j, within, NOW) == []
    past = View(mono=MONO, stops={1: StopSent(MONO - 5.1 - RESEND_STOP_AFTER_S, 5.0)})
    d = decide(j, past, NOW)
    assert len(d) == 1 and isinstance(d[0], Stop) and d[0].resend
    assert (d[0].cause, d[0].why) == (StopCause.UNCONFIRMED, Why.STOP_NOT_CONFIRMED)


def test_a_cancel_stops_the_running_attempt_with_its_own_grace_then_cancels():
    j = job(stop_grace_s=5.0)
    j.cancel_requested = True
    a = attempt(j)
    d = decide(j, View(mono=MONO, cancel_grace_s=30.0), NOW)
    assert d == [Stop(attempt=1, grace_s=30.0, cause=StopCause.CANCELLED,
                      message="cancelled by the user", why=Why.CANCELLED)]
    a.state = AttemptState.STOPPING
    assert decide(j, View(mono=MONO, stops={1: StopSent(MONO, 30.0)}), NOW) == []
    for r in a.ranks:
        r.state = RankState.STOPPED
    d = decide(j, View(mono=MONO, stops={1: StopSent(MONO, 30.0)}), NOW)
    assert [type(x) for x in d] == [EndAttempt, Cancel]


def test_a_cancelled_pending_job_is_cancelled_at_once():
    j = job(JobState.PENDING)
    j.cancel_requested = True
    assert [type(x) for x in decide(j, View(mono=MONO), NOW)] == [Cancel]


def test_a_finished_job_gets_no_decision():
    j = job(JobState.SUCCEEDED)
    attempt(j, state=AttemptState.SUCCEEDED, rank_state=RankState.SUCCEEDED)
    assert decide(j, View(mono=MONO, fault=crash()), NOW) == []
