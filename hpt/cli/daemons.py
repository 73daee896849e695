"""``hptctl up``, ``controller``, ``agent`` and ``demo``: the commands that run hpt's daemons.

Each turns its options into a ``ControllerConfig`` or ``AgentConfig`` (which validate them) and
hands it to :mod:`hpt.cli.boot`, which runs the daemon in this process (the controller, the
agent) or as children (``up``'s agents) until a signal. The controller and agent classes are
imported only when a daemon starts, so that ``hptctl --help`` does not load them.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from hpt import client as hc
from hpt import credentials
from hpt._address import DEFAULT_HOST, DEFAULT_PORT
from hpt.cli import boot
from hpt.cli.common import EXIT_USAGE, CliError, given
from hpt.cli.limits import limit_options


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


@click.command()
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
    from hpt.controller.config import ControllerConfig

    if port == 0:
        port = boot.free_port(host if host not in ("", "0.0.0.0", "::") else "127.0.0.1")
    folder = credentials.cluster_dir(boot.join_host_port(host, port))
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
            boot.local_agent_name(controller_addr, i),
            "--token-file",
            str(written[0]),
        ]
        if slots is not None:
            argv += ["--slots", str(slots)]
        return argv

    try:
        boot.run_control_plane(cfg, num_agents=agents, agent_argv=agent_argv)
    finally:
        for path in written:
            path.unlink(missing_ok=True)


@click.command()
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
@click.option(
    "--max-snapshot-interval",
    type=click.FloatRange(1, 86400),
    default=None,
    help="The most seconds apart an --adapt-cadence job's snapshots are set (a crash of the "
    "script loses at most that) [default: 300].",
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
    max_snapshot_interval: float | None,
    limits: dict[str, Any],
) -> None:
    """Run the controller only (as the Helm chart does)."""
    from hpt.controller.config import ControllerConfig

    kwargs = limits | given(heartbeat_period_s=heartbeat_period, agent_lease_s=agent_lease,
                            metrics_port=metrics_port, status_port=status_port,
                            grow_hysteresis_s=grow_after,
                            max_snapshot_interval_s=max_snapshot_interval)
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
    boot.run_control_plane(cfg, num_agents=0, agent_argv=None)


@click.command()
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
@click.option("--no-fork-server", is_flag=True,
              help="Start each warm process on its own instead of forking it from one that "
                   "imported torch once.")
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
    no_fork_server: bool,
    metrics_port: int | None,
    no_health_check: bool,
    hang_min: float | None,
    peer_port: int,
    peer_advertise: str,
) -> None:
    """Run a node agent until SIGTERM/SIGINT."""
    from hpt.agent.config import AgentConfig

    try:  # replicas: a comma-separated list, tried in turn
        addr = ",".join(hc.resolve_controller(a) for a in (controller_addr or "").split(",")
                        if a.strip()) or hc.resolve_controller(None)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--controller'") from None
    kwargs = given(name=name, address=address, slots=slots, lease_s=lease,
                   run_dir=os.path.abspath(run_dir) if run_dir else None,
                   hang=_hang_config(hang_min))
    try:
        cfg = AgentConfig(
            controller=addr,
            token=_token_from(token_file),
            tls_ca=tls_ca or "",
            tls_cert=tls_cert or "",
            tls_key=tls_key or "",
            warm_ranks=not no_warm,
            fork_server=not no_fork_server,
            metrics_port=metrics_port,
            health_check=not no_health_check,
            peer_port=peer_port,
            peer_advertise=peer_advertise,
            **kwargs,
        )
    except ValueError as e:
        raise _config_error(e) from None
    boot.run_agent(cfg)


@click.command()
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
    from hpt.cli import demo as demo_


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
    script_path = demo_.find_script(script)
    if script_path is None:
        raise click.BadParameter(f"{script!r} does not exist", param_hint="'--script'")
    demo_.run(
        steps=steps,
        kill_at=kill_at,
        num_agents=agents,
        nodes=nodes,
        procs=procs,
        script=script_path,
        keep=keep,
    )


COMMANDS = (up, controller, agent, demo)
