"""Elastic recovery of a lost node on a real local cluster (JSON lines on stdout).

    python tests/bench/bench_elastic.py [--runs 3] [--hidden 512] [--step-times 0.05,0.5] [--shard]

- ``node_kill_to_first_step_shrunk``: three agents (warm interpreters, one rank each), a job
  ``--nodes 2:3`` protected 2+1; SIGKILL the agent of rank 2 -> first step of the attempt on
  the two survivors (the example is data parallel: each survivor reads its own replica, the
  lost node is not decoded); ``steps_lost`` = the newest step any rank of the first attempt
  reported (the survivors' last reports included) minus the step restored. Once per step
  time of ``--step-times``. ``first_protected_s``: from the attempt's
  first step to its first protected step (the window in which a node loss falls back to disk).
  ``--load N`` runs N busy loops beside the cluster (a loaded machine: heartbeats of different
  nodes arrive further out of phase). ``--lose 1,2``: also kill two agents at once (those of
  ranks 0 and 1: the node of old rank 2 goes on alone, reading its own replica although new
  rank 0 prefers old rank 0; parity 2+1 cannot decode two lost nodes, the data-parallel
  replicas need no decoding). Each count is measured in the same run, 1 being the baseline.
  ``--shard``: the job keeps its parameters and Adam state sharded (``train.py --shard``,
  ZeRO-3 style), so the survivors decode the lost node from parity and restore the newest
  protected step.
- ``step_time_protected``: the same 3-node job, wall time per step from the first step to the
  end, protected (2+1, every step) against unprotected (``--redundancy off``) in the same run.
Every figure is the median of ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from hpt._proto import common_pb2 as pb  # noqa: E402
from tests.integration.cluster import TRAIN, LocalCluster, wait_for  # noqa: E402


def warm_ready(cluster: LocalCluster) -> bool:
    nodes = [n for n in cluster.client.nodes() if n.state == pb.NODE_STATE_READY]
    return bool(nodes) and all(n.warm_ready >= cluster.slots for n in nodes)


def node_kill(runs: int, hidden: int, step_s: float, lose: int = 1,
              shard: bool = False) -> tuple[list[float], list[int], list[float]]:
    took, lost, first_protected = [], [], []
    job = ["python", TRAIN, "--steps", "100000", "--step-time", str(step_s), "--hidden",
           str(hidden)] + (["--shard"] if shard else [])
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp, LocalCluster(Path(tmp), agents=3, slots=1,
                                                                warm=True) as cluster:
            job_id = cluster.submit(*job, nodes=3, procs=1, min_nodes=3 - lose,
                                    redundancy="2+1")
            protected = cluster.wait_job(job_id, lambda j: bool(
                j.attempts and j.attempts[0].first_step_at and j.attempts[0].protected_steps),
                180, "a protected step")
            first_protected.append(time.time() - protected.attempts[0].first_step_at)
            cluster.wait_job(job_id, lambda j: any(s >= 5 for s in j.attempts[0].protected_steps),
                             180, "protected step >= 5")
            wait_for(lambda c=cluster: warm_ready(c), 180, "warm pools full", poll_s=0.1)
            before = cluster.job(job_id).attempts[0]
            victims = [before.ranks[2].node] if lose == 1 else [r.node for r in before.ranks[:lose]]
            killed = time.time()
            for victim in victims:
                cluster.kill_agent(victim)
            # (two losses seen one heartbeat apart may cost an attempt on two nodes first)
            now = cluster.wait_job(job_id, lambda j: any(
                a.world_size == 3 - lose and a.first_step_at > 0 for a in j.attempts[1:]),
                180, "shrunk stepping")
            after = next(a for a in now.attempts[1:] if a.world_size == 3 - lose)
            # the newest step a rank of the first attempt reported, read once the survivors'
            # last reports are in (read at the kill, heartbeats not yet sent lag behind)
            reached = max(r.step for r in now.attempts[0].ranks)
            source = next(e.message for e in cluster.events(job_id)
                          if e.kind == "restore_source" and e.attempt == after.number)
            match = re.search(r"step (\d+)", source)
            restored = int(match.group(1)) if match else 0
            took.append(after.first_step_at - killed)
            lost.append(reached - restored)
            cluster.client.cancel(job_id)
            cluster.wait_terminal(job_id)
    return took, lost, first_protected


def step_time(runs: int, hidden: int, steps: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"off": [], "2+1": []}
    job = ["python", TRAIN, "--steps", str(steps), "--step-time", "0", "--hidden", str(hidden)]
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(Path(tmp), agents=3, slots=1,
                                                            warm=True) as cluster:
        for _ in range(runs):
            for redundancy in ("off", "2+1"):  # interleaved: load drifts hit both alike
                job_id = cluster.submit(*job, nodes=3, procs=1, redundancy=redundancy)
                done = cluster.wait_terminal(job_id, 600)
                attempt = done.attempts[-1]
                if len(done.attempts) != 1:
                    continue  # a restart mixes recovery into the step time
                out[redundancy].append((attempt.ended_at - attempt.first_step_at) / steps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--step-times", default="0.05,0.5",
                        help="comma-separated seconds per step of the node-kill job")
    parser.add_argument("--load", type=int, default=0,
                        help="busy-loop processes beside the node-kill runs")
    parser.add_argument("--lose", default="1",
                        help="comma-separated numbers of nodes killed at once (1 or 2 of 3)")
    parser.add_argument("--shard", action="store_true",
                        help="the node-kill job keeps parameters and optimizer state sharded "
                             "(ZeRO-3): a lost node is decoded from parity, not read from a "
                             "replica")
    parser.add_argument("--no-step-time", action="store_true",
                        help="skip the protected vs unprotected step time")
    args = parser.parse_args()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(args.load)]
    try:
        kills = [(float(v), int(n)) for v in args.step_times.split(",") if v  # "": none
                 for n in args.lose.split(",")]
        for step_s, lose in kills:
            took, lost, first = node_kill(args.runs, args.hidden, step_s, lose, args.shard)
            print(json.dumps({"bench": "node_kill_to_first_step_shrunk", "step_s": step_s,
                              "state": "sharded" if args.shard else "data parallel",
                              "lost_nodes": lose, "load": args.load, "runs": len(took),
                              "median_s": round(statistics.median(took), 3),
                              "values_s": [round(v, 3) for v in took],
                              "steps_lost_median": statistics.median(lost), "steps_lost": lost,
                              "first_protected_median_s": round(statistics.median(first), 3),
                              "first_protected_s": [round(v, 3) for v in first],
                              "first_protected_steps_median": round(
                                  statistics.median(first) / step_s, 1) if step_s else None,
                              "goal_s": 4.0, "goal_steps_lost": 1,
                              "loadavg": [round(v, 1) for v in os.getloadavg()]}), flush=True)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    if args.no_step_time:
        return
    times = step_time(args.runs, args.hidden, args.steps)
    off, on = statistics.median(times["off"]), statistics.median(times["2+1"])
    print(json.dumps({"bench": "step_time_protected", "hidden": args.hidden,
                      "steps": args.steps, "runs": len(times["2+1"]),
                      "unprotected_s": round(off, 5), "protected_2p1_s": round(on, 5),
                      "inflation_pct": round(100 * (on / off - 1), 2),
                      "goal_pct": 5,
                      "loadavg": [round(v, 1) for v in os.getloadavg()]}), flush=True)


if __name__ == "__main__":
    main()
