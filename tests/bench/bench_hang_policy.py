"""Hang policy figures on a real local cluster (JSON lines on stdout).

    python tests/bench/bench_hang_policy.py [--runs 3] [--hang-timeout 3]

- ``sigstop``: a rank of a 2x2 job (warm interpreters, ``--hang-timeout H``) is SIGSTOPped;
  seconds from the SIGSTOP to every rank of the next attempt running, and to its first step.
  The goal is <= 1 s beyond H; ``beyond_deadline_s`` is that margin. Before this change the
  hung rank got SIGTERM and the job's 5 s grace before SIGKILL.
- ``eval_section``: the same job with an evaluation of 3 x H seconds and no step, inside
  ``hpt.section("eval", timeout=10 x H)``: restarts per run (goal 0). Baseline in the same run:
  the same evaluation outside a section, restarts (or failure) per run: what every evaluation
  longer than the hang deadline did before sections existed.
Every figure is the median of ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from hpt._proto import common_pb2 as pb  # noqa: E402
from tests.integration.cluster import BIN, TRAIN, LocalCluster, state_name, wait_for  # noqa: E402

LONG = ["python", TRAIN, "--steps", "100000", "--step-time", "0.05"]
EVAL = ["python", str(BIN / "eval_train.py"), "--steps", "20", "--eval-at", "5"]


def emit(name: str, values: list[float], **extra: object) -> float:
    med = statistics.median(values)
    print(json.dumps({"bench": name, "median": round(med, 3), "runs": len(values),
                      "values": [round(v, 3) for v in values], **extra}), flush=True)
    return med


def warm_ready(cluster: LocalCluster) -> bool:
    nodes = [n for n in cluster.client.nodes() if n.state == pb.NODE_STATE_READY]
    return bool(nodes) and all(n.warm_ready >= cluster.slots for n in nodes)


def sigstop(runs: int, hang_timeout: float) -> tuple[list[float], list[float]]:
    running, stepped = [], []
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(Path(tmp), warm=True) as cluster:
        job_id = cluster.submit(*LONG, max_restarts=runs + 1, hang_timeout_s=hang_timeout)
        for attempt in range(1, runs + 1):
            cluster.wait_step(job_id, attempt, 10, timeout_s=180)
            wait_for(lambda: warm_ready(cluster), 180, "warm pools full", poll_s=0.1)
            victim = cluster.job(job_id).attempts[attempt - 1].ranks[1]
            stopped = time.time()
            os.kill(victim.pid, signal.SIGSTOP)

            def next_running(j: pb.Job, a: int = attempt) -> bool:
                return len(j.attempts) > a and all(
                    r.state == pb.RANK_STATE_RUNNING and r.pid > 0 for r in j.attempts[a].ranks)

            wait_for(lambda a=attempt: next_running(cluster.job(job_id), a), 120,
                     "next attempt running", poll_s=0.01)
            running.append(time.time() - stopped)
            job = cluster.wait_job(job_id, lambda j, a=attempt: j.attempts[a].first_step_at > 0,
                                   120, "next attempt steps")
            stepped.append(job.attempts[attempt].first_step_at - stopped)
        cluster.client.cancel(job_id)
        cluster.wait_terminal(job_id)
    return running, stepped


def eval_section(runs: int, hang_timeout: float, in_section: bool) -> list[float]:
    restarts = []
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(Path(tmp), warm=True) as cluster:
        for _ in range(runs):
            args = ["--eval-s", str(3 * hang_timeout)]
            if in_section:
                args += ["--section-timeout", str(10 * hang_timeout)]
            job_id = cluster.submit(*EVAL, *args, hang_timeout_s=hang_timeout, max_restarts=1)
            job = cluster.wait_terminal(job_id, timeout_s=300)
            ok = state_name(job.state) == "SUCCEEDED" and job.restarts == 0
            restarts.append(0.0 if ok else float(max(1, job.restarts)))
    return restarts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--hang-timeout", type=float, default=3.0)
    args = parser.parse_args()
    h = args.hang_timeout
    load = os.getloadavg()[0]
    running, stepped = sigstop(args.runs, h)
    med = emit("sigstop_to_next_attempt_running_s", running, hang_timeout_s=h, load1=load)
    print(json.dumps({"bench": "sigstop_beyond_deadline_s", "median": round(med - h, 3),
                      "goal": "<= 1.0"}), flush=True)
    emit("sigstop_to_next_attempt_first_step_s", stepped, hang_timeout_s=h)
    emit("eval_section_3x_hang_timeout_restarts", eval_section(args.runs, h, True),
         hang_timeout_s=h, eval_s=3 * h)
    emit("baseline_eval_without_section_restarts", eval_section(args.runs, h, False),
         hang_timeout_s=h, eval_s=3 * h)


if __name__ == "__main__":
    main()
