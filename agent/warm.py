"""Warm rank interpreters: Python processes with torch already imported, waiting for a rank.

``import torch`` costs 1.7-1.9 s on our machines and dominates a restart. The agent keeps one
idle interpreter per slot; a launch of ``python [-u] script.py ...`` or ``python -m mod ...``
hands it the argv, environment and working directory as one JSON line on its stdin, and the
interpreter runs the script as ``__main__`` (like ``python script.py`` would). Anything it
cannot reproduce exactly falls back to a cold ``subprocess.Popen``: another interpreter,
interpreter flags, or an environment variable only read at interpreter start-up.

The idle interpreters are forked by the agent's fork server (``zygote.py``), which imports torch
once per agent: a replacement costs a fork, not another import, and a launch that finds the pool
empty forks one on the spot. Without it (not Linux, ``fork_server=False``, or the zygote died)
each interpreter is a Python of its own, :mod:`hpt._warm` run as ``python -m hpt._warm READY_FD
RENICE``, and an empty pool means a cold start. Both are rank-side code: the agent never
imports the training API.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from hpt.agent.spawn import Spawner
from hpt.agent.zygote import Forked, Zygote, ZygoteError

log = logging.getLogger(__name__)

# Read once when an interpreter or torch starts: a job that sets them differently gets a cold start.
_STARTUP_ONLY = (
    "PYTHONHASHSEED", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONOPTIMIZE",
    "PYTHONDONTWRITEBYTECODE", "PYTHONWARNINGS", "PYTHONMALLOC", "PYTHONSAFEPATH",
    "LD_PRELOAD", "LD_LIBRARY_PATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
    "TORCH_CPP_LOG_LEVEL", "KMP_AFFINITY", "GOMP_CPU_AFFINITY",
)
_CHILD_MODULE = "hpt._warm"
_ON_DEMAND_FORK_S = 5.0
"""How long a launch that found the pool empty waits for a ready zygote's fork (milliseconds
when all is well) before it starts the rank cold."""

Interpreter = subprocess.Popen[bytes] | Forked
"""An idle interpreter: forked by the zygote, or started on its own when there is none."""


class WarmPool:
    """Keeps ``size`` idle warm interpreters; ``take`` turns one into a rank."""

    def __init__(
        self,
        size: int,
        spawner: Spawner,
        *,
        base_env: dict[str, str] | None = None,
        settled: Callable[[], bool] = lambda: True,
        settle_timeout_s: float = 30.0,
        fork_server: bool = True,
        zygote_restart_s: float = 10.0,
    ) -> None:
        self._size = size
        self._spawner = spawner
        self._settled = settled
        self._settle_timeout_s = settle_timeout_s
        self._refilling = threading.Lock()
        self._env = dict(os.environ if base_env is None else base_env)
        self._env["PYTHONUNBUFFERED"] = "1"
        self._idle: list[Interpreter] = []
        self._ready_fds: dict[int, int] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._wake = threading.Event()
        self._filling = 0
        self._zygote: Zygote | None = None
        self._zygote_restart_s = zygote_restart_s
        self._zygote_started = time.monotonic()
        if fork_server and sys.platform == "linux":
            self._zygote = Zygote(spawner, self._env)
            # forks wait for the zygote's imports: fill in the background, not in the caller
            threading.Thread(target=self._fill, daemon=True, name="hpt-warm-fill").start()
        else:
            self._fill()

    @property
    def zygote(self) -> Zygote | None:
        return self._zygote

    def _spawn(self) -> Interpreter:
        zygote = self._zygote
        if zygote is not None and zygote.alive():
            try:
                child = zygote.fork()
            except ZygoteError as exc:
                log.warning("warm pool: %s; starting an interpreter of its own", exc)
            else:
                with self._lock:
                    self._ready_fds[child.pid] = child.ready_fd
                return child
        # the child writes one byte on this pipe once torch is imported and primed
        read_fd, write_fd = os.pipe()
        try:
            proc = self._spawner.popen(
                [sys.executable, "-m", _CHILD_MODULE, str(write_fd), _can_renice()],
                env=self._env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                pass_fds=(write_fd,),
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        with self._lock:
            self._ready_fds[proc.pid] = read_fd
        return proc

    def _restart_zygote(self) -> None:
        """A fork server that died is started again, at most once per ``zygote_restart_s``
        (meanwhile, and while it imports torch, ranks start cold)."""
        dead = self._zygote
        if dead is None or dead.alive():
            return
        with self._lock:
            now = time.monotonic()
            if (self._closed or self._zygote is not dead
                    or now - self._zygote_started < self._zygote_restart_s):
                return
            log.warning("warm pool: the fork server (pid %d) is gone; starting another", dead.pid)
            self._zygote, self._zygote_started = Zygote(self._spawner, self._env), now
        dead.close()

    def _fill(self) -> None:
        self._restart_zygote()
        with self._lock:
            if self._closed:
                return
            for p in self._idle:
                if p.poll() is not None and p.pid in self._ready_fds:
                    os.close(self._ready_fds.pop(p.pid))
            self._idle = [p for p in self._idle if p.poll() is None]
            missing = self._size - len(self._idle) - self._filling
            self._filling += max(0, missing)
        # spawned outside the lock: a fork waits while the zygote still imports torch
        for _ in range(max(0, missing)):
            try:
                proc = self._spawn()
            except (OSError, subprocess.SubprocessError) as exc:
                log.error("warm pool: cannot start an interpreter: %s", exc)
                with self._lock:
                    self._filling -= 1
                continue
            with self._lock:
                self._filling -= 1
                if not self._closed:
                    self._idle.append(proc)
                    continue
            self._discard(proc)

    def _discard(self, proc: Interpreter) -> None:
        proc.kill()
        proc.wait()
        with self._lock:
            fd = self._ready_fds.pop(proc.pid, None)
        if fd is not None:
            os.close(fd)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()

    def take(self, argv: list[str], env: dict[str, str], cwd: str | None) -> Interpreter | None:
        """Hand the rank to an idle interpreter and return it, or None when a cold start is
        needed (the caller then spawns normally). With a ready fork server an empty pool forks
        one on the spot. A replacement starts in the background."""
        if not self.can_run(argv, env, cwd):
            return None
        with self._lock:
            idle = [p for p in self._idle if p.poll() is None]
            proc: Interpreter | None = None
            fd: int | None = None
            if idle:
                # one that finished its warm-up first; a still-importing one beats a cold start
                idle.sort(key=lambda p: not self._ready_signalled(p))
                proc = idle[0]
                self._idle.remove(proc)
                fd = self._ready_fds.pop(proc.pid, None)
            closed = self._closed
        if proc is None:
            # Fork one now only from a zygote that is ready: a launch never waits for the
            # zygote's own import (the agent's stream would go silent meanwhile), it starts cold
            zygote = self._zygote
            if closed or zygote is None or not zygote.alive() or not zygote.ready():
                if zygote is not None and not zygote.alive() and not closed:
                    threading.Thread(target=self._refill, daemon=True,
                                     name="hpt-warm-fill").start()  # (a new fork server)
                return None
            try:
                proc = zygote.fork(timeout_s=_ON_DEMAND_FORK_S)
            except ZygoteError as exc:
                log.warning("warm pool: %s; the rank starts cold", exc)
                return None
            fd = proc.ready_fd
        if fd is not None:
            os.close(fd)
        request = json.dumps({"argv": argv[1:], "env": env, "cwd": cwd}).encode() + b"\n"
        try:
            assert proc.stdin is not None
            proc.stdin.write(request)
            proc.stdin.close()
            proc.stdin = None  # the rank's stdin is /dev/null from here on
        except OSError:
            proc.kill()
            proc.wait()
            return None
        threading.Thread(target=self._refill, daemon=True, name="hpt-warm-fill").start()
        return proc

    def _refill(self) -> None:
        # Replacements of their own import torch (~7 s of CPU each): start them once the ranks
        # just launched are past their own start-up, so they do not compete with it. Forks
        # cost milliseconds and go at once.
        if not self._refilling.acquire(blocking=False):
            return
        try:
            forks = self._zygote is not None and self._zygote.alive()  # (milliseconds each)
            deadline = time.monotonic() + (0.0 if forks else self._settle_timeout_s)
            while not self._closed and time.monotonic() < deadline and not self._settled():
                self._wake.wait(0.2)
            self._fill()
        finally:
            self._refilling.release()

    def ready(self) -> int:
        """Idle interpreters that finished importing torch and wait for a rank."""
        with self._lock:
            return sum(1 for p in self._idle if p.poll() is None and self._ready_signalled(p))

    def _ready_signalled(self, proc: Interpreter) -> bool:
        fd = self._ready_fds.get(proc.pid)
        if fd is None:
            return True
        if not select.select([fd], [], [], 0)[0]:
            return False
        os.close(fd)
        del self._ready_fds[proc.pid]
        return True

    def can_run(self, argv: list[str], env: dict[str, str], cwd: str | None) -> bool:
        if len(argv) < 2 or not same_interpreter(argv[0], sys.executable, env.get("PATH"), cwd):
            return False
        rest = argv[1:]
        if rest[0] == "-u":
            rest = rest[1:]
        if not rest or (rest[0].startswith("-") and rest[0] != "-m") or rest[0] == "-m" and len(rest) < 2:
            return False
        if cwd is not None and not os.path.isdir(cwd):
            return False
        return all(env.get(k) == self._env.get(k) for k in _STARTUP_ONLY)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.set()
            idle, self._idle = self._idle, []
        for proc in idle:
            self._discard(proc)
        with self._lock:
            left, self._ready_fds = list(self._ready_fds.values()), {}
        for fd in left:
            os.close(fd)
        if self._zygote is not None:
            self._zygote.close()


def same_interpreter(command: str, interpreter: str, path: str | None, cwd: str | None) -> bool:
    """Whether ``command`` (a name looked up on ``path``, or a path relative to ``cwd``) runs
    ``interpreter``: the same file once links are resolved, reached from the same directory
    (``/venv/bin/python`` and ``/venv/bin/python3`` are one interpreter; the system
    ``/usr/bin/python3`` that a venv's ``python`` links to is not: it has other packages)."""
    if os.sep not in command:
        found = shutil.which(command, path=path)
        if found is None:
            return False
        command = found
    command = os.path.join(cwd or os.getcwd(), command)

    def where(p: str) -> tuple[str, str]:
        return os.path.realpath(os.path.dirname(p)), os.path.realpath(p)

    return where(command) == where(interpreter)


def _can_renice() -> str:
    """'1' when a child may lower its niceness back after raising it (root, or RLIMIT_NICE)."""
    if os.geteuid() == 0:
        return "1"
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    return "1" if soft == resource.RLIM_INFINITY or soft >= 40 else "0"
