"""The fault matrix: real controller, agents and ranks (gloo, CPU) on loopback, one injected
fault each. Every case asserts the job's final state and the recorded finding/fault event."""

from __future__ import annotations

import subprocess
import urllib.request

import pytest

from hpt._proto import common_pb2 as pb
from tests.faults.faults import FAULTY, FINDING_KINDS, Faults
from tests.integration.cluster import state_name, wait_for


def events_of(cluster, job_id: str, kind: str) -> list[pb.Event]:
    return [e for e in cluster.events(job_id) if e.kind == kind]


def wait_event(cluster, job_id: str, kind: str, timeout_s: float = 45) -> list[pb.Event]:
    return wait_for(lambda: events_of(cluster, job_id, kind), timeout_s, f"a {kind} event")


def test_rank_slowed_by_30_percent_is_flagged_as_straggler_within_10_steps(shared_cluster):
    cluster = shared_cluster
    env = Faults().slow_rank(1, factor=1.3).env()
    job_id = cluster.submit("python", FAULTY, "--steps", "40", "--step-time", "0.05", env=env)
    flagged = wait_event(cluster, job_id, "straggler")
    job = cluster.wait_terminal(job_id)
    assert state_name(job.state) == "SUCCEEDED", job.reason
    assert len(job.attempts) == 1, "a straggler is reported, not restarted"
    assert {e.rank for e in flagged} == {1}
    event = flagged[0]
    assert event.node == "node-0" and event.attempt == 1
    assert "rank 1 (node-0) is a straggler" in event.message
    step = int(event.message.rsplit("at step ", 1)[1])
    # records start at step 2 (the first hpt.step only opens a step): flagged within 10 steps
    assert step <= 2 + 10, event.message


def test_sigstopped_rank_is_detected_as_hang_and_the_job_recovers(shared_cluster):
    cluster = shared_cluster
    env = Faults().stop_rank(2, step=5).env()
    job_id = cluster.submit(
        "python", FAULTY, "--steps", "20", "--step-time", "0.05", env=env, stop_grace_s=1.0
    )
    job = cluster.wait_terminal(job_id, timeout_s=90)
    assert state_name(job.state) == "SUCCEEDED", job.reason
    assert len(job.attempts) == 2 and job.attempts[1].state == pb.ATTEMPT_STATE_SUCCEEDED
    cause = job.attempts[0].cause
    assert cause.kind == "hang" and cause.rank == 2 and cause.node == "node-1", cause
    assert "stopped" in cause.message
    faults = events_of(cluster, job_id, "fault")
    assert faults and faults[0].rank == 2 and "hang" in faults[0].message
    stacks = {e.rank: e.message for e in events_of(cluster, job_id, "stacks")}
    assert "process is stopped" in stacks[2]


def test_rank_that_never_enters_an_all_reduce_is_named_as_the_culprit(shared_cluster):
    cluster = shared_cluster
    env = Faults().stall_before_collective(3, step=6).env()
    job_id = cluster.submit(
        "python", FAULTY, "--steps", "20", "--step-time", "0.05", env=env, stop_grace_s=1.0
    )
    missing = wait_event(cluster, job_id, "collective_missing")
    job = cluster.wait_terminal(job_id, timeout_s=90)
    assert state_name(job.state) == "SUCCEEDED", job.reason
    assert {e.rank for e in missing} == {3}
    assert missing[0].node == "node-1" and "never entered all_reduce seq" in missing[0].message
    cause = job.attempts[0].cause
    assert cause.kind == "hang" and cause.rank == 3, cause


def test_rank_spinning_while_holding_the_gil_is_detected_with_its_stack(shared_cluster):
    cluster = shared_cluster
    env = Faults().spin_holding_gil(1, step=5).env()
    job_id = cluster.submit(
        "python", FAULTY, "--steps", "20", "--step-time", "0.05", env=env, stop_grace_s=1.0
    )
    job = cluster.wait_terminal(job_id, timeout_s=90)
    assert state_name(job.state) == "SUCCEEDED", job.reason
    cause = job.attempts[0].cause
    assert cause.kind == "hang" and cause.rank == 1 and cause.node == "node-0", cause
    stacks = {e.rank: e.message for e in events_of(cluster, job_id, "stacks")}
    assert "in spin_holding_the_gil" in stacks[1], stacks.get(1)
    assert "in main" in stacks[1]


def test_clean_run_raises_no_finding(shared_cluster):
    cluster = shared_cluster
    job_id = cluster.submit("python", FAULTY, "--steps", "60", "--step-time", "0.05")
    job = cluster.wait_terminal(job_id)
    assert state_name(job.state) == "SUCCEEDED", job.reason
    kinds = [e.kind for e in cluster.events(job_id)]
    bad = [
        (e.kind, e.rank, e.message)
        for e in cluster.events(job_id)
        if e.kind in (*FINDING_KINDS, "fault", "stacks")
    ]
    assert not bad, bad
    assert kinds[-1] == "job_succeeded"


def test_node_failing_its_health_check_is_quarantined_and_the_job_placed_elsewhere(
    fault_cluster,
):
    cluster = fault_cluster(agent_env={"node-0": {"HPT_FAULT_HEALTH": "fail"}}, expect_ready=1)
    nodes = wait_for(
        lambda: (lambda ns: ns if len(ns) == 2 else None)(cluster.client.nodes()),
        30,
        "both nodes registered",
    )
    by_name = {n.name: n for n in nodes}
    assert by_name["node-0"].state == pb.NODE_STATE_QUARANTINED
    assert "health check failed" in by_name["node-0"].reason
    assert "HPT_FAULT_HEALTH=fail" in by_name["node-0"].reason
    assert by_name["node-1"].state == pb.NODE_STATE_READY
    job_id = cluster.submit("python", FAULTY, "--steps", "5", "--step-time", "0", nodes=1)
    job = cluster.wait_terminal(job_id)
    assert state_name(job.state) == "SUCCEEDED", job.reason
    assert list(job.attempts[0].nodes) == ["node-1"]
    quarantined = [e for e in cluster.events() if e.kind == "node_quarantined"]
    assert [e.node for e in quarantined] == ["node-0"]


@pytest.mark.skipif(
    subprocess.run(["which", "promtool"], capture_output=True).returncode != 0,
    reason="promtool not installed",
)
def test_controller_metrics_endpoint_passes_promtool(shared_cluster):
    cluster = shared_cluster
    url = f"http://127.0.0.1:{cluster.metrics_port}/metrics"
    before = urllib.request.urlopen(url, timeout=5).read().decode()
    env = Faults().stop_rank(0, step=3).env()
    job_id = cluster.submit(
        "python", FAULTY, "--steps", "10", "--step-time", "0.05", env=env, stop_grace_s=1.0
    )
    cluster.wait_terminal(job_id, timeout_s=90)

    # the cluster is shared: counters and gauges are compared with what they were before
    def grew(text: str, name: str) -> float:
        return sample(text, name) - sample(before, name)

    def scrape() -> str | None:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        done = grew(text, 'hpt_jobs{state="succeeded"}') == 1.0 and 'kind="hang"' in text
        return text if done and grew(text, 'hpt_recovery_seconds_count{kind="hang"}') else None

    text = wait_for(scrape, 60, "recovery recorded in /metrics", poll_s=0.5)
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    assert grew(text, 'hpt_faults_total{kind="hang"}') == 1.0
    assert grew(text, "hpt_attempts_total") == 2.0
    assert grew(text, 'hpt_recovery_seconds_count{kind="hang"}') == 1.0
    assert 'hpt_goodput_seconds_total{category="productive"}' in text
    assert sample(text, 'hpt_nodes{state="ready"}') == 2.0


def sample(text: str, name: str) -> float:
    """The value of the sample ``name`` (with its labels) in a Prometheus text page; 0 if absent."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_straggler_policy_restarts_the_job_without_the_slow_node(shared_cluster):
    cluster = shared_cluster
    env = Faults().slow_rank(1, factor=2.0).env()  # first attempt only
    job_id = cluster.submit("python", FAULTY, "--steps", "60", "--step-time", "0.05", env=env,
                            min_nodes=1, straggler_restart_after=5)
    job = cluster.wait_terminal(job_id)
    assert state_name(job.state) == "SUCCEEDED", job.reason
    assert len(job.attempts) == 2
    cause = job.attempts[0].cause
    assert cause.kind == "straggler" and cause.rank == 1 and cause.node == "node-0", cause
    assert list(job.attempts[1].nodes) == ["node-1"] and job.attempts[1].world_size == 2
    assert list(job.excluded_nodes) == ["node-0"]
    excluded = events_of(cluster, job_id, "node_excluded")
    assert excluded and excluded[0].node == "node-0"
