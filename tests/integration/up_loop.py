"""Start ``hptctl up`` until its agents are ready, stop it with Ctrl-C, and say what was lost.

Used by ``test_up_loop.py`` (a few rounds) and ``tests/bench/bench_up_loop.py`` (50 rounds).
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.cluster import free_port, pid_alive, wait_for

ROOT = Path(__file__).resolve().parents[2]
_STARTED = re.compile(r"agent (node-[\w.]+) started \(pid (\d+)\)")


@dataclass
class Round:
    returncode: int | None = None
    lines: list[str] = field(default_factory=list)
    agent_pids: dict[str, int] = field(default_factory=dict)
    ready: bool = False

    @property
    def lost_agents(self) -> list[str]:
        """Agents that ended before ``hptctl up`` stopped them (its warning names them)."""
        return [ln for ln in self.lines if ln.startswith("warning: agent")]

    @property
    def fork_noise(self) -> list[str]:
        return [ln for ln in self.lines if "fork_posix" in ln]


def one_round(agents: int = 2, ready_timeout_s: float = 120.0, slots: int = 1) -> Round:
    """One start/stop of ``hptctl up --agents N``; every process it started is reaped."""
    out = Round()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpt.cli", "up", "--agents", str(agents), "--port",
         str(free_port()), "--slots", str(slots)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
        start_new_session=True, text=True,
    )
    assert proc.stdout is not None

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            out.lines.append(line.rstrip("\n"))
            m = _STARTED.search(line)
            if m:
                out.agent_pids[m.group(1)] = int(m.group(2))
            if "agent(s) ready" in line:
                out.ready = True

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        # agents not ready in time: out.ready stays False and the caller says so; stop it anyway
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: out.ready or proc.poll() is not None, ready_timeout_s,
                     "hptctl up: agents ready", poll_s=0.05)
        proc.send_signal(signal.SIGINT)
        out.returncode = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
        proc.stdout.close()
        for pid in out.agent_pids.values():
            wait_for(lambda pid=pid: not pid_alive(pid), 30, f"agent pid {pid} gone")
    return out
