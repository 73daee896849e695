"""Running hpt's daemons from ``hptctl``: the controller in this process, local agents as child
processes, signal handling, and stopping and reaping every process started here.

``hptctl up`` and ``hptctl controller`` call :func:`run_control_plane`; ``hptctl agent`` calls
:func:`run_agent`; :mod:`hpt.cli.demo` and :mod:`hpt.cli.run` use the process helpers. The
controller and agent classes are imported inside the functions so that ``hptctl --help`` works
without loading them.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import click

from hpt import _pdeathsig
from hpt.cli.common import EXIT_USAGE, CliError

AGENT_STOP_GRACE_S = 20.0
"""SIGTERM to SIGKILL for an agent: it stops its own ranks first (their grace is 5 s)."""
CONTROLLER_STOP_GRACE_S = 2.0
"""Grace for in-flight RPCs when the controller stops."""
_REAP_TIMEOUT_S = 5.0
"""How long to wait for a process to disappear after SIGKILL."""
_WATCH_PERIOD_S = 0.5

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def install_stop_handlers(on_signal: Callable[[int], None]) -> Callable[[], None]:
    """Route SIGINT and SIGTERM to ``on_signal(signum)``; returns a function restoring the old
    handlers. Call from the main thread. Keep ``on_signal`` tiny (set an event)."""
    previous = {s: signal.getsignal(s) for s in _STOP_SIGNALS}

    def handler(signum: int, frame: Any) -> None:
        on_signal(signum)

    for s in _STOP_SIGNALS:
        signal.signal(s, handler)

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return restore


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM while cleaning up (the cleanup itself has deadlines)."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in _STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def spawn(argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[bytes]:
    """Start a child in its own session (so a terminal's Ctrl-C reaches only us; we stop it).

    The child gets SIGTERM if we die, even by SIGKILL (PR_SET_PDEATHSIG, armed by the exec
    wrapper of :mod:`hpt._pdeathsig`: no Python runs in the child between fork and exec, where
    gRPC's fork handlers would run), so the agents of a killed ``hptctl up`` stop their ranks
    and exit instead of living on. Call it from the main thread: the death signal follows the
    thread that forked.
    """
    return subprocess.Popen(
        _pdeathsig.wrap(list(argv), signal.SIGTERM),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        **popen_kwargs,
    )


def stop_processes(procs: Sequence[subprocess.Popen[bytes]], *, grace_s: float) -> None:
    """SIGTERM each process, wait up to ``grace_s`` in all, SIGKILL the process groups of those
    left (each leads its own session), and reap them all."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            try:
                p.wait(timeout=_REAP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                click.echo(f"warning: process {p.pid} did not exit after SIGKILL", err=True)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def join_host_port(host: str, port: int) -> str:
    """``host:port`` for dialing a server bound on ``host`` (wildcards dial loopback)."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def local_agent_name(controller_addr: str, i: int) -> str:
    """Name of ``hptctl up``'s agent ``i``: unique per cluster on this host (the controller's
    port is in it), so two local clusters never register or sweep under each other's names."""
    return f"node-{i}.{controller_addr.rsplit(':', 1)[-1]}"


SERVER_GC_THRESHOLDS = (100_000, 50, 100)
"""The controller's garbage collector thresholds (CPython's default: 700, 10, 10).

With CPython's defaults, a controller taking 2,000 heartbeats a second ran a full collection
every 0.6-1 s, each 200-330 ms with every thread stopped, and found nothing to collect (its
garbage goes with reference counts): the heartbeats waiting a few milliseconds in the intake's
queue outlived two young collections and counted as long-lived. Acks came 4-5 s late and
talking nodes were declared lost. With these thresholds the same run made one full
collection, and 4,000 agents ran on a core where 3,000 did not (docs/benchmarks.md)."""


def run_control_plane(
    cfg: Any,
    *,
    num_agents: int,
    agent_argv: Callable[[str, int], list[str]] | None,
) -> None:
    """Run ``Controller(cfg)`` here and ``num_agents`` agent processes until SIGINT/SIGTERM.

    On a signal: stop the agents (SIGTERM, ``AGENT_STOP_GRACE_S``, SIGKILL), then the
    controller; every child is reaped.

    Args:
        cfg: a ``ControllerConfig``.
        num_agents: agents to start after the controller listens.
        agent_argv: ``(controller_addr, i) -> argv`` of agent ``i``.

    Raises:
        CliError: the controller cannot start, or stopped without being asked to.
    """
    try:
        from hpt.controller.app import Controller
    except ImportError as e:
        raise CliError(f"the controller is not available: {e}") from e
    try:
        controller = Controller(cfg)
    except ValueError as e:
        raise CliError(f"invalid configuration: {e}", EXIT_USAGE) from None
    stop = threading.Event()
    signalled: list[int] = []
    restore = install_stop_handlers(lambda signum: (signalled.append(signum), stop.set()))
    agents: list[tuple[str, subprocess.Popen[bytes]]] = []
    started = False
    try:
        gc.set_threshold(*SERVER_GC_THRESHOLDS)  # a long-lived server
        try:
            port = controller.start()
        except (OSError, RuntimeError) as e:
            raise CliError(f"cannot start the controller on {cfg.host}:{cfg.port}: {e}") from e
        started = True
        threading.Thread(
            target=lambda: (controller.wait_for_termination(), stop.set()),
            name="controller-wait",
            daemon=True,
        ).start()
        addr = join_host_port(cfg.host, port)
        bind = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        click.echo(f"hpt controller listening on {bind}:{port}")
        for i in range(num_agents):
            if stop.is_set():
                break
            assert agent_argv is not None
            proc = spawn(agent_argv(addr, i))
            agents.append((local_agent_name(addr, i), proc))
            click.echo(f"agent {local_agent_name(addr, i)} started (pid {proc.pid})")
        click.echo(f"hptctl talks to it with --controller {addr} (or HPT_CONTROLLER={addr})")
        click.echo("Ctrl-C stops it")
        _watch_agents(agents, stop, lambda: controller.ready_nodes([n for n, _ in agents]))
    finally:
        with signals_ignored():
            stop_processes([p for _, p in agents], grace_s=AGENT_STOP_GRACE_S)
            if started:
                controller.stop(grace_s=CONTROLLER_STOP_GRACE_S)
        restore()
        # with SERVER_GC_THRESHOLDS more is left for the interpreter's final collection; the
        # controller has released what it owns: exit without walking it (as the agent does)
        gc.freeze()
    if not signalled:
        raise CliError("the controller stopped")
    click.echo("stopped")


def _watch_agents(
    agents: list[tuple[str, subprocess.Popen[bytes]]], stop: threading.Event,
    ready: Callable[[], int],
) -> None:
    reported: set[str] = set()
    announced = not agents
    while not stop.wait(_WATCH_PERIOD_S if announced else 0.1):
        if not announced and ready() == len(agents):
            announced = True
            click.echo(f"{len(agents)} agent(s) ready: submit jobs now")
        for name, proc in agents:
            if name not in reported and proc.poll() is not None:
                reported.add(name)
                click.echo(
                    f"warning: agent {name} (pid {proc.pid}) exited with code {proc.returncode}",
                    err=True,
                )


def run_agent(cfg: Any) -> None:
    """Run ``Agent(cfg)`` until SIGTERM/SIGINT, which call ``agent.stop()``.

    ``stop`` runs on its own thread: a signal handler interrupts the main thread anywhere in
    ``run``, possibly while it holds a lock that ``stop`` needs.
    """
    try:
        from hpt.agent.daemon import Agent
    except ImportError as e:
        raise CliError(f"the agent is not available: {e}") from e
    agent = Agent(cfg)
    stopper = threading.Thread(target=agent.stop, name="agent-stop", daemon=True)
    requested = threading.Event()

    def on_signal(signum: int) -> None:
        if not requested.is_set():
            requested.set()
            stopper.start()

    restore = install_stop_handlers(on_signal)
    try:
        agent.run()
    finally:
        restore()
        if requested.is_set():
            stopper.join(timeout=AGENT_STOP_GRACE_S)
        # the agent released everything it owns; the interpreter's final collection of torch's
        # and grpc's objects took 5-18 s of a loaded 2-core box, past callers' stop deadlines
        gc.freeze()
