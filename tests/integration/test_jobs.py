"""The job runner end to end: real controller, agents and ranks (gloo, CPU) on loopback."""

from __future__ import annotations

import grpc
import pytest

from hpt._proto import common_pb2 as pb
from tests.integration.cluster import BIN, TRAIN, LocalCluster, pid_alive, state_name, wait_for
from tests.redis_fixture import start_redis, stop_redis

FAST = ["python", TRAIN, "--steps", "12", "--step-time", "0"]
PACED = ["python", TRAIN, "--steps", "40", "--step-time", "0.05"]
# A rank killed with -9 mid-run (restart, cause, events, then success) is asserted by
# test_checkpoint.py::test_rank_killed_midrun_resumes_from_memory_bitwise_identical.


def kinds(cluster: LocalCluster, job_id: str) -> list[str]:
    return [e.kind for e in cluster.events(job_id)]


def test_two_by_two_job_succeeds_with_torch_env_and_logs(shared_cluster):
    cluster = shared_cluster
    job_id = cluster.submit(*FAST)
    job = cluster.wait_terminal(job_id)
    assert state_name(job.state) == "SUCCEEDED", job.reason
    assert len(job.attempts) == 1
    attempt = job.attempts[0]
    assert attempt.world_size == 4 and sorted(attempt.nodes) == ["node-0", "node-1"]
    assert sorted((r.rank, r.node) for r in attempt.ranks) == [
        (0, "node-0"), (1, "node-0"), (2, "node-1"), (3, "node-1")]
    assert all(r.step == 12 for r in attempt.ranks)
    text = [line.text for line in cluster.client.logs(job_id, rank=0)]
    assert any(t.startswith("final sha256 ") for t in text), text
    assert kinds(cluster, job_id)[:2] == ["job_submitted", "attempt_launched"]


def test_rank_that_always_fails_ends_failed_with_root_cause_after_max_restarts(shared_cluster):
    cluster = shared_cluster
    job_id = cluster.submit("python", str(BIN / "fail.py"), nodes=1, procs=2, max_restarts=1)
    job = cluster.wait_terminal(job_id)
    assert state_name(job.state) == "FAILED"
    assert len(job.attempts) == 2
    assert "max_restarts (1) reached" in job.reason
    assert "ValueError: deliberate failure for the test" in job.reason
    assert job.root_cause.classification == "user"
    assert job.root_cause.kind == "rank_exit"
    failed = [r for r in job.attempts[-1].ranks if r.state == pb.RANK_STATE_FAILED]
    assert failed and "Traceback" in failed[0].exit.traceback
    assert "job_failed" in kinds(cluster, job_id)


def test_agent_kill_9_restarts_the_job_on_the_remaining_node(shared_cluster):
    cluster = shared_cluster
    job_id = cluster.submit(*PACED, min_nodes=1, max_restarts=2)
    job = cluster.wait_step(job_id, attempt=1, step=3)
    lost_node = "node-1"
    lost_pids = [r.pid for r in job.attempts[0].ranks if r.node == lost_node]
    cluster.kill_agent(lost_node)
    job = cluster.wait_terminal(job_id)
    assert state_name(job.state) == "SUCCEEDED", job.reason
    assert len(job.attempts) == 2
    assert job.attempts[0].cause.kind == "node_lost"
    assert job.attempts[0].cause.node == lost_node
    second = job.attempts[1]
    assert list(second.nodes) == ["node-0"] and second.world_size == 2
    nodes = {n.name: n for n in cluster.client.nodes()}
    assert nodes[lost_node].state == pb.NODE_STATE_LOST
    # the lost agent's ranks died with it (PDEATHSIG), they are not orphans
    wait_for(lambda: not any(pid_alive(p) for p in lost_pids), 10, "lost node's ranks dead")


def test_cancel_stops_every_rank_and_leaves_no_orphans(shared_cluster):
    cluster = shared_cluster
    job_id = cluster.submit("python", str(BIN / "sleeper.py"), stop_grace_s=2.0)
    job = cluster.wait_step(job_id, attempt=1, step=1)
    pids = [r.pid for r in job.attempts[0].ranks]
    cluster.client.cancel(job_id)
    job = cluster.wait_terminal(job_id)
    assert state_name(job.state) == "CANCELLED"
    assert all(r.state == pb.RANK_STATE_STOPPED for r in job.attempts[0].ranks)
    assert not any(pid_alive(p) for p in pids)
    assert "job_cancelled" in kinds(cluster, job_id)


def test_bad_spec_is_rejected_naming_the_field_and_nothing_is_stored(shared_cluster):
    cluster = shared_cluster
    jobs_before = [j.id for j in cluster.client.list()]
    events_before = len(cluster.events())
    with pytest.raises(grpc.RpcError) as err:
        cluster.client.submit(command=["python", "x.py"], nodes=1, procs_per_node=0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "procs_per_node (0)" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        cluster.client.submit(command=["python"], env={"RANK": "1"})
    assert "reserved" in err.value.details()
    # nothing stored: no job and no event of a job (the cluster is shared: compare with before)
    assert [j.id for j in cluster.client.list()] == jobs_before
    stored = [e for e in cluster.events()[events_before:]
              if (e.job_id and e.job_id not in jobs_before) or e.kind == "job_submitted"]
    assert not stored, stored


def test_rpc_without_the_token_is_refused(cluster_factory):
    cluster = cluster_factory(token="s3cret-token", agents=1)
    assert [n.name for n in cluster.client.nodes()] == ["node-0"]  # agents and CLI hold it
    from hpt.client import JobClient

    with JobClient.connect(cluster.address) as anonymous, pytest.raises(grpc.RpcError) as err:
        anonymous.nodes()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with JobClient.connect(cluster.address, token="wrong") as wrong, pytest.raises(grpc.RpcError) as err:
        wrong.list()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.redis
def test_controller_restart_with_redis_keeps_the_job_running_without_a_new_attempt(
    cluster_factory, tmp_path
):
    url, redis_proc = start_redis(tmp_path / "redis")
    try:
        cluster = cluster_factory(redis_url=url)
        job_id = cluster.submit("python", TRAIN, "--steps", "60", "--step-time", "0.05")
        job = cluster.wait_step(job_id, attempt=1, step=3)
        pids = sorted(r.pid for r in job.attempts[0].ranks)
        cluster.kill_controller()
        cluster.start_controller()
        job = cluster.job(job_id)
        assert len(job.attempts) == 1, "restarted controller must adopt, not relaunch"
        job = cluster.wait_terminal(job_id)
        assert state_name(job.state) == "SUCCEEDED", job.reason
        assert len(job.attempts) == 1 and job.restarts == 0
        assert sorted(r.pid for r in job.attempts[0].ranks) == pids
        assert all(r.step == 60 for r in job.attempts[0].ranks)
        cluster.close()
    finally:
        stop_redis(redis_proc)


def test_agent_that_loses_the_controller_past_its_lease_kills_its_ranks(cluster_factory):
    cluster = cluster_factory(agents=1, agent_lease_s=3.0)
    job_id = cluster.submit("python", str(BIN / "sleeper.py"), nodes=1, procs=2)
    job = cluster.wait_step(job_id, attempt=1, step=1)
    pids = [r.pid for r in job.attempts[0].ranks]
    cluster.kill_controller()
    wait_for(lambda: not any(pid_alive(p) for p in pids), 30, "ranks self-fenced")
    assert cluster.agents["node-0"].poll() is None, "the agent itself keeps running"
