"""``hptctl``'s client commands: ``submit``, ``ls``, ``status``, ``describe``, ``logs``,
``cancel``, ``ckpt ls``, ``nodes`` and ``events``. Each opens a client (:mod:`hpt.client`) from
the connection options, makes its RPCs and renders the answer (:mod:`hpt.cli.render`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import click
from rich.text import Text

from hpt import client as hc
from hpt.cli.common import (
    CliError,
    Conn,
    client_options,
    output_option,
    parse_env,
    session,
    wait_for_job,
)
from hpt.cli.render import (
    age,
    attempts_table,
    cell,
    clock,
    console,
    echo_json,
    event_line,
    fault_what,
    fault_where,
    faults_table,
    history_table,
    kv_table,
    ranks_table,
    status_rows,
    table,
)
from hpt.cli.spec_options import given, spec_help, spec_options
from hpt.jobspec import MAX_NODES

_CANCEL_MARGIN_S = 30.0
"""``cancel`` waits the stop grace plus this long for the job to report CANCELLED."""


def _no_checkpoints(job: Any) -> str:
    """What ``ckpt ls`` says instead of an empty table."""
    state = hc.job_state_name(job.state)
    disk = (f"nothing persisted yet under {job.spec.persist_dir}" if job.spec.persist_dir else
            "none: submit with --persist-dir DIR --persist-every N to keep checkpoints on disk")
    if state in hc.TERMINAL_JOB_STATES:
        return (f"job {job.id} is {state}: its in-memory snapshots were freed when it ended; "
                f"persisted checkpoints: {disk}")
    return f"job {job.id} is {state}: no snapshot yet; persisted checkpoints: {disk}"


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


@click.command(context_settings={"allow_interspersed_args": False})
@click.option(
    "-n",
    "--nodes",
    "--nnodes",
    "nodes",
    default="1",
    callback=_parse_nodes,
    metavar="N|MIN:MAX",
    help=spec_help("nodes"),
)
@click.option("--min-nodes", type=click.IntRange(min=0), default=None, help=spec_help("min_nodes"))
@click.option("--env", "env", multiple=True, callback=parse_env, metavar="KEY=VALUE",
              help=spec_help("env", "none"))
@spec_options(default_text={"workdir": "current directory"})
@click.option("--wait", is_flag=True, help="Follow the job until it ends; exit 0 iff it succeeded.")
@click.argument(
    "command", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- CMD [ARGS]..."
)
@client_options
def submit(
    conn: Conn,
    nodes: tuple[int, int | None],
    min_nodes: int | None,
    env: dict[str, str],
    wait: bool,
    command: tuple[str, ...],
    **spec: Any,
) -> None:
    """Submit a job: NODES x PROCS_PER_NODE ranks each running CMD."""
    max_nodes, range_min = nodes
    if range_min is not None and min_nodes is not None:
        raise click.UsageError("give --nodes MIN:MAX or --min-nodes, not both")
    options = given(spec)
    options.setdefault("workdir", os.getcwd())  # the ranks run where hptctl ran
    with session(conn) as client:
        job_id = client.submit(
            command=command,
            nodes=max_nodes,
            min_nodes=range_min if range_min is not None else (
                max_nodes if min_nodes is None else min_nodes),
            env=env,
            **options,
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


@click.command("ls")
@output_option()
@client_options
def ls_(conn: Conn, output: str) -> None:
    """List jobs."""
    with session(conn) as client:
        jobs = [hc.job_to_dict(j) for j in client.list()]
    if output == "json":
        echo_json(jobs)
        return
    t = table("ID", "NAME", "STATE", "ATTEMPT", "RESTARTS", "WORLD", "NODES", "AGE", "REASON")
    for d in jobs:
        t.add_row(
            *map(cell, (d["id"], d["name"], d["state"], d["attempt"], d["restarts"])),
            *map(cell, (d["world_size"], d["nodes"], age(d["created_at"]))),
            cell(d["reason"]),
        )
    console().print(t)


@click.command()
@click.argument("job_id", metavar="JOB")
@output_option()
@client_options
def status(conn: Conn, job_id: str, output: str) -> None:
    """Show the state of a job."""
    with session(conn) as client:
        d = hc.job_to_dict(client.get(job_id))
    if output == "json":
        echo_json(d)
    else:
        console().print(kv_table(status_rows(d)))


@click.command()
@click.argument("job_id", metavar="JOB")
@output_option()
@client_options
def describe(conn: Conn, job_id: str, output: str) -> None:
    """Show a job in detail: attempts, ranks, faults and history."""
    with session(conn) as client:
        d = hc.job_to_dict(client.get(job_id), detail=True)
    if output == "json":
        echo_json(d)
        return
    out = console()
    spec = d["spec"]
    rows = status_rows(d) + [
        ("command", " ".join(spec["command"])),
        (
            "requested",
            f"{spec['nodes']} nodes x {spec['procs_per_node']} procs "
            f"(min {spec['min_nodes']} nodes, max {spec['max_restarts']} restarts)",
        ),
        ("workdir", spec["workdir"]),
    ]
    how = "retuned by the controller" if spec["adapt_cadence"] else "fixed"
    if d["snapshot_every"] or spec["adapt_cadence"]:
        snap = d["snapshot_every"]
        rows.append(("snapshots", f"every {snap} steps ({how})" if snap
                     else f"the script's Checkpointer(every=) ({how})"))
    if spec["persist_dir"]:
        every = d["persist_every"]
        rows.append(("persist", f"{spec['persist_dir']}, every {every} steps ({how})"
                     if every else f"{spec['persist_dir']}, no cadence yet ({how})"))
    if d["root_cause"]:
        rc = d["root_cause"]
        rows.append(
            ("root cause", f"{fault_what(rc)} ({fault_where(rc)}, {rc['classification'] or '-'})")
        )
    out.print(kv_table(rows, title="Job"))
    sections = (
        ("Attempts", d["attempts"], attempts_table),
        (f"Ranks (attempt {d['attempt']})", d["ranks"], ranks_table),
        ("Faults", d["faults"], faults_table),
        ("History", d["history"], history_table),
    )
    for title, rows, render in sections:
        out.print()
        out.print(render(rows, title) if rows else Text(f"{title}: none"))


@click.command()
@click.argument("job_id", metavar="JOB")
@click.option("-f", "--follow", is_flag=True, help="Keep streaming new lines.")
@click.option("--rank", type=click.IntRange(min=0), default=None, help="Only this rank.")
@output_option(
    "text", "json",
    help="Output format: the lines, or one JSON object per line (attempt, rank, stream, text).",
)
@client_options
def logs(conn: Conn, job_id: str, follow: bool, rank: int | None, output: str) -> None:
    """Print the output of a job's ranks."""
    with session(conn) as client:
        for line in client.logs(job_id, follow=follow, rank=rank):
            text = line.text.removesuffix("\n")
            if output == "json":
                click.echo(json.dumps({"attempt": line.attempt, "rank": line.rank,
                                       "stream": line.stream, "text": text}))
            else:
                click.echo(text if rank is not None else f"[rank {line.rank}] {text}")


@click.command()
@click.argument("job_id", metavar="JOB")
@click.option(
    "--grace",
    type=float,
    default=0.0,
    help="Seconds between SIGTERM and SIGKILL [default: the job's].",
)
@client_options
def cancel(conn: Conn, job_id: str, grace: float) -> None:
    """Stop a job and wait until it reports CANCELLED."""
    with session(conn) as client:
        job = client.cancel(job_id, grace_s=grace)
        grace_s = grace or job.spec.stop_grace_s  # the stored spec has its grace resolved
        job = wait_for_job(client, job_id, timeout_s=grace_s + _CANCEL_MARGIN_S)
    state = hc.job_state_name(job.state)
    if state == "CANCELLED":
        click.echo(f"job {job_id} cancelled")
    else:
        click.echo(f"job {job_id} had already ended: {state}", err=True)


@click.group()
def ckpt() -> None:
    """Snapshots and persisted checkpoints."""


@ckpt.command("ls")
@click.argument("job_id", metavar="JOB")
@output_option()
@client_options
def ckpt_ls(conn: Conn, job_id: str, output: str) -> None:
    """List a job's snapshots (memory) and persisted checkpoints (disk), newest first."""
    with session(conn) as client:
        job = client.get(job_id)
    rows, protection = hc.checkpoints_of(job), hc.protection_of(job)
    if output == "json":
        echo_json(rows)
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
        if p["replicated"]:
            click.echo("data parallel (no sharded tensor): parity covers only the blocks "
                       "that differ between replicas (RNG states and the like), a rebuild "
                       "copies the rest from a survivor; a resize reads the survivors' "
                       "replicas, whatever the number of nodes lost while one survives, and "
                       "so does a restart onto spares when no step is recoverable rank for "
                       "rank (the lost ranks then take a survivor's RNG streams)")
        elif p["split"]:
            groups = {int(g) for s in p["split"] if (g := s.partition("/")[2])}
            click.echo(f"sharded, split evenly ({', '.join(p['split'])}): a resize reads "
                       + (f"one copy of each new rank's slice while {min(groups)} divides "
                          "the new world" if groups else
                          "only the old slices each new rank's slice overlaps"))
        elif p["state_bytes_per_node"]:
            click.echo("sharded, not split evenly on one dim (or not reported yet): a resize "
                       "reads every old rank's snapshot")


def _warn_store_degraded(store: Any) -> None:
    if store.ByteSize() and not store.up:
        click.echo(f"store: DEGRADED, down since {age(store.down_since or None)}: {store.error} "
                   f"({store.pending_events} event(s) held in the controller's memory)", err=True)


@click.command()
@output_option()
@client_options
def nodes(conn: Conn, output: str) -> None:
    """List the agents (nodes) and their state."""
    with session(conn) as client:
        listed, store = client.nodes_and_store()
        found = [hc.node_to_dict(n) for n in listed]
    _warn_store_degraded(store)
    if output == "json":
        echo_json(found)
        return
    t = table("NAME", "STATE", "ADDRESS", "SLOTS", "LAST SEEN", "REASON")
    for n in found:
        t.add_row(
            *map(cell, (n["name"], n["state"], n["address"], n["slots"])),
            cell(age(n["last_seen_at"])),
            cell(n["reason"]),
        )
    console().print(t)


@click.command()
@click.option("-f", "--follow", is_flag=True, help="Keep streaming new events.")
@click.option("--job", "job_id", metavar="JOB", default="", help="Only this job's events.")
@output_option()
@client_options
def events(conn: Conn, follow: bool, job_id: str, output: str) -> None:
    """Show the event log: submissions, launches, faults, restarts."""
    with session(conn) as client:
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


COMMANDS = (submit, ls_, status, describe, logs, cancel, ckpt, nodes, events)
