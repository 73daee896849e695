"""The child side of the agent's fork server (:mod:`hpt.agent.zygote` is the agent's side).

Run by the agent as ``python -m hpt._zygote SOCK_FD READY_FD``. It imports torch and
hpt once, primes what a rank's first optimizer step would import (``torch._dynamo``), writes
one byte on READY_FD, then serves fork requests on SOCK_FD, a ``SOCK_SEQPACKET`` Unix socket:

- agent -> zygote: ``{"fork": id}`` with four file descriptors attached (the child's stdin,
  stdout and stderr, and its ready pipe). The zygote forks; the child becomes a warm rank
  interpreter (:func:`hpt._warm.become_rank`) on those descriptors, in its own session, with
  ``PR_SET_PDEATHSIG = SIGKILL`` against the zygote (which has it against the agent);
- zygote -> agent: ``{"forked": id, "pid": pid}`` at once, and ``{"exited": pid, "status": s}``
  (the raw wait status) once it has reaped that child; ``{"failed": id, "error": text}`` when
  fork itself failed.

EOF on the socket (the agent closed it, or died) ends the zygote; its children get their death
signal with it. The zygote never runs autograd, OpenMP parallel regions or threads of its own
before forking: a forked child would inherit locks and pools whose threads it does not have.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys

from hpt import _pdeathsig

_MAX_PACKET = 4096


def _send(sock: socket.socket, message: dict[str, object]) -> None:
    with contextlib.suppress(OSError):  # the agent is gone: EOF ends the loop next
        sock.send(json.dumps(message).encode())


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(sock, {"exited": pid, "status": status})


def _serve(sock: socket.socket) -> tuple[list[int], int] | None:
    """Fork on request until EOF. Returns ``([stdin, stdout, stderr], ready)`` descriptors in a
    forked child, None in the zygote at EOF."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    me = os.getpid()
    while True:
        readable = select.select([sock, wake_r], [], [])[0]
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
            _reap(sock)
        if sock not in readable:
            continue
        try:
            data, fds, _, _ = socket.recv_fds(sock, _MAX_PACKET, 4)
        except OSError:
            data, fds = b"", []
        if not data:
            for fd in fds:
                os.close(fd)
            return None
        try:
            request = json.loads(data)
            ident = int(request["fork"])
            if len(fds) != 4:
                raise ValueError(f"fork request with {len(fds)} descriptors, not 4")
        except (ValueError, KeyError, TypeError) as exc:
            for fd in fds:
                os.close(fd)
            _send(sock, {"failed": -1, "error": f"bad request: {exc}"})
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            _send(sock, {"failed": ident, "error": str(exc)})
            continue
        if pid == 0:  # the child: drop the zygote's plumbing, keep the four descriptors
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.close(wake_r)
            os.close(wake_w)
            sock.close()
            os.setsid()
            _pdeathsig.arm(me)
            return fds[:3], fds[3]
        for fd in fds:
            os.close(fd)
        _send(sock, {"forked": ident, "pid": pid})


def _fresh_child_state() -> None:
    """What a cold interpreter would have of its own: numpy's global generator is seeded from
    the OS at import, so forked children would share one sequence (Python's ``random`` reseeds
    itself after fork). Then the first backward pass, which the zygote must not run."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()
    import torch

    (torch.nn.Parameter(torch.zeros(4)) * 2.0).sum().backward()


def main() -> int:
    from hpt import _warm

    # at the agent's priority (an interpreter of its own imports niced): the pool's first
    # interpreters wait for this import, and it happens once
    sock_fd, ready_fd = int(sys.argv[1]), int(sys.argv[2])
    _warm.import_torch(autograd=False)
    with contextlib.suppress(OSError):
        os.write(ready_fd, b"1")
    os.close(ready_fd)
    sock = socket.socket(fileno=sock_fd)
    child = _serve(sock)
    if child is None:
        return 0
    stdio, child_ready = child
    _fresh_child_state()
    for target, fd in enumerate(stdio):
        os.dup2(fd, target)
        os.close(fd)
    return _warm.become_rank(child_ready)


if __name__ == "__main__":
    sys.exit(main())
