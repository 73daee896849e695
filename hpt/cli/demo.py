"""``hptctl demo``: start a local cluster, run a job, kill a rank, and show the recovery.

The cluster is ``hptctl up`` in a child process (its own session, its output in a log file); the
job is ``python <script> --steps N`` on ``nodes x procs`` ranks. Once every rank of attempt 1 has
reached ``kill_at`` the demo SIGKILLs rank 1 (the ranks run on this machine), then follows the job
to its end and prints what hpt recorded: the fault, when it was detected, how long until training
stepped again, and the job's events.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from hpt import client as hc
from hpt._proto import common_pb2
from hpt.cli import boot
from hpt.cli.common import CliError, rpc_error
from hpt.cli.local import LocalCluster
from hpt.cli.render import (
    cell,
    clock,
    console,
    duration,
    event_line,
    fault_what,
    fault_where,
    table,
)

JOB_TIMEOUT_S = 600.0
"""The demo job is cancelled when it has not ended after this long."""
WARM_WAIT_S = 60.0
_REFRESH_S = 0.2
_PLAIN_PROGRESS_S = 1.0


@dataclass(frozen=True, slots=True)
class _Kill:
    rank: int
    node: str
    pid: int
    step: int
    at: float
    """Wall clock, to compare with the controller's timestamps (same machine)."""


def find_script(script: str) -> str | None:
    """The training script as an absolute path: as given, else relative to the repository."""
    path = Path(script)
    if path.is_file():
        return str(path.resolve())
    if not path.is_absolute():
        in_repo = Path(__file__).resolve().parents[2] / path
        if in_repo.is_file():
            return str(in_repo)
    return None


def run(
    *, steps: int, kill_at: int, num_agents: int, nodes: int, procs: int, script: str, keep: bool
) -> None:
    """Run the demo; returns iff the job SUCCEEDED after at least one restart.

    Raises:
        CliError: the cluster did not come up, an RPC failed, or the job did not recover.
    """
    out = console()
    cluster = LocalCluster(prefix="hpt-demo-", agents=num_agents, slots=procs)
    restore = boot.install_stop_handlers(_interrupt)
    ok = False
    try:
        cluster.start()
        _say(out, f"local cluster: controller on {cluster.addr}, {num_agents} agents "
                  f"(log: {cluster.log_path})")
        with cluster.connect() as client:
            cluster.wait_ready(client)
            _wait_warm(client, procs)
            command = [sys.executable, script, "--steps", str(steps)]
            start = time.monotonic()
            job_id = client.submit(
                command=command,
                nodes=nodes,
                procs_per_node=procs,
                max_restarts=3,
                name="demo",
                workdir=os.getcwd(),
            )
            _say(
                out,
                f"submitted job {job_id}: {nodes} nodes x {procs} procs running "
                f"python {script} --steps {steps}",
            )
            kill = _watch(client, job_id, kill_at, out, start, procs)
            ok = _summary(client, job_id, kill, out, time.monotonic() - start)
    except grpc.RpcError as e:
        raise rpc_error(e, cluster.addr) from None
    finally:
        with boot.signals_ignored():
            if keep and cluster.proc is not None and cluster.proc.poll() is None:
                _say(
                    out,
                    f"the cluster keeps running: export HPT_CONTROLLER={cluster.addr} "
                    f"HPT_TOKEN_FILE={cluster.token_file}; stop it with: kill {cluster.proc.pid}",
                )
            else:
                _say(out, "stopping the local cluster")
                cluster.stop()
        restore()
    if not ok:
        raise CliError(f"the job did not recover as expected; cluster log: {cluster.log_path}")
    if not keep:
        cluster.remove()


def _interrupt(signum: int) -> None:
    # SIGTERM as well as SIGINT unwinds through the cleanup in ``run``.
    raise KeyboardInterrupt


def _say(out: Console, message: str) -> None:
    out.print(Text(message))


def _maybe_kill(d: dict[str, Any], kill_at: int) -> _Kill | None:
    """SIGKILL rank 1 once every rank of attempt 1 runs and has reached ``kill_at``."""
    ranks = d["ranks"]
    if d["attempt"] != 1 or not ranks or len(ranks) < d["world_size"]:
        return None
    if any(r["state"] != "RUNNING" or (r["step"] or 0) < kill_at for r in ranks):
        return None
    target = next((r for r in ranks if r["rank"] == 1), None)
    if target is None or not target["pid"] or target["pid"] in (1, os.getpid()):
        return None
    try:
        os.kill(target["pid"], signal.SIGKILL)
    except ProcessLookupError:
        return None
    return _Kill(
        rank=1, node=target["node"], pid=target["pid"], step=target["step"], at=time.time()
    )


def _wait_warm(client: hc.JobClient, procs: int) -> None:
    """Give the agents' warm interpreters (torch imported) up to WARM_WAIT_S to come up before
    the job starts: a freshly started node is busy importing torch."""
    deadline = time.monotonic() + WARM_WAIT_S
    pause = threading.Event()
    while not _warm(client, procs) and time.monotonic() < deadline:
        pause.wait(_REFRESH_S)


def _warm(client: hc.JobClient, procs: int) -> bool:
    """Every agent has its warm interpreters (torch imported) ready for the restart."""
    nodes = [n for n in client.nodes() if n.state == common_pb2.NODE_STATE_READY]
    return bool(nodes) and all(n.warm_ready >= procs for n in nodes)


def _watch(
    client: hc.JobClient, job_id: str, kill_at: int, out: Console, start: float, procs: int
) -> _Kill | None:
    """Follow the job at ~5 Hz until it is terminal, killing rank 1 once; returns the kill.

    The kill comes at ``kill_at`` steps of the job, counted from its start as the flag says;
    the message says whether the agents' warm interpreters (refilled during the job's first
    seconds) are ready for the restart, or it will start cold.
    """
    live_view = sys.stdout.isatty()
    plain = _PlainProgress(out)
    kill: _Kill | None = None
    pause = threading.Event()
    live = Live(console=out, refresh_per_second=5) if live_view else contextlib.nullcontext()
    with live:
        while True:
            d = hc.job_to_dict(client.get(job_id), detail=True)
            elapsed = time.monotonic() - start
            if kill is None and (kill := _maybe_kill(d, kill_at)) is not None:
                how = ("warm interpreters ready" if _warm(client, procs)
                       else "warm interpreters still refilling: the restart starts cold")
                _say(
                    out,
                    f"killed rank {kill.rank} (pid {kill.pid} on {kill.node}) with SIGKILL "
                    f"at step {kill.step} ({how})",
                )
            if isinstance(live, Live):
                live.update(_render(d, elapsed, kill))
            else:
                plain.update(d, elapsed)
            if d["state"] in hc.TERMINAL_JOB_STATES:
                return kill
            if elapsed > JOB_TIMEOUT_S:
                client.cancel(job_id)
                raise CliError(f"job {job_id} did not end within {JOB_TIMEOUT_S:.0f} s; cancelled")
            pause.wait(_REFRESH_S)


def _render(d: dict[str, Any], elapsed: float, kill: _Kill | None) -> Group:
    head = Text.assemble(
        ("job ", "dim"),
        (d["id"], "bold"),
        "  ",
        (d["state"], "bold green" if d["state"] in ("RUNNING", "SUCCEEDED") else "bold yellow"),
        f"  attempt {d['attempt']}  restarts {d['restarts']}  elapsed {elapsed:.1f} s",
    )
    ranks = table("RANK", "NODE", "PID", "STATE", "STEP")
    for r in d["ranks"]:
        ranks.add_row(*map(cell, (r["rank"], r["node"], r["pid"], r["state"], r["step"])))
    parts: list[Any] = [head, ranks]
    if kill is not None:
        parts.append(Text(f"killed rank {kill.rank} (pid {kill.pid}) at step {kill.step}", "red"))
    return Group(*parts)


def _step(rank: dict[str, Any]) -> str:
    return "-" if rank["step"] is None else str(rank["step"])


class _PlainProgress:
    """Progress lines for a pipe or a file: on every change of state, at most 1/s for steps."""

    def __init__(self, out: Console) -> None:
        self._out = out
        self._key: tuple[Any, ...] | None = None
        self._steps = ""
        self._printed_at = -_PLAIN_PROGRESS_S

    def update(self, d: dict[str, Any], elapsed: float) -> None:
        key = (d["state"], d["attempt"], d["restarts"], tuple(r["state"] for r in d["ranks"]))
        steps = " ".join(
            f"r{r['rank']}:{_step(r) if r['state'] == 'RUNNING' else r['state'].lower()}"
            for r in d["ranks"]
        )
        due = steps != self._steps and elapsed - self._printed_at >= _PLAIN_PROGRESS_S
        if key == self._key and not due:
            return
        self._key, self._steps, self._printed_at = key, steps, elapsed
        _say(
            self._out,
            f"{elapsed:6.1f} s  {d['state']:<10} attempt {d['attempt']}  "
            f"restarts {d['restarts']}  {steps}",
        )


def _summary(
    client: hc.JobClient, job_id: str, kill: _Kill | None, out: Console, total_s: float
) -> bool:
    """Print what happened; True iff the job SUCCEEDED after at least one restart."""
    d = hc.job_to_dict(client.get(job_id), detail=True)
    attempts = d["attempts"]
    out.print()
    _say(
        out,
        f"result: job {job_id} {d['state']} after {len(attempts)} attempt(s), "
        f"{d['restarts']} restart(s){': ' + d['reason'] if d['reason'] else ''}",
    )
    if kill is None:
        _say(
            out,
            "no rank was killed (the job ended or restarted before every rank reached --kill-at)",
        )
    else:
        _say(
            out,
            f"injected: SIGKILL to rank {kill.rank} (pid {kill.pid} on {kill.node}) at "
            f"{clock(kill.at)}, step {kill.step}",
        )
    for f in d["faults"]:
        after = ""
        if kill is not None and f["detected_at"] is not None:
            after = f" ({duration(f['detected_at'] - kill.at)} after the kill)"
        _say(
            out,
            f"fault in attempt {f['attempt']}: {fault_what(f)} on {fault_where(f)}, "
            f"detected {clock(f['detected_at'])}{after}",
        )
    if kill is not None:
        nxt = next((a for a in attempts if a["number"] > 1 and a["first_step_at"]), None)
        if nxt is not None:
            _say(
                out,
                f"recovery: attempt {nxt['number']} stepped "
                f"{duration(nxt['first_step_at'] - kill.at)} after the kill",
            )
        else:
            _say(out, "recovery: no later attempt reached a step")
    _say(out, f"total: {duration(total_s)}")
    _say(out, "events:")
    for e in client.events(follow=False, job_id=job_id):
        _say(out, "  " + event_line(hc.event_to_dict(e)))
    return d["state"] == "SUCCEEDED" and d["restarts"] >= 1
