"""``hptctl``: the command line of hpt.

Client commands (``submit``, ``ls``, ``status``, ``describe``, ``logs``, ``cancel``, ``nodes``,
``events``) talk to the controller through :mod:`hpt.client`; daemon commands (``up``,
``controller``, ``agent``) run the control plane in this process; ``demo`` starts a local cluster,
runs a job, kills a rank and shows the recovery (see :mod:`hpt._demo`).

Exit codes: 0 success; 1 failure (an RPC error, or a job that failed while a command waited for
it); 2 usage error (bad flags, or a spec the controller refused as INVALID_ARGUMENT). Errors go to
stderr as one line ``error: ...``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import click
import grpc
from rich.table import Table
from rich.text import Text

from hpt import _cli_cert, credentials
from hpt import client as hc
from hpt._cli_plan import plan as plan_command
from hpt._cli_util import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    age,
    cell,
    clock,
    console,
    duration,
    error_line,
    event_line,
    fault_what,
    fault_where,
    kv_table,
    rpc_error,
    table,
    wait_for_job,
)
from hpt._control_opts import limit_options
from hpt._run import run_command
from hpt.controller.config import DEFAULT_HOST, DEFAULT_PORT
from hpt.jobspec import MAX_NODES, MAX_PROCS_PER_NODE, MAX_RESTARTS

_CANCEL_MARGIN_S = 30.0
"""``cancel`` waits the stop grace plus this long for the job to report CANCELLED."""
_DEFAULT_STOP_GRACE_S = 5.0


_NoArgsIsHelp = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


class _Main(click.Group):
    """The root group: turns every failure into one ``error:`` line and an exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        code = self._run(args, prog_name, complete_var, **extra)
        if standalone_mode:
            sys.exit(code)
        return code

    def _run(self, args, prog_name, complete_var, **extra) -> int:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NoArgsIsHelp as e:  # bare ``hptctl``: show the help, as click 8.1 did
            click.echo(e.format_message())
            return EXIT_OK
        except click.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            error_line(e.format_message() + hint)
            return EXIT_USAGE
        except click.ClickException as e:
            error_line(e.format_message())
            return e.exit_code
        except click.Abort:
            return EXIT_INTERRUPTED
        return rv if isinstance(rv, int) else EXIT_OK


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hpt", prog_name="hptctl", message="%(prog)s %(version)s")
def main() -> None:
    """hpt: run PyTorch jobs on a cluster and keep them alive."""


# --- shared options --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Conn:
    controller: str | None
    token_file: str | None
    tls_ca: str | None

    def open(self) -> hc.JobClient:
        try:
            addr = hc.resolve_controller(self.controller)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="'--controller'") from None
        # flags first, else what `hptctl up` or the user left in the cluster's folder
        files = credentials.found(addr)
        token_file = self.token_file or files.get("token_file", "")
        token = ""
        if token_file:
            try:
                token = hc.read_token_file(token_file)
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint="'--token-file'") from None
        tls = {"tls_ca": self.tls_ca} if self.tls_ca else {
            k: v for k, v in files.items() if k.startswith("tls_")}
        try:
            return hc.JobClient.connect(addr, token=token, **tls)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="'--tls-ca'") from None


def client_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--controller``, ``--token-file`` and ``--tls-ca``, passed on as ``conn``."""

    @click.option(
        "--controller",
        metavar="HOST:PORT",
        help=f"Controller address [default: ${hc.CONTROLLER_ENV} or {hc.DEFAULT_CONTROLLER}].",
    )
    @click.option(
        "--token-file",
        envvar=hc.TOKEN_FILE_ENV,
        type=click.Path(exists=True, dir_okay=False),
        help=f"File holding the bearer token [env: {hc.TOKEN_FILE_ENV}].",
    )
    @click.option(
        "--tls-ca",
        type=click.Path(exists=True, dir_okay=False),
        help="PEM CA of the controller's certificate; enables TLS.",
    )
    @functools.wraps(f)
    def wrapper(
        *args: Any,
        controller: str | None,
        token_file: str | None,
        tls_ca: str | None,
        **kwargs: Any,
    ) -> Any:
        return f(*args, conn=_Conn(controller, token_file, tls_ca), **kwargs)

    return wrapper


output_option = click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="Output format.",
)


@contextlib.contextmanager
def _session(conn: _Conn) -> Iterator[hc.JobClient]:
    """A connected client; RPC errors inside become ``CliError`` with a clear message."""
    client = conn.open()
    try:
        yield client
    except grpc.RpcError as e:
        raise rpc_error(e, client.address) from None
    finally:
        client.close()


def _no_checkpoints(job: Any) -> str:
    """What ``ckpt ls`` says instead of an empty table."""
    state = hc.job_state_name(job.state)
    disk = (f"nothing persisted yet under {job.spec.persist_dir}" if job.spec.persist_dir else
            "none: submit with --persist-dir DIR --persist-every N to keep checkpoints on disk")
    if state in hc.TERMINAL_JOB_STATES:
        return (f"job {job.id} is {state}: its in-memory snapshots were freed when it ended; "
                f"persisted checkpoints: {disk}")
    return f"job {job.id} is {state}: no snapshot yet; persisted checkpoints: {disk}"


def _progress(d: dict[str, Any]) -> str:
    if d["step"] is None:
        return "no step reported yet"
    return f"step {d['step']} (every rank), last reported {age(d['step_at'])}"


def _status_rows(d: dict[str, Any]) -> list[tuple[str, Any]]:
    return [
        ("id", d["id"]),
        ("name", d["name"]),
        ("state", d["state"]),
        ("reason", d["reason"]),
        ("progress", _progress(d)),
        ("attempt", d["attempt"]),
        ("restarts", d["restarts"]),
        ("world size", d["world_size"]),
        ("nodes", d["nodes"]),
        ("created", clock(d["created_at"])),
    ]


def _attempts_table(attempts: list[dict[str, Any]], title: str) -> Table:
    t = table(
        "#", "STATE", "NODES", "WORLD", "STARTED", "FIRST STEP", "ENDED", "CAUSE", title=title
    )
    for a in attempts:
        cause = a["cause"]
        t.add_row(
            *map(cell, (a["number"], a["state"], a["nodes"], a["world_size"])),
            *map(cell, (clock(a["started_at"]), clock(a["first_step_at"]))),
            cell(clock(a["ended_at"])),
            cell(f"{fault_what(cause)} ({fault_where(cause)})" if cause else None),
        )
    return t


def _ranks_table(ranks: list[dict[str, Any]], title: str) -> Table:
    t = table("RANK", "NODE", "PID", "STATE", "STEP", "EXIT", title=title)
    for r in ranks:
        t.add_row(
            *map(cell, (r["rank"], r["node"], r["pid"], r["state"], r["step"])),
            cell(r["exit_reason"]),
        )
    return t


def _faults_table(faults: list[dict[str, Any]], title: str) -> Table:
    t = table("ATTEMPT", "WHAT", "WHERE", "CLASS", "DETECTED", "RECOVERED IN", "STEPS LOST",
              title=title)
    for f in faults:
        t.add_row(
            *map(cell, (f["attempt"], fault_what(f), fault_where(f), f["classification"])),
            cell(clock(f["detected_at"])),
            cell(duration(f["recovery_s"])),
            cell(f.get("steps_lost")),
        )
    return t


def _history_table(history: list[dict[str, Any]], title: str) -> Table:
    t = table("AT", "STATE", "REASON", title=title)
    for h in history:
        t.add_row(*map(cell, (clock(h["at"]), h["state"], h["reason"])))
    return t


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2))


# --- client commands -------------------------------------------------------------------------


def _parse_env(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict:
    env: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} must be KEY=VALUE", ctx, param)
        if not (key[0].isalpha() or key[0] == "_") or not all(c.isalnum() or c == "_" for c in key):
            raise click.BadParameter(f"{key!r} is not a valid variable name", ctx, param)
        if key in env:
            raise click.BadParameter(f"{key!r} is given twice", ctx, param)
        env[key] = value
    return env


def _parse_nodes(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, int | None]:
    """``N`` -> (N, None); ``MIN:MAX`` -> (MAX, MIN) (torchrun's elastic range)."""
    lo, sep, hi = str(value).partition(":")
    try:
        low, high = int(lo), int(hi if sep else lo)
    except ValueError:
        raise click.BadParameter(f"{value!r} must be N or MIN:MAX", ctx, param) from None
    if low < 0 or high < low:
        raise click.BadParameter(f"{value!r} needs 0 <= MIN <= MAX", ctx, param)
    if not 1 <= high <= MAX_NODES:
        raise click.BadParameter(f"{value!r}: nodes must be in 1..{MAX_NODES}", ctx, param)
    return high, (low if sep else None)


@main.command(context_settings={"allow_interspersed_args": False})
@click.option(
    "-n",
    "--nodes",
    "--nnodes",
    "nodes",
    default="1",
    show_default=True,
    callback=_parse_nodes,
    metavar="N|MIN:MAX",
    help=f"Nodes to run on (1..{MAX_NODES}); MIN:MAX shrinks to MIN after faults and grows "
    "back to MAX.",
)
@click.option(
    "-p",
    "--procs-per-node",
    "--nproc-per-node",
    "--nproc_per_node",
    "procs_per_node",
    type=click.IntRange(1, MAX_PROCS_PER_NODE),
    default=1,
    show_default=True,
    help="Ranks per node.",
)
@click.option(
    "--min-nodes",
    type=click.IntRange(min=0),
    default=None,
    help="Fewest nodes to continue on after a fault [default: NODES].",
)
@click.option(
    "--max-restarts",
    type=click.IntRange(min=0, max=MAX_RESTARTS),
    default=3,
    show_default=True,
    help="Restarts after a fault before the job fails.",
)
@click.option(
    "--env",
    "env",
    multiple=True,
    callback=_parse_env,
    metavar="KEY=VALUE",
    help="Environment variable for every rank (repeatable).",
)
@click.option("--name", default="", help="Job name.")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default=None,
    help="Working directory of the ranks [default: current directory].",
)
@click.option(
    "--node-wait",
    type=float,
    default=None,
    help="Seconds to wait for enough nodes [default: 300].",
)
@click.option(
    "--grace",
    type=float,
    default=None,
    help="Seconds between SIGTERM and SIGKILL when stopping ranks [default: 5].",
)
@click.option(
    "--persist-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory the agents persist snapshots to (DCP format + verified manifest).",
)
@click.option(
    "--persist-every",
    type=click.IntRange(min=0),
    default=0,
    help="Persist every Nth complete snapshot (needs --persist-dir) [default: never].",
)
@click.option(
    "--keep-persisted",
    type=click.IntRange(min=0),
    default=0,
    help="Persisted checkpoints kept per rank [default: 3].",
)
@click.option(
    "--straggler-restart-after",
    type=click.IntRange(min=0),
    default=0,
    help="Restart without a straggler's node once it was flagged for N steps [default: 0, "
    "report only].",
)
@click.option(
    "--hang-timeout",
    type=click.FloatRange(min=0, max=7 * 24 * 3600.0),
    default=0.0,
    help="Seconds without progress (a step, a section's end) after which a rank is hung, also "
    "for a script without hpt hooks; before the first step S or the 300 s start-up deadline, "
    "whichever is longer [default: 0, automatic: 10 x the median step, at least 5 s, and only "
    "once the script reports steps].",
)
@click.option(
    "--redundancy",
    default="",
    metavar="K+M",
    help="Protect snapshots across nodes: Reed-Solomon K data + M parity nodes per group, or "
    "'off' [default: M=1, K from the node count; 2 nodes: a mirror].",
)
@click.option("--wait", is_flag=True, help="Follow the job until it ends; exit 0 iff it succeeded.")
@click.argument(
    "command", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- CMD [ARGS]..."
)
@client_options
def submit(
    conn: _Conn,
    nodes: tuple[int, int | None],
    procs_per_node: int,
    min_nodes: int | None,
    max_restarts: int,
    env: dict[str, str],
    name: str,
    workdir: str | None,
    node_wait: float | None,
    grace: float | None,
    persist_dir: str | None,
    persist_every: int,
    keep_persisted: int,
    straggler_restart_after: int,
    hang_timeout: float,
    redundancy: str,
    wait: bool,
    command: tuple[str, ...],
) -> None:
    """Submit a job: NODES x PROCS_PER_NODE ranks each running CMD."""
    max_nodes, range_min = nodes
    if range_min is not None and min_nodes is not None:
        raise click.UsageError("give --nodes MIN:MAX or --min-nodes, not both")
    with _session(conn) as client:
        job_id = client.submit(
            command=command,
            nodes=max_nodes,
            procs_per_node=procs_per_node,
            min_nodes=range_min if range_min is not None else (
                max_nodes if min_nodes is None else min_nodes),
            max_restarts=max_restarts,
            env=env,
            name=name,
            workdir=os.path.abspath(workdir or os.getcwd()),
            node_wait_timeout_s=node_wait,
            stop_grace_s=grace,
            persist_dir=os.path.abspath(persist_dir) if persist_dir else "",
            persist_every=persist_every,
            keep_persisted=keep_persisted,
            straggler_restart_after=straggler_restart_after,
            hang_timeout_s=hang_timeout,
            redundancy=redundancy,
        )
        click.echo(job_id)
        if not wait:
            return
        job = wait_for_job(client, job_id, on_change=_echo_progress)
    d = hc.job_to_dict(job)
    if d["state"] != "SUCCEEDED":
        raise CliError(f"job {job_id} {d['state']}: {d['reason'] or 'no reason given'}")


def _echo_progress(d: dict[str, Any]) -> None:
    reason = f": {d['reason']}" if d["reason"] else ""
    click.echo(
        f"job {d['id']} {d['state']} (attempt {d['attempt']}, restarts {d['restarts']}, "
        f"world size {d['world_size']}){reason}",
        err=True,
    )


@main.command("ls")
@output_option
@client_options
def ls_(conn: _Conn, output: str) -> None:
    """List jobs."""
    with _session(conn) as client:
        jobs = [hc.job_to_dict(j) for j in client.list()]
    if output == "json":
        _echo_json(jobs)
        return
    t = table("ID", "NAME", "STATE", "ATTEMPT", "RESTARTS", "WORLD", "NODES", "AGE", "REASON")
    for d in jobs:
        t.add_row(
            *map(cell, (d["id"], d["name"], d["state"], d["attempt"], d["restarts"])),
            *map(cell, (d["world_size"], d["nodes"], age(d["created_at"]))),
            cell(d["reason"]),
        )
    console().print(t)


@main.command()
@click.argument("job_id", metavar="JOB")
@output_option
@client_options
def status(conn: _Conn, job_id: str, output: str) -> None:
    """Show the state of a job."""
    with _session(conn) as client:
        d = hc.job_to_dict(client.get(job_id))
    if output == "json":
        _echo_json(d)
    else:
        console().print(kv_table(_status_rows(d)))


@main.command()
@click.argument("job_id", metavar="JOB")
@output_option
@client_options
def describe(conn: _Conn, job_id: str, output: str) -> None:
    """Show a job in detail: attempts, ranks, faults and history."""
    with _session(conn) as client:
        d = hc.job_to_dict(client.get(job_id), detail=True)
    if output == "json":
        _echo_json(d)
        return
    out = console()
    spec = d["spec"]
    rows = _status_rows(d) + [
        ("command", " ".join(spec["command"])),
        (
            "requested",
            f"{spec['nodes']} nodes x {spec['procs_per_node']} procs "
            f"(min {spec['min_nodes']} nodes, max {spec['max_restarts']} restarts)",
        ),
        ("workdir", spec["workdir"]),
    ]
    if d["root_cause"]:
        rc = d["root_cause"]
        rows.append(
            ("root cause", f"{fault_what(rc)} ({fault_where(rc)}, {rc['classification'] or '-'})")
        )
    out.print(kv_table(rows, title="Job"))
    sections = (
        ("Attempts", d["attempts"], _attempts_table),
        (f"Ranks (attempt {d['attempt']})", d["ranks"], _ranks_table),
        ("Faults", d["faults"], _faults_table),
        ("History", d["history"], _history_table),
    )
    for title, rows, render in sections:
        out.print()
        out.print(render(rows, title) if rows else Text(f"{title}: none"))


@main.command()
@click.argument("job_id", metavar="JOB")
@click.option("-f", "--follow", is_flag=True, help="Keep streaming new lines.")
@click.option("--rank", type=click.IntRange(min=0), default=None, help="Only this rank.")
@click.option(
    "-o",
    "--output",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Output format: the lines, or one JSON object per line (attempt, rank, stream, text).",
)
@client_options
def logs(conn: _Conn, job_id: str, follow: bool, rank: int | None, output: str) -> None:
    """Print the output of a job's ranks."""
    with _session(conn) as client:
        for line in client.logs(job_id, follow=follow, rank=rank):
            text = line.text.removesuffix("\n")
            if output == "json":
                click.echo(json.dumps({"attempt": line.attempt, "rank": line.rank,
                                       "stream": line.stream, "text": text}))
            else:
                click.echo(text if rank is not None else f"[rank {line.rank}] {text}")


@main.command()
@click.argument("job_id", metavar="JOB")
@click.option(
    "--grace",
    type=float,
    default=0.0,
    help="Seconds between SIGTERM and SIGKILL [default: the job's].",
)
@client_options
def cancel(conn: _Conn, job_id: str, grace: float) -> None:
    """Stop a job and wait until it reports CANCELLED."""
    with _session(conn) as client:
        job = client.cancel(job_id, grace_s=grace)
        grace_s = grace or job.spec.stop_grace_s or _DEFAULT_STOP_GRACE_S
        job = wait_for_job(client, job_id, timeout_s=grace_s + _CANCEL_MARGIN_S)
    state = hc.job_state_name(job.state)
    if state == "CANCELLED":
        click.echo(f"job {job_id} cancelled")
    else:
        click.echo(f"job {job_id} had already ended: {state}", err=True)


@main.group()
def ckpt() -> None:
    """Snapshots and persisted checkpoints."""


@ckpt.command("ls")
@click.argument("job_id", metavar="JOB")
@output_option
@client_options
def ckpt_ls(conn: _Conn, job_id: str, output: str) -> None:
    """List a job's snapshots (memory) and persisted checkpoints (disk), newest first."""
    with _session(conn) as client:
        job = client.get(job_id)
    rows, protection = hc.checkpoints_of(job), hc.protection_of(job)
    if output == "json":
        _echo_json(rows)
        return
    if not rows:
        click.echo(_no_checkpoints(job))
        return
    t = table("STEP", "TIER", "SIZE", "STATE")
    for d in rows:
        size = f"{d['size_bytes'] / 2**20:.1f} MiB" if d["size_bytes"] else "-"
        t.add_row(*map(cell, (d["step"], d["tier"], size, d["state"])))
    console().print(t)
    if protection:
        p = protection
        ratio = f"{p['memory_ratio']:.2f} x state" if p["memory_ratio"] else "-"
        expected = f" (1 + m/k = {p['expected_ratio']:.2f})" if p["expected_ratio"] else ""
        click.echo(f"protection {p['redundancy']}: per node {p['state_bytes_per_node'] / 2**20:.1f}"
                   f" MiB state + {p['parity_bytes_per_node'] / 2**20:.1f} MiB parity per "
                   f"generation = {ratio}{expected}")


@main.command()
@output_option
@client_options
def nodes(conn: _Conn, output: str) -> None:
    """List the agents (nodes) and their state."""
    with _session(conn) as client:
        listed, store = client.nodes_and_store()
        found = [hc.node_to_dict(n) for n in listed]
    _warn_store_degraded(store)
    if output == "json":
        _echo_json(found)
        return
    t = table("NAME", "STATE", "ADDRESS", "SLOTS", "LAST SEEN", "REASON")
    for n in found:
        t.add_row(
            *map(cell, (n["name"], n["state"], n["address"], n["slots"])),
            cell(age(n["last_seen_at"])),
            cell(n["reason"]),
        )
    console().print(t)


@main.command()
@click.option("-f", "--follow", is_flag=True, help="Keep streaming new events.")
@click.option("--job", "job_id", metavar="JOB", default="", help="Only this job's events.")
@output_option
@client_options
def events(conn: _Conn, follow: bool, job_id: str, output: str) -> None:
    """Show the event log: submissions, launches, faults, restarts."""
    with _session(conn) as client:
        stream = (hc.event_to_dict(e) for e in client.events(follow=follow, job_id=job_id))
        if output == "json":
            for e in stream:
                click.echo(json.dumps(e))
        elif follow:
            for e in stream:
                click.echo(event_line(e))
        else:
            t = table("SEQ", "AT", "KIND", "JOB", "ATTEMPT", "NODE", "RANK", "MESSAGE")
            for e in stream:
                t.add_row(
                    *map(cell, (e["seq"], clock(e["at"]), e["kind"], e["job_id"])),
                    *map(cell, (e["attempt"] or None, e["node"], e["rank"])),
                    cell(e["message"]),
                )
            console().print(t)


# --- daemons ---------------------------------------------------------------------------------


def _warn_store_degraded(store: Any) -> None:
    if store.ByteSize() and not store.up:
        click.echo(f"store: DEGRADED, down since {age(store.down_since or None)}: {store.error} "
                   f"({store.pending_events} event(s) held in the controller's memory)", err=True)


def _token_from(path: str | None, option: str = "'--token-file'") -> str:
    if not path:
        return ""
    try:
        return hc.read_token_file(path)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=option) from None


def _hang_config(min_s: float | None) -> Any:
    if min_s is None:
        return None
    from hpt.monitor.detectors.hang import HangConfig

    try:
        return HangConfig(min_s=min_s)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--hang-min'") from None


def _config_error(e: ValueError) -> CliError:
    return CliError(f"invalid configuration: {e}", EXIT_USAGE)


@main.command()
@click.option(
    "--agents",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Agents (nodes) to start on this machine.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_PORT,
    show_default=True,
    help="Port of the controller; 0 picks a free one.",
)
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to bind.")
@click.option("--redis-url", default="", help="Keep state in Redis [default: in this process].")
@click.option(
    "--token-file",
    type=click.Path(exists=True, dir_okay=False),
    help="Client token to require [default: a new one, written where hptctl finds it].",
)
@click.option(
    "--slots",
    type=click.IntRange(min=1),
    default=None,
    help="Ranks each agent may run [default: CPU count].",
)
def up(
    agents: int, port: int, host: str, redis_url: str, token_file: str | None, slots: int | None
) -> None:
    """Run a controller and AGENTS local agents until Ctrl-C (a cluster on one machine).

    Security is on: the controller requires a client token (hptctl) and a different agent
    token (its agents), both random unless --token-file gives the client's, kept with mode 0600
    in $HPT_HOME/clusters/HOST_PORT while it runs; hptctl finds them there.
    """
    from hpt import _daemons
    from hpt.controller.config import ControllerConfig

    if port == 0:
        port = _daemons.free_port(host if host not in ("", "0.0.0.0", "::") else "127.0.0.1")
    folder = credentials.cluster_dir(_daemons.join_host_port(host, port))
    client_token = _token_from(token_file) if token_file else credentials.new_token()
    agent_token = credentials.new_token()
    try:
        cfg = ControllerConfig(
            host=host, port=port, redis_url=redis_url, token=client_token,
            agent_token=agent_token,
        )
    except ValueError as e:
        raise _config_error(e) from None
    written = [credentials.write_secret(folder / credentials.AGENT_TOKEN, agent_token)]
    if not token_file:
        written.append(credentials.write_secret(folder / credentials.TOKEN, client_token))
        click.echo(f"client token in {written[-1]} (mode 0600; hptctl finds it)")

    def agent_argv(controller_addr: str, i: int) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "hpt.cli",
            "agent",
            "--controller",
            controller_addr,
            "--name",
            _daemons.local_agent_name(controller_addr, i),
            "--token-file",
            str(written[0]),
        ]
        if slots is not None:
            argv += ["--slots", str(slots)]
        return argv

    try:
        _daemons.run_control_plane(cfg, num_agents=agents, agent_argv=agent_argv)
    finally:
        for path in written:
            path.unlink(missing_ok=True)


@main.command()
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to bind.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_PORT,
    show_default=True,
    help="Port to listen on; 0 picks a free one.",
)
@click.option(
    "--redis-url",
    default="",
    envvar="HPT_REDIS_URL",
    help="Keep state in Redis [env: HPT_REDIS_URL, which keeps a password out of argv; "
    "default: in this process].",
)
@click.option(
    "--token-file",
    type=click.Path(exists=True, dir_okay=False),
    help="Require this bearer token on every RPC.",
)
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="PEM certificate.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="PEM private key.")
@click.option(
    "--tls-client-ca",
    type=click.Path(exists=True, dir_okay=False),
    help="PEM CA of client certificates; requires mTLS.",
)
@click.option(
    "--agent-token-file",
    type=click.Path(exists=True, dir_okay=False),
    help="Require this bearer token from agents (needed with --token-file; must differ).",
)
@click.option("--insecure", is_flag=True, help="Allow a non-loopback bind without TLS.")
@click.option(
    "--leader-lease",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Replicas: elect a leader through a lease of this many seconds in Redis [default: off].",
)
@click.option(
    "--health-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Also serve gRPC health alone, in plaintext, on this port (probes) [default: off].",
)
@click.option(
    "--heartbeat-period", type=float, default=None, help="Seconds between agent heartbeats."
)
@click.option(
    "--agent-lease",
    type=float,
    default=None,
    help="Seconds agents keep ranks alive without the controller.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve Prometheus /metrics on --host at this port; 0 picks a free one [default: off].",
)
@click.option(
    "--status-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve the read-only status page on --host at this port [default: off].",
)
@click.option(
    "--grow-after",
    type=click.FloatRange(0, 86400),
    default=None,
    help="Seconds a node must stay free before a shrunk job grows onto it [default: 10].",
)
@limit_options
def controller(
    host: str,
    port: int,
    redis_url: str,
    token_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_client_ca: str | None,
    agent_token_file: str | None,
    insecure: bool,
    leader_lease: float,
    health_port: int | None,
    heartbeat_period: float | None,
    agent_lease: float | None,
    metrics_port: int | None,
    status_port: int | None,
    grow_after: float | None,
    limits: dict[str, Any],
) -> None:
    """Run the controller only (as the Helm chart does)."""
    from hpt import _daemons
    from hpt.controller.config import ControllerConfig

    kwargs: dict[str, Any] = dict(limits)
    if heartbeat_period is not None:
        kwargs["heartbeat_period_s"] = heartbeat_period
    if agent_lease is not None:
        kwargs["agent_lease_s"] = agent_lease
    if metrics_port is not None:
        kwargs["metrics_port"] = metrics_port
    if status_port is not None:
        kwargs["status_port"] = status_port
    if grow_after is not None:
        kwargs["grow_hysteresis_s"] = grow_after
    try:
        cfg = ControllerConfig(
            host=host,
            port=port,
            redis_url=redis_url,
            token=_token_from(token_file),
            tls_cert=tls_cert or "",
            tls_key=tls_key or "",
            tls_client_ca=tls_client_ca or "",
            agent_token=_token_from(agent_token_file, "'--agent-token-file'"),
            insecure=insecure,
            leader_lease_s=leader_lease,
            health_port=health_port,
            **kwargs,
        )
    except ValueError as e:
        raise _config_error(e) from None
    _daemons.run_control_plane(cfg, num_agents=0, agent_argv=None)


@main.command()
@click.option(
    "--controller",
    "controller_addr",
    metavar="HOST:PORT",
    help=f"Controller address [default: ${hc.CONTROLLER_ENV} or {hc.DEFAULT_CONTROLLER}].",
)
@click.option("--name", default=None, help="Node name, unique in the cluster [default: hostname].")
@click.option(
    "--address",
    default=None,
    help="Address other nodes reach this node's ranks on [default: 127.0.0.1].",
)
@click.option(
    "--slots",
    type=click.IntRange(min=1),
    default=None,
    help="Ranks this node may run [default: CPU count].",
)
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Socket, logs and error files [default: a fresh temporary directory].",
)
@click.option(
    "--token-file",
    type=click.Path(exists=True, dir_okay=False),
    help="Agent-role bearer token to present to the controller.",
)
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False), help="PEM CA; enables TLS.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="PEM client cert.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="PEM client key.")
@click.option(
    "--lease",
    type=float,
    default=None,
    help="Kill ranks after losing the controller this long [default: controller's].",
)
@click.option("--no-warm", is_flag=True, help="Do not keep warm (torch imported) processes.")
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve Prometheus /metrics on --address at this port; 0 picks a free one [default: off].",
)
@click.option(
    "--no-health-check", is_flag=True, help="Skip the pre-flight health check at start."
)
@click.option(
    "--hang-min",
    type=click.FloatRange(min=0.1),
    default=None,
    help="A rank without progress this long (or 10x its median step) is hung [default: 5].",
)
@click.option(
    "--peer-port",
    type=click.IntRange(0, 65535),
    default=0,
    help="Port of the peer service (snapshot protection) on --address [default: a free one].",
)
@click.option(
    "--peer-advertise",
    default="",
    metavar="HOST:PORT",
    help="Where other agents reach the peer service [default: --address:--peer-port].",
)
def agent(
    controller_addr: str | None,
    name: str | None,
    address: str | None,
    slots: int | None,
    run_dir: str | None,
    token_file: str | None,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    lease: float | None,
    no_warm: bool,
    metrics_port: int | None,
    no_health_check: bool,
    hang_min: float | None,
    peer_port: int,
    peer_advertise: str,
) -> None:
    """Run a node agent until SIGTERM/SIGINT."""
    from hpt import _daemons
    from hpt.agent.config import AgentConfig

    try:  # replicas: a comma-separated list, tried in turn
        addr = ",".join(hc.resolve_controller(a) for a in (controller_addr or "").split(",")
                        if a.strip()) or hc.resolve_controller(None)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--controller'") from None
    given = {
        "name": name,
        "address": address,
        "slots": slots,
        "lease_s": lease,
        "run_dir": os.path.abspath(run_dir) if run_dir else None,
        "hang": _hang_config(hang_min),
    }
    kwargs = {k: v for k, v in given.items() if v is not None}
    try:
        cfg = AgentConfig(
            controller=addr,
            token=_token_from(token_file),
            tls_ca=tls_ca or "",
            tls_cert=tls_cert or "",
            tls_key=tls_key or "",
            warm_ranks=not no_warm,
            metrics_port=metrics_port,
            health_check=not no_health_check,
            peer_port=peer_port,
            peer_advertise=peer_advertise,
            **kwargs,
        )
    except ValueError as e:
        raise _config_error(e) from None
    _daemons.run_agent(cfg)


@main.command()
@click.option(
    "--steps",
    type=click.IntRange(min=2),
    default=150,
    show_default=True,
    help="Training steps of the demo job (0.1 s each).",
)
@click.option(
    "--kill-at",
    type=click.IntRange(min=1),
    default=60,
    show_default=True,
    help="Kill rank 1 once every rank reached this step of the job (counted from its start; "
    "the agents refill their warm interpreters during the first seconds, an earlier kill "
    "restarts cold).",
)
@click.option(
    "--agents",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Agents (nodes) of the local cluster.",
)
@click.option(
    "--nodes", type=click.IntRange(min=1), default=2, show_default=True, help="Nodes of the job."
)
@click.option(
    "--procs", type=click.IntRange(min=1), default=2, show_default=True, help="Ranks per node."
)
@click.option(
    "--script",
    default="examples/train.py",
    show_default=True,
    help="Training script (run with --steps N).",
)
@click.option("--keep", is_flag=True, help="Leave the local cluster running afterwards.")
def demo(
    steps: int, kill_at: int, agents: int, nodes: int, procs: int, script: str, keep: bool
) -> None:
    """Run a job on a local cluster, kill a rank, and watch hpt recover."""
    from hpt import _demo

    if kill_at >= steps:
        raise click.BadParameter(
            f"({kill_at}) must be < --steps ({steps})", param_hint="'--kill-at'"
        )
    if nodes > agents:
        raise click.BadParameter(
            f"({nodes}) must be <= --agents ({agents})", param_hint="'--nodes'"
        )
    if nodes * procs < 2:
        raise click.UsageError("--nodes x --procs must be >= 2 so that there is a rank 1 to kill")
    script_path = _demo.find_script(script)
    if script_path is None:
        raise click.BadParameter(f"{script!r} does not exist", param_hint="'--script'")
    _demo.run(
        steps=steps,
        kill_at=kill_at,
        num_agents=agents,
        nodes=nodes,
        procs=procs,
        script=script_path,
        keep=keep,
    )


main.add_command(plan_command, "plan")
main.add_command(run_command)
main.add_command(_cli_cert.cert)


if __name__ == "__main__":
    main(prog_name="hptctl")
