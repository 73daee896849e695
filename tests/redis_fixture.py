"""Start and stop a real ``redis-server`` on a free loopback port, for tests.

``tests/conftest.py`` wraps these in the ``redis_server`` fixture; integration tests that must
kill and restart Redis themselves import them directly::

    from tests.redis_fixture import start_redis, stop_redis
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
_PORT_ATTEMPTS = 3


def start_redis(tmp_path: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """Start ``redis-server`` without persistence and wait until it answers PING.

    Args:
        tmp_path: directory for the server's working dir and log (one subdirectory per server).

    Returns:
        ``(url, process)``: ``redis://127.0.0.1:<port>/0`` and the server; pass it to
        ``stop_redis``.

    Raises:
        pytest.skip.Exception: no ``redis-server`` binary on PATH.
        RuntimeError: it did not come up within ``START_TIMEOUT_S`` seconds.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not found on PATH (Debian package 'redis-server')")
    failures: list[str] = []
    # Another process can take the free port between our probe and redis binding it; retry.
    for _ in range(_PORT_ATTEMPTS):
        port = _free_port()
        work_dir = tmp_path / f"redis-{port}"
        work_dir.mkdir(parents=True)
        log_path = work_dir / "redis.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(work_dir)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        if _wait_ready(proc, port):
            return f"redis://127.0.0.1:{port}/0", proc
        stop_redis(proc)
        failures.append(f"port {port}: {log_path.read_text(errors='replace')[-2000:]}")
    raise RuntimeError(
        f"redis-server did not answer PING within {START_TIMEOUT_S} s "
        f"({_PORT_ATTEMPTS} attempts):\n" + "\n".join(failures)
    )


def stop_redis(proc: subprocess.Popen[bytes]) -> None:
    """Terminate the server (SIGKILL after ``STOP_TIMEOUT_S`` seconds) and reap it; idempotent."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(proc: subprocess.Popen[bytes], port: int) -> bool:
    """True once *our* server answers on ``port``; False if it exits or the deadline passes."""
    client = redis.Redis(
        host="127.0.0.1",
        port=port,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        retry=Retry(NoBackoff(), 0),
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            try:
                # Compare pids: if our bind failed, someone else's server may own the port.
                if client.info("server")["process_id"] == proc.pid:
                    return True
            except redis.RedisError:  # not up yet, or a foreign server that wants AUTH
                pass
            try:
                proc.wait(timeout=0.02)  # doubles as the pause between probes
                return False  # exited: most likely the port was taken
            except subprocess.TimeoutExpired:
                pass
        return False
    finally:
        client.close()
