"""How many agents one controller handles: a real controller process and a real redis-server
against N simulated agents speaking the real gRPC protocol (``tests/simagents.py``, all on one
asyncio loop in this process). JSON lines on stdout, one per N:

    python tests/bench/bench_scale.py --agents 100,500,1000,2000 [--window 20]

For each N, in this order:
1. registration: all N agents dial in (256 at a time); seconds until every one is registered;
2. submit -> all ranks launched: a job of N nodes x ``--slots`` ranks; seconds from SubmitJob
   until the last agent received its Launch;
3. steady state for ``--window`` seconds with the job running: heartbeat latency (send -> ack)
   p50/p99, heartbeats never acknowledged, controller CPU (fraction of one core) and RSS,
   Redis commands/s, nodes wrongly declared lost, protection pieces built per second (the
   job is protected by default: parity holders report the pieces of each round the controller
   names, ``--protect-build-s`` after it);
4. node loss: ``--lose`` agents stop heartbeating (their streams stay open); detection = the
   controller's ``node_lost`` event time minus the agent's last heartbeat, p50/p99; and the
   time until the job's next attempt was launched on every surviving node.
A run "breaks" when registration or launch misses its deadline, heartbeats go unacknowledged,
or a talking node is declared lost; the line says which (``broke``).

The load generator shares the machine with the controller (and, today, with other people's
work): its own CPU use is reported (``simulator_cpu``) so a saturated generator is visible.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import redis  # noqa: E402

from hpt._proto import common_pb2, jobs_pb2, jobs_pb2_grpc  # noqa: E402
from tests.redis_fixture import start_redis, stop_redis  # noqa: E402
from tests.simagents import Fleet, FleetConfig, percentile  # noqa: E402

_TICKS = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


class _Controller:
    def __init__(self, workdir: Path, redis_url: str, period_s: float, src: str = "") -> None:
        self.port = _free_port()
        self.log_path = workdir / f"controller-{self.port}.log"
        env = dict(os.environ)
        if src:  # another version of hpt (an importable tree: hpt/ with hpt/controller/ ...)
            env["PYTHONPATH"] = src
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hpt.cli", "controller", "--port", str(self.port),
                 "--redis-url", redis_url, "--heartbeat-period", str(period_s)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=src or ROOT, env=env, start_new_session=True)
        self.target = f"127.0.0.1:{self.port}"

    async def wait_serving(self, deadline_s: float) -> None:
        end = time.monotonic() + deadline_s
        async with grpc.aio.insecure_channel(self.target) as ch:
            stub = jobs_pb2_grpc.JobServiceStub(ch)
            while time.monotonic() < end:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"controller exited: {self.log_path.read_text()[-2000:]}")
                try:
                    await stub.ListNodes(jobs_pb2.ListNodesRequest(), timeout=1.0)
                    return
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.1)
        raise TimeoutError(f"controller not serving after {deadline_s} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)


async def _watch_events(stub: jobs_pb2_grpc.JobServiceStub, sink: list) -> None:  # type: ignore[type-arg]
    try:
        async for ev in stub.StreamEvents(jobs_pb2.StreamEventsRequest(follow=True)):
            sink.append(ev)
    except (grpc.aio.AioRpcError, asyncio.CancelledError):
        pass


def _py_spy(pid: int, seconds: float, out: str) -> subprocess.Popen[bytes]:
    """A sampling profile of ``pid`` for ``seconds`` into ``out`` (py-spy's raw format)."""
    return subprocess.Popen(
        ["py-spy", "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "50", "-f", "raw",
         "-o", out, "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _timing(args: argparse.Namespace, baseline: bool) -> str:
    """The wire form of the timing the fleet sends: a baseline controller gets records, or the
    unpacked columns with ``--baseline-columns``; this tree packed columns unless told."""
    if args.records or (baseline and not args.baseline_columns):
        return "records"
    if baseline or args.unpacked:
        return "columns"
    return "packed columns"


async def run_one(n: int, args: argparse.Namespace, workdir: Path,
                  baseline: bool = False) -> dict[str, object]:
    out: dict[str, object] = {"bench": "controller_scale", "agents": n, "ranks": n * args.slots,
                              "heartbeat_period_s": args.period, "broke": "",
                              "controller": "baseline" if baseline else "this tree",
                              "timing": _timing(args, baseline)}
    redis_url, redis_proc = start_redis(workdir)
    ctl = _Controller(workdir, redis_url, args.period, args.baseline_src if baseline else "")
    rclient = redis.Redis.from_url(redis_url)
    events: list = []  # type: ignore[type-arg]
    try:
        await ctl.wait_serving(60)
        channel = grpc.aio.insecure_channel(ctl.target)
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        watcher = asyncio.create_task(_watch_events(stub, events))
        cfg = FleetConfig(target=ctl.target, num_agents=n, slots=args.slots,
                          steps_per_s=args.steps_per_s,
                          collectives_per_step=args.collectives_per_step,
                          columns=_timing(args, baseline) != "records",
                          packed=_timing(args, baseline) == "packed columns",
                          protect_build_s=args.protect_build_s,
                          replicated=args.replicated,
                          **({"split": ""} if args.no_split else
                             {"split": args.split} if args.split else {}))
        sim_cpu0 = time.process_time()
        async with Fleet(cfg) as fleet:
            t0 = time.monotonic()
            registered = await fleet.wait_registered(args.deadline)
            out["registered"] = registered
            out["register_all_s"] = round(time.monotonic() - t0, 3)
            if registered < n:
                out["broke"] = f"registration: {registered}/{n} in {args.deadline} s; " \
                               f"{fleet.errors()[:3]}"
                return out
            # 2. submit -> every node got its Launch
            spec = common_pb2.JobSpec(name="scale", command=["python", "-c", "pass"], nodes=n,
                                      procs_per_node=args.slots, min_nodes=max(1, n - args.lose),
                                      max_restarts=3)
            launch_spy = _py_spy(ctl.proc.pid, 10, f"{args.py_spy}-launch-{n}.txt") \
                if args.py_spy and not baseline else None
            submitted = time.time()
            resp = await stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec), timeout=60)
            job_id = resp.job_id
            end = time.monotonic() + args.deadline
            while len(fleet.launches(job_id, 1)) < n and time.monotonic() < end:
                await asyncio.sleep(0.02)
            launched = fleet.launches(job_id, 1)
            if launch_spy is not None:
                launch_spy.wait(timeout=60)
            out["submit_to_all_launched_s"] = round(max(launched) - submitted, 3) \
                if len(launched) == n else None
            if len(launched) < n:
                out["broke"] = f"launch: {len(launched)}/{n} agents got a Launch"
                return out
            # 3. steady state
            await asyncio.sleep(min(5.0, args.window / 4))  # first-step burst settles
            fleet.latencies.clear()
            recs0, pieces0 = fleet.num_records, fleet.num_pieces_built
            cpu0, ops0 = _cpu_s(ctl.proc.pid), rclient.info("stats")["total_commands_processed"]
            sim0, w0 = time.process_time(), time.monotonic()
            lost_before = sum(1 for e in events if e.kind == "node_lost")
            spy = None
            if args.py_spy:  # a sampling profile of the controller over the window
                spy = _py_spy(ctl.proc.pid, args.window,
                              f"{args.py_spy}-{'base-' if baseline else ''}{n}.txt")
            await asyncio.sleep(args.window)
            if spy is not None:
                spy.wait(timeout=60)
            wall = time.monotonic() - w0
            lat = fleet.latencies[:]
            out.update(
                heartbeats=len(lat),
                heartbeat_p50_s=round(percentile(lat, 0.5), 4),
                heartbeat_p99_s=round(percentile(lat, 0.99), 4),
                heartbeat_max_s=round(max(lat), 4) if lat else None,
                unacked_beats=sum(a.unacked(2 * args.period) for a in fleet.agents),
                controller_cpu=round((_cpu_s(ctl.proc.pid) - cpu0) / wall, 3),
                controller_rss_mib=round(_rss_bytes(ctl.proc.pid) / 2**20, 1),
                controller_threads=_threads(ctl.proc.pid),
                redis_ops_per_s=round(
                    (rclient.info("stats")["total_commands_processed"] - ops0) / wall, 1),
                timing_records_per_s=round((fleet.num_records - recs0) / wall, 1),
                protection_pieces_built_per_s=round(
                    (fleet.num_pieces_built - pieces0) / wall, 1),
                simulator_cpu=round((time.process_time() - sim0) / wall, 3),
            )
            acked = len(lat)
            out["controller_cpu_ms_per_heartbeat"] = round(
                1000 * out["controller_cpu"] * wall / acked, 3) if acked else None  # type: ignore[operator]
            out["controller_rss_kib_per_agent"] = round(
                _rss_bytes(ctl.proc.pid) / 1024 / n, 1)
            false_lost = sum(1 for e in events if e.kind == "node_lost") - lost_before
            if false_lost:
                out["broke"] = f"{false_lost} talking node(s) declared lost"
            elif out["unacked_beats"]:
                out["broke"] = f"{out['unacked_beats']} heartbeats unacknowledged"
            # 4. node loss
            victims = fleet.agents[-args.lose:] if args.lose else []
            for agent in victims:
                agent.silence()
            names = {a.name: a for a in victims}
            end = time.monotonic() + max(30.0, 10 * args.period)
            detect: dict[str, float] = {}
            while len(detect) < len(victims) and time.monotonic() < end:
                for e in events:
                    if e.kind == "node_lost" and e.node in names and e.node not in detect:
                        detect[e.node] = e.at - names[e.node].silenced_at
                await asyncio.sleep(0.05)
            d = list(detect.values())
            out.update(lost=len(victims), detected=len(d),
                       detection_p50_s=round(percentile(d, 0.5), 3) if d else None,
                       detection_p99_s=round(percentile(d, 0.99), 3) if d else None)
            if victims:
                end = time.monotonic() + args.deadline
                survivors = n - len(victims)
                while len(fleet.launches(job_id, 2)) < survivors and time.monotonic() < end:
                    await asyncio.sleep(0.05)
                relaunched = fleet.launches(job_id, 2)
                first_lost = min((e.at for e in events if e.kind == "node_lost"
                                  and e.node in names), default=None)
                out["node_lost_to_relaunched_s"] = round(max(relaunched) - first_lost, 3) \
                    if len(relaunched) >= survivors and first_lost else None
                end = time.monotonic() + 10  # (the event may trail the launches)
                while not any(e.kind == "restore_source" for e in events) \
                        and time.monotonic() < end:
                    await asyncio.sleep(0.05)
                out["restore_source"] = next((e.message[:160] for e in events
                                              if e.kind == "restore_source"), None)
                sizes = sorted(fleet.launch_bytes(job_id, 2))
                if sizes:  # each carries its node's share of the old layout (a resize)
                    out.update(relaunch_bytes_p50=sizes[len(sizes) // 2],
                               relaunch_bytes_max=sizes[-1], relaunch_bytes_total=sum(sizes))
            out["agent_errors"] = fleet.errors()[:3]
            out["simulator_cpu_total_s"] = round(time.process_time() - sim_cpu0, 1)
        watcher.cancel()
        await channel.close()
        return out
    finally:
        if ctl.proc.poll() is not None and not out.get("broke"):
            out["broke"] = f"controller exited {ctl.proc.returncode}"
        if out.get("broke"):  # what the controller said (its log goes with the temporary dir)
            lines = ctl.log_path.read_text(errors="replace").splitlines()
            out["controller_log"] = [ln[:300] for ln in lines if "WARNING" in ln
                                     or "ERROR" in ln or "CRITICAL" in ln][:15]
        ctl.stop()
        rclient.close()
        stop_redis(redis_proc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--agents", default="100,500,1000", help="comma-separated N values")
    p.add_argument("--slots", type=int, default=8, help="ranks per node")
    p.add_argument("--period", type=float, default=0.5, help="heartbeat period, seconds")
    p.add_argument("--window", type=float, default=20.0, help="steady-state window, seconds")
    p.add_argument("--deadline", type=float, default=60.0, help="per-phase deadline, seconds")
    p.add_argument("--lose", type=int, default=5, help="agents silenced in the loss phase")
    p.add_argument("--steps-per-s", type=float, default=1.0)
    p.add_argument("--collectives-per-step", type=int, default=2)
    p.add_argument("--protect-build-s", type=float, default=0.05,
                   help="seconds a simulated parity holder takes per round's piece (0: the "
                        "fleet reports no pieces, no protection round completes)")
    p.add_argument("--py-spy", default="", metavar="PREFIX",
                   help="profile the controller with py-spy over the window into PREFIX-N.txt "
                        "and over the 10 s after the submit into PREFIX-launch-N.txt")
    p.add_argument("--replicated", action="store_true",
                   help="the ranks report data-parallel snapshots (DDP); default: sharded")
    p.add_argument("--no-split", action="store_true",
                   help="sharded ranks report no even split (state cut some other way): a "
                   "resize names every old rank")
    p.add_argument("--split", default="", metavar="TEXT",
                   help="the split sharded ranks report (default: the fleet's FSDP one; "
                   "'floor/8:30000' for HSDP within each node of 8)")
    p.add_argument("--stop-on-break", action="store_true", default=True)
    p.add_argument("--records", action="store_true",
                   help="agents send one message per timing record (the pre-summary wire form)")
    p.add_argument("--unpacked", action="store_true",
                   help="agents send timing columns in the repeated fields, not packed")
    p.add_argument("--baseline-columns", action="store_true",
                   help="the baseline controller gets (unpacked) timing columns, not records")
    p.add_argument("--baseline-src", default="", metavar="DIR",
                   help="also measure, before each N, the controller of another hpt tree "
                   "(DIR/hpt with controller/, agent/, ckpt/, monitor/ copied under it), fed "
                   "per-record timing; its line says controller=baseline")
    args = p.parse_args()
    baseline_broke = False
    with tempfile.TemporaryDirectory(prefix="hpt-scale-") as tmp:
        for n in [int(x) for x in args.agents.split(",")]:
            if args.baseline_src and not baseline_broke:
                result = asyncio.run(run_one(n, args, Path(tmp), baseline=True))
                print(json.dumps(result), flush=True)
                baseline_broke = bool(result["broke"])
            result = asyncio.run(run_one(n, args, Path(tmp)))
            print(json.dumps(result), flush=True)
            if result["broke"] and args.stop_on_break:
                break


if __name__ == "__main__":
    main()
