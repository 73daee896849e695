"""The agent's guard: a tiny process that outlives the agent just long enough to kill what the
agent's ranks left behind.

Ranks die with their agent (``PR_SET_PDEATHSIG``, ``spawn.py``), but a process a rank started
(a data loader, a ``sleep`` in a shell script) gets no such signal and would be orphaned. Every
rank runs in its own session, so "everything the rank started" is its session. The agent starts
one guard (its own session, no death signal, stdlib only so it starts in milliseconds) and tells
it over a pipe ``+<sid>`` when a rank session starts and ``-<sid>`` when the agent has reaped
it. When the pipe closes (the agent exited, even by ``kill -9``) the guard SIGKILLs each listed
session still alive, every process in it, and exits.

Run as a script (``python guard.py``), never imported by the guard process itself, so it does
not pay for importing hpt. The agent imports ``kill_session`` from here too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading


def session_members(sid: int) -> list[int]:
    """Pids of every live process whose session id is ``sid`` (read from /proc)."""
    members = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return members
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # after the command: state ppid pgrp session ...
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] != b"Z":
            members.append(int(entry))
    return members


def kill_session(sid: int) -> int:
    """SIGKILL the process group ``sid`` and every process of session ``sid``; returns how many
    processes were signalled (besides the group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, signal.SIGKILL)
    killed = 0
    for pid in session_members(sid):
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except (ProcessLookupError, PermissionError):
            pass
    return killed


class Guard:
    """The agent's end of the pipe to its guard process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,  # survives a kill of the agent's group
        )

    @property
    def pid(self) -> int:
        return self._proc.pid

    def watch(self, sid: int) -> None:
        """A rank session started; called before anything can make it an orphan."""
        self._write(f"+{sid}\n")

    def unwatch(self, sid: int) -> None:
        """The rank's session was reaped and killed by the agent itself."""
        self._write(f"-{sid}\n")

    def close(self, timeout_s: float = 5.0) -> None:
        """At agent shutdown, after its ranks were stopped: the guard kills any survivor, exits."""
        with self._lock:
            if self._proc.stdin is not None and not self._proc.stdin.closed:
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout_s)

    def _write(self, line: str) -> None:
        with self._lock:
            stdin = self._proc.stdin
            if stdin is None or stdin.closed:
                return
            try:
                stdin.write(line.encode())
                stdin.flush()
            except (BrokenPipeError, ValueError):
                pass


def main() -> int:
    sessions: set[int] = set()
    for raw in sys.stdin.buffer:
        line = raw.strip()
        if len(line) < 2 or not line[1:].isdigit():
            continue
        sid = int(line[1:])
        if line[:1] == b"+":
            sessions.add(sid)
        elif line[:1] == b"-":
            sessions.discard(sid)
    for sid in sorted(sessions):
        kill_session(sid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
