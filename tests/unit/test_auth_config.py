"""Configuration rules behind roles, replicas and credential files (no processes)."""

from __future__ import annotations

import stat

import pytest

from hpt import credentials
from hpt.agent.config import AgentConfig
from hpt.controller.config import ControllerConfig


def test_agent_takes_a_list_of_controller_replicas_in_order():
    cfg = AgentConfig(controller="10.0.0.1:7470, 10.0.0.2:7470", name="n")
    assert cfg.controllers == ("10.0.0.1:7470", "10.0.0.2:7470")
    with pytest.raises(ValueError, match=r"controller \('a:1,b'\) must be host:port"):
        AgentConfig(controller="a:1,b", name="n")


def test_agent_mtls_needs_a_ca_and_cert_and_key_together():
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        AgentConfig(controller="a:1", name="n", tls_ca="ca", tls_cert="c")
    with pytest.raises(ValueError, match="need tls_ca"):
        AgentConfig(controller="a:1", name="n", tls_cert="c", tls_key="k")


def test_leader_election_needs_redis_and_a_lease_shorter_than_the_agents():
    with pytest.raises(ValueError, match="needs redis_url"):
        ControllerConfig(leader_lease_s=3.0)
    with pytest.raises(ValueError, match=r"leader_lease_s \(12.0\) must be < agent_lease_s"):
        ControllerConfig(leader_lease_s=12.0, redis_url="redis://h:6379/0")
    assert ControllerConfig(leader_lease_s=3.0, redis_url="redis://h:6379/0").leader_lease_s == 3


def test_client_ca_without_a_server_certificate_is_refused():
    with pytest.raises(ValueError, match="tls_client_ca needs tls_cert"):
        ControllerConfig(tls_client_ca="ca.pem")


def test_secrets_are_created_private_and_found_for_their_address(tmp_path, monkeypatch):
    monkeypatch.setenv(credentials.HOME_ENV, str(tmp_path))
    folder = credentials.cluster_dir("[::1]:7470")
    assert folder == tmp_path / "clusters" / "__1_7470"
    path = credentials.write_secret(folder / credentials.TOKEN, credentials.new_token())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert credentials.found("[::1]:7470") == {"token_file": str(path)}
    assert credentials.found("127.0.0.1:7470") == {}
    assert credentials.new_token() != credentials.new_token()
