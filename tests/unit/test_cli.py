"""hptctl against a real gRPC server that runs a small in-test JobService.

The servicer returns fixed protos and records what it received (requests and metadata), so the
tests check both what the CLI sends and how it renders what comes back. Daemon commands run with
fake Controller/Agent classes; their process handling runs for real.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from concurrent import futures

import click
import grpc
import pytest
from click.testing import CliRunner

from hpt import client as hc
from hpt._proto import common_pb2, jobs_pb2, jobs_pb2_grpc
from hpt.cli import boot, main

T0 = 1_700_000_000.0

# --- surface freeze --------------------------------------------------------------------------

# Changing the CLI surface is a decision: update this snapshot in the same change, on purpose.
CLI_SURFACE = {
    "agent": ["--address", "--controller", "--hang-min", "--lease", "--metrics-port", "--name",
              "--no-fork-server", "--no-health-check", "--no-warm", "--peer-advertise",
              "--peer-port", "--run-dir", "--slots", "--tls-ca", "--tls-cert", "--tls-key",
              "--token-file"],
    "cancel": ["--controller", "--grace", "--tls-ca", "--token-file", "JOB_ID"],
    "cert ca": ["--days", "--out"],
    "cert issue": ["--ca-cert", "--ca-key", "--days", "--dns", "--ip", "--name", "--out"],
    "ckpt ls": ["--controller", "--output", "--tls-ca", "--token-file", "-o", "JOB_ID"],
    "controller": ["--agent-lease", "--agent-token-file", "--grow-after", "--health-port",
                   "--heartbeat-period", "--host", "--insecure", "--keep-finished",
                   "--keep-finished-for", "--launch-timeout", "--leader-lease",
                   "--max-snapshot-interval", "--max-streams", "--metrics-port", "--port",
                   "--redis-url", "--status-port", "--tls-cert", "--tls-client-ca", "--tls-key",
                   "--token-file"],
    "demo": ["--agents", "--keep", "--kill-at", "--nodes", "--procs", "--script", "--steps"],
    "describe": ["--controller", "--output", "--tls-ca", "--token-file", "-o", "JOB_ID"],
    "events": ["--controller", "--follow", "--job", "--output", "--tls-ca", "--token-file", "-f",
               "-o"],
    "logs": ["--controller", "--follow", "--output", "--rank", "--tls-ca", "--token-file", "-f",
             "-o", "JOB_ID"],
    "ls": ["--controller", "--output", "--tls-ca", "--token-file", "-o"],
    "nodes": ["--controller", "--output", "--tls-ca", "--token-file", "-o"],
    "plan": ["--compare-torchrun", "--days", "--gpus", "--gpus-per-node", "--inputs", "--output",
             "--persist-interval", "--redundancy", "--simulate", "--snapshot-interval", "-o"],
    "run": ["--env", "--keep-dir", "--max-restarts", "--nproc-per-node", "--nproc_per_node",
            "--procs-per-node", "-p", "COMMAND"],
    "status": ["--controller", "--output", "--tls-ca", "--token-file", "-o", "JOB_ID"],
    "submit": ["--adapt-cadence", "--controller", "--env", "--grace", "--hang-timeout",
               "--keep-persisted", "--max-restarts", "--min-nodes", "--name", "--nnodes",
               "--node-wait", "--nodes", "--nproc-per-node", "--nproc_per_node", "--persist-dir",
               "--persist-every", "--procs-per-node", "--rank-log-max-bytes", "--redundancy",
               "--snapshot-every", "--straggler-restart-after", "--tls-ca", "--token-file",
               "--wait", "--workdir", "-n", "-p", "COMMAND"],
    "up": ["--agents", "--host", "--port", "--redis-url", "--slots", "--token-file"],
}  # fmt: skip


def _surface(group: click.Group, prefix: str = "") -> dict[str, list[str]]:
    out = {}
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            out.update(_surface(cmd, f"{prefix}{name} "))
            continue
        opts = sorted(
            o
            for p in cmd.params
            if isinstance(p, click.Option)
            for o in (*p.opts, *p.secondary_opts)
        )
        out[prefix + name] = opts + [
            p.name.upper() for p in cmd.params if isinstance(p, click.Argument)
        ]
    return out


def test_cli_surface_is_frozen() -> None:
    assert _surface(main) == CLI_SURFACE


# --- the in-test server ----------------------------------------------------------------------


def _job(state: int = common_pb2.JOB_STATE_RUNNING, *, persisting: bool = False) -> common_pb2.Job:
    spec = common_pb2.JobSpec(
        name="train",
        command=["python", "train.py"],
        nodes=2,
        procs_per_node=2,
        min_nodes=1,
        max_restarts=3,
        env={"A": "1"},
        workdir="/w",
    )
    if persisting:  # submitted with a cadence of 1, which the controller retuned to 600
        spec.persist_dir, spec.persist_every, spec.adapt_cadence = "/ckpt", 1, True
    fault = common_pb2.Fault(
        kind="rank_exit",
        node="node-1",
        rank=1,
        message="killed by SIGKILL",
        detected_at=T0 + 10.0,
        occurred_at=T0 + 9.9,
        classification="user",
        attempt=1,
    )
    first = common_pb2.Attempt(
        number=1,
        state=common_pb2.ATTEMPT_STATE_FAILED,
        nodes=["node-0", "node-1"],
        world_size=4,
        started_at=T0 + 1.0,
        first_step_at=T0 + 2.0,
        ended_at=T0 + 10.5,
        cause=fault,
    )
    ranks = [
        common_pb2.RankStatus(
            rank=r,
            local_rank=r % 2,
            node=f"node-{r // 2}",
            pid=100 + r,
            state=common_pb2.RANK_STATE_RUNNING,
            step=20 + r,
        )
        for r in range(3)
    ]
    ranks.append(
        common_pb2.RankStatus(
            rank=3,
            local_rank=1,
            node="node-1",
            pid=0,
            state=common_pb2.RANK_STATE_FAILED,
            step=-1,
            exit_reason="exit code 3",
            exit=common_pb2.ExitInfo(exit_code=3, error_type="ValueError"),
        )
    )
    second = common_pb2.Attempt(
        number=2,
        state=common_pb2.ATTEMPT_STATE_RUNNING,
        nodes=["node-0", "node-1"],
        world_size=4,
        started_at=T0 + 11.0,
        first_step_at=T0 + 13.5,
        ranks=ranks,
    )
    return common_pb2.Job(
        id="job-1",
        spec=spec,
        state=state,
        attempts=[second, first],
        restarts=1,
        reason="restarted after rank_exit",
        created_at=T0,
        root_cause=fault,
        persist_every=600 if persisting else 0,
        snapshot_every=20 if persisting else 0,
        history=[
            common_pb2.StateChange(state="PENDING", at=T0, reason="submitted"),
            common_pb2.StateChange(state="RUNNING", at=T0 + 1.0, reason="[launched]"),
        ],
    )


class _FakeJobs(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self) -> None:
        self.requests: list[tuple[str, object]] = []
        self.metadata: list[tuple[str, dict[str, str]]] = []
        self.submit_error: tuple[grpc.StatusCode, str] | None = None
        self.job_states: list[int] = []  # successive GetJob states; the last one repeats
        self.persisting = False  # GetJob's job persists (its cadence retuned by the controller)

    def _record(self, name: str, request: object, context: grpc.ServicerContext) -> None:
        self.requests.append((name, request))
        self.metadata.append((name, dict(context.invocation_metadata())))

    def SubmitJob(self, request, context):
        self._record("SubmitJob", request, context)
        if self.submit_error is not None:
            context.abort(*self.submit_error)
        return jobs_pb2.SubmitJobResponse(job_id="job-1")

    def GetJob(self, request, context):
        self._record("GetJob", request, context)
        if request.job_id != "job-1":
            context.abort(grpc.StatusCode.NOT_FOUND, f"job {request.job_id!r} not found")
        state = self.job_states.pop(0) if len(self.job_states) > 1 else None
        state = state or (self.job_states[0] if self.job_states else common_pb2.JOB_STATE_RUNNING)
        return _job(state, persisting=self.persisting)

    def ListJobs(self, request, context):
        self._record("ListJobs", request, context)
        return jobs_pb2.ListJobsResponse(jobs=[_job(), common_pb2.Job(id="job-0")])

    def CancelJob(self, request, context):
        self._record("CancelJob", request, context)
        return _job(common_pb2.JOB_STATE_RUNNING)

    def ListNodes(self, request, context):
        self._record("ListNodes", request, context)
        return jobs_pb2.ListNodesResponse(
            nodes=[
                common_pb2.Node(
                    name="node-0",
                    address="127.0.0.1",
                    slots=2,
                    state=common_pb2.NODE_STATE_READY,
                    last_seen_at=T0,
                ),
                common_pb2.Node(
                    name="node-1",
                    address="127.0.0.1",
                    slots=2,
                    state=common_pb2.NODE_STATE_LOST,
                    reason="missed heartbeats",
                ),
            ]
        )

    def StreamLogs(self, request, context):
        self._record("StreamLogs", request, context)
        for rank in (0, 1):
            yield jobs_pb2.LogLine(attempt=1, rank=rank, stream="stdout", text=f"hello {rank}\n")

    def StreamEvents(self, request, context):
        self._record("StreamEvents", request, context)
        yield common_pb2.Event(seq=1, at=T0, kind="job_submitted", job_id="job-1", rank=-1)
        yield common_pb2.Event(
            seq=2,
            at=T0 + 10,
            kind="rank_exit",
            job_id="job-1",
            attempt=1,
            node="node-1",
            rank=1,
            message="killed by SIGKILL",
        )


@pytest.fixture
def server() -> Iterator[tuple[str, _FakeJobs]]:
    fake = _FakeJobs()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    jobs_pb2_grpc.add_JobServiceServicer_to_server(fake, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        yield f"127.0.0.1:{port}", fake
    finally:
        srv.stop(grace=None).wait(timeout=5)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(hc.CONTROLLER_ENV, raising=False)
    monkeypatch.delenv(hc.TOKEN_FILE_ENV, raising=False)


def _run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def _requests(fake: _FakeJobs, name: str) -> list:
    return [r for n, r in fake.requests if n == name]


# --- addresses and usage errors --------------------------------------------------------------


def test_resolve_controller_prefers_flag_then_env_then_default(monkeypatch) -> None:
    assert hc.resolve_controller(None) == hc.DEFAULT_CONTROLLER == "127.0.0.1:7470"
    monkeypatch.setenv(hc.CONTROLLER_ENV, "ctl.example:9000")
    assert hc.resolve_controller(None) == "ctl.example:9000"
    assert hc.resolve_controller("10.0.0.1:7000") == "10.0.0.1:7000"
    assert hc.resolve_controller("[::1]:7000") == "[::1]:7000"


@pytest.mark.parametrize(
    "bad", ["nohost", "host:", ":7470", "host:0", "host:99999", "a:b", "::1:7"]
)
def test_resolve_controller_rejects_a_bad_address_naming_controller(bad: str) -> None:
    with pytest.raises(ValueError, match="controller"):
        hc.resolve_controller(bad)


def test_bad_controller_address_is_a_usage_error() -> None:
    result = _run("ls", "--controller", "nohost")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and "controller" in result.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["submit", "--env", "BAD", "--", "echo"], "--env"),
        (["submit", "--env", "1X=2", "--", "echo"], "--env"),
        (["submit", "-n", "2", "--"], "CMD"),
        (["ls", "--bogus"], "--bogus"),
        (["status"], "JOB"),
        (["nosuchcommand"], "nosuchcommand"),
    ],
)
def test_usage_errors_exit_2_with_one_error_line(args: list[str], needle: str) -> None:
    result = _run(*args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]


def test_no_server_is_unavailable_exit_1() -> None:
    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
        result = _run("status", "job-1", "--controller", addr)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: cannot reach the controller at {addr}")


def test_python_dash_m_runs_the_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hpt.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0 and "submit" in out.stdout


# --- client commands against the server ------------------------------------------------------


def test_submit_prints_the_job_id_and_sends_the_spec(server, tmp_path, monkeypatch) -> None:
    addr, fake = server
    monkeypatch.chdir(tmp_path)
    result = _run(
        "submit",
        "--controller",
        addr,
        "-n",
        "2",
        "-p",
        "3",
        "--env",
        "A=1",
        "--env",
        "B=x=y",
        "--name",
        "t",
        "--",
        "python",
        "train.py",
        "--steps",
        "5",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "job-1"
    (req,) = _requests(fake, "SubmitJob")
    spec = req.spec
    assert list(spec.command) == ["python", "train.py", "--steps", "5"]
    assert dict(spec.env) == {"A": "1", "B": "x=y"}
    assert (spec.nodes, spec.procs_per_node, spec.min_nodes, spec.max_restarts) == (2, 3, 2, 3)
    assert spec.name == "t" and spec.workdir == str(tmp_path)
    assert not spec.HasField("node_wait_timeout_s") and not spec.HasField("stop_grace_s")


def test_submit_sends_timeouts_only_when_given(server) -> None:
    addr, fake = server
    result = _run("submit", "--controller", addr, "--node-wait", "7", "--grace", "0", "--", "true")
    assert result.exit_code == 0, result.output
    spec = _requests(fake, "SubmitJob")[0].spec
    assert (spec.node_wait_timeout_s, spec.HasField("stop_grace_s"), spec.stop_grace_s) == (
        7.0,
        True,
        0.0,
    )


def test_submit_takes_the_command_without_dashes_too(server) -> None:
    addr, fake = server
    result = _run("submit", "--controller", addr, "python", "train.py", "--steps", "5")
    assert result.exit_code == 0, result.output
    assert list(_requests(fake, "SubmitJob")[0].spec.command) == [
        "python",
        "train.py",
        "--steps",
        "5",
    ]


def test_invalid_argument_from_the_server_exits_2_with_its_message(server) -> None:
    addr, fake = server
    fake.submit_error = (grpc.StatusCode.INVALID_ARGUMENT, "procs_per_node (0) must be >= 1")
    result = _run("submit", "--controller", addr, "-p", "2", "--", "true")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: procs_per_node (0) must be >= 1"


def test_submit_wait_follows_until_terminal(server) -> None:
    addr, fake = server
    fake.job_states = [common_pb2.JOB_STATE_RUNNING, common_pb2.JOB_STATE_SUCCEEDED]
    ok = _run("submit", "--controller", addr, "--wait", "--", "true")
    assert ok.exit_code == 0 and ok.stdout.strip() == "job-1"
    assert "SUCCEEDED" in ok.stderr
    fake.job_states = [common_pb2.JOB_STATE_FAILED]
    failed = _run("submit", "--controller", addr, "--wait", "--", "true")
    assert failed.exit_code == 1 and "error: job job-1 FAILED" in failed.stderr


def test_status_json_has_the_status_fields(server) -> None:
    addr, _ = server
    result = _run("status", "job-1", "-o", "json", "--controller", addr)
    assert result.exit_code == 0
    d = json.loads(result.stdout)
    assert {k: d[k] for k in ("id", "name", "state", "attempt", "restarts", "world_size")} == {
        "id": "job-1",
        "name": "train",
        "state": "RUNNING",
        "attempt": 2,
        "restarts": 1,
        "world_size": 4,
    }
    assert d["reason"] == "restarted after rank_exit"


def test_describe_json_has_attempts_ranks_history_and_root_cause(server) -> None:
    addr, fake = server
    fake.persisting = True
    result = _run("describe", "job-1", "--output", "json", "--controller", addr)
    assert result.exit_code == 0
    d = json.loads(result.stdout)
    assert [a["number"] for a in d["attempts"]] == [1, 2]
    first = d["attempts"][0]
    assert first["state"] == "FAILED" and first["cause"]["kind"] == "rank_exit"
    assert set(first) >= {
        "number",
        "state",
        "nodes",
        "world_size",
        "started_at",
        "first_step_at",
        "ended_at",
        "cause",
    }
    assert d["attempts"][1]["ended_at"] is None
    ranks = {r["rank"]: r for r in d["ranks"]}
    assert set(ranks[0]) >= {"rank", "node", "pid", "state", "exit_reason", "step"}
    assert (ranks[0]["state"], ranks[0]["step"], ranks[0]["pid"]) == ("RUNNING", 20, 100)
    assert (ranks[3]["state"], ranks[3]["step"], ranks[3]["exit_reason"]) == (
        "FAILED",
        None,
        "exit code 3",
    )
    assert [h["state"] for h in d["history"]] == ["PENDING", "RUNNING"]
    assert set(d["history"][0]) == {"state", "at", "reason"}
    assert d["root_cause"]["node"] == "node-1" and d["root_cause"]["rank"] == 1
    (fault,) = d["faults"]
    assert fault["recovery_s"] == pytest.approx(3.5)
    assert d["persist_every"] == 600 and d["spec"]["persist_every"] == 1  # in force; submitted
    assert d["snapshot_every"] == 20 and d["spec"]["snapshot_every"] == 0


def test_describe_table_shows_the_fault_and_its_recovery(server) -> None:
    addr, fake = server
    fake.persisting = True
    result = _run("describe", "job-1", "--controller", addr)
    assert result.exit_code == 0
    out = result.stdout
    for needle in (
        "Attempts",
        "Ranks (attempt 2)",
        "Faults",
        "History",
        "rank_exit",
        "node-1 rank 1",
        "3.50 s",
        "[launched]",
        "/ckpt, every 600 steps (retuned by the controller)",
        "every 20 steps (retuned by the controller)",
    ):
        assert needle in out, needle


def test_nodes_json_has_prefixless_states(server) -> None:
    addr, _ = server
    result = _run("nodes", "-o", "json", "--controller", addr)
    assert result.exit_code == 0
    nodes = json.loads(result.stdout)
    assert [(n["name"], n["state"], n["slots"]) for n in nodes] == [
        ("node-0", "READY", 2),
        ("node-1", "LOST", 2),
    ]
    assert nodes[1]["reason"] == "missed heartbeats" and nodes[1]["last_seen_at"] is None


def test_table_outputs_render(server) -> None:
    addr, _ = server
    for args, needle in (
        (["ls"], "job-0"),
        (["nodes"], "missed heartbeats"),
        (["status", "job-1"], "restarted after rank_exit"),
        (["events"], "killed by SIGKILL"),
    ):
        result = _run(*args, "--controller", addr)
        assert result.exit_code == 0 and needle in result.stdout, (args, result.output)


def test_ls_json_lists_every_job(server) -> None:
    addr, _ = server
    jobs = json.loads(_run("ls", "-o", "json", "--controller", addr).stdout)
    assert [(j["id"], j["state"], j["attempt"]) for j in jobs] == [
        ("job-1", "RUNNING", 2),
        ("job-0", "UNSPECIFIED", 0),
    ]


def test_the_token_from_token_file_arrives_as_bearer_metadata(server, tmp_path) -> None:
    addr, fake = server
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    assert (
        _run("status", "job-1", "--controller", addr, "--token-file", str(token_file)).exit_code
        == 0
    )
    env = {hc.TOKEN_FILE_ENV: str(token_file)}
    assert _run("logs", "job-1", "--controller", addr, env=env).exit_code == 0
    seen = {name: md.get("authorization") for name, md in fake.metadata}
    assert seen == {"GetJob": "Bearer s3cret", "StreamLogs": "Bearer s3cret"}


def test_no_token_file_sends_no_authorization(server) -> None:
    addr, fake = server
    assert _run("nodes", "--controller", addr).exit_code == 0
    assert "authorization" not in fake.metadata[0][1]


def test_logs_prints_the_streamed_lines(server) -> None:
    addr, fake = server
    result = _run("logs", "job-1", "--controller", addr)
    assert result.exit_code == 0
    assert result.stdout.splitlines() == ["[rank 0] hello 0", "[rank 1] hello 1"]
    req = _requests(fake, "StreamLogs")[0]
    assert (req.job_id, req.follow, req.has_rank) == ("job-1", False, False)
    only = _run("logs", "job-1", "-f", "--rank", "1", "--controller", addr)
    assert only.stdout.splitlines() == ["hello 0", "hello 1"]  # the fake ignores the filter
    req = _requests(fake, "StreamLogs")[1]
    assert (req.follow, req.rank, req.has_rank) == (True, 1, True)


def test_events_json_is_one_object_per_line(server) -> None:
    addr, fake = server
    result = _run("events", "--job", "job-1", "-o", "json", "--controller", addr)
    assert result.exit_code == 0
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(e["seq"], e["kind"], e["rank"]) for e in events] == [
        (1, "job_submitted", None),
        (2, "rank_exit", 1),
    ]
    assert _requests(fake, "StreamEvents")[0].job_id == "job-1"


def test_cancel_waits_for_cancelled(server) -> None:
    addr, fake = server
    fake.job_states = [common_pb2.JOB_STATE_CANCELLED]
    result = _run("cancel", "job-1", "--grace", "2", "--controller", addr)
    assert result.exit_code == 0 and "cancelled" in result.stdout
    (req,) = _requests(fake, "CancelJob")
    assert (req.job_id, req.grace_s) == ("job-1", 2.0)


def test_not_found_exits_1_with_the_server_message(server) -> None:
    addr, _ = server
    result = _run("status", "nope", "--controller", addr)
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: job 'nope' not found"


# --- views -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("enum", "prefix", "to_dict", "field", "make"),
    [
        (
            common_pb2.RankState,
            "RANK_STATE_",
            hc.rank_to_dict,
            "state",
            lambda v: common_pb2.RankStatus(state=v),
        ),
        (
            common_pb2.NodeState,
            "NODE_STATE_",
            hc.node_to_dict,
            "state",
            lambda v: common_pb2.Node(state=v),
        ),
        (
            common_pb2.AttemptState,
            "ATTEMPT_STATE_",
            hc.attempt_to_dict,
            "state",
            lambda v: common_pb2.Attempt(state=v),
        ),
        (
            common_pb2.JobState,
            "JOB_STATE_",
            hc.job_to_dict,
            "state",
            lambda v: common_pb2.Job(state=v),
        ),
    ],
)
def test_every_enum_member_maps_to_its_name_without_prefix(enum, prefix, to_dict, field, make):
    for name, value in enum.items():
        assert to_dict(make(value))[field] == name.removeprefix(prefix)


def test_a_job_before_its_first_launch_is_attempt_0_with_the_requested_world_size() -> None:
    job = common_pb2.Job(id="j", spec=common_pb2.JobSpec(nodes=3, procs_per_node=2))
    d = hc.job_to_dict(job, detail=True)
    assert (d["attempt"], d["world_size"], d["ranks"], d["root_cause"]) == (0, 6, [], None)
    json.dumps(d)


# --- daemons with fake Controller/Agent classes ----------------------------------------------


class _FakeController:
    instances: list[_FakeController] = []

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.stopped_with: float | None = None
        _FakeController.instances.append(self)

    def start(self) -> int:
        return 4242

    def ready_nodes(self, names: list[str]) -> int:
        return 0  # the fake agents never register

    def wait_for_termination(self) -> None:
        pass  # returns at once: the controller "stopped on its own"

    def stop(self, grace_s: float) -> None:
        self.stopped_with = grace_s


def test_controller_command_reports_a_controller_that_stops_on_its_own(monkeypatch) -> None:
    _FakeController.instances.clear()
    fake_module = types.SimpleNamespace(Controller=_FakeController)
    monkeypatch.setitem(sys.modules, "hpt.controller.app", fake_module)
    result = _run("controller", "--port", "0", "--heartbeat-period", "0.25", "--agent-lease", "3")
    assert result.exit_code == 1 and "error: the controller stopped" in result.stderr
    assert "listening on 127.0.0.1:4242" in result.stdout
    (ctl,) = _FakeController.instances
    assert (ctl.cfg.port, ctl.cfg.heartbeat_period_s, ctl.cfg.agent_lease_s) == (0, 0.25, 3.0)
    assert ctl.stopped_with is not None


def test_controller_config_errors_are_usage_errors() -> None:
    result = _run("controller", "--heartbeat-period", "0")
    assert result.exit_code == 2 and "heartbeat_period_s" in result.stderr


def test_control_plane_stops_and_reaps_its_agents_on_sigterm(monkeypatch) -> None:
    class _Blocking(_FakeController):
        def __init__(self, cfg) -> None:
            super().__init__(cfg)
            self._done = threading.Event()

        def wait_for_termination(self) -> None:
            self._done.wait(timeout=60)

        def stop(self, grace_s: float) -> None:
            super().stop(grace_s)
            self._done.set()

    monkeypatch.setitem(
        sys.modules, "hpt.controller.app", types.SimpleNamespace(Controller=_Blocking)
    )
    from hpt.controller.config import ControllerConfig

    procs: list[subprocess.Popen] = []
    real_spawn = boot.spawn

    def spawn(argv, **kw):
        procs.append(real_spawn(argv, **kw))
        return procs[-1]

    monkeypatch.setattr(boot, "spawn", spawn)
    # The "agent" tells its parent to stop, then waits to be stopped.
    agent = "import os, signal, time; os.kill(os.getppid(), signal.SIGTERM); time.sleep(60)"
    previous = signal.getsignal(signal.SIGTERM)
    boot.run_control_plane(
        ControllerConfig(port=0),
        num_agents=1,
        agent_argv=lambda addr, i: [sys.executable, "-c", agent],
    )
    assert signal.getsignal(signal.SIGTERM) is previous
    (proc,) = procs
    assert proc.returncode == -signal.SIGTERM


def test_stop_processes_escalates_to_sigkill_and_reaps() -> None:
    code = "import signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); signal.pause()"  # noqa: E501
    proc = boot.spawn([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready and proc.stdout.readline() == b"ready\n"
        boot.stop_processes([proc], grace_s=0.2)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        proc.stdout.close()


def test_agent_command_stops_the_agent_on_sigterm(monkeypatch, tmp_path) -> None:
    created = []

    class _FakeAgent:
        def __init__(self, cfg) -> None:
            self.cfg = cfg
            self.stopped = threading.Event()
            created.append(self)

        def run(self) -> None:
            signal.raise_signal(signal.SIGTERM)
            assert self.stopped.wait(timeout=10)

        def stop(self) -> None:
            self.stopped.set()

    monkeypatch.setitem(sys.modules, "hpt.agent.daemon", types.SimpleNamespace(Agent=_FakeAgent))
    previous = signal.getsignal(signal.SIGTERM)
    result = _run(
        "agent",
        "--controller",
        "127.0.0.1:7000",
        "--name",
        "n1",
        "--slots",
        "3",
        "--lease",
        "4",
        "--no-warm",
        "--no-fork-server",
        "--run-dir",
        str(tmp_path),
    )
    assert result.exit_code == 0, result.output
    assert signal.getsignal(signal.SIGTERM) is previous
    (agent,) = created
    cfg = agent.cfg
    assert (cfg.controller, cfg.name, cfg.slots, cfg.lease_s, cfg.warm_ranks, cfg.fork_server,
            cfg.run_dir) == (
        "127.0.0.1:7000",
        "n1",
        3,
        4.0,
        False,
        False,
        str(tmp_path),
    )


# --- demo pieces -----------------------------------------------------------------------------


def _demo_view(pid: int, step: int | None = 12, state: str = "RUNNING") -> dict:
    ranks = [
        {
            "rank": r,
            "node": f"node-{r // 2}",
            "pid": pid if r == 1 else 10**7 + r,
            "state": state,
            "step": step,
        }
        for r in range(4)
    ]
    return {"attempt": 1, "world_size": 4, "ranks": ranks}


def test_demo_kills_rank_1_only_once_every_rank_reached_the_step() -> None:
    from hpt.cli import demo as _demo

    proc = boot.spawn([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert _demo._maybe_kill(_demo_view(proc.pid, step=11), kill_at=12) is None
        assert _demo._maybe_kill(_demo_view(proc.pid, step=None), kill_at=12) is None
        assert _demo._maybe_kill(_demo_view(proc.pid, state="PENDING"), kill_at=12) is None
        assert proc.poll() is None
        kill = _demo._maybe_kill(_demo_view(proc.pid, step=12), kill_at=12)
        assert kill is not None and (kill.rank, kill.pid, kill.node) == (1, proc.pid, "node-0")
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


def test_demo_summary_reports_the_fault_and_the_recovery(server) -> None:
    import io

    from rich.console import Console

    from hpt.cli import demo as _demo

    addr, fake = server
    fake.job_states = [common_pb2.JOB_STATE_SUCCEEDED]
    buf = io.StringIO()
    kill = _demo._Kill(rank=1, node="node-1", pid=101, step=12, at=T0 + 9.9)
    with hc.JobClient.connect(addr) as client:
        ok = _demo._summary(client, "job-1", kill, Console(file=buf, width=200), total_s=20.0)
    text = buf.getvalue()
    assert ok
    assert "result: job job-1 SUCCEEDED after 2 attempt(s), 1 restart(s)" in text
    assert (
        "rank_exit: killed by SIGKILL on node-1 rank 1" in text and "0.10 s after the kill" in text
    )
    assert "recovery: attempt 2 stepped 3.60 s after the kill" in text
    assert "#2 rank_exit [job-1/1/node-1 rank 1] killed by SIGKILL" in text


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl binary")
def test_tls_with_a_ca_file_and_a_token(tmp_path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    (tmp_path / "token").write_text("t0k\n")
    fake = _FakeJobs()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    jobs_pb2_grpc.add_JobServiceServicer_to_server(fake, srv)
    creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    port = srv.add_secure_port("127.0.0.1:0", creds)
    srv.start()
    try:
        addr = f"127.0.0.1:{port}"
        ok = _run(
            "nodes",
            "--controller",
            addr,
            "--tls-ca",
            str(cert),
            "--token-file",
            str(tmp_path / "token"),
        )
        assert ok.exit_code == 0, ok.output
        assert fake.metadata[0][1]["authorization"] == "Bearer t0k"
        plain = _run("nodes", "--controller", addr)  # a plaintext client cannot talk to TLS
        assert plain.exit_code == 1 and plain.stderr.startswith("error: ")
    finally:
        srv.stop(grace=None).wait(timeout=5)
