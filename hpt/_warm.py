"""The child side of a warm rank interpreter (:mod:`hpt.agent.warm` keeps the pool): a Python
process that imports torch and hpt ahead of time, then becomes a rank.

Run by the agent as ``python -m hpt._warm READY_FD RENICE``. It warms up (at the lowest CPU
priority when RENICE is ``1``: it may raise the priority back), writes one byte on READY_FD once
torch is imported and primed, then reads one JSON line on stdin, ``{"argv", "env", "cwd"}``, and
runs that script or module as ``__main__`` as ``python [-u] script.py ...`` or ``python -m mod
...`` would. EOF instead of a request: the pool closed it before handing out a rank (exit 0).
This is rank-side code: running it imports the ``hpt`` package (the training API) before torch,
as the rank's ``import hpt`` would; the agent only names it in an argv.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

_MAX_REQUEST_BYTES = 4 * 1024 * 1024


def import_torch(*, autograd: bool = True) -> None:
    """Import torch and pay its lazy first-use costs now (the first optimizer step imports
    torch._dynamo: ~0.8 s). Touches no RNG and leaves no state behind. ``autograd=False`` runs
    no backward: the fork server (:mod:`hpt._zygote`) must not start autograd's threads."""
    import torch
    import torch.distributed  # noqa: F401
    import torch.nn  # noqa: F401
    import torch.optim  # noqa: F401

    param = torch.nn.Parameter(torch.zeros(4))
    if autograd:
        (param * 2.0).sum().backward()
    else:
        param.grad = torch.zeros(4)
    for opt in (torch.optim.SGD([param], lr=0.1), torch.optim.Adam([param]),
                torch.optim.AdamW([param])):
        opt.step()
        opt.zero_grad()


def _serve() -> int:
    # Warm-up at the lowest CPU priority, so refilling the pool does not slow the ranks
    # training next to it; only when we may raise the priority back before becoming a rank.
    ready_fd, renice = sys.argv[1:3]
    niced = renice == "1"
    base = os.getpriority(os.PRIO_PROCESS, 0)
    if niced:
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    import_torch()
    return become_rank(int(ready_fd), restore_priority=base if niced else None)


def become_rank(ready_fd: int, *, restore_priority: int | None = None) -> int:
    """Say ready on ``ready_fd``, wait for the rank's request on stdin and run it as __main__
    (at ``restore_priority`` when the warm-up ran niced)."""
    import runpy

    # the pool may have handed us out (and closed its end) before we got here
    with contextlib.suppress(OSError):
        os.write(ready_fd, b"1")
    os.close(ready_fd)
    line = sys.stdin.buffer.readline(_MAX_REQUEST_BYTES)
    if restore_priority is not None:
        os.setpriority(os.PRIO_PROCESS, 0, restore_priority)
    if not line:
        return 0  # the pool closed us before handing out a rank
    request = json.loads(line)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.environ.clear()
    os.environ.update(request["env"])
    if request["cwd"]:
        os.chdir(request["cwd"])
    args = list(request["argv"])
    if args[0] == "-u":
        args = args[1:]
    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        sys.path.insert(0, os.getcwd())
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        script = os.path.abspath(args[0])
        sys.argv = [args[0], *args[1:]]
        sys.path[0] = os.path.dirname(script)
        runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(_serve())
