"""torchrun's spellings on ``hptctl submit`` and ``hptctl run``'s arguments (no cluster here:
tests/integration/test_torchrun.py runs both for real)."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from hpt._run import torchrun_nnodes
from hpt.cli import main


@click.command()
@click.option("-n", "--nodes", type=int, default=1)
@click.option("--min-nodes", type=int, default=None)
@click.option("--nnodes", default=None)
def probe(nodes: int, min_nodes: int | None, nnodes: str | None) -> None:
    if nnodes is not None:
        nodes, min_nodes = torchrun_nnodes(click.get_current_context(), nodes, min_nodes, nnodes)
    click.echo(f"{nodes} {min_nodes}")


@pytest.mark.parametrize(("args", "out"), [
    (["--nnodes", "2"], "2 None"),
    (["--nnodes", "1:4"], "4 1"),
    (["--nnodes", "3:3"], "3 3"),
    (["-n", "2"], "2 None"),
])
def test_nnodes_maps_onto_nodes_and_min_nodes(args, out):
    result = CliRunner().invoke(probe, args)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == out


@pytest.mark.parametrize(("args", "message"), [
    (["--nnodes", "4:1"], "must have 1 <= MIN <= MAX"),
    (["--nnodes", "0"], "must have 1 <= MIN <= MAX"),
    (["--nnodes", "a:b"], "must be N or MIN:MAX with integers"),
    (["--nnodes", "2", "-n", "2"], "--nnodes and --nodes are exclusive"),
    (["--nnodes", "2", "--min-nodes", "1"], "--nnodes and --min-nodes are exclusive"),
])
def test_bad_nnodes_is_refused_naming_the_option(args, message):
    result = CliRunner().invoke(probe, args)
    assert result.exit_code == 2
    assert message in result.output


def test_run_refuses_a_bad_env_pair_before_starting_anything():
    result = CliRunner().invoke(main, ["run", "-p", "2", "--env", "NOEQUALS", "--", "python", "x"])
    assert result.exit_code == 2
    assert "'--env'" in result.output and "must be KEY=VALUE" in result.output
