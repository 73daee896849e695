"""Security on by default: roles by token, agent identity by mTLS certificate, refusals counted.

Certificates are made here with ``cryptography`` (:mod:`hpt.certs`): the cluster CA, the
controller's certificate, agent certificates naming their node, one from a foreign CA, one
expired. A real controller serves on loopback over TLS requiring client certificates.
"""

from __future__ import annotations

import datetime as dt
import os
import queue
import signal
import stat
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from hpt import certs
from hpt._proto import agent_pb2, agent_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from hpt.agent import tls
from hpt.agent.config import AgentConfig
from hpt.controller.app import Controller
from hpt.controller.config import ControllerConfig
from tests.integration.cluster import ROOT, free_port, wait_for

CLIENT_TOKEN = "client-token-for-tests-0123456789"
AGENT_TOKEN = "agent-token-for-tests-9876543210"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = certs.make_ca()
    ca.write(d, "ca")
    certs.issue(ca, "localhost", ips=("127.0.0.1",)).write(d, "server")
    for node in ("node-0", "node-1"):
        certs.issue(ca, node).write(d, node)
    certs.issue(ca, "hptctl").write(d, "cli")
    certs.issue(certs.make_ca("other-ca"), "node-0").write(d, "foreign")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    certs.issue(ca, "node-0", days=1, not_before=past).write(d, "expired")
    return d


@pytest.fixture
def controller(pki):
    cfg = ControllerConfig(
        port=0, token=CLIENT_TOKEN, agent_token=AGENT_TOKEN,
        tls_cert=str(pki / "server.crt"), tls_key=str(pki / "server.key"),
        tls_client_ca=str(pki / "ca.crt"),
    )
    c = Controller(cfg)
    c.start()
    yield c
    c.stop(grace_s=0.1)


def _channel(pki: Path, port: int, stem: str | None, *, ca: str = "ca") -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(pki / f"{ca}.crt").read_bytes(),
        private_key=(pki / f"{stem}.key").read_bytes() if stem else None,
        certificate_chain=(pki / f"{stem}.crt").read_bytes() if stem else None,
    )
    return grpc.secure_channel(f"127.0.0.1:{port}", creds,
                               options=[("grpc.ssl_target_name_override", "localhost")])


def _register(channel: grpc.Channel, node: str, token: str) -> agent_pb2.ControllerMessage:
    """Open an agent stream, register as ``node``, return the controller's first message."""
    outbox: queue.Queue = queue.Queue()
    outbox.put(agent_pb2.AgentMessage(register=agent_pb2.Register(
        node=node, address="127.0.0.1", slots=1, hostname="test")))

    def requests():  # type: ignore[no-untyped-def]
        while (msg := outbox.get()) is not None:
            yield msg

    call = agent_pb2_grpc.AgentServiceStub(channel).Connect(
        requests(), metadata=[("authorization", f"Bearer {token}")], timeout=10)
    try:
        return next(call)
    finally:
        outbox.put(None)
        call.cancel()


def _failures(c: Controller) -> dict[str, float]:
    out = {}
    for line in c.metrics.metrics.render().decode().splitlines():
        if line.startswith("hpt_auth_failures_total{"):
            reason = line.split('reason="')[1].split('"')[0]
            out[reason] = float(line.rsplit(" ", 1)[1])
    return out


def test_agent_with_its_own_certificate_registers_as_its_node(controller, pki):
    with _channel(pki, controller.port, "node-0") as ch:
        first = _register(ch, "node-0", AGENT_TOKEN)
    assert first.WhichOneof("kind") == "registered" and first.registered.node == "node-0"


def test_agent_certificate_of_another_node_cannot_register_as_node_0(controller, pki):
    with _channel(pki, controller.port, "node-1") as ch, pytest.raises(grpc.RpcError) as err:
        _register(ch, "node-0", AGENT_TOKEN)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "node-0" in err.value.details() and "node-1" in err.value.details()
    assert _failures(controller).get("wrong_identity") == 1.0
    with controller.reconciler.lock:
        assert "node-0" not in controller.reconciler.nodes


def test_cli_token_cannot_act_as_an_agent_and_agent_token_cannot_submit(controller, pki):
    with _channel(pki, controller.port, "cli") as ch:
        with pytest.raises(grpc.RpcError) as err:
            _register(ch, "hptctl", CLIENT_TOKEN)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        stub = jobs_pb2_grpc.JobServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.ListJobs(jobs_pb2.ListJobsRequest(), timeout=10,
                          metadata=[("authorization", f"Bearer {AGENT_TOKEN}")])
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as err:
            stub.ListJobs(jobs_pb2.ListJobsRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.ListNodes(jobs_pb2.ListNodesRequest(), timeout=10,
                            metadata=[("authorization", f"Bearer {CLIENT_TOKEN}")])
        assert list(ok.nodes) == []
    assert _failures(controller) == {"wrong_role": 2.0, "missing_token": 1.0}


@pytest.mark.parametrize("stem, ca", [("foreign", "ca"), ("expired", "ca"), (None, "ca")],
                         ids=["client-cert-of-a-wrong-ca", "expired-client-cert", "no-client-cert"])
def test_tls_handshake_refuses_bad_client_certificates(controller, pki, stem, ca):
    with _channel(pki, controller.port, stem, ca=ca) as ch, pytest.raises(grpc.RpcError) as err:
        _register(ch, "node-0", AGENT_TOKEN)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with controller.reconciler.lock:
        assert "node-0" not in controller.reconciler.nodes


def test_client_trusting_a_wrong_ca_refuses_the_controller(controller, pki):
    # the agent's side of "wrong CA": the controller's certificate does not verify
    # foreign.crt is a leaf of another CA, not the CA that signed server.crt
    with _channel(pki, controller.port, "node-0", ca="foreign") as ch, \
            pytest.raises(grpc.RpcError) as err:
        _register(ch, "node-0", AGENT_TOKEN)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_on_the_tls_port_is_refused(controller):
    with grpc.insecure_channel(f"127.0.0.1:{controller.port}") as ch, \
            pytest.raises(grpc.RpcError) as err:
        _register(ch, "node-0", AGENT_TOKEN)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_peer_transfer_credentials_identify_the_calling_agent(pki):
    """The helpers the agent-to-agent snapshot service uses: mTLS both ways, caller named."""
    seen: list[str] = []

    class Probe(health.HealthServicer):
        def Check(self, request, context):  # type: ignore[no-untyped-def]
            seen.append(tls.peer_node(context))
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    def agent_cfg(stem: str) -> AgentConfig:
        return AgentConfig(controller="127.0.0.1:1", name=stem, tls_ca=str(pki / "ca.crt"),
                           tls_cert=str(pki / f"{stem}.crt"), tls_key=str(pki / f"{stem}.key"))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(Probe(), server)
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(agent_cfg("node-0")))
    server.start()
    try:
        opts = [("grpc.ssl_target_name_override", "node-0")]
        with grpc.secure_channel(f"127.0.0.1:{port}", tls.channel_credentials(agent_cfg("node-1")),
                                 options=opts) as ch:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert seen == ["node-1"]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch, pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert seen == ["node-1"]
    finally:
        server.stop(0)


@pytest.mark.timeout(300)  # hptctl up, an agent and six CLI processes on a 2-core machine
def test_hptctl_up_generates_a_private_token_the_cli_finds_and_never_leaks_it(tmp_path):
    home = tmp_path / "home"
    port = free_port()
    env = {**os.environ, "HPT_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "up.log"
    hptctl = [sys.executable, "-m", "hpt.cli"]
    with open(log_path, "wb") as log:
        up = subprocess.Popen([*hptctl, "up", "--agents", "1", "--port", str(port), "--slots", "1"],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                              start_new_session=True)
    folder = home / "clusters" / f"127.0.0.1_{port}"
    try:
        token_file = wait_for(lambda: (folder / "token").is_file() and folder / "token", 60,
                              "token written")
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE((folder / "agent-token").stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert token != (folder / "agent-token").read_text().strip()

        def cli(*args: str, home_dir: Path = home) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*hptctl, *args], cwd=ROOT,
                                  env={**env, "HPT_HOME": str(home_dir),
                                       "HPT_CONTROLLER": f"127.0.0.1:{port}"},
                                  capture_output=True, text=True, timeout=60)

        wait_for(lambda: '"READY"' in cli("nodes", "-o", "json").stdout, 120, "node READY")
        anonymous = cli("nodes", home_dir=tmp_path / "elsewhere")
        assert anonymous.returncode != 0 and "UNAUTHENTICATED" in anonymous.stderr.upper()
        script = "import os; print('ENV', sorted(os.environ.items()))"
        submitted = cli("submit", "-n", "1", "-p", "1", "--wait", "--", sys.executable, "-c",
                        script)
        assert submitted.returncode == 0, submitted.stderr
        job_id = cli("ls", "-o", "json").stdout.split('"id": "')[1].split('"')[0]
        logs = cli("logs", job_id).stdout
        events = cli("events", "-o", "json").stdout
        assert "ENV [" in logs  # the rank's whole environment is in there
        for text, where in ((logs, "rank env/logs"), (events, "events")):
            assert token not in text, where
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
    out = log_path.read_text()
    assert token not in out and str(token_file) in out
    assert not (folder / "token").exists() and not (folder / "agent-token").exists()
    for logfile in tmp_path.rglob("*.log"):
        assert token not in logfile.read_text(errors="replace"), logfile


def test_token_and_agent_token_must_be_separate_roles():
    with pytest.raises(ValueError, match="agent_token must differ"):
        ControllerConfig(token="same", agent_token="same")
    with pytest.raises(ValueError, match="together"):
        ControllerConfig(token="only-client")
