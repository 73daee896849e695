"""Children that die with their parent, with no Python run between fork and exec.

``subprocess.Popen(preexec_fn=...)`` runs Python in the forked child, so CPython also runs every
``os.register_at_fork`` handler there, gRPC's included: in a process with live gRPC threads the
child then touched the parent's epoll state ("epoll_wait error: Bad file descriptor", exit -6),
and each fork printed gRPC's ``fork_posix`` INFO lines. Without ``preexec_fn`` CPython forks
(vfork where it can) and execs from C. The death signal is set instead by a small exec wrapper:
a fresh ``python -I -S`` that calls ``prctl(PR_SET_PDEATHSIG)``, checks that the parent that
launched it is still its parent (if not, the parent died before the signal was armed, so it
exits), and execs the real command in place (same pid, same file descriptors).

The death signal fires when the *thread* that forked exits: fork from a thread that lives as
long as the parent (the agent's spawner thread, ``hptctl up``'s main thread).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1

_WRAPPER = (
    "import ctypes,os,sys\n"
    "ctypes.CDLL(None,use_errno=True).prctl(1,int(sys.argv[2]),0,0,0)\n"
    "if os.getppid()!=int(sys.argv[1]):os._exit(70)\n"
    "try:os.execvp(sys.argv[3],sys.argv[3:])\n"
    "except OSError as e:\n"
    " sys.stderr.write(f'cannot run {sys.argv[3]!r}: {e}\\n');os._exit(127)\n"
)
"""argv: [parent pid, signal number, command...]. Exit 70 (EX_SOFTWARE): the parent is gone;
127: the command could not be executed (as a shell says)."""


def wrap(argv: list[str], sig: signal.Signals = signal.SIGKILL) -> list[str]:
    """``argv`` run so that the child gets ``sig`` when this process's forking thread exits.
    Returns ``argv`` unchanged where the kernel has no parent death signal (not Linux)."""
    if sys.platform != "linux":
        return list(argv)
    return [sys.executable, "-I", "-S", "-c", _WRAPPER, str(os.getpid()), str(int(sig)), *argv]


def arm(parent: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """In a process forked without exec (the fork server's children, :mod:`hpt._zygote`): get
    ``sig`` when the forking thread of ``parent`` exits; exit at once (70, as the wrapper) if
    ``parent`` is already gone."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(70)
