"""The runner survives its own faults (issue 8): a paused controller, a Redis restart, a broken
network between agents and controller, a controller killed between two store writes, duplicate
agents, an agent killed with -9, oversized input and greedy clients. Real processes on loopback
and a real ``redis-server``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest

from hpt._proto import jobs_pb2
from tests.faults.control_plane import ControlPlaneCluster, PersistentRedis, hold
from tests.integration.cluster import (
    BIN,
    TRAIN,
    pid_alive,
    shm_files,
    state_name,
    wait_for,
    wait_for_dead,
)
from tests.redis_fixture import start_redis, stop_redis

SLEEPER = str(BIN / "sleeper.py")
# Each test starts a cluster and waits on it; the shared machine can be slow.
pytestmark = pytest.mark.timeout(300)
SHM = Path("/dev/shm")


@pytest.fixture
def cp(tmp_path, request):
    made: list[ControlPlaneCluster] = []

    def make(**kw) -> ControlPlaneCluster:  # type: ignore[no-untyped-def]
        cluster = ControlPlaneCluster(tmp_path, **kw)
        made.append(cluster)
        return cluster.start()

    yield make
    failed = request.node.rep_call.failed if hasattr(request.node, "rep_call") else False
    for cluster in made:
        if failed:
            print(cluster.logs())
        cluster.close()


def rank_pids(job, attempt: int = 1) -> list[int]:  # type: ignore[no-untyped-def]
    return sorted(r.pid for r in job.attempts[attempt - 1].ranks)


def min_step(job, attempt: int = 1) -> int:  # type: ignore[no-untyped-def]
    return min(r.step for r in job.attempts[attempt - 1].ranks)


def owner_locks(cluster: ControlPlaneCluster, node: str) -> list[Path]:
    """Owner locks of agents named ``node`` that this cluster started (another cluster on the
    host may run agents of the same names)."""
    ours = {p.pid for p in cluster._all}
    return sorted(p for p in SHM.glob(f"hpt-{node}--*.lock") if _lock_pid(p) in ours)


def _lock_pid(lock: Path) -> int:
    try:
        return int(json.loads(lock.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


# ------------------------------------------------------------------------ item 1 and item 3


def test_paused_controller_judges_nobody_and_self_fenced_agents_take_the_next_attempt(cp):
    cluster = cp(agents=2, slots=1, agent_lease_s=5.0)  # heartbeat timeout 2 s (0.5 s x 4)
    job_id = cluster.submit("python", SLEEPER, nodes=2, procs=1, max_restarts=3)
    job = cluster.wait_step(job_id, attempt=1, step=1)
    pids = rank_pids(job)

    # paused past the heartbeat timeout, within the agents' lease: nobody is lost
    cluster.pause(cluster.controller)
    hold(3.5)
    cluster.resume(cluster.controller)
    resumed_at = min_step(cluster.job(job_id))
    job = cluster.wait_step(job_id, attempt=1, step=resumed_at + 30, timeout_s=60)
    kinds = cluster.event_kinds()
    assert "node_lost" not in kinds, kinds
    assert len(job.attempts) == 1 and rank_pids(job) == pids
    assert set(cluster.node_states().values()) == {"READY"}

    # paused past the lease: the agents kill their ranks (self-fencing) ...
    cluster.pause(cluster.controller)
    wait_for(lambda: not any(pid_alive(p) for p in pids), 30, "ranks self-fenced")
    cluster.resume(cluster.controller)
    # ... and still accept the attempt the controller launches next (fenced by its number)
    job = cluster.wait_step(job_id, attempt=2, step=1, timeout_s=60)
    assert len(job.attempts) == 2
    assert "launch refused" not in cluster.logs()


def test_lost_node_that_heartbeats_again_rejoins_and_its_old_ranks_are_fenced(cp):
    cluster = cp(agents=2, slots=1, proxied=True)
    job_id = cluster.submit("python", SLEEPER, nodes=2, procs=1, max_restarts=3)
    job = cluster.wait_step(job_id, attempt=1, step=1)
    pids = rank_pids(job)

    cluster.proxies["node-1"].blackhole()  # a silent partition: no FIN, no RST
    wait_for(lambda: cluster.node_states()["node-1"] == "LOST", 30, "node-1 LOST")
    cluster.proxies["node-1"].heal()
    wait_for(lambda: cluster.node_states()["node-1"] == "READY", 30, "node-1 rejoined")

    job = cluster.wait_step(job_id, attempt=2, step=1, timeout_s=60)
    assert {r.node for r in job.attempts[1].ranks} == {"node-0", "node-1"}
    assert "node_rejoined" in cluster.event_kinds()
    assert not wait_for_dead(set(pids), 15), "attempt 1's ranks must be fenced"


def test_network_delay_costs_no_attempt_and_a_reset_mid_transfer_is_recovered(cp):
    cluster = cp(agents=2, slots=1, proxied=True)
    job_id = cluster.submit("python", SLEEPER, nodes=2, procs=1, max_restarts=3)
    job = cluster.wait_step(job_id, attempt=1, step=1)
    pids = rank_pids(job)

    cluster.proxies["node-0"].delay(0.2)
    job = cluster.wait_step(job_id, attempt=1, step=min_step(job) + 20, timeout_s=60)
    cluster.proxies["node-0"].heal()
    assert len(job.attempts) == 1 and rank_pids(job) == pids
    assert set(cluster.node_states().values()) == {"READY"}

    accepted = cluster.proxies["node-1"].num_accepted
    cluster.proxies["node-1"].reset_after(2048)  # RST in the middle of the stream
    wait_for(lambda: cluster.proxies["node-1"].num_resets >= 1, 30, "connection reset")
    cluster.proxies["node-1"].heal()
    wait_for(lambda: cluster.proxies["node-1"].num_accepted > accepted, 30, "agent reconnected")
    # a stream that stays closed longer than a heartbeat period costs the node (and the
    # attempt) on a loaded machine; either way the agent re-registers and the job runs on
    wait_for(lambda: set(cluster.node_states().values()) == {"READY"}, 60, "nodes READY")
    # the job steps on: 10 steps in one attempt (a node lost just now may still start another)
    base: dict[int, int] = {}

    def stepping(job) -> bool:  # type: ignore[no-untyped-def]
        n = len(job.attempts)
        now = min_step(job, n)
        return now >= 0 and now >= base.setdefault(n, now) + 10

    cluster.wait_job(job_id, stepping, 120, "10 steps in the newest attempt")


def test_a_restore_slower_than_the_silence_limit_keeps_the_agents_controller(cp):
    # Every peer service sits behind a slow link. The agent running old rank 1 is killed; a
    # spare node takes its place at the same world size, so it must hold old rank 1 itself
    # (a resize of this data-parallel job would read the survivors' replicas instead).
    # Decoding it pulls the survivors' pieces through a slow link for longer than the 3 s an
    # agent waits for a silent controller. The launch that waits for those pieces must not
    # silence the stream.
    nodes = ("node-0", "node-1", "node-2", "node-3")
    cluster = cp(agents=4, slots=1, peer_proxied=nodes)
    job_id = cluster.submit("python", TRAIN, "--steps", "100000", "--step-time", "0.1",
                            "--hidden", "512", nodes=3, procs=1, min_nodes=2,
                            redundancy="2+1")
    job = cluster.wait_job(job_id, lambda j: any(s >= 3 for s in j.attempts[-1].protected_steps),
                           90, "a protected step >= 3")
    first = job.attempts[-1]
    victim = first.ranks[1].node
    (rebuilder,) = set(nodes) - set(first.nodes)  # the spare
    for name in nodes:
        cluster.peer_proxies[name].delay(0.1)  # ~5 s for the 3.4 MB of one node's snapshot
    cluster.kill_agent(victim)
    job = cluster.wait_job(job_id, lambda j: len(j.attempts) >= 2 and j.attempts[-1].ranks
                           and min(r.step for r in j.attempts[-1].ranks)
                           >= j.attempts[-1].restore_step + 5, 120,
                           "the shrunk attempt 5 steps past its restore")
    for name in nodes:
        cluster.peer_proxies[name].heal()
    restored = [e.message for e in cluster.events(job_id) if e.kind == "snapshot_rebuilt"]
    assert any(m.startswith(f"{rebuilder}: ") and "rank 1 from decoded" in m  # the slow link
               for m in restored), restored
    assert job.attempts[1].restore_step > 0
    assert len(job.attempts) == 2, [(a.number, a.cause.message) for a in job.attempts[1:]]
    registered = [e.node for e in cluster.events() if e.kind == "node_registered"]
    assert sorted(registered) == list(nodes), registered  # nobody again
    assert "silent for" not in cluster.logs()
    cluster.client.cancel(job_id)
    cluster.wait_terminal(job_id)


def test_dropped_link_loses_the_node_until_the_agent_reconnects(cp):
    cluster = cp(agents=2, slots=1, proxied=True)
    job_id = cluster.submit("python", SLEEPER, nodes=2, procs=1, max_restarts=3)
    cluster.wait_step(job_id, attempt=1, step=1)
    cluster.proxies["node-1"].drop()
    wait_for(lambda: cluster.node_states()["node-1"] == "LOST", 30, "node-1 LOST")
    cluster.proxies["node-1"].heal()
    job = cluster.wait_step(job_id, attempt=2, step=1, timeout_s=60)
    assert cluster.node_states()["node-1"] == "READY"
    assert len(job.attempts) == 2


# ------------------------------------------------------------------------ item 2


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, f"{name} not exported"
    return float(match.group(1))


def test_redis_killed_and_restarted_kills_no_rank_and_loses_no_acknowledged_write(cp, tmp_path):
    store = PersistentRedis(tmp_path).start()
    try:
        cluster = cp(agents=2, slots=2, redis_url=store.url, metrics=True)
        kept = cluster.submit("python", SLEEPER, nodes=2, procs=1)
        to_cancel = cluster.submit("python", SLEEPER, nodes=2, procs=1)
        job = cluster.wait_step(kept, attempt=1, step=1)
        cluster.wait_step(to_cancel, attempt=1, step=1)
        pids = rank_pids(job)

        store.kill()
        cluster.client.cancel(to_cancel)  # acknowledged while the store is down
        acknowledged = []
        try:
            acknowledged.append(cluster.submit("python", SLEEPER, nodes=1, procs=1))
        except grpc.RpcError as exc:  # refused, not acknowledged: allowed
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
        cancelled = cluster.wait_terminal(to_cancel, timeout_s=60)
        assert state_name(cancelled.state) == "CANCELLED"
        assert cluster.controller.poll() is None, "the controller kept running"
        wait_for(lambda: not cluster.client.nodes_and_store()[1].up, 30, "store DEGRADED")
        wait_for(lambda: _metric(cluster.metrics_port, "hpt_store_up") == 0.0, 30,
                 "hpt_store_up 0")

        store.start()
        wait_for(lambda: cluster.client.nodes_and_store()[1].up, 30, "store back")
        assert cluster.controller.poll() is None, "the controller kept running"
        job = cluster.job(kept)
        assert len(job.attempts) == 1 and rank_pids(job) == pids
        assert all(pid_alive(p) for p in pids), "no rank killed"

        # what was acknowledged is in the store: a restarted controller finds all of it
        wait_for(lambda: cluster.client.nodes_and_store()[1].pending_events == 0, 30,
                 "events written")
        cluster.kill_controller()
        cluster.start_controller()
        assert state_name(cluster.job(to_cancel).state) == "CANCELLED"
        assert "cancel_requested" in cluster.event_kinds(to_cancel)
        for job_id in acknowledged:
            cluster.job(job_id)  # raises NOT_FOUND if lost
        job = cluster.wait_step(kept, attempt=1, step=min_step(job) + 5)
        assert len(job.attempts) == 1 and rank_pids(job) == pids
        cluster.close()
    finally:
        store.close()


# ------------------------------------------------------------------------ crash points


@pytest.mark.parametrize("point", ["fault-recorded:1", "launch-persisted:2"])
def test_controller_killed_between_two_store_writes_makes_exactly_one_next_attempt(
    cp, tmp_path, point
):
    url, redis_proc = start_redis(tmp_path / "redis")
    try:
        cluster = cp(agents=1, slots=2, redis_url=url, controller_env={"HPT_CRASH_AT": point})
        job_id = cluster.submit("python", SLEEPER, nodes=1, procs=2, max_restarts=3)
        job = cluster.wait_step(job_id, attempt=1, step=1)
        first = rank_pids(job)
        os.kill(first[0], signal.SIGKILL)
        wait_for(lambda: cluster.controller.poll() is not None, 60, f"controller dies at {point}")
        assert cluster.controller.returncode == 86
        cluster._drop_client()
        cluster.controller_env = {}
        cluster.start_controller()
        job = cluster.wait_step(job_id, attempt=2, step=1, timeout_s=60)
        job = cluster.wait_step(job_id, attempt=2, step=min_step(job, 2) + 20, timeout_s=60)
        assert len(job.attempts) == 2, [a.number for a in job.attempts]
        assert not wait_for_dead(set(first), 15), "attempt 1 left orphans"
        cluster.close()
    finally:
        stop_redis(redis_proc)


# ------------------------------------------------------------------------ item 4 and item 16


def test_duplicate_agent_is_refused_and_cannot_sweep_a_live_agents_snapshots(cp):
    cluster = cp(agents=1, slots=1)
    job_id = cluster.submit("python", TRAIN, "--steps", "100000", "--step-time", "0.05",
                            nodes=1, procs=1)
    job = cluster.wait_step(job_id, attempt=1, step=3)
    # snapshot buffers (allocated once, kept) of this cluster's node-0
    live = [p for p in shm_files({"node-0"}, {cluster.agents["node-0"].pid})
            if p.name.endswith(".buf")]
    assert live

    dup = cluster._spawn(["agent", "--controller", cluster.address, "--name", "node-0",
                          "--slots", "1", "--no-warm", "--no-health-check",
                          "--run-dir", str(cluster.workdir / "run-dup")], "agent-dup.log")
    log_path = cluster.workdir / "agent-dup.log"
    wait_for(lambda: "refused this agent" in log_path.read_text(errors="replace")
             or not all(p.exists() for p in live), 60, "duplicate refused (or sweeping)")
    assert all(p.exists() for p in live), "the duplicate swept a live agent's snapshots"
    assert len(owner_locks(cluster, "node-0")) == 2  # each agent process owns its own files
    dup.terminate()
    dup.wait(timeout=30)
    assert all(p.exists() for p in live), "the duplicate's shutdown removed live snapshots"
    job = cluster.wait_step(job_id, attempt=1, step=min_step(job) + 5)
    assert len(job.attempts) == 1 and cluster.node_states() == {"node-0": "READY"}


def test_agent_killed_with_9_leaves_no_orphan_and_the_next_agent_reclaims_its_leftovers(
    cp, tmp_path
):
    cluster = cp(agents=1, slots=1)
    pid_file = tmp_path / "sleep.pid"
    job_id = cluster.submit("sh", "-c", f"sleep 300 & echo $! > {pid_file}; wait",
                            nodes=1, procs=1, max_restarts=0)
    wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 60, "rank's child")
    child = int(pid_file.read_text())
    cluster.kill_agent("node-0")
    assert not wait_for_dead({child}, 15), "the rank's child outlived its agent"

    [lock] = owner_locks(cluster, "node-0")  # what the dead agent left: its lock, its snapshot files
    instance = lock.name.removeprefix("hpt-node-0--").removesuffix(".lock")
    planted = SHM / f"hpt-node-0--{instance}-{job_id}-r0.g0.buf"
    planted.write_bytes(b"left behind")

    cluster.start_agent("node-9")  # another agent on this host
    wait_for(lambda: cluster.node_states().get("node-9") == "READY", 120, "node-9 READY")
    assert not lock.exists() and not planted.exists(), "the dead agent's leftovers remain"
    wait_for(lambda: state_name(cluster.job(job_id).state) == "FAILED", 60, "job failed")


# ------------------------------------------------------------------------ items 11 and 12


def test_size_budget_paged_ls_retention_stream_cap_and_log_bytes(cp):
    cluster = cp(agents=1, slots=2, controller_args=["--keep-finished", "2",
                                                     "--max-streams", "3"])
    client = cluster.client
    with pytest.raises(grpc.RpcError) as refused:
        cluster.submit("python", "-c", "pass", *["x" * 16_000] * 250, nodes=1, procs=1)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.command (" in refused.value.details() and "1048576" in refused.value.details()

    # a spec inside the budget reaches the agent whole
    env = {f"BIG_{i}": "v" * 32_000 for i in range(28)}
    check = "import os; assert all(len(os.environ[f'BIG_{i}']) == 32000 for i in range(28))"
    big = cluster.submit("python", "-c", check, nodes=1, procs=1, env=env)
    assert state_name(cluster.wait_terminal(big).state) == "SUCCEEDED"

    # rank output: 12 lines of 1 MiB then a marker; the controller keeps a bounded tail
    noisy = cluster.submit("python", "-c", "import sys\nfor _ in range(12):\n"
                           "    print('x' * 2**20, flush=True)\nprint('the end', flush=True)",
                           nodes=1, procs=1)
    assert state_name(cluster.wait_terminal(noisy).state) == "SUCCEEDED"
    wait_for(lambda: any(line.text == "the end" for line in client.logs(noisy)), 30, "marker")
    kept_chars = sum(len(line.text) for line in client.logs(noisy))
    assert kept_chars <= 4 * 2**20, kept_chars

    for _ in range(2):
        done = cluster.submit("python", "-c", "pass", nodes=1, procs=1)
        cluster.wait_terminal(done)
    wait_for(lambda: len(client.list()) == 2, 30, "finished jobs beyond 2 dropped")
    assert [j.id for j in client.list(page_size=1)][-1] == done
    page = client._stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=1), timeout=10)
    assert len(page.jobs) == 1 and page.next_page_token

    # follow-streams are capped; unary RPCs keep answering
    running = cluster.submit("python", SLEEPER, nodes=1, procs=1)
    calls = [client._stub.StreamEvents(jobs_pb2.StreamEventsRequest(follow=True)) for _ in range(3)]
    readers = [threading.Thread(target=lambda c=c: _drain(c), daemon=True) for c in calls]
    for r in readers:
        r.start()
    try:
        def fourth_refused() -> bool:
            extra = client._stub.StreamEvents(jobs_pb2.StreamEventsRequest(follow=True))
            try:
                next(extra)
            except grpc.RpcError as exc:
                return exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            finally:
                extra.cancel()
            return False

        wait_for(fourth_refused, 30, "a fourth stream refused")
        assert running in [j.id for j in client.list()]
        assert cluster.node_states() == {"node-0": "READY"}
    finally:
        for c in calls:
            c.cancel()
        for r in readers:
            r.join(10)
    client.cancel(running)
    cluster.wait_terminal(running)


def _drain(call) -> None:  # type: ignore[no-untyped-def]
    try:
        for _ in call:
            pass
    except grpc.RpcError:
        pass
