"""Decision tests: given a job and the cluster's capacity (and now), expect an action."""

from __future__ import annotations

from hpt.controller.decide import Fail, Restart, View, decide
from hpt.controller.model import Attempt, Fault, FaultKind, Job, JobSpec, JobState, Rank
from hpt.controller.policy import Action, decide_placement
from hpt.controller.scheduler import Capacity, place


def job(**kw) -> Job:  # type: ignore[no-untyped-def]
    kw.setdefault("command", ("python", "t.py"))
    return Job(id="j", spec=JobSpec(**kw))


def fault() -> Fault:
    return Fault(kind=FaultKind.RANK_EXIT, attempt=1, node="n1", rank=3,
                 message="exited with code 1: ValueError: boom")


def test_place_prefers_nodes_with_most_free_slots_then_name():
    caps = [Capacity("b", 4), Capacity("a", 4), Capacity("c", 8)]
    assert place(caps, procs_per_node=2, min_nodes=2, max_nodes=2) == ["c", "a"]


def test_place_is_all_or_nothing_below_min_nodes():
    caps = [Capacity("a", 2), Capacity("b", 1)]
    assert place(caps, procs_per_node=2, min_nodes=2, max_nodes=2) is None


def test_place_takes_at_most_max_nodes():
    caps = [Capacity(n, 2) for n in "abcd"]
    assert place(caps, procs_per_node=2, min_nodes=1, max_nodes=3) == ["a", "b", "c"]


def _running(j: Job) -> Job:
    j.state = JobState.RUNNING
    j.attempts.append(Attempt(number=1, nodes=["n1"], master_addr="h", master_port=1,
                              world_size=1, ranks=[Rank(rank=0, local_rank=0, node="n1")]))
    return j


def test_fault_with_restarts_left_is_not_a_failure():
    decisions = decide(_running(job(max_restarts=1)), View(mono=0.0, fault=fault()), 0.0)
    assert isinstance(decisions[-1], Restart)
    assert not any(isinstance(d, Fail) for d in decisions)


def test_fault_after_max_restarts_fails_with_root_cause_in_reason():
    j = _running(job(max_restarts=2))
    j.restarts = 2
    decision = decide(j, View(mono=0.0, fault=fault()), 0.0)[-1]
    assert isinstance(decision, Fail)
    assert "max_restarts (2) reached" in decision.message
    assert "rank 3 on n1" in decision.message and "ValueError: boom" in decision.message


def test_enough_nodes_restarts_on_all_of_them():
    d = decide_placement(job(nodes=2, procs_per_node=2), [Capacity("a", 2), Capacity("b", 2)], 0)
    assert d.action == Action.RESTART and d.nodes == ("a", "b")
    assert "shrunk" not in d.reason


def test_elastic_job_shrinks_to_the_remaining_node_when_min_nodes_allows():
    d = decide_placement(job(nodes=2, procs_per_node=2, min_nodes=1), [Capacity("b", 2)], 0)
    assert d.action == Action.RESTART and d.nodes == ("b",)
    assert "shrunk from 2" in d.reason


def test_too_few_nodes_waits_until_the_deadline():
    j = job(nodes=2, procs_per_node=2, node_wait_timeout_s=30.0)
    d = decide_placement(j, [Capacity("b", 2)], now=100.0)
    assert d.action == Action.WAIT_FOR_NODES and d.deadline_at == 130.0
    assert "1 usable, 2 needed" in d.reason


def test_waiting_keeps_the_first_deadline():
    j = job(nodes=2, node_wait_timeout_s=30.0)
    j.deadline_at = 130.0
    assert decide_placement(j, [], now=120.0).deadline_at == 130.0


def test_deadline_passed_without_nodes_fails_naming_the_setting():
    j = job(nodes=2, node_wait_timeout_s=30.0)
    j.deadline_at = 130.0
    d = decide_placement(j, [Capacity("a", 8)], now=130.0)
    assert d.action == Action.FAIL
    assert "node_wait_timeout_s (30)" in d.reason and "min_nodes is 2" in d.reason


def test_nodes_the_straggler_policy_excluded_are_not_placed_on():
    j = job(nodes=2, procs_per_node=2, min_nodes=1)
    j.excluded_nodes.append("a")
    d = decide_placement(j, [Capacity("a", 4), Capacity("b", 2)], 0)
    assert d.action == Action.RESTART and d.nodes == ("b",)
