"""torchrun's spellings on ``hptctl submit`` and ``hptctl run``'s arguments (no cluster here:
tests/integration/test_torchrun.py runs both for real)."""

from __future__ import annotations

from click.testing import CliRunner

from hpt.cli import main
from tests.unit.test_cli import _clean_env, _requests, _run, server  # noqa: F401  (fixtures)


def test_nnodes_and_nproc_per_node_map_onto_the_job_spec(server) -> None:  # noqa: F811
    addr, fake = server
    result = _run("submit", "--controller", addr, "--nnodes", "1:2", "--nproc-per-node", "3",
                  "--", "true")
    assert result.exit_code == 0, result.output
    spec = _requests(fake, "SubmitJob")[0].spec
    assert (spec.nodes, spec.min_nodes, spec.procs_per_node) == (2, 1, 3)


def test_a_bad_nnodes_range_is_a_usage_error(server) -> None:  # noqa: F811
    addr, _ = server
    result = _run("submit", "--controller", addr, "--nnodes", "3:2", "--", "true")
    assert result.exit_code == 2 and "--nodes" in result.output, result.output


def test_run_refuses_a_bad_env_pair_before_starting_anything():
    result = CliRunner().invoke(main, ["run", "-p", "2", "--env", "NOEQUALS", "--", "python", "x"])
    assert result.exit_code == 2
    assert "'--env'" in result.output and "must be KEY=VALUE" in result.output
