"""hptctl submit's job options come from the job spec (hpt/jobspec.py), not a copy of it."""

from __future__ import annotations

import click

from hpt import jobspec
from hpt.cli import main
from tests.unit.test_cli import _clean_env, _requests, _run, server  # noqa: F401  (fixtures)


def _submit_options() -> dict[str, click.Option]:
    cmd = main.commands["submit"]
    return {p.name: p for p in cmd.params if isinstance(p, click.Option) and p.name}


def test_every_spec_field_is_a_submit_option_with_the_specs_help_and_bounds():
    options = _submit_options()
    for f, option in jobspec.options():
        if f.name == "command":
            continue  # the argument after --
        assert f.name in options, f"{f.name} has no submit option"
        assert option.help in (options[f.name].help or ""), f.name
        if option.cli and option.bounds is not None:
            kind = options[f.name].type
            assert (kind.min, kind.max) == (option.bounds.lo, option.bounds.hi), f.name
            assert options[f.name].default is None, f"{f.name}: an option not given is not sent"


def test_a_new_spec_option_is_sent_when_given_and_left_out_when_not(server) -> None:  # noqa: F811
    addr, fake = server
    result = _run("submit", "--controller", addr, "--rank-log-max-bytes", "4096",
                  "--persist-dir", "ckpts", "--", "true")
    assert result.exit_code == 0, result.output
    spec = _requests(fake, "SubmitJob")[0].spec
    assert spec.rank_log_max_bytes == 4096 and spec.persist_dir.endswith("/ckpts")
    assert spec.persist_dir.startswith("/")  # made absolute where hptctl runs
    assert _run("submit", "--controller", addr, "--", "true").exit_code == 0
    assert _requests(fake, "SubmitJob")[1].spec.rank_log_max_bytes == 0


def test_a_value_outside_the_specs_bounds_is_a_usage_error_naming_the_option(server) -> None:  # noqa: F811
    addr, fake = server
    result = _run("submit", "--controller", addr, "--keep-persisted", "0", "--", "true")
    assert result.exit_code == 2 and "--keep-persisted" in result.output
    assert _requests(fake, "SubmitJob") == []


def test_a_flag_option_is_sent_true_when_given_and_the_specs_default_otherwise(server) -> None:  # noqa: F811
    addr, fake = server
    result = _run("submit", "--controller", addr, "--adapt-cadence", "--snapshot-every", "18",
                  "--", "true")
    assert result.exit_code == 0, result.output
    assert _requests(fake, "SubmitJob")[0].spec.adapt_cadence is True
    assert _requests(fake, "SubmitJob")[0].spec.snapshot_every == 18
    assert _run("submit", "--controller", addr, "--", "true").exit_code == 0
    assert _requests(fake, "SubmitJob")[1].spec.adapt_cadence is False
    assert "--adapt-cadence" in _run("submit", "--help").output
