"""A throw-away local cluster for ``hptctl run`` and ``hptctl demo``: ``hptctl up`` in a child
process (its own session, its output in a log file in a fresh folder, a client token of its
own), a client to it, a wait until its agents are READY, and a stop that reaps it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import grpc

from hpt import client as hc
from hpt._proto import common_pb2
from hpt.cli import boot
from hpt.cli.common import CliError

READY_TIMEOUT_S = 240.0
"""How long the local cluster may take until every agent is READY: each agent's health check
and warm interpreters import torch, ~2 s each on an idle machine, over a minute on a loaded
2-core one (measured: 60 s was not enough at load 16-19, for ``run`` as for ``demo``)."""
STOP_GRACE_S = boot.AGENT_STOP_GRACE_S + 15.0
"""``hptctl up`` stops its agents and controller within this after SIGTERM."""
_POLL_S = 0.2
_SAY_WAITING_AFTER_S = 10.0
_LOG_TAIL_BYTES = 2000


class LocalCluster:
    """``hptctl up --agents N --slots S`` on a free loopback port, in ``run_dir``.

    ``start`` spawns it; ``connect`` opens a client with its token; ``wait_ready`` waits for
    its agents; ``stop`` stops and reaps it (idempotent); ``remove`` deletes ``run_dir``.
    """

    def __init__(self, *, prefix: str, agents: int, slots: int) -> None:
        self.agents = agents
        self.run_dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.log_path = self.run_dir / "cluster.log"
        port = boot.free_port()
        self.addr = f"127.0.0.1:{port}"
        # the cluster requires a client token like any other (hptctl up): its own
        self._token = secrets.token_urlsafe(32)
        self.token_file = self.run_dir / "token"
        self.token_file.touch(mode=0o600)
        self.token_file.write_text(self._token + "\n")
        self._argv = [sys.executable, "-m", "hpt.cli", "up", "--agents", str(agents),
                      "--port", str(port), "--slots", str(slots),
                      "--token-file", str(self.token_file)]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Spawn the cluster (call from the main thread: see :func:`boot.spawn`)."""
        with open(self.log_path, "wb") as log_file:
            self.proc = boot.spawn(self._argv, stdout=log_file, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def connect(self) -> hc.JobClient:
        return hc.JobClient.connect(self.addr, token=self._token)

    def wait_ready(self, client: hc.JobClient, *, timeout_s: float = READY_TIMEOUT_S,
                   stop: threading.Event | None = None) -> None:
        """Return once every agent is READY.

        Raises:
            CliError: the cluster exited first, ``timeout_s`` passed, or ``stop`` was set.
            grpc.RpcError: an RPC failed other than with UNAVAILABLE (still starting).
        """
        assert self.proc is not None, "start() first"
        stop = stop or threading.Event()
        start = time.monotonic()
        said = False
        while not stop.is_set():
            if self.proc.poll() is not None:
                raise CliError(
                    f"the local cluster exited with code {self.proc.returncode} before its "
                    f"agents were ready; log {self.log_path}: {self.log_tail()}"
                )
            ready = 0
            try:
                ready = sum(n.state == common_pb2.NODE_STATE_READY for n in client.nodes())
            except grpc.RpcError as e:
                if e.code() is not grpc.StatusCode.UNAVAILABLE:
                    raise
            if ready >= self.agents:
                return
            waited = time.monotonic() - start
            if not said and waited > _SAY_WAITING_AFTER_S:
                said = True
                click.echo(f"waiting for the agents ({ready} of {self.agents} READY): each runs "
                           "a health check and imports torch first", err=True)
            if waited > timeout_s:
                raise CliError(f"{ready} of {self.agents} agents READY after {timeout_s:.0f} s; "
                               f"see {self.log_path}")
            stop.wait(_POLL_S)
        raise CliError("interrupted")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``STOP_GRACE_S``; reaped either way."""
        if self.proc is not None:
            boot.stop_processes([self.proc], grace_s=STOP_GRACE_S)

    def remove(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def log_tail(self) -> str:
        """The end of the cluster's log, for an error message."""
        with contextlib.suppress(OSError), open(self.log_path, "rb") as f:
            f.seek(max(0, self.log_path.stat().st_size - _LOG_TAIL_BYTES))
            return f.read().decode("utf-8", "replace").strip()
        return ""
