"""Replicated controllers: the standby takes over from a dead or frozen leader without
restarting any job, and a deposed leader's writes never reach the store."""

from __future__ import annotations

import signal

import pytest

from hpt._proto import common_pb2
from tests.integration.cluster import TRAIN, wait_for
from tests.integration.ha_cluster import HACluster
from tests.redis_fixture import start_redis, stop_redis

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
def ha(tmp_path, request):
    url, redis_proc = start_redis(tmp_path / "redis")
    cluster = HACluster(tmp_path, redis_url=url, lease_s=1.5, token="ha-client-token")
    try:
        cluster.start_controller()
        for i in range(cluster.num_agents):
            cluster.start_agent(f"node-{i}")
        cluster.wait_nodes_ready(cluster.num_agents, timeout_s=180)  # torch imports under load
        yield cluster
    finally:
        failed = request.node.rep_call.failed if hasattr(request.node, "rep_call") else False
        if failed:
            print(cluster.logs())
        try:
            cluster.close()
        finally:
            stop_redis(redis_proc)


def _pids(job: common_pb2.Job) -> list[int]:
    return sorted(r.pid for r in job.attempts[-1].ranks)


def _continues_untouched(ha: HACluster, job_id: str, pids: list[int], step: int) -> None:
    job = ha.wait_step(job_id, attempt=1, step=step, timeout_s=60)
    assert len(job.attempts) == 1 and job.restarts == 0
    assert _pids(job) == pids
    kinds = {e.kind for e in ha.events(job_id)}
    assert not kinds & {"fault", "recovering", "node_lost"}, kinds


@pytest.mark.timeout(480)  # two failovers and a replica restart on one 2-core machine
def test_standby_takes_over_from_a_frozen_then_a_killed_leader_without_restarting_the_job(ha):
    job_id = ha.submit("python", TRAIN, "--steps", "100000", "--step-time", "0.05")
    job = ha.wait_step(job_id, attempt=1, step=3)
    pids = _pids(job)

    # 1. replica 0 frozen past its lease: replica 1 leads, agents follow, the job goes on
    old = ha.replicas[0]
    old_epoch = ha.epoch()
    old.send_signal(signal.SIGSTOP)
    try:
        ha.wait_leader(1)
        assert ha.epoch() == old_epoch + 1
        at_takeover = ha.record_versions()
        ha.wait_nodes_ready(2)
        _continues_untouched(ha, job_id, pids, ha.job(job_id).attempts[0].ranks[0].step + 5)
    finally:
        old.send_signal(signal.SIGCONT)
    # awake again, the deposed leader finds its epoch superseded and exits by itself, having
    # written nothing (every record it could touch still carries the new epoch)
    wait_for(lambda: old.poll() is not None, 30, "deposed leader exits")
    assert old.returncode != 0
    stale = [k for k, (v, e) in ha.record_versions().items()
             if e == str(old_epoch).encode() and v != at_takeover.get(k, (0, b""))[0]]
    assert stale == []
    # the elector saw the lease gone ("leadership lost"), or the control loop woke first and
    # found the epoch superseded or no renewal within the lease ("stepping down"); never a crash
    logs = ha.logs()
    assert "leadership lost" in logs or "stepping down" in logs, logs[-3000:]
    assert "control loop crashed" not in logs, logs[-3000:]

    # 2. its supervisor restarts it as the standby; now the leader is killed outright
    ha.start_replica(0)
    assert ha.leader() == 1
    ha.replicas[1].kill()
    ha.replicas[1].wait(timeout=30)
    ha.wait_leader(0)
    assert ha.epoch() == old_epoch + 2
    ha.wait_nodes_ready(2)
    _continues_untouched(ha, job_id, pids, ha.job(job_id).attempts[0].ranks[0].step + 5)
    ha.client.cancel(job_id)
    assert ha.wait_terminal(job_id).state == common_pb2.JOB_STATE_CANCELLED
