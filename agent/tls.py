"""The agent's TLS credentials, in one place: to the controller and between agents.

An agent's certificate names its node (subject CN or a DNS SAN equal to the node name, see
``hptctl cert issue``) and is signed by the cluster CA. The same files serve three uses:

- the agent's stream to the controller (:func:`channel_credentials`): mTLS, the controller
  accepts the registration only for a node the certificate names;
- the agent's own server for peer snapshot transfer (:func:`server_credentials`, used by
  ``peers.PeerAuth.bind``): it requires a client certificate from the same CA;
- a transfer client dialing another agent (:func:`channel_credentials`, used by
  ``peers.PeerAuth.channel``); a peer service can name its caller with :func:`peer_node`.

Without ``tls_ca`` everything is plaintext (loopback ``hptctl up``): the functions return None
and :func:`peer_node` returns "".
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import grpc


class TLSFiles(Protocol):
    """Where an agent's PEM files are (``AgentConfig``, ``peers.PeerAuth``)."""

    @property
    def tls_ca(self) -> str: ...
    @property
    def tls_cert(self) -> str: ...
    @property
    def tls_key(self) -> str: ...


def _read(path: str, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{field} ({path!r}) cannot be read: {e}") from e


def channel_credentials(cfg: TLSFiles) -> grpc.ChannelCredentials | None:
    """mTLS client credentials from ``cfg`` (CA, certificate, key); None without ``tls_ca``.

    Raises:
        ValueError: a PEM file cannot be read (the error names the field).
    """
    if not cfg.tls_ca:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(cfg.tls_ca, "tls_ca"),
        private_key=_read(cfg.tls_key, "tls_key") if cfg.tls_key else None,
        certificate_chain=_read(cfg.tls_cert, "tls_cert") if cfg.tls_cert else None,
    )


def server_credentials(cfg: TLSFiles) -> grpc.ServerCredentials | None:
    """Server credentials for an agent-to-agent service: this agent's certificate, and client
    certificates required and verified against the same CA. None without TLS configured.

    Raises:
        ValueError: TLS is configured without a certificate and key, or a file cannot be read.
    """
    if not cfg.tls_ca:
        return None
    if not cfg.tls_cert:
        raise ValueError("tls_cert/tls_key are needed to serve peers over mTLS")
    return grpc.ssl_server_credentials(
        [(_read(cfg.tls_key, "tls_key"), _read(cfg.tls_cert, "tls_cert"))],
        root_certificates=_read(cfg.tls_ca, "tls_ca"),
        require_client_auth=True,
    )


def peer_node(context: grpc.ServicerContext) -> str:
    """The node name of the agent calling an mTLS service: its certificate's subject CN
    (verified by gRPC against the CA); "" on a plaintext connection."""
    auth = context.auth_context() or {}
    for value in auth.get("x509_common_name", ()):
        return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return ""
