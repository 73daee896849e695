"""Who may call what on the controller: two roles by bearer token, agent identity by certificate.

- **client** (``hptctl``, scripts): ``JobService`` and reflection, with the client token.
- **agent**: ``AgentService``, with the agent token. The tokens differ (``ControllerConfig``
  refuses equal ones), so a CLI token cannot register an agent and an agent token cannot submit.
- **agent identity**: with mTLS (``tls_client_ca``) an agent may register only as a node its
  verified certificate names (subject CN or a DNS SAN), see :func:`identity_error`; every report
  on that stream is then taken for that node only (the servicer labels them, the reconciler
  refuses reports about ranks another node hosts).

Health checks need nothing (Kubernetes probes). Every refusal is counted through
``on_failure(reason)`` (``hpt_auth_failures_total``) and logged without the presented secret.
TLS handshake failures (wrong CA, expired certificate, plaintext client) end inside gRPC's core
before any Python runs; they are refused all the same but cannot be counted here.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable

import grpc

log = logging.getLogger(__name__)

_AGENT_PREFIX = "/hpt.v1.AgentService/"
_HEALTH_PREFIX = "/grpc.health.v1.Health/"


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks ``authorization: Bearer <token>`` against the role the called service needs.

    Args:
        client_token: token of the client role (JobService, reflection).
        agent_token: token of the agent role (AgentService).
        on_failure: ``(reason)`` for every refused call; reason is one of
            ``hpt.monitor.metrics.AUTH_FAILURES``.
    """

    def __init__(
        self, *, client_token: str, agent_token: str, on_failure: Callable[[str], None]
    ) -> None:
        if not client_token or not agent_token or client_token == agent_token:
            raise ValueError("client_token and agent_token must be set and differ")
        self._tokens = {
            "client": f"Bearer {client_token}".encode(),
            "agent": f"Bearer {agent_token}".encode(),
        }
        self._on_failure = on_failure

        def deny(code: grpc.StatusCode, text: str):  # type: ignore[no-untyped-def]
            def handler(request, context):  # type: ignore[no-untyped-def]
                context.abort(code, text)

            return {
                (False, False): grpc.unary_unary_rpc_method_handler(handler),
                (False, True): grpc.unary_stream_rpc_method_handler(handler),
                (True, False): grpc.stream_unary_rpc_method_handler(handler),
                (True, True): grpc.stream_stream_rpc_method_handler(handler),
            }

        self._deny = {
            "missing_token": deny(grpc.StatusCode.UNAUTHENTICATED, "missing bearer token"),
            "bad_token": deny(grpc.StatusCode.UNAUTHENTICATED, "wrong bearer token"),
            "wrong_role": deny(
                grpc.StatusCode.PERMISSION_DENIED, "this token's role may not call this service"
            ),
        }

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        method = handler_call_details.method
        if method.startswith(_HEALTH_PREFIX):
            return continuation(handler_call_details)
        role = "agent" if method.startswith(_AGENT_PREFIX) else "client"
        other = "client" if role == "agent" else "agent"
        presented = [
            value.encode() if isinstance(value, str) else value
            for key, value in handler_call_details.invocation_metadata or ()
            if key == "authorization"
        ]
        if any(hmac.compare_digest(p, self._tokens[role]) for p in presented):
            return continuation(handler_call_details)
        if not presented:
            reason = "missing_token"
        elif any(hmac.compare_digest(p, self._tokens[other]) for p in presented):
            reason = "wrong_role"
        else:
            reason = "bad_token"
        self._on_failure(reason)
        log.warning("refused %s: %s (a %s token is needed)", method, reason, role)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return self._deny[reason][(handler.request_streaming, handler.response_streaming)]


def peer_names(context: grpc.ServicerContext) -> set[str]:
    """Names the caller's verified TLS client certificate carries (CN and SANs); empty without
    mTLS. gRPC fills these only after verifying the chain against the configured client CA."""
    auth = context.auth_context() or {}
    names: set[str] = set()
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth.get(key, ()):
            names.add(value.decode(errors="replace") if isinstance(value, bytes) else str(value))
    return names


def identity_error(context: grpc.ServicerContext, node: str, *, mtls: bool) -> str:
    """Why an agent may not register as ``node`` on this connection ("" when it may).

    With mTLS the node name must be one its certificate names; without mTLS (loopback
    ``hptctl up``) the agent token alone is the credential and any name is accepted.
    """
    if not mtls:
        return ""
    names = peer_names(context)
    if node in names:
        return ""
    shown = ", ".join(sorted(names)[:4]) or "none"
    return f"register.node ({node!r}) is not a name in the client certificate ({shown})"
