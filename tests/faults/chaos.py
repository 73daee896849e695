"""A seeded chaos run: one training job, one fault after another, in the rank, the agents, the
controller and the store, each injected only once the job recovered from the one before.

What it holds the runner to, fault after fault:

- a fault of the job (a rank killed, a node lost with its agent, a node cut off from the
  controller until it is declared lost) costs exactly one new attempt, which restores a recent
  snapshot from memory or a peer (never step 0, never older than the newest protected step);
- a fault of the runner itself that it is built to ride out (the controller killed and started
  again, the controller paused for less than the agents' lease, Redis killed and started again
  or paused, an agent paused for less than the node lease, an agent's link slowed, a rank
  stopped for a second) costs no attempt at all: a healthy job is never restarted;
- the job ends SUCCEEDED with the SHA-256 of a fault-free run of the same job (the example is
  deterministic, and a node lost is replaced by the spare agent, so the world stays the same);
- nothing is left behind: no rank process, no snapshot memory (``LocalCluster.close``).

``tests/faults/test_chaos.py`` runs one seed with every kind of fault once. Longer soaks::

    .venv/bin/python tests/bench/bench_chaos.py --seeds 1-5 --faults 12 [--shard]

print one JSON line per fault (its kind, the step the job had reached and the newest protected
one, the attempt it left the job in, the step restored, the seconds from injection to the next
step, and how far protection was behind the ranks ``GAP`` steps later), one per seed, and one
per kind of fault at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from hpt._proto import common_pb2
from tests.faults.control_plane import CALM_AGENT_ARGS, ControlPlaneCluster, PersistentRedis, hold
from tests.integration.cluster import TRAIN, final_sha, state_name, wait_for

RESTARTS = {"kill_rank": True, "kill_agent": True, "partition_agent": True,
            "kill_controller": False, "pause_controller": False, "kill_redis": False,
            "pause_redis": False, "pause_agent": False, "slow_link": False, "pause_rank": False}
"""Each kind of fault, and whether it costs the job a new attempt."""
KINDS = tuple(RESTARTS)

STEP_TIME_S = 0.05
FIRST_AT = 20
"""The step the job reaches before the first fault."""
GAP = 30
"""Steps the job makes after recovering from one fault before the next is injected."""
ROOM = 120
"""Steps a fault may take while it is injected and recovered from (a paused controller's
4 s are 80 paced steps)."""
MAX_STEPS_LOST = 3
"""Steps a rank's restart may lose behind the newest step the controller had heard of (its
agent holds the rank's snapshots). A node lost takes its memory with it: the restart restores
the newest step protected across nodes, never an older one."""
CONTROLLER_PAUSE_S = 4.0
"""Less than the agents' lease (10 s): they keep their ranks running and wait."""
AGENT_PAUSE_S = 0.6
"""Less than the node lease (2 s at the 0.5 s heartbeat): the node is not declared lost."""
REDIS_DOWN_S = 2.0
RANK_PAUSE_S = 1.0
"""A rank stopped this long holds the others in their next all-reduce; far below the hang
deadline (the agents run with ``--hang-min 120``: hang detection is tested elsewhere)."""
REDIS_PAUSE_S = 3.0
LINK_DELAY_S = 0.2
"""Each way, on every read of an agent's link to the controller, for ``SLOW_LINK_S``."""
SLOW_LINK_S = 3.0
RECOVERY_TIMEOUT_S = 180.0


@dataclass
class Injected:
    kind: str
    target: str
    at_step: int
    """The newest step every rank of the attempt had reported when the fault was injected."""
    protected_step: int
    """The newest step of the attempt protected across nodes when the fault was injected."""
    attempt_before: int
    attempt_after: int = 0
    restored_step: int = 0
    """The step the new attempt restored (0: the fault cost no attempt)."""
    seconds_to_next_step: float = 0.0
    """From the injection to every rank of the job past the step it was at (or restored)."""
    unprotected_steps_after: int = -1
    """``GAP`` steps after that: how many steps the newest protected one is behind the ranks
    (what a node lost then would lose)."""


def plan(seed: int, count: int) -> list[str]:
    """``count`` faults for ``seed``: every kind once (when ``count`` allows), then random ones,
    in a random order."""
    rng = random.Random(seed)
    if count <= len(KINDS):
        return rng.sample(KINDS, count)
    kinds = [*KINDS, *(rng.choice(KINDS) for _ in range(count - len(KINDS)))]
    rng.shuffle(kinds)
    return kinds


def total_steps(count: int) -> int:
    """Steps the job runs: the first fault's step, room for each fault and the gap after it,
    and a gap to finish (paced while the faults go on, unpaced after the last)."""
    return FIRST_AT + count * (ROOM + GAP) + GAP


def job_argv(steps: int, step_time_s: float = STEP_TIME_S, pace_file: str = "",
             extra: tuple[str, ...] = ()) -> list[str]:
    argv = ["python", TRAIN, "--steps", str(steps), "--step-time", str(step_time_s), *extra]
    return [*argv, "--pace-file", pace_file] if pace_file else argv


class Chaos:
    """Injects faults into ``cluster`` (agents ``node-0`` .. and a controller on ``store``)
    while ``job_id`` runs, and checks after each that the job recovered as it must."""

    def __init__(self, cluster: ControlPlaneCluster, store: PersistentRedis, job_id: str,
                 rng: random.Random, log: Callable[[str], None] = print) -> None:
        self.cluster = cluster
        self.store = store
        self.job_id = job_id
        self.rng = rng
        self.log = log
        self.injected: list[Injected] = []

    # ------------------------------------------------------------------ reading the job

    def job(self) -> common_pb2.Job:
        """The job, waiting out a controller that is starting or a store that is coming back."""
        def read() -> common_pb2.Job | None:
            try:
                return self.cluster.job(self.job_id)
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE,
                                      grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
            ctl = self.cluster.controller
            if ctl is not None and ctl.poll() is not None:  # nobody starts it again: say so now
                raise AssertionError(f"the controller exited ({ctl.returncode}); faults so far: "
                                     f"{[asdict(i) for i in self.injected]}")
            return None
        return wait_for(read, 60, "the controller answers")

    def _running(self, job: common_pb2.Job) -> common_pb2.Attempt:
        if state_name(job.state) in ("SUCCEEDED", "FAILED", "CANCELLED"):
            raise AssertionError(
                f"the job ended {state_name(job.state)} during the chaos run ({job.reason}); "
                f"faults so far: {[asdict(i) for i in self.injected]}")
        return job.attempts[-1]

    @staticmethod
    def _step(attempt: common_pb2.Attempt) -> int:
        """The step every rank of ``attempt`` reached (-1 before they all reported one)."""
        if not attempt.ranks or any(r.pid <= 0 for r in attempt.ranks):
            return -1
        return min(r.step for r in attempt.ranks)

    def wait_step(self, step: int, timeout_s: float = RECOVERY_TIMEOUT_S) -> common_pb2.Job:
        """Wait until every rank of the job's newest attempt is at ``step`` or past it."""
        def reached() -> common_pb2.Job | None:
            job = self.job()
            return job if self._step(self._running(job)) >= step else None
        return wait_for(reached, timeout_s, f"every rank at step {step}", poll_s=0.1)

    def wait_protected(self) -> common_pb2.Job:
        """Wait until the job's newest attempt has a step protected across nodes."""
        def protected() -> common_pb2.Job | None:
            job = self.job()
            return job if self._running(job).protected_steps else None
        return wait_for(protected, RECOVERY_TIMEOUT_S, "a protected step", poll_s=0.1)

    # ------------------------------------------------------------------ the faults

    def run(self, kinds: list[str]) -> list[Injected]:
        job = self.wait_step(FIRST_AT)
        for kind in kinds:
            if kind in ("kill_agent", "partition_agent"):  # a node lost before its first
                # protected step loses every step
                job = self.wait_protected()
            attempt = self._running(job)
            before = Injected(kind=kind, target="", at_step=self._step(attempt),
                              protected_step=max(attempt.protected_steps, default=0),
                              attempt_before=attempt.number)
            started = time.monotonic()
            before.target = getattr(self, f"_{kind}")(attempt)
            job = self._recovered(before, started)
            self.injected.append(before)
            job = self.wait_step(self._step(job.attempts[-1]) + GAP)
            attempt = job.attempts[-1]
            before.unprotected_steps_after = (self._step(attempt)
                                              - max(attempt.protected_steps, default=0))
            self.log(json.dumps({"fault": asdict(before)}))
        return self.injected

    def _recovered(self, inj: Injected, started: float) -> common_pb2.Job:
        """Wait until the job steps again after ``inj``, and check what it cost."""
        if RESTARTS[inj.kind]:
            def restarted() -> common_pb2.Job | None:
                job = self.job()
                attempt = self._running(job)
                return (job if attempt.number > inj.attempt_before
                        and self._step(attempt) > attempt.restore_step else None)
            job = wait_for(restarted, RECOVERY_TIMEOUT_S, f"the job stepping again after {inj.kind}",
                           poll_s=0.1)
            attempt = job.attempts[-1]
            inj.restored_step = attempt.restore_step
        else:
            job = self.wait_step(inj.at_step + 1)
            attempt = job.attempts[-1]
        inj.seconds_to_next_step = round(time.monotonic() - started, 2)
        inj.attempt_after = attempt.number
        want = inj.attempt_before + (1 if RESTARTS[inj.kind] else 0)
        if attempt.number != want:
            causes = [(a.number, a.cause.message) for a in job.attempts]
            raise AssertionError(f"{inj.kind} ({inj.target}) left the job in attempt "
                                 f"{attempt.number}, not {want}: {causes}")
        least = (inj.protected_step if inj.kind in ("kill_agent", "partition_agent")
                 else inj.at_step - MAX_STEPS_LOST)
        if RESTARTS[inj.kind] and not inj.restored_step >= least:
            events = "\n".join(f"  {e.kind} (attempt {e.attempt}): {e.message}"
                               for e in self.cluster.events(self.job_id))
            raise AssertionError(f"{inj.kind} ({inj.target}) at step {inj.at_step} restored "
                                 f"step {inj.restored_step}; the job's events:\n{events}")
        return job

    def _kill_rank(self, attempt: common_pb2.Attempt) -> str:
        victim = self.rng.choice(list(attempt.ranks))
        os.kill(victim.pid, signal.SIGKILL)
        return f"rank {victim.rank} on {victim.node}"

    def _kill_agent(self, attempt: common_pb2.Attempt) -> str:
        """Kill the agent of one of the job's nodes with its ranks (the spare agent takes its
        place), then start it again: it comes back as the spare, its memory swept."""
        node = self.rng.choice(list(attempt.nodes))
        ranks = [r.pid for r in attempt.ranks if r.node == node]
        self.cluster.kill_agent(node)
        for pid in ranks:  # the node is gone: its ranks with it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

        def moved() -> bool:
            return self.job().attempts[-1].number > attempt.number
        wait_for(moved, RECOVERY_TIMEOUT_S, f"a new attempt without {node}", poll_s=0.1)
        self.cluster.start_agent(node)
        names = set(self.cluster.agents)
        wait_for(lambda: names <= {n.name for n in self.cluster.client.nodes()
                                   if n.state == common_pb2.NODE_STATE_READY},
                 RECOVERY_TIMEOUT_S, f"{node} back", poll_s=0.1)
        return node

    def _kill_controller(self, attempt: common_pb2.Attempt) -> str:
        self.cluster.kill_controller()
        self.cluster.start_controller()
        return "controller"

    def _pause_controller(self, attempt: common_pb2.Attempt) -> str:
        assert self.cluster.controller is not None
        self.cluster.pause(self.cluster.controller)
        try:
            hold(CONTROLLER_PAUSE_S)
        finally:
            self.cluster.resume(self.cluster.controller)
        return f"controller for {CONTROLLER_PAUSE_S:g} s"

    def _kill_redis(self, attempt: common_pb2.Attempt) -> str:
        self.store.kill()
        hold(REDIS_DOWN_S)
        self.store.start()
        wait_for(lambda: self.cluster.client.nodes_and_store()[1].up, 60, "the store back",
                 poll_s=0.1)
        return f"redis for {REDIS_DOWN_S:g} s"

    def _partition_agent(self, attempt: common_pb2.Attempt) -> str:
        """Cut a node of the job off from the controller (its agent and ranks run on) until the
        controller declared it lost, then heal the link: the agent must fence its old ranks and
        come back as the spare."""
        node = self.rng.choice(list(attempt.nodes))
        proxy = self.cluster.proxies[node]
        proxy.drop()
        try:
            wait_for(lambda: self.cluster.node_states().get(node) == "LOST", RECOVERY_TIMEOUT_S,
                     f"{node} LOST", poll_s=0.1)
        finally:
            proxy.heal()
        wait_for(lambda: set(self.cluster.node_states().values()) == {"READY"},
                 RECOVERY_TIMEOUT_S, f"{node} back", poll_s=0.1)
        return node

    def _pause_redis(self, attempt: common_pb2.Attempt) -> str:
        assert self.store.proc is not None
        os.kill(self.store.proc.pid, signal.SIGSTOP)
        try:
            hold(REDIS_PAUSE_S)
        finally:
            os.kill(self.store.proc.pid, signal.SIGCONT)
        wait_for(lambda: self.cluster.client.nodes_and_store()[1].up, 60, "the store back",
                 poll_s=0.1)
        return f"redis for {REDIS_PAUSE_S:g} s"

    def _slow_link(self, attempt: common_pb2.Attempt) -> str:
        node = self.rng.choice(list(attempt.nodes))
        proxy = self.cluster.proxies[node]
        proxy.delay(LINK_DELAY_S)
        try:
            hold(SLOW_LINK_S)
        finally:
            proxy.heal()
        return f"{node}'s link +{LINK_DELAY_S:g} s for {SLOW_LINK_S:g} s"

    def _pause_rank(self, attempt: common_pb2.Attempt) -> str:
        victim = self.rng.choice(list(attempt.ranks))
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            hold(RANK_PAUSE_S)
        finally:
            os.kill(victim.pid, signal.SIGCONT)
        return f"rank {victim.rank} for {RANK_PAUSE_S:g} s"

    def _pause_agent(self, attempt: common_pb2.Attempt) -> str:
        node = self.rng.choice(list(attempt.nodes))
        proc = self.cluster.agents[node]
        self.cluster.pause(proc)
        try:
            hold(AGENT_PAUSE_S)
        finally:
            self.cluster.resume(proc)
        return f"{node} for {AGENT_PAUSE_S:g} s"


def start_cluster(workdir: Path, store: PersistentRedis) -> ControlPlaneCluster:
    """Three agents of two slots on ``store``, each linked to the controller through a proxy
    (``proxy.py``): a job of two nodes and its spare."""
    cluster = ControlPlaneCluster(workdir, agents=3, slots=2, redis_url=store.url,
                                  agent_args=CALM_AGENT_ARGS, proxied=True)
    try:
        cluster.start()
    except BaseException:
        cluster.close()
        raise
    return cluster


def reference_sha(cluster: ControlPlaneCluster, steps: int, extra: tuple[str, ...] = ()) -> str:
    """The digest of the job run fault-free (unpaced: pacing is a sleep, not arithmetic)."""
    job_id = cluster.submit(*job_argv(steps, 0.0, extra=extra), nodes=2, procs=2)
    job = cluster.wait_terminal(job_id, 300)
    if state_name(job.state) != "SUCCEEDED":
        raise AssertionError(f"the fault-free run ended {state_name(job.state)}: {job.reason}")
    return final_sha(cluster, job_id)


def soak(cluster: ControlPlaneCluster, store: PersistentRedis, seed: int, count: int,
         reference: str | None = None, log: Callable[[str], None] = print,
         injected: list[Injected] | None = None, extra: tuple[str, ...] = ()) -> dict:
    """One chaos run of ``count`` faults for ``seed`` on ``cluster``; raises AssertionError on
    the first broken promise, returns the run's summary (``injected`` gets each fault).
    ``extra``: options of the example job (``--shard``: state no other node holds, rebuilt
    from parity when a node is lost)."""
    steps = total_steps(count)
    reference = reference or reference_sha(cluster, steps, extra)
    kinds = plan(seed, count)
    pace = cluster.workdir / f"pace-{seed}"
    pace.touch()
    job_id = cluster.submit(*job_argv(steps, pace_file=str(pace), extra=extra), nodes=2, procs=2,
                            max_restarts=count + 1)
    chaos = Chaos(cluster, store, job_id, random.Random(seed), log)
    try:
        done = chaos.run(kinds)
    finally:
        pace.unlink()  # the faults are over: the job runs to its end unpaced
        if injected is not None:
            injected.extend(chaos.injected)
    job = cluster.wait_terminal(job_id, 300)
    if state_name(job.state) != "SUCCEEDED":
        raise AssertionError(f"the job ended {state_name(job.state)}: {job.reason}")
    want = 1 + sum(RESTARTS[k] for k in kinds)
    if len(job.attempts) != want:
        raise AssertionError(f"{len(job.attempts)} attempts, not {want}: "
                             f"{[(a.number, a.cause.message) for a in job.attempts]}")
    sha = final_sha(cluster, job_id)
    if sha != reference:
        raise AssertionError(f"final digest {sha} differs from the fault-free run's {reference}")
    lost = {k: max((i.at_step - i.restored_step for i in done if i.kind == k), default=None)
            for k in KINDS if RESTARTS[k]}
    return {"seed": seed, "faults": kinds, "attempts": len(job.attempts),
            "steps_lost_max": lost, "digest_equal": True}


def _seeds(text: str) -> list[int]:
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", text)
    if not m:
        raise argparse.ArgumentTypeError(f"--seeds: {text!r} is not N or N-M")
    first, last = int(m.group(1)), int(m.group(2) or m.group(1))
    return list(range(first, last + 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=_seeds, default=[1], help="N or N-M (default 1)")
    parser.add_argument("--faults", type=int, default=len(KINDS), help="faults per seed")
    parser.add_argument("--shard", action="store_true",
                        help="the example job with its state sharded (ZeRO-3) over the ranks")
    args = parser.parse_args(argv)
    if args.faults < 1:
        parser.error("--faults must be >= 1")
    # stopped from outside: unwind, so that a paused process is resumed and every one reaped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    failed = 0
    injected: list[Injected] = []
    with tempfile.TemporaryDirectory(prefix="hpt-chaos-") as tmp:
        for seed in args.seeds:
            workdir = Path(tmp) / f"seed-{seed}"
            workdir.mkdir()
            store = PersistentRedis(workdir).start()
            try:
                cluster = start_cluster(workdir, store)
                try:
                    print(json.dumps(soak(cluster, store, seed, args.faults, injected=injected,
                                          extra=("--shard",) if args.shard else ())),
                          flush=True)
                except AssertionError as exc:
                    failed += 1
                    print(json.dumps({"seed": seed, "failed": str(exc)}), flush=True)
                    print(cluster.logs(), file=sys.stderr)
                finally:
                    cluster.close()
            finally:
                store.close()
    for line in summary(injected):
        print(json.dumps(line), flush=True)
    return 1 if failed else 0


def summary(injected: list[Injected]) -> list[dict]:
    """Per kind of fault: how many, the median and the slowest seconds from injection to the
    job's next step, how far the newest protected step was behind the ranks ``GAP`` steps
    after (median, most), and for those that restart, the median and the most steps lost
    (behind the step the ranks had reported) and behind the newest protected step."""
    out = []
    for kind in KINDS:
        mine = [i for i in injected if i.kind == kind]
        if not mine:
            continue
        line: dict = {"kind": kind, "n": len(mine),
                      "to_next_step_s_median": round(statistics.median(
                          i.seconds_to_next_step for i in mine), 2),
                      "to_next_step_s_max": max(i.seconds_to_next_step for i in mine),
                      "unprotected_steps_after_median": statistics.median(
                          i.unprotected_steps_after for i in mine),
                      "unprotected_steps_after_max": max(i.unprotected_steps_after
                                                         for i in mine)}
        if RESTARTS[kind]:
            lost = [max(0, i.at_step - i.restored_step) for i in mine]
            line.update(steps_lost_median=statistics.median(lost), steps_lost_max=max(lost),
                        behind_protected_max=max(i.protected_step - i.restored_step
                                                 for i in mine))
        out.append(line)
    return out


if __name__ == "__main__":
    sys.exit(main())
