"""The agent's fork server: one Python with torch imported that forks warm rank interpreters.

A cold rank pays ~7 s of CPU before its first line runs here (import torch ~3.3 s, then
``torch._dynamo``, which torch imports the first time an optimizer is built). The warm pool
(``warm.py``) hides that behind an idle interpreter per slot, but each replacement pays it
again, while the restarted ranks train beside it. The zygote pays it once per agent: every warm
interpreter after the first is a ``fork()`` of it (tens of milliseconds), and a launch that
finds the pool empty forks one on the spot instead of starting cold.

The zygote (``hpt._zygote``, rank-side code) is started through the spawner like every other
child, so it dies with the agent; its children die with it (``PR_SET_PDEATHSIG``). They are the
zygote's children, not the agent's: the zygote reaps them and reports each exit status over the
socket, and :class:`Forked` gives the launcher and the pool the part of ``subprocess.Popen``
they use (``pid``, the three pipes, ``poll``, ``wait``, ``kill``, ``send_signal``). Signals go
through a pidfd taken at fork time, so a recycled pid is never signalled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import Future
from typing import IO, Any

from hpt.agent.spawn import Spawner

log = logging.getLogger(__name__)

_MODULE = "hpt._zygote"
_FORK_TIMEOUT_S = 120.0  # a zygote still importing torch on a loaded node answers late


class ZygoteError(Exception):
    """The zygote cannot fork (gone, or the fork failed): start the interpreter another way."""


class Forked:
    """A process forked by the zygote, seen through the ``subprocess.Popen`` calls the agent
    makes. ``returncode`` follows Popen: the exit code, or -N when signal N ended it."""

    def __init__(self, pid: int, stdin: IO[bytes], stdout: IO[bytes], stderr: IO[bytes]) -> None:
        self.pid = pid
        self.args = [_MODULE, str(pid)]
        self.stdin: IO[bytes] | None = stdin
        self.stdout: IO[bytes] | None = stdout
        self.stderr: IO[bytes] | None = stderr
        self.returncode: int | None = None
        self.ready_fd = -1
        """Read end of the pipe the interpreter writes one byte on once it waits for a rank;
        the pool owns (and closes) it."""
        self._done = threading.Event()
        self._pidfd = -1
        with contextlib.suppress(OSError, AttributeError):
            self._pidfd = os.pidfd_open(pid)

    def _exited(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        self._done.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[bytes | None, bytes | None]:
        """Close stdin, read stdout and stderr to their ends and wait (as Popen's, no input)."""
        if self.stdin is not None:
            self.stdin.close()
            self.stdin = None
        out: dict[str, bytes] = {}

        def drain(name: str, pipe: IO[bytes]) -> None:
            out[name] = pipe.read()
            pipe.close()

        readers = [threading.Thread(target=drain, args=(name, pipe), daemon=True)
                   for name, pipe in (("out", self.stdout), ("err", self.stderr)) if pipe]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(timeout)
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        self.wait(timeout)
        return out.get("out"), out.get("err")

    def send_signal(self, sig: int) -> None:
        if self._done.is_set():
            return
        with contextlib.suppress(ProcessLookupError, OSError):
            if self._pidfd >= 0:
                signal.pidfd_send_signal(self._pidfd, sig)
            else:
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def _gone(self, timeout_s: float) -> bool:
        """Whether the process has exited (for when the zygote is gone and cannot say)."""
        if self._pidfd < 0:
            return True
        return bool(select.select([self._pidfd], [], [], timeout_s)[0])


class Zygote:
    """The agent's side of one fork server. ``fork()`` returns a :class:`Forked` warm
    interpreter waiting for its rank (the same protocol as ``hpt._warm``)."""

    def __init__(self, spawner: Spawner, env: dict[str, str]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ready_r, ready_w = os.pipe()
        try:
            self._proc = spawner.popen(
                [sys.executable, "-m", _MODULE, str(theirs.fileno()), str(ready_w)],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                start_new_session=True, pass_fds=(theirs.fileno(), ready_w))
        except BaseException:
            ours.close()
            os.close(ready_r)
            raise
        finally:
            theirs.close()
            os.close(ready_w)
        self._sock = ours
        self._ready_r = ready_r
        self._ready = False
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._next_id = 0
        self._pending: dict[int, tuple[Future[Forked], list[int]]] = {}
        self._children: dict[int, Forked] = {}
        self._alive = True
        self._reader = threading.Thread(target=self._read, name="hpt-zygote", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        return self._alive

    def ready(self) -> bool:
        """Whether the zygote has imported torch and forks without delay."""
        if self._ready:
            return True
        with self._lock:
            if self._ready_r >= 0 and select.select([self._ready_r], [], [], 0)[0]:
                os.close(self._ready_r)
                self._ready_r, self._ready = -1, True
        return self._ready

    def wait_ready(self, timeout_s: float) -> bool:
        fd = self._ready_r
        if not self._ready and fd >= 0:
            with contextlib.suppress(OSError, ValueError):
                select.select([fd], [], [], timeout_s)
        return self.ready()

    def fork(self, timeout_s: float = _FORK_TIMEOUT_S) -> Forked:
        """A new warm interpreter. Waits while the zygote is still importing torch.

        Raises:
            ZygoteError: the zygote is gone, refused, or did not answer in ``timeout_s``.
        """
        pipes = [os.pipe() for _ in range(4)]  # stdin, stdout, stderr, ready
        theirs = [pipes[0][0], pipes[1][1], pipes[2][1], pipes[3][1]]
        ours = [pipes[0][1], pipes[1][0], pipes[2][0], pipes[3][0]]
        result: Future[Forked] = Future()
        with self._lock:
            if not self._alive:
                for fd in theirs + ours:
                    os.close(fd)
                raise ZygoteError("the zygote is gone")
            ident = self._next_id
            self._next_id += 1
            self._pending[ident] = (result, ours)
        try:
            with self._send_lock:
                socket.send_fds(self._sock, [json.dumps({"fork": ident}).encode()], theirs)
        except OSError as exc:
            with self._lock:
                self._pending.pop(ident, None)
            for fd in ours:
                os.close(fd)
            raise ZygoteError(f"cannot reach the zygote: {exc}") from exc
        finally:
            for fd in theirs:
                os.close(fd)
        try:
            return result.result(timeout=timeout_s)
        except TimeoutError as exc:
            with self._lock:
                late = self._pending.pop(ident, None)
            if late is not None:  # never answered: the reader will not touch these
                for fd in ours:
                    os.close(fd)
            raise ZygoteError(f"the zygote did not fork within {timeout_s:.0f}s") from exc

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(4096)
            except OSError:
                data = b""
            if not data:
                break
            try:
                message: dict[str, Any] = json.loads(data)
            except ValueError:
                log.error("zygote: unreadable message %r", data[:200])
                continue
            if "forked" in message:
                self._on_forked(int(message["forked"]), int(message["pid"]))
            elif "exited" in message:
                pid, code = int(message["exited"]), os.waitstatus_to_exitcode(message["status"])
                with self._lock:
                    child = self._children.pop(pid, None)
                if child is not None:
                    child._exited(code)
            elif "failed" in message:
                with self._lock:
                    entry = self._pending.pop(int(message["failed"]), None)
                if entry is not None:
                    for fd in entry[1]:
                        os.close(fd)
                    entry[0].set_exception(ZygoteError(f"fork failed: {message.get('error')}"))
        self._on_gone()

    def _on_forked(self, ident: int, pid: int) -> None:
        with self._lock:
            entry = self._pending.pop(ident, None)
        if entry is None:  # the caller gave up waiting: nobody will run this child
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            return
        result, (stdin_w, stdout_r, stderr_r, ready_r) = entry
        child = Forked(pid, os.fdopen(stdin_w, "wb", buffering=0), os.fdopen(stdout_r, "rb"),
                       os.fdopen(stderr_r, "rb"))
        child.ready_fd = ready_r
        with self._lock:
            self._children[pid] = child
        result.set_result(child)

    def _on_gone(self) -> None:
        """The zygote exited: its children got SIGKILL from the kernel; say so once each is
        gone (the zygote can no longer report their statuses)."""
        with self._lock:
            self._alive = False
            pending, self._pending = list(self._pending.values()), {}
            children, self._children = list(self._children.values()), {}
        for result, fds in pending:
            for fd in fds:
                os.close(fd)
            result.set_exception(ZygoteError("the zygote exited"))
        if children:
            log.error("zygote (pid %d) exited with %d interpreters of its own alive: they die "
                      "with it", self._proc.pid, len(children))
        for child in children:
            child.kill()
            child._gone(5.0)
            child._exited(-signal.SIGKILL)

    def close(self) -> None:
        """End the zygote (EOF on its socket). Call once the ranks it forked are gone: its
        children die with it."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        try:
            self._proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(timeout=5.0)
        self._sock.close()
        with self._lock:
            if self._ready_r >= 0:
                os.close(self._ready_r)
                self._ready_r = -1
