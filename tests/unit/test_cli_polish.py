"""What a newcomer sees of hptctl: a version, help on every option, honest ranges, JSON logs,
progress in ``status``, a sentence instead of an empty ``ckpt ls`` table."""

from __future__ import annotations

import json

import click
from click.testing import CliRunner

from hpt._proto import common_pb2
from hpt.cli import main
from tests.unit.test_cli import _FakeJobs, server  # noqa: F401  (the in-test JobService)


def _run(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _options(group: click.Group, prefix: str = ""):  # type: ignore[no-untyped-def]
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from _options(cmd, f"{prefix}{name} ")
            continue
        for p in cmd.params:
            if isinstance(p, click.Option):
                yield f"{prefix}{name} {p.opts[-1]}", p


def test_version_prints_the_package_version():
    result = _run("--version")
    assert result.exit_code == 0 and result.output.startswith("hptctl ")
    assert result.output.split()[1][0].isdigit()


def test_every_option_of_every_command_has_help():
    missing = [name for name, p in _options(main) if not (p.help or "").strip()]
    assert missing == []


def test_nodes_and_procs_advertise_and_enforce_the_range_the_controller_accepts():
    help_text = " ".join(_run("submit", "--help").output.split())
    assert "(1..16384)" in help_text and "1<=x<=64" in help_text
    result = _run("submit", "-n", "0", "--", "python", "x.py")
    assert result.exit_code == 2 and "1..16384" in result.output
    result = _run("submit", "-p", "65", "--", "python", "x.py")
    assert result.exit_code == 2 and "1<=x<=64" in result.output


def test_logs_json_is_one_object_per_line(server):  # noqa: F811
    addr, _ = server
    result = _run("logs", "job-1", "-o", "json", "--controller", addr)
    assert result.exit_code == 0
    lines = [json.loads(ln) for ln in result.output.splitlines()]
    assert lines == [{"attempt": 1, "rank": r, "stream": "stdout", "text": f"hello {r}"}
                     for r in (0, 1)]


def test_status_shows_the_step_every_rank_completed(server):  # noqa: F811
    addr, _ = server
    d = json.loads(_run("status", "job-1", "-o", "json", "--controller", addr).output)
    # ranks 0..2 reported steps 20..22, rank 3 none: the job as a whole has no step yet
    assert d["step"] is None
    table = _run("status", "job-1", "--controller", addr).output
    assert "progress" in table and "no step reported yet" in table


def test_ckpt_ls_of_a_job_without_snapshots_says_why(server):  # noqa: F811
    addr, fake = server
    fake.job_states = [common_pb2.JOB_STATE_SUCCEEDED]
    out = _run("ckpt", "ls", "job-1", "--controller", addr).output
    assert "in-memory snapshots were freed when it ended" in out
    assert "--persist-dir" in out


def test_submit_sends_the_hang_timeout(server):  # noqa: F811
    addr, fake = server
    result = _run("submit", "--hang-timeout", "45", "--controller", addr, "--", "python", "x.py")
    assert result.exit_code == 0
    (req,) = [r for name, r in fake.requests if name == "SubmitJob"]
    assert req.spec.hang_timeout_s == 45.0
