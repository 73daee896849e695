"""Recovery figures of the job runner on a real local cluster (JSON lines on stdout).

    python tests/bench/bench_recovery.py [--runs 5]

- rank kill -> first step of the next attempt: hpt with warm interpreters and hpt cold (plain
  spawn); the baseline is torchrun on the same machine and script: its launch -> first step
  (the floor of any torchrun restart), and whether its restart after a rank kill steps at all;
- the same, back to back (the next kill as soon as the restarted job stepped), with warm
  interpreters forked by the agent's fork server and with interpreters of their own, with the
  machine's busy CPU seconds per restart;
- agent kill -> node declared lost, and -> first step on the remaining node;
- job submit -> first step;
- controller kill + restart (Redis store) -> every node re-registered, job untouched.
Every figure is the median of ``--runs`` runs; ratios are against torchrun in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
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
from tests.redis_fixture import start_redis, stop_redis  # noqa: E402

LONG = ["python", TRAIN, "--steps", "100000", "--step-time", "0.05"]


def emit(name: str, values: list[float], **extra: object) -> float:
    med = statistics.median(values)
    print(json.dumps({"bench": name, "median_s": round(med, 3), "runs": len(values),
                      "values_s": [round(v, 3) for v in values], **extra}), flush=True)
    return med


def warm_ready(cluster: LocalCluster) -> bool:
    nodes = [n for n in cluster.client.nodes() if n.state == pb.NODE_STATE_READY]
    return bool(nodes) and all(n.warm_ready >= cluster.slots for n in nodes)


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (not idle or iowait) since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def rank_kill_hpt(runs: int, warm: bool, *, fork_server: bool = True,
                  wait_pools: bool = True, cpu: list[float] | None = None) -> list[float]:
    """Rank kill -> first step of the next attempt, ``runs`` times. ``wait_pools=False`` kills
    again as soon as the previous attempt stepped (back to back: the pool had no time to
    refill unless it forks). ``cpu`` gets the machine's busy CPU seconds per restart."""
    out = []
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(
            Path(tmp), warm=warm, fork_server=fork_server) as cluster:
        job_id = cluster.submit(*LONG, max_restarts=runs + 1)
        cluster.wait_step(job_id, 1, 5)
        if warm:
            wait_for(lambda: warm_ready(cluster), 120, "warm pools full", poll_s=0.1)
        busy = busy_cpu_s()
        for attempt in range(1, runs + 1):
            cluster.wait_step(job_id, attempt, 5 if wait_pools else 1)
            if warm and wait_pools:
                wait_for(lambda: warm_ready(cluster), 120, "warm pools full", poll_s=0.1)
            job = cluster.job(job_id)
            victim = job.attempts[attempt - 1].ranks[1]
            killed = time.time()
            os.kill(victim.pid, signal.SIGKILL)
            job = cluster.wait_job(job_id, lambda j, a=attempt: len(j.attempts) > a
                                   and j.attempts[a].first_step_at > 0, 120, "next attempt steps")
            out.append(job.attempts[attempt].first_step_at - killed)
        if cpu is not None:
            cpu.append((busy_cpu_s() - busy) / runs)
        cluster.client.cancel(job_id)
        cluster.wait_terminal(job_id)
    return out


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        kids.extend(int(k) for k in text)
    return kids


def torchrun_baseline(runs: int) -> tuple[list[float], bool]:
    """torchrun on the same script: launch -> first step (its floor for any restart), and
    whether a restart after a rank kill reaches a first step at all (30 s deadline)."""
    starts, restarted = [], False
    for i in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            marks = Path(tmp) / "first-steps"
            marks.touch()
            launched = time.time()
            proc = subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", "4", "--max-restarts", "1", TRAIN, "--steps", "100000",
                 "--step-time", "0.05", "--first-step-file", str(marks)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )
            try:
                line = wait_for(lambda m=marks: m.read_text().split("\n")[0], 120,
                                "torchrun step")
                starts.append(float(line.split()[1]) - launched)
                if i == 0:
                    victim = sorted(_children(proc.pid))[1]
                    os.kill(victim, signal.SIGKILL)
                    try:
                        wait_for(lambda m=marks: len(m.read_text().split("\n")) > 2, 30,
                                 "torchrun restart stepped")
                        restarted = True
                    except TimeoutError:
                        restarted = False
            finally:
                # torchrun's workers live in sessions of their own: kill them, then torchrun
                for pid in _children(proc.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pid, signal.SIGKILL)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return starts, restarted


def agent_kill(runs: int) -> tuple[list[float], list[float]]:
    lost, stepped = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp, LocalCluster(Path(tmp), warm=True) as cluster:
            job_id = cluster.submit(*LONG, min_nodes=1)
            cluster.wait_step(job_id, 1, 5)
            wait_for(lambda c=cluster: warm_ready(c), 120, "warm pools full", poll_s=0.1)
            killed = time.time()
            cluster.kill_agent("node-1")
            job = cluster.wait_job(job_id, lambda j: len(j.attempts) > 1
                                   and j.attempts[1].first_step_at > 0, 120, "restart stepped")
            node_lost = next(e for e in cluster.events() if e.kind == "node_lost")
            lost.append(node_lost.at - killed)
            stepped.append(job.attempts[1].first_step_at - killed)
            cluster.client.cancel(job_id)
            cluster.wait_terminal(job_id)
    return lost, stepped


def submit_to_first_step(runs: int) -> list[float]:
    out = []
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(Path(tmp), warm=True) as cluster:
        for _ in range(runs):
            wait_for(lambda: warm_ready(cluster), 120, "warm pools full", poll_s=0.1)
            submitted = time.time()
            job_id = cluster.submit("python", TRAIN, "--steps", "3", "--step-time", "0")
            job = cluster.wait_terminal(job_id)
            out.append(job.attempts[0].first_step_at - submitted)
    return out


def controller_restart(runs: int) -> list[float]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        url, redis_proc = start_redis(Path(tmp) / "redis")
        try:
            with LocalCluster(Path(tmp), redis_url=url) as cluster:
                job_id = cluster.submit(*LONG)
                cluster.wait_step(job_id, 1, 3)
                for _ in range(runs):
                    cluster.kill_controller()
                    started = time.time()
                    cluster.start_controller()

                    def reconciled(started: float = started) -> bool:
                        nodes = cluster.client.nodes()
                        return len(nodes) == 2 and all(
                            n.state == pb.NODE_STATE_READY and n.last_seen_at > started
                            for n in nodes)

                    wait_for(reconciled, 60, "nodes re-registered", poll_s=0.02)
                    out.append(time.time() - started)
                    assert len(cluster.job(job_id).attempts) == 1, "restart must not relaunch"
                cluster.client.cancel(job_id)
                cluster.wait_terminal(job_id)
        finally:
            stop_redis(redis_proc)
    return out


def back_to_back(runs: int) -> None:
    """The next kill as soon as the restarted job stepped: the fork server refills the pool in
    milliseconds; interpreters of their own take seconds of CPU each, beside the job."""
    meds = {}
    for fork_server, name in ((True, "fork_server"), (False, "own_interpreters")):
        cpu: list[float] = []
        meds[name] = emit(
            f"rank_kill_to_first_step.back_to_back.{name}",
            rank_kill_hpt(runs, True, fork_server=fork_server, wait_pools=False, cpu=cpu),
            busy_cpu_s_per_restart=round(cpu[0], 2))
    print(json.dumps({"bench": "rank_kill_to_first_step.back_to_back.ratio",
                      "fork_server_vs_own": round(meds["fork_server"] / meds["own_interpreters"],
                                                  3)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", choices=["back_to_back"], default=None,
                        help="run only this part")
    args = parser.parse_args()
    runs = args.runs
    if args.only == "back_to_back":
        back_to_back(runs)
        return
    starts, restarted = torchrun_baseline(max(3, runs // 2))
    base = emit("torchrun_launch_to_first_step", starts, restart_after_rank_kill_ok=restarted)
    warm = emit("rank_kill_to_first_step.hpt_warm", rank_kill_hpt(runs, warm=True))
    cold = emit("rank_kill_to_first_step.hpt_cold", rank_kill_hpt(runs, warm=False))
    print(json.dumps({"bench": "rank_kill_to_first_step.ratio_vs_torchrun_launch",
                      "hpt_warm": round(warm / base, 3), "hpt_cold": round(cold / base, 3)}))
    back_to_back(runs)
    lost, stepped = agent_kill(max(3, runs // 2))
    emit("agent_kill_to_node_lost", lost)
    emit("agent_kill_to_first_step_on_remaining_node", stepped)
    emit("submit_to_first_step.hpt_warm", submit_to_first_step(runs))
    emit("controller_restart_to_reconciled.redis", controller_restart(max(3, runs // 2)))


if __name__ == "__main__":
    main()
