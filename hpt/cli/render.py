"""Rendering for ``hptctl``: tables on a terminal or a pipe, time and duration cells, the views
of a job (status, attempts, ranks, faults, history) and JSON output. No commands here."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text


def console() -> Console:
    """A console on stdout; off a terminal (pipe, file, test) tables are not folded at 80."""
    return Console() if sys.stdout.isatty() else Console(width=200, no_color=True)


def clock(t: float | None) -> str:
    """Wall-clock seconds as local ``HH:MM:SS.mmm``; ``-`` when unknown."""
    if t is None:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def age(t: float | None) -> str:
    return "-" if t is None else duration(max(0.0, time.time() - t)) + " ago"


def cell(value: Any) -> Text:
    """A table cell; Text keeps user strings (reasons, messages) from being read as markup."""
    if value is None or value == "":
        return Text("-")
    if isinstance(value, list | tuple):
        return Text(",".join(str(v) for v in value) or "-")
    return Text(str(value))


def table(*columns: str, title: str | None = None) -> Table:
    t = Table(title=title, title_justify="left", box=None, pad_edge=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    return t


def kv_table(rows: list[tuple[str, Any]], title: str | None = None) -> Table:
    t = Table(title=title, title_justify="left", box=None, show_header=False, pad_edge=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    for key, value in rows:
        t.add_row(key, cell(value))
    return t


def fault_where(fault: dict[str, Any]) -> str:
    parts = [fault["node"], f"rank {fault['rank']}" if fault["rank"] is not None else ""]
    return " ".join(p for p in parts if p) or "-"


def fault_what(fault: dict[str, Any]) -> str:
    return f"{fault['kind']}: {fault['message']}" if fault["message"] else fault["kind"]


def event_line(e: dict[str, Any]) -> str:
    """One event as a log line: time, seq, kind, [job/attempt/node rank], message."""
    where = "/".join(str(x) for x in (e["job_id"], e["attempt"] or None, e["node"]) if x)
    rank = f" rank {e['rank']}" if e["rank"] is not None else ""
    return f"{clock(e['at'])} #{e['seq']} {e['kind']} [{where or '-'}{rank}] {e['message']}"


# --- a job's views ---------------------------------------------------------------------------


def progress(d: dict[str, Any]) -> str:
    if d["step"] is None:
        return "no step reported yet"
    return f"step {d['step']} (every rank), last reported {age(d['step_at'])}"


def status_rows(d: dict[str, Any]) -> list[tuple[str, Any]]:
    return [
        ("id", d["id"]),
        ("name", d["name"]),
        ("state", d["state"]),
        ("reason", d["reason"]),
        ("progress", progress(d)),
        ("attempt", d["attempt"]),
        ("restarts", d["restarts"]),
        ("world size", d["world_size"]),
        ("nodes", d["nodes"]),
        ("created", clock(d["created_at"])),
    ]


def attempts_table(attempts: list[dict[str, Any]], title: str) -> Table:
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


def ranks_table(ranks: list[dict[str, Any]], title: str) -> Table:
    t = table("RANK", "NODE", "PID", "STATE", "STEP", "EXIT", title=title)
    for r in ranks:
        t.add_row(
            *map(cell, (r["rank"], r["node"], r["pid"], r["state"], r["step"])),
            cell(r["exit_reason"]),
        )
    return t


def faults_table(faults: list[dict[str, Any]], title: str) -> Table:
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


def history_table(history: list[dict[str, Any]], title: str) -> Table:
    t = table("AT", "STATE", "REASON", title=title)
    for h in history:
        t.add_row(*map(cell, (clock(h["at"]), h["state"], h["reason"])))
    return t


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2))
