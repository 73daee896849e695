"""``hptctl controller`` options that bound what one client or one job can take from the
controller (retention of finished jobs, follow-streams, launch deadline); kept here so the CLI
module only applies them."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from hpt.cli.common import given

_OPTIONS: dict[str, str] = {
    "keep_finished": "keep_finished_jobs",
    "keep_finished_for": "keep_finished_s",
    "launch_timeout": "launch_timeout_s",
    "max_streams": "max_streams",
}


def limit_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Adds the options; the command receives them as ``limits``: ControllerConfig kwargs."""

    @click.option("--keep-finished", type=click.IntRange(min=0), default=None,
                  help="Finished jobs the controller keeps [default: 1000].")
    @click.option("--keep-finished-for", type=click.FloatRange(min=0, min_open=True),
                  default=None, metavar="SECONDS",
                  help="Drop finished jobs this long after they ended [default: 7 days].")
    @click.option("--launch-timeout", type=click.FloatRange(min=0, min_open=True), default=None,
                  metavar="SECONDS",
                  help="A rank not started this long after its launch is a fault [default: 120].")
    @click.option("--max-streams", type=click.IntRange(1, 64), default=None,
                  help="Concurrent 'logs -f'/'events -f' streams; more are refused [default: 32].")
    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        limits = given(**{cfg: kwargs.pop(opt) for opt, cfg in _OPTIONS.items()})
        return f(*args, limits=limits, **kwargs)

    return wrapper
