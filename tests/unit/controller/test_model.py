"""Job/attempt state machines, spec validation and proto mapping."""

from __future__ import annotations

import pytest

from hpt._proto import common_pb2 as pb
from hpt.controller import convert
from hpt.controller.model import (
    ATTEMPT_TRANSITIONS,
    JOB_TRANSITIONS,
    Attempt,
    AttemptState,
    IllegalTransitionError,
    Job,
    JobSpec,
    JobState,
    NodeState,
    Rank,
    RankState,
)


def spec(**kw) -> JobSpec:  # type: ignore[no-untyped-def]
    kw.setdefault("command", ("python", "train.py"))
    return JobSpec(**kw)


def test_every_job_edge_has_a_reason_and_terminal_states_have_none():
    for state, edges in JOB_TRANSITIONS.items():
        assert all(reason for reason in edges.values())
        assert (not edges) == state.is_terminal
    for state, edges in ATTEMPT_TRANSITIONS.items():
        assert (not edges) == state.is_terminal


def test_job_transition_records_history_and_reason():
    job = Job(id="j", spec=spec())
    previous = job.set_state(JobState.RUNNING, "launched", now=10.0)
    assert previous == JobState.PENDING
    assert job.state == JobState.RUNNING
    assert job.reason == "launched"
    assert [(h.state, h.at, h.reason) for h in job.history] == [("RUNNING", 10.0, "launched")]


@pytest.mark.parametrize(
    "start,target",
    [
        (JobState.PENDING, JobState.SUCCEEDED),
        (JobState.PENDING, JobState.RECOVERING),
        (JobState.SUCCEEDED, JobState.RUNNING),
        (JobState.FAILED, JobState.RECOVERING),
        (JobState.CANCELLED, JobState.RUNNING),
        (JobState.RECOVERING, JobState.SUCCEEDED),
    ],
)
def test_illegal_job_transition_is_refused_and_changes_nothing(start, target):
    job = Job(id="j", spec=spec(), state=start)
    with pytest.raises(IllegalTransitionError, match=f"{start.value} -> {target.value}"):
        job.set_state(target, "nope", now=1.0)
    assert job.state == start
    assert job.history == []


def test_attempt_cannot_go_from_running_straight_to_failed():
    attempt = Attempt(number=1, nodes=["a"], master_addr="h", master_port=1, world_size=1,
                      ranks=[Rank(rank=0, local_rank=0, node="a")], state=AttemptState.RUNNING)
    with pytest.raises(IllegalTransitionError):
        attempt.set_state(AttemptState.FAILED, "skip stopping", now=1.0)
    attempt.set_state(AttemptState.STOPPING, "fault", now=1.0)
    attempt.set_state(AttemptState.FAILED, "ranks ended", now=2.0)
    assert [h.state for h in attempt.history] == ["STOPPING", "FAILED"]


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"procs_per_node": 0}, "procs_per_node (0) must be in 1..64"),
        ({"nodes": 0}, "nodes (0) must be in 1..16384"),
        ({"nodes": 20000}, "nodes (20000)"),
        ({"command": ()}, "command must not be empty"),
        ({"command": ("",)}, "command[0]"),
        ({"nodes": 2, "min_nodes": 3}, "min_nodes (3)"),
        ({"max_restarts": -1}, "max_restarts (-1)"),
        ({"env": (("RANK", "3"),)}, "env name 'RANK' is reserved"),
        ({"env": (("HPT_JOB_ID", "x"),)}, "env name 'HPT_JOB_ID' is reserved"),
        ({"env": (("1BAD", "x"),)}, "env name '1BAD'"),
        ({"name": "Bad_Name"}, "name ('Bad_Name') must be a DNS-1123 label"),
        ({"name": "a" * 64}, "DNS-1123"),
        ({"workdir": "relative/dir"}, "workdir ('relative/dir') must be an absolute path"),
        ({"node_wait_timeout_s": 0.0}, "node_wait_timeout_s (0.0)"),
        ({"stop_grace_s": -1.0}, "stop_grace_s (-1.0)"),
    ],
)
def test_bad_spec_names_the_field(kwargs, field):
    with pytest.raises(ValueError) as err:
        spec(**kwargs)
    assert field in str(err.value)


def test_spec_round_trips_through_proto_including_zero_grace():
    original = spec(nodes=2, procs_per_node=3, min_nodes=1, max_restarts=4,
                    env=(("A", "1"), ("B", "x y")), name="demo", workdir="/tmp",
                    node_wait_timeout_s=12.5, stop_grace_s=0.0)
    assert convert.spec_from_proto(convert.spec_to_proto(original)) == original


def test_unset_optional_spec_fields_take_documented_defaults():
    parsed = convert.spec_from_proto(pb.JobSpec(command=["x"], nodes=1, procs_per_node=1))
    assert parsed.node_wait_timeout_s == 300.0
    assert parsed.stop_grace_s == 5.0


@pytest.mark.parametrize("enum,wire", [(JobState, pb.JobState), (AttemptState, pb.AttemptState),
                                       (RankState, pb.RankState), (NodeState, pb.NodeState)])
def test_every_model_enum_member_maps_to_a_wire_value_and_back(enum, wire):
    prefix = {JobState: "JOB_STATE_", AttemptState: "ATTEMPT_STATE_", RankState: "RANK_STATE_",
              NodeState: "NODE_STATE_"}[enum]
    wire_names = {n for n in wire.keys() if not n.endswith("UNSPECIFIED")}  # noqa: SIM118
    assert {prefix + m.value for m in enum} == wire_names


def test_job_round_trips_through_stored_bytes():
    job = Job(id="j-1", spec=spec(nodes=1), created_at=5.0)
    job.set_state(JobState.RUNNING, "go", 6.0)
    job.attempts.append(Attempt(number=1, nodes=["n"], master_addr="h", master_port=9,
                                world_size=1, ranks=[Rank(rank=0, local_rank=0, node="n", pid=7,
                                                          state=RankState.RUNNING, step=3)]))
    back = convert.job_from_bytes(convert.job_to_bytes(job))
    assert back == job


def test_stored_bytes_are_the_message_of_every_rank_and_follow_each_change():
    # job_to_bytes joins each rank's kept bytes: the same message as the protos built whole,
    # and a rank's bytes are made again when any of its fields changed
    from hpt.controller.model import ExitInfo, Fault, FaultKind

    job = Job(id="j-2", spec=spec(nodes=2), created_at=5.0, reason="r", restarts=1,
              excluded_nodes=["bad"])
    job.set_state(JobState.RUNNING, "go", 6.0)
    for number in (1, 2):
        ranks = [Rank(rank=r, local_rank=r % 2, node=f"n{r // 2}", pid=100 + r,
                      state=RankState.RUNNING, step=10 * number + r,
                      snapshot_steps=(number, number + 1), snapshot_bytes=1 << 40)
                 for r in range(4)]
        job.attempts.append(Attempt(number=number, nodes=["n0", "n1"], master_addr="h",
                                    master_port=9, world_size=4, ranks=ranks,
                                    protected_steps=(3,), redundancy="1+1", parity_bytes=5))
    job.attempts[0].cause = Fault(kind=FaultKind.RANK_EXIT, attempt=1, node="n1", rank=3,
                                  message="boom")
    for _ in range(2):  # the second time from the kept bytes
        assert pb.Job.FromString(convert.job_to_bytes(job)) == convert.job_to_proto(job)
    rank = job.attempts[1].ranks[2]
    rank.step, rank.snapshot_steps = 99, (98, 99)
    rank.exit = ExitInfo(exit_code=1, error_type="E", error_message="m")
    back = convert.job_from_bytes(convert.job_to_bytes(job))
    assert back == job
    assert back.attempts[1].ranks[2].step == 99 and back.attempts[1].ranks[2].exit == rank.exit


def test_unknown_wire_rank_state_is_a_value_error():
    with pytest.raises(ValueError, match="rank state"):
        convert.rank_state_from_proto(99)
