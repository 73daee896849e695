"""``hptctl run -p 4 -- python train.py``: torchrun's one-liner, with hpt's recovery.

Starts a throw-away local cluster (``hptctl up`` with one agent on a free port, in a temporary
directory), submits the command as a one-node job of ``-p`` ranks, prints the ranks' output
(``[rank N] ...``) and the job's progress as it goes, stops the cluster and exits with the job's
status: 0 when it succeeded, 1 otherwise (the reason on stderr). Ctrl-C cancels the job first.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import click
import grpc

from hpt import client as hc
from hpt.cli import boot
from hpt.cli.common import CliError, parse_env, rpc_error
from hpt.cli.local import LocalCluster

_POLL_S = 0.2
_PROGRESS_EVERY_S = 2.0
_LOG_DRAIN_S = 5.0
"""After the job ends, how long the log printer may take to print what is left."""


def run(*, command: tuple[str, ...], procs: int, max_restarts: int, env: dict[str, str],
        keep_dir: bool) -> None:
    """Run ``command`` as ``procs`` ranks on a local one-node cluster; return iff it succeeded.

    Raises:
        CliError: the cluster did not come up, an RPC failed, or the job did not succeed.
    """
    cluster = LocalCluster(prefix="hpt-run-", agents=1, slots=procs)
    interrupted = threading.Event()
    restore = boot.install_stop_handlers(lambda signum: interrupted.set())
    final: dict[str, Any] | None = None
    job_id = ""
    try:
        cluster.start()
        click.echo(f"hpt: local cluster on {cluster.addr} (log {cluster.log_path})", err=True)
        with cluster.connect() as client:
            cluster.wait_ready(client, stop=interrupted)
            job_id = client.submit(command=list(command), nodes=1, procs_per_node=procs,
                                   max_restarts=max_restarts, env=env, name="run",
                                   workdir=os.getcwd())
            click.echo(f"hpt: job {job_id}: {procs} ranks running {' '.join(command)}", err=True)
            printer = threading.Thread(target=_print_logs, args=(client, job_id),
                                       name="hpt-run-logs", daemon=True)
            printer.start()
            final = _follow(client, job_id, interrupted)
            printer.join(timeout=_LOG_DRAIN_S)
    except grpc.RpcError as e:
        raise rpc_error(e, cluster.addr) from None
    finally:
        with boot.signals_ignored():
            cluster.stop()
        restore()
    if final is None or final["state"] != "SUCCEEDED":
        state = final["state"] if final else "not started"
        reason = (final or {}).get("reason") or "no reason given"
        raise CliError(f"job {job_id or '-'} {state}: {reason}; cluster log: {cluster.log_path}")
    click.echo(f"hpt: job {job_id} SUCCEEDED after {final['restarts']} restart(s)", err=True)
    if not keep_dir:
        cluster.remove()


def _print_logs(client: hc.JobClient, job_id: str) -> None:
    try:
        for line in client.logs(job_id, follow=True):
            click.echo(f"[rank {line.rank}] {line.text}")
    except grpc.RpcError:
        return  # the cluster is going away; the job's status says what happened


def _follow(client: hc.JobClient, job_id: str, interrupted: threading.Event) -> dict[str, Any]:
    """Print state changes and step progress until the job ends; cancel it on Ctrl-C."""
    last_key: tuple[Any, ...] | None = None
    last_progress = 0.0
    cancelled = False
    while True:
        if interrupted.is_set() and not cancelled:
            click.echo(f"hpt: interrupted; cancelling job {job_id}", err=True)
            client.cancel(job_id)
            cancelled = True
        job = client.get(job_id)
        d = hc.job_to_dict(job)
        key = (d["state"], d["attempt"], d["restarts"])
        now = time.monotonic()
        if key != last_key:
            reason = f": {d['reason']}" if d["reason"] else ""
            click.echo(f"hpt: {d['state']} attempt {d['attempt']} restarts {d['restarts']}"
                       f"{reason}", err=True)
            last_key = key
        elif d["state"] == "RUNNING" and now - last_progress >= _PROGRESS_EVERY_S:
            steps = [r.step for a in job.attempts[-1:] for r in a.ranks]
            if steps:
                click.echo(f"hpt: step {min(steps)}..{max(steps)} on {len(steps)} ranks", err=True)
            last_progress = now
        if d["state"] in hc.TERMINAL_JOB_STATES:
            return d
        interrupted.wait(_POLL_S)


@click.command("run", context_settings={"allow_interspersed_args": False})
@click.option("-p", "--procs-per-node", "--nproc-per-node", "--nproc_per_node", "procs",
              type=click.IntRange(min=1), default=1, show_default=True, help="Ranks to run.")
@click.option("--max-restarts", type=click.IntRange(min=0), default=3, show_default=True,
              help="Restarts after a fault before the job fails.")
@click.option("--env", "env", multiple=True, callback=parse_env, metavar="KEY=VALUE",
              help="Environment variable for every rank (repeatable).")
@click.option("--keep-dir", is_flag=True, help="Keep the cluster's log directory on success.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED,
                metavar="-- CMD [ARGS]...")
def run_command(procs: int, max_restarts: int, env: dict[str, str], keep_dir: bool,
                command: tuple[str, ...]) -> None:
    """Run CMD as PROCS ranks on a throw-away local cluster; exit with the job's status."""
    run(command=command, procs=procs, max_restarts=max_restarts, env=env, keep_dir=keep_dir)
