"""hpt: fault-tolerant job runner and checkpoint service for PyTorch training.

What a training script uses::

    import hpt
    ctx = hpt.init()          # process group up, connected to the local agent
    ckpt = hpt.Checkpointer(model, optimizer, extra_state={"sampler": sampler})
    start = ckpt.restore()    # steps already done: from agent memory, disk, or 0
    for step in range(start, steps):
        ...
        optimizer.step()
        ckpt.save(step + 1)   # returns at once; the copy overlaps the next step
        hpt.step(step + 1)    # completed steps; the agent sees progress (hangs, stragglers)

A plain torchrun-style script (reading RANK, WORLD_SIZE, MASTER_ADDR...) runs unchanged under
hpt; ``hpt.init`` adds progress reports and a named error on crash.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import sys
from dataclasses import dataclass

from hpt import _rank_monitor
from hpt._rank import AgentChannel, install_error_file_hook
from hpt._rank_monitor import section
from hpt._rank_protocol import Exiting, Hello
from hpt._restore_env import restore_plan

__all__ = ["Checkpointer", "Context", "init", "step", "current", "section"]


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    # torch is imported only when a script asks for the Checkpointer
    if name == "Checkpointer":
        from hpt.checkpoint import Checkpointer

        return Checkpointer
    raise AttributeError(f"module 'hpt' has no attribute {name!r}")


_context: Context | None = None
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Context:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    job_id: str
    attempt: int
    node: str
    restore_step: int
    """The in-memory snapshot step the controller chose for this attempt (0: none);
    ``Checkpointer.restore()`` loads it (or a persisted one) and returns where to resume."""
    channel: AgentChannel | None


def init(
    backend: str | None = None,
    timeout: datetime.timedelta = datetime.timedelta(minutes=5),
    *,
    init_process_group: bool = True,
) -> Context:
    """Connect to the local agent (when run by hpt) and set up ``torch.distributed``.

    Args:
        backend: ``"gloo"``/``"nccl"``; default nccl when CUDA is available, else gloo.
        timeout: deadline for the rendezvous and for every collective.
        init_process_group: set False if the script initialises the process group itself.

    Returns:
        The rank's Context (also available later from ``hpt.current()``).
    """
    global _context
    env = os.environ
    rank = int(env.get("RANK", "0"))
    world = int(env.get("WORLD_SIZE", "1"))
    error_file = env.get("HPT_ERROR_FILE")
    if error_file:
        install_error_file_hook(error_file)
    channel = None
    if env.get("HPT_AGENT_SOCKET"):
        try:
            hello = Hello(job_id=env.get("HPT_JOB_ID", ""),
                          attempt=int(env.get("HPT_ATTEMPT", "1")), rank=rank, pid=os.getpid())
        except ValueError as exc:  # not launched by an agent as it would: train without it
            log.warning("hpt: not reporting to the agent at %s: %s", env["HPT_AGENT_SOCKET"], exc)
        else:
            channel = AgentChannel(env["HPT_AGENT_SOCKET"], hello)
    if init_process_group and "MASTER_ADDR" in env:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            if backend is None:
                backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    first = _context is None
    _context = Context(
        rank=rank,
        world_size=world,
        local_rank=int(env.get("LOCAL_RANK", "0")),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", "1")),
        job_id=env.get("HPT_JOB_ID", ""),
        attempt=int(env.get("HPT_ATTEMPT", "1")),
        node=env.get("HPT_NODE", ""),
        restore_step=restore_plan(env).step,
        channel=channel,
    )
    _rank_monitor.start(job_id=_context.job_id, attempt=_context.attempt, rank=rank,
                        node=_context.node, channel=channel)
    if first:
        atexit.register(_at_exit)
    return _context


def _at_exit() -> None:
    """The script is done (its main returned, ``sys.exit``, or an exception was reported): tell
    the agent, so teardown is not judged as a hang and a crash inside the interpreter's teardown
    is told apart from a failure of the script; then end what hpt started while the interpreter
    still runs: the watchdog thread, the instrumentation, and the default process group if the
    script did not destroy it, whoever created it. Its backend threads are joined now: a gloo
    worker thread ("pt_gloo_runloop") that drops the last reference to a finished work's
    tensors during interpreter finalization must take the GIL, CPython ends such a thread with
    ``pthread_exit``, and the forced unwind through that C++ destructor calls
    ``std::terminate`` ("terminate called without an active exception": SIGABRT after the
    script's last line, seen in about 1 of 15 exits of a plain two-rank gloo script)."""
    ctx = _context
    if ctx is not None and ctx.channel is not None:
        ctx.channel.send(Exiting())
    try:
        _rank_monitor.stop()
        # not after an uncaught exception (Python sets sys.last_value): peers may sit in a
        # collective with this rank, and a destroy could wait on them
        if getattr(sys, "last_value", None) is None:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    except Exception as exc:  # exiting anyway: say why teardown was not clean
        log.warning("hpt: teardown at exit: %s", exc)
    if ctx is not None and ctx.channel is not None:
        ctx.channel.close()


def current() -> Context | None:
    return _context


def step(completed: int) -> None:
    """Report that ``completed`` steps are done. Cheap; never raises into the training loop."""
    ctx = _context
    if ctx is not None and ctx.channel is not None:
        ctx.channel.step(completed)
        _rank_monitor.on_step(completed)
