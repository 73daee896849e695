"""What ``hptctl`` commands share: exit codes, the error type and RPC error messages, the
client connection options, and waiting on a job. No commands here."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import click
import grpc

from hpt import client as hc
from hpt import credentials
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


def given(**values: Any) -> dict[str, Any]:
    """The keyword arguments whose value is not None: the options the user gave, so that the
    config's own defaults apply to the others."""
    return {k: v for k, v in values.items() if v is not None}


def parse_env(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    """``--env KEY=VALUE`` (repeatable) as a dict; a bad name or a repeated key is refused."""
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


# --- connection options ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Conn:
    """The connection flags of a client command; ``open`` resolves them to a client."""

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
        return f(*args, conn=Conn(controller, token_file, tls_ca), **kwargs)

    return wrapper


def output_option(*formats: str, help: str = "Output format.") -> Callable[..., Any]:
    """``-o/--output`` choosing among ``formats`` (the first is the default): table or json
    unless told."""
    formats = formats or ("table", "json")
    return click.option("-o", "--output", type=click.Choice(list(formats)), default=formats[0],
                        show_default=True, help=help)


@contextlib.contextmanager
def session(conn: Conn) -> Iterator[hc.JobClient]:
    """A connected client; RPC errors inside become ``CliError`` with a clear message."""
    client = conn.open()
    try:
        yield client
    except grpc.RpcError as e:
        raise rpc_error(e, client.address) from None
    finally:
        client.close()
