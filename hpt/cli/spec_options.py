"""``hptctl submit``'s job options, made from the job spec's own field list (hpt/jobspec.py).

Each spec field marked for the command line becomes one option: its flags, help text, default
and bounds come from the field, so a new job option needs no edit here. An option the user
does not give is not sent, and the spec's default applies. The few options ``submit`` spells
its own way (the command, ``--nodes N|MIN:MAX``, ``--min-nodes``, ``--env``) take their help
from the spec too (``spec_help``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import Field
from typing import Any, TypeVar

import click

from hpt import jobspec

F = TypeVar("F", bound=Callable[..., Any])


def spec_help(name: str, default_text: str = "") -> str:
    """The help of spec field ``name`` with its default (and bounds), as ``--help`` shows it."""
    f, option = _field(name)
    text = _help(f, option, default_text)
    return text if option.bounds is None else f"{text} ({option.bounds})"


def spec_options(*, default_text: dict[str, str] | None = None) -> Callable[[F], F]:
    """Add one option per command-line spec field; the command receives them as ``**spec``
    keyword arguments named after the fields (None: not given)."""
    overrides = default_text or {}

    def decorate(fn: F) -> F:
        for f, option in reversed(list(jobspec.options())):
            if option.cli and f.type == "bool":  # a flag: absent is None, the spec's default
                fn = click.option(*_flags(f, option), f.name, is_flag=True, default=None,
                                  help=_help(f, option, overrides.get(f.name, "")))(fn)
            elif option.cli:
                fn = click.option(*_flags(f, option), f.name, default=None,
                                  type=_type(f, option), metavar=option.metavar or None,
                                  help=_help(f, option, overrides.get(f.name, "")))(fn)
        return fn

    return decorate


def given(options: dict[str, Any]) -> dict[str, Any]:
    """The spec options the user gave, directories made absolute (they are where the user is,
    not where an agent runs)."""
    out = {}
    for f, option in jobspec.options():
        value = options.get(f.name)
        if option.cli and value is not None:
            out[f.name] = os.path.abspath(value) if option.path and value else value
    return out


def _field(name: str) -> tuple[Field[Any], jobspec.Option]:
    return next((f, o) for f, o in jobspec.options() if f.name == name)


def _flags(f: Field[Any], option: jobspec.Option) -> tuple[str, ...]:
    return option.flags or ("--" + f.name.replace("_", "-"),)


def _type(f: Field[Any], option: jobspec.Option) -> click.ParamType:
    if option.path:
        return click.Path(file_okay=False)
    b = option.bounds
    if f.type == "int":
        return click.IntRange(int(b.lo), int(b.hi)) if b else click.INT
    if f.type == "float":
        return click.FloatRange(b.lo, b.hi, min_open=b.lo_open) if b else click.FLOAT
    return click.STRING


def _help(f: Field[Any], option: jobspec.Option, default_text: str) -> str:
    shown = default_text or option.default_text or _plain(f.default)
    return f"{option.help} [default: {shown}]"


def _plain(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value) if value != "" else "none"
