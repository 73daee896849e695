"""Pieces ``hptctl`` commands share: the error type, RPC error messages, waiting on a job, and
rich/plain rendering helpers. Used by :mod:`hpt.cli` and :mod:`hpt._demo`; no click commands here.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import click
import grpc
from rich.console import Console
from rich.table import Table
from rich.text import Text

from hpt import client as hc
from hpt._proto import common_pb2

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

POLL_S = 0.5
UNAVAILABLE_PATIENCE_S = 30.0
"""While waiting on a job, how long the controller may be unreachable (it may be restarting)."""


class CliError(click.ClickException):
    """A failure reported as ``error: <message>`` with an exit code (1 unless told)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def error_line(message: str) -> None:
    """Print ``error: message`` on stderr as one line."""
    one_line = "; ".join(part.strip() for part in message.splitlines() if part.strip())
    click.echo(f"error: {one_line}", err=True)


def rpc_error(err: grpc.RpcError, addr: str) -> CliError:
    """The message and exit code for a failed RPC: INVALID_ARGUMENT is a usage error (2)."""
    code = err.code() if callable(getattr(err, "code", None)) else None
    details = (err.details() if callable(getattr(err, "details", None)) else "") or ""
    details = details.strip() or (code.name if code is not None else str(err))
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return CliError(details, EXIT_USAGE)
    if code is grpc.StatusCode.UNAVAILABLE:
        return CliError(
            f"cannot reach the controller at {addr} ({details}); is it running? "
            f"Set --controller or ${hc.CONTROLLER_ENV}"
        )
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return CliError(
            f"the controller at {addr} refused the request ({code.name}: {details}); "
            f"pass --token-file or set ${hc.TOKEN_FILE_ENV}"
        )
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return CliError(f"the controller at {addr} did not answer in time ({details})")
    if code is grpc.StatusCode.NOT_FOUND:
        return CliError(details)
    return CliError(f"{code.name if code is not None else 'RPC failed'}: {details}")


def wait_for_job(
    client: hc.JobClient,
    job_id: str,
    *,
    timeout_s: float | None = None,
    on_change: Callable[[dict[str, Any]], None] | None = None,
    poll_s: float = POLL_S,
) -> common_pb2.Job:
    """Poll GetJob until the job is terminal; returns the final Job.

    Rides out the controller being unreachable for up to ``UNAVAILABLE_PATIENCE_S`` (a
    controller restart keeps jobs running). ``on_change`` gets the status view whenever the
    state, attempt, restarts or reason change.

    Raises:
        CliError: the job is not terminal after ``timeout_s`` seconds.
        grpc.RpcError: any other RPC failure.
    """
    start = time.monotonic()
    unreachable_since: float | None = None
    last: tuple[Any, ...] | None = None
    pause = threading.Event()  # never set: a wait that Ctrl-C interrupts
    while True:
        now = time.monotonic()
        job = None
        try:
            job = client.get(job_id)
            unreachable_since = None
        except grpc.RpcError as e:
            if e.code() is not grpc.StatusCode.UNAVAILABLE:
                raise
            unreachable_since = unreachable_since if unreachable_since is not None else now
            if now - unreachable_since > UNAVAILABLE_PATIENCE_S:
                raise
        if job is not None:
            d = hc.job_to_dict(job)
            key = (d["state"], d["attempt"], d["restarts"], d["reason"])
            if on_change is not None and key != last:
                on_change(d)
            last = key
            if d["state"] in hc.TERMINAL_JOB_STATES:
                return job
        if timeout_s is not None and now - start > timeout_s:
            state = last[0] if last else "unknown"
            raise CliError(f"job {job_id} did not end within {timeout_s:.0f} s (state {state})")
        pause.wait(poll_s)


# --- rendering -------------------------------------------------------------------------------


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
