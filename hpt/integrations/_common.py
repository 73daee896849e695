"""What the trainer callbacks share: joining hpt, progress beats, sections that span hooks."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import hpt
from hpt._rank_protocol import Finished

log = logging.getLogger(__name__)


def ensure_init() -> hpt.Context:
    """``hpt.init()`` unless the script already called it; the trainer owns the process group."""
    ctx = hpt.current()
    if ctx is None:
        ctx = hpt.init(init_process_group=False)
    return ctx


def report_ddp(model: Any) -> bool:
    """Report the bucket all-reduces of ``model`` when a trainer wrapped it in DDP (see
    :mod:`hpt.integrations.ddp`); True when the hook is registered. A hook of the user's own
    stays: hpt then only warns."""
    import torch

    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return False
    from hpt.integrations.ddp import report_bucket_allreduces

    try:
        report_bucket_allreduces(model)
    except RuntimeError as exc:  # the user registered a hook of their own
        log.warning("[hpt] DDP all-reduces not reported: %s", exc)
        return False
    return True


def beat(completed: int) -> None:
    """Tell the agent the rank is working (an evaluation or save batch finished) without
    completing a training step: the hang deadline counts from here, step timings are untouched."""
    ctx = hpt.current()
    if ctx is not None and ctx.channel is not None:
        ctx.channel.step(completed)


def finished() -> None:
    """Tell the agent training is over on this rank: no hang check while the process shuts down
    (a trainer's teardown and the interpreter's exit can be silent for seconds)."""
    ctx = hpt.current()
    if ctx is not None and ctx.channel is not None:
        ctx.channel.send(Finished())


class Sections:
    """``hpt.section(name)`` opened in one trainer hook and closed in another."""

    def __init__(self) -> None:
        self._open: dict[str, contextlib.ExitStack] = {}

    def enter(self, name: str, timeout: float | None = None) -> None:
        """Open section ``name`` (with its own hang deadline ``timeout``, seconds) unless open."""
        if name in self._open:
            return
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(hpt.section(name, timeout=timeout))
        except Exception as exc:  # never into the training loop
            log.debug("hpt: section %s not timed: %s", name, exc)
        self._open[name] = stack

    def exit(self, name: str) -> None:
        stack = self._open.pop(name, None)
        if stack is not None:
            stack.close()

    def close(self) -> None:
        for name in list(self._open):
            self.exit(name)
