"""Figures of the control plane under its own faults, on a real local cluster (JSON lines).

    python tests/bench/bench_control_plane.py [--runs 3] [--jobs 1000] [--only NAME]

- ``controller_pause``: the controller SIGSTOPped for ``--pause`` seconds (10) then resumed, a
  2x1 job running: false node losses and ranks killed (goal 0 for both). Agents' lease 15 s.
- ``redis_restart``: Redis (fsync'ed AOF) killed with -9 and started again 2 s later while the
  job runs and a client keeps submitting: ranks killed by the time the store is back, and
  acknowledged submits missing after a controller restart (goal 0 for both), and how many
  submits were refused meanwhile. Agents' lease 60 s (the controller restart is slow here).
- ``lost_node_rejoin``: an agent SIGSTOPped until its node is LOST, then resumed: seconds from
  SIGCONT to READY. Baseline in the same run: the old way back, a fresh agent process started
  once the node is LOST (start -> READY).
- ``controller_memory``: controller RSS after ``--jobs`` finished jobs, keeping all of them
  (``--keep-finished`` = jobs) and keeping 100, against its RSS before the first job.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from tests.faults.control_plane import ControlPlaneCluster, PersistentRedis  # noqa: E402
from tests.integration.cluster import BIN, pid_alive, wait_for  # noqa: E402

SLEEPER = str(BIN / "sleeper.py")


def emit(name: str, **fields: object) -> None:
    print(json.dumps({"bench": name, **fields}), flush=True)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def node_states(cluster: ControlPlaneCluster) -> dict[str, str]:
    return cluster.node_states()


def controller_pause(runs: int, pause_s: float) -> None:
    losses, killed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cluster = ControlPlaneCluster(Path(tmp), agents=2, slots=1, agent_lease_s=15.0)
        try:
            cluster.start()
            job_id = cluster.submit("python", SLEEPER, nodes=2, procs=1, max_restarts=runs + 1)
            for _ in range(runs):
                job = cluster.wait_step(job_id, len(cluster.job(job_id).attempts), 1)
                pids = [r.pid for r in job.attempts[-1].ranks]
                before = cluster.event_kinds().count("node_lost")
                cluster.pause(cluster.controller)
                threading.Event().wait(pause_s)  # the fault's duration
                cluster.resume(cluster.controller)
                step = min(r.step for r in cluster.job(job_id).attempts[-1].ranks)
                # past the controller's grace period: heartbeats re-observed, nodes judged
                cluster.wait_step(job_id, len(cluster.job(job_id).attempts), step + 40, 120)
                losses.append(cluster.event_kinds().count("node_lost") - before)
                killed.append(sum(not pid_alive(p) for p in pids))
        finally:
            cluster.close()
    emit("controller_pause", pause_s=pause_s, runs=runs, false_node_losses=losses,
         ranks_killed=killed, goal=0)


def redis_restart(runs: int) -> None:
    killed, lost, refused, acked = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        store = PersistentRedis(Path(tmp)).start()
        # a long lease: the controller restart that checks the writes is slow on a loaded
        # machine, and agents that lose it past their lease kill their ranks by design
        cluster = ControlPlaneCluster(Path(tmp), agents=2, slots=4, redis_url=store.url,
                                      agent_lease_s=60.0)
        try:
            cluster.start()
            job_id = cluster.submit("python", SLEEPER, nodes=2, procs=1)
            for _ in range(runs):
                job = cluster.wait_step(job_id, 1, 1)
                pids = [r.pid for r in job.attempts[0].ranks]
                acknowledged, refusals = [], 0
                store.kill()
                down_at = time.monotonic()
                while time.monotonic() - down_at < 2.0:
                    try:
                        acknowledged.append(cluster.submit("true", nodes=1, procs=1))
                    except grpc.RpcError:
                        refusals += 1
                store.start()
                wait_for(lambda: cluster.client.nodes_and_store()[1].up, 60, "store back")
                killed.append(sum(not pid_alive(p) for p in pids))
                for _ in range(3):
                    acknowledged.append(cluster.submit("true", nodes=1, procs=1))
                wait_for(lambda: cluster.client.nodes_and_store()[1].pending_events == 0, 60,
                         "events written")
                cluster.kill_controller()
                cluster.start_controller()
                known = {j.id for j in cluster.client.list()}
                lost.append(sum(a not in known for a in acknowledged))
                refused.append(refusals)
                acked.append(len(acknowledged))
        finally:
            cluster.close()
            store.close()
    emit("redis_restart", runs=runs, ranks_killed=killed, acknowledged_writes_lost=lost,
         submits_acknowledged=acked, submits_refused_while_down=refused, goal=0)


def lost_node_rejoin(runs: int) -> None:
    rejoin, restart = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cluster = ControlPlaneCluster(Path(tmp), agents=2, slots=1)
        try:
            cluster.start()
            for _ in range(runs):
                agent = cluster.agents["node-1"]
                cluster.pause(agent)
                wait_for(lambda: node_states(cluster)["node-1"] == "LOST", 60, "LOST",
                         poll_s=0.02)
                t0 = time.monotonic()
                cluster.resume(agent)
                wait_for(lambda: node_states(cluster)["node-1"] == "READY", 60, "READY",
                         poll_s=0.02)
                rejoin.append(time.monotonic() - t0)
            for _ in range(runs):  # baseline: back by a fresh agent process
                cluster.kill_agent("node-1")
                wait_for(lambda: node_states(cluster)["node-1"] == "LOST", 60, "LOST",
                         poll_s=0.02)
                t0 = time.monotonic()
                cluster.start_agent("node-1")
                wait_for(lambda: node_states(cluster)["node-1"] == "READY", 120, "READY",
                         poll_s=0.02)
                restart.append(time.monotonic() - t0)
        finally:
            cluster.close()
    med, base = statistics.median(rejoin), statistics.median(restart)
    emit("lost_node_rejoin", median_s=round(med, 3), values_s=[round(v, 3) for v in rejoin],
         baseline="fresh agent process: kill, start, READY", baseline_median_s=round(base, 3),
         baseline_values_s=[round(v, 3) for v in restart], ratio=round(med / base, 3))


def controller_memory(jobs: int) -> None:
    out = {}
    for keep in (jobs, 100):
        with tempfile.TemporaryDirectory() as tmp:
            cluster = ControlPlaneCluster(Path(tmp), agents=2, slots=4,
                                          controller_args=["--keep-finished", str(keep)])
            try:
                cluster.start()
                assert cluster.controller is not None
                warm = cluster.submit("true", nodes=1, procs=1)
                cluster.wait_terminal(warm)
                before = rss_bytes(cluster.controller.pid)
                ids = []
                for i in range(jobs):
                    ids.append(cluster.submit("true", nodes=1, procs=1, env={"I": str(i)}))
                    if len(ids) >= 16:  # keep the agents' slots busy, not oversubscribed
                        cluster.wait_terminal(ids.pop(0), 120)
                for job_id in ids:
                    cluster.wait_terminal(job_id, 120)
                wait_for(lambda c=cluster, k=keep: len(c.client.list()) <= k, 60, "retention applied")
                after = rss_bytes(cluster.controller.pid)
                out[keep] = (before, after, len(cluster.client.list()))
            finally:
                cluster.close()
    full, kept = out[jobs], out[100]
    emit("controller_memory", finished_jobs=jobs,
         rss_before_mb=round(full[0] / 2**20, 1),
         rss_after_keep_all_mb=round(full[1] / 2**20, 1), jobs_kept_all=full[2],
         rss_after_keep_100_mb=round(kept[1] / 2**20, 1), jobs_kept_100=kept[2],
         growth_keep_all_kb_per_job=round((full[1] - full[0]) / 1024 / jobs, 2),
         growth_keep_100_kb_per_job=round((kept[1] - kept[0]) / 1024 / jobs, 2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--pause", type=float, default=10.0)
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    print(json.dumps({"machine": os.uname().nodename, "cpus": os.cpu_count(),
                      "load_avg": os.getloadavg()}), flush=True)
    benches = {
        "controller_pause": lambda: controller_pause(args.runs, args.pause),
        "redis_restart": lambda: redis_restart(args.runs),
        "lost_node_rejoin": lambda: lost_node_rejoin(max(args.runs, 5)),
        "controller_memory": lambda: controller_memory(args.jobs),
    }
    for name, run in benches.items():
        if not args.only or args.only == name:
            run()


if __name__ == "__main__":
    main()
