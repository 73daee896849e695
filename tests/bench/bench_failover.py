"""Controller failover figures on a real local cluster (JSON lines on stdout).

    python tests/bench/bench_failover.py [--runs 3] [--lease 1.5]

Two controller replicas share a real redis-server (leader lease ``--lease`` s); two agents
(given both addresses) run a 2x2 job. Each run:

- freezes the leader (SIGSTOP): time until the standby leads, until every agent re-registered
  with it; then wakes the old leader (SIGCONT) and counts its writes that reached the store
  after the takeover (stale writes accepted, goal 0);
- restarts it as the standby and SIGKILLs the leader: the same two times;
- counts jobs restarted (new attempts or changed rank pids, goal 0).

Baseline in the same run: one controller (no election) SIGKILLed and restarted at once by its
supervisor -> every agent re-registered (the path before replicas existed).
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from hpt._proto import common_pb2 as pb  # noqa: E402
from tests.integration.cluster import TRAIN, LocalCluster, wait_for  # noqa: E402
from tests.integration.ha_cluster import HACluster  # noqa: E402
from tests.redis_fixture import start_redis, stop_redis  # noqa: E402

LONG = ["python", TRAIN, "--steps", "100000", "--step-time", "0.05"]


def emit(name: str, values: list[float], **extra: object) -> float:
    med = statistics.median(values)
    print(json.dumps({"bench": name, "median_s": round(med, 3), "runs": len(values),
                      "values": [round(v, 3) for v in values], **extra}), flush=True)
    return med


def nodes_ready(cluster: LocalCluster, n: int) -> bool:
    try:
        return sum(x.state == pb.NODE_STATE_READY for x in cluster.client.nodes()) >= n
    except Exception:  # the controller is not up yet: poll again
        return False


def pids(cluster: LocalCluster, job_id: str) -> tuple[int, list[int]]:
    job = cluster.job(job_id)
    return len(job.attempts), sorted(r.pid for r in job.attempts[-1].ranks)


def one_ha_run(work: Path, lease_s: float) -> dict[str, float]:
    url, redis_proc = start_redis(work / "redis")
    ha = HACluster(work, redis_url=url, lease_s=lease_s)
    try:
        ha.start_controller()
        for i in range(ha.num_agents):
            ha.start_agent(f"node-{i}")
        ha.wait_nodes_ready(ha.num_agents, timeout_s=300)  # the shared machine may be loaded
        job_id = ha.submit(*LONG)
        ha.wait_step(job_id, 1, 3, timeout_s=300)
        before = pids(ha, job_id)
        out: dict[str, float] = {}
        # frozen leader
        old, old_epoch = ha.replicas[0], ha.epoch()
        t0 = time.monotonic()
        old.send_signal(signal.SIGSTOP)
        ha.wait_leader(1)
        out["frozen_to_new_leader_s"] = time.monotonic() - t0
        at_takeover = ha.record_versions()
        wait_for(lambda: nodes_ready(ha, 2), 120, "agents back", poll_s=0.02)
        out["frozen_to_agents_back_s"] = time.monotonic() - t0
        old.send_signal(signal.SIGCONT)
        wait_for(lambda: old.poll() is not None, 60, "deposed leader exits")
        out["stale_writes_accepted"] = sum(
            1 for k, (v, e) in ha.record_versions().items()
            if e == str(old_epoch).encode() and v != at_takeover.get(k, (0, b""))[0])
        # killed leader
        ha.start_replica(0)
        ha.wait_step(job_id, 1, ha.job(job_id).attempts[0].ranks[0].step + 3)
        t0 = time.monotonic()
        ha.replicas[1].kill()
        ha.wait_leader(0)
        out["killed_to_new_leader_s"] = time.monotonic() - t0
        wait_for(lambda: nodes_ready(ha, 2), 120, "agents back", poll_s=0.02)
        out["killed_to_agents_back_s"] = time.monotonic() - t0
        ha.wait_step(job_id, 1, ha.job(job_id).attempts[0].ranks[0].step + 3)
        out["jobs_restarted"] = float(pids(ha, job_id) != before)
        ha.client.cancel(job_id)
        ha.wait_terminal(job_id)
        return out
    finally:
        ha.close()
        stop_redis(redis_proc)


def one_restart_run(work: Path) -> float:
    url, redis_proc = start_redis(work / "redis")
    cluster = LocalCluster(work, redis_url=url)
    try:
        cluster.start_controller()
        for i in range(cluster.num_agents):
            cluster.start_agent(f"node-{i}")
        cluster.wait_nodes_ready(cluster.num_agents, timeout_s=300)
        job_id = cluster.submit(*LONG)
        cluster.wait_step(job_id, 1, 3, timeout_s=300)
        t0 = time.monotonic()
        cluster.kill_controller()
        cluster.start_controller()
        wait_for(lambda: nodes_ready(cluster, 2), 120, "agents back", poll_s=0.02)
        took = time.monotonic() - t0
        cluster.client.cancel(job_id)
        cluster.wait_terminal(job_id)
        return took
    finally:
        cluster.close()
        stop_redis(redis_proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--lease", type=float, default=1.5)
    args = parser.parse_args()
    runs: list[dict[str, float]] = []
    baseline: list[float] = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix=f"hpt-failover-{i}-") as d:
            runs.append(one_ha_run(Path(d), args.lease))
        with tempfile.TemporaryDirectory(prefix=f"hpt-restart-{i}-") as d:
            baseline.append(one_restart_run(Path(d)))
        print(json.dumps({"bench": "failover.run", "run": i, **{k: round(v, 3) for k, v in
                          runs[-1].items()}, "baseline_restart_s": round(baseline[-1], 3)}),
              flush=True)
    lease = {"leader_lease_s": args.lease}
    for key in ("frozen_to_new_leader_s", "frozen_to_agents_back_s", "killed_to_new_leader_s"):
        emit(f"failover.{key.removesuffix('_s')}", [r[key] for r in runs], **lease)
    killed = emit("failover.killed_to_agents_back", [r["killed_to_agents_back_s"] for r in runs],
                  **lease)
    base = emit("baseline.single_controller_restart_to_agents_back", baseline)
    print(json.dumps({"bench": "failover.killed_to_agents_back.ratio_vs_restart",
                      "ratio": round(killed / base, 3)}), flush=True)
    print(json.dumps({"bench": "failover.jobs_restarted",
                      "total": int(sum(r["jobs_restarted"] for r in runs)), "runs": len(runs)}))
    print(json.dumps({"bench": "failover.stale_writes_accepted",
                      "total": int(sum(r["stale_writes_accepted"] for r in runs)),
                      "runs": len(runs)}))


if __name__ == "__main__":
    main()
