"""The controller process: store, reconciler and gRPC server wired together.

``Controller(cfg).start()`` returns the bound port; ``wait_for_termination()`` blocks until
``stop()`` (or a crash of the control loop, which stops the server so the process exits and its
supervisor restarts it: state is in the store).

With ``leader_lease_s`` the process starts as a standby (:mod:`hpt.controller.leader`): the
server answers health checks only, and the state is loaded and the control loop started when
this process wins the lease; losing it ends the process like a crash does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hpt._proto import agent_pb2, agent_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from hpt.controller.agent_stream import AgentServicer, HeartbeatIntake, SyncInterceptorAdapter
from hpt.controller.auth import AuthInterceptor
from hpt.controller.config import ControllerConfig
from hpt.controller.decode import DecodeErrorInterceptor
from hpt.controller.leader import LeaderElector, StandbyGate
from hpt.controller.metrics import ControllerMetrics
from hpt.controller.model import NodeState
from hpt.controller.reconcile import Reconciler
from hpt.controller.server import JobServicer
from hpt.controller.status_page import StatusPage
from hpt.controller.store import FencedError, Store, open_store

log = logging.getLogger(__name__)

_SERVER_START_TIMEOUT_S = 30.0
_MAX_CONCURRENT_RPCS = 100_000
"""Every agent holds one stream: this bounds agents plus concurrent client calls."""

_SERVICES = (
    jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
    agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Controller:
    def __init__(self, cfg: ControllerConfig, store: Store | None = None) -> None:
        if not is_loopback(cfg.host) and not cfg.tls_cert and not cfg.insecure:
            raise ValueError(
                f"host ({cfg.host}) is not loopback: give tls_cert/tls_key, or insecure=True"
            )
        self.cfg = cfg
        self.store = store if store is not None else open_store(cfg.redis_url)
        self.reconciler = Reconciler(cfg, self.store)
        self.metrics = ControllerMetrics(self.reconciler)
        self.status_page: StatusPage | None = None
        self._server: grpc.aio.Server | None = None
        self._intake: HeartbeatIntake | None = None
        # the gRPC server runs on its own asyncio loop: agent streams are coroutines there
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="hpt-grpc",
                                             daemon=True)
        # unary RPCs and the follow-streams (at most max_streams of them) run on this pool
        self._pool = futures.ThreadPoolExecutor(max_workers=cfg.max_streams + 16,
                                                thread_name_prefix="hpt-rpc")
        # agents' registrations and disconnects (they take the reconciler's lock)
        self._agent_pool = futures.ThreadPoolExecutor(max_workers=4,
                                                      thread_name_prefix="hpt-agents")
        self._health_server: grpc.Server | None = None
        self._health = health.HealthServicer()
        self._done = threading.Event()
        self.port = 0
        self.health_port = 0
        self.elector: LeaderElector | None = None
        self._gate = StandbyGate(lambda: self.elector.leader_name() if self.elector else "")
        if cfg.leader_lease_s:
            self.elector = LeaderElector(
                self.store,  # type: ignore[arg-type]  # config validation: a RedisStore
                lease_s=cfg.leader_lease_s,
                on_elected=self._lead,
                on_lost=lambda reason: self._done.set(),
            )
            self.reconciler.fence = self.elector.check

    def start(self) -> int:
        """Bind and serve; lead at once, or (with leader election) once the lease is won."""
        cfg = self.cfg
        interceptors: list[grpc.ServerInterceptor] = []
        if cfg.token:
            interceptors.append(AuthInterceptor(
                client_token=cfg.token, agent_token=cfg.agent_token,
                on_failure=lambda reason: self.metrics.metrics.inc(
                    "hpt_auth_failures_total", reason=reason),
            ))
        interceptors.append(DecodeErrorInterceptor())
        interceptors.append(self._gate)
        for service in _SERVICES:
            self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.reconciler.on_crash = lambda exc: self._done.set()
        if self.elector is None:
            self._lead(0)  # before serving: no RPC ever meets the standby gate
        self._loop_thread.start()
        try:
            self._server, self.port = asyncio.run_coroutine_threadsafe(
                self._start_server(interceptors), self._loop).result(_SERVER_START_TIMEOUT_S)
        except BaseException:
            self._close_loop()
            raise
        health_servicer = self._health
        # "" answers liveness (the process serves); the services answer whether it leads
        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        if cfg.health_port is not None:
            self._health_server = grpc.server(
                futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="hpt-health"))
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self._health_server)
            self.health_port = self._health_server.add_insecure_port(
                f"{cfg.host}:{cfg.health_port}")
            self._health_server.start()
        self.metrics.start()
        if cfg.metrics_port is not None:
            self.metrics.serve(cfg.host, cfg.metrics_port)
        if cfg.status_port is not None:
            self.status_page = StatusPage(self.reconciler, token=cfg.token,
                                          tls_cert=cfg.tls_cert, tls_key=cfg.tls_key)
            self.status_page.serve(cfg.host, cfg.status_port)
        log.info("controller listening on %s:%d (store: %s)", cfg.host, self.port,
                 "redis" if cfg.redis_url else "embedded")
        if self.elector is not None:
            log.info("standby until the leader lease is won (lease %.1fs)", cfg.leader_lease_s)
            self.metrics.metrics.set("hpt_controller_leader", 0)
            self.elector.start()
        return self.port

    def ready_nodes(self, names: list[str]) -> int:
        """How many of the nodes ``names`` are registered and READY."""
        rec = self.reconciler
        with rec.lock:
            return sum(1 for n in names
                       if n in rec.nodes and rec.nodes[n].node.state == NodeState.READY)

    async def _start_server(
        self, interceptors: list[grpc.ServerInterceptor]
    ) -> tuple[grpc.aio.Server, int]:
        """Build and start the server on its loop; unary RPCs (sync handlers) run on a pool."""
        cfg = self.cfg
        options = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.aio.server(
            migration_thread_pool=self._pool,
            interceptors=[SyncInterceptorAdapter(i, wraps=isinstance(i, DecodeErrorInterceptor))
                          for i in interceptors],
            options=options,
            maximum_concurrent_rpcs=_MAX_CONCURRENT_RPCS,
        )
        self._intake = HeartbeatIntake(self.reconciler, asyncio.get_running_loop())
        jobs_pb2_grpc.add_JobServiceServicer_to_server(JobServicer(self.reconciler, self._pool), server)
        agent_pb2_grpc.add_AgentServiceServicer_to_server(
            AgentServicer(
                self.reconciler, self._intake, self._agent_pool, mtls=bool(cfg.tls_client_ca),
                on_auth_failure=lambda reason: self.metrics.metrics.inc(
                    "hpt_auth_failures_total", reason=reason),
            ),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*_SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert:
            creds = grpc.ssl_server_credentials(
                [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())],
                root_certificates=Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None,
                require_client_auth=bool(cfg.tls_client_ca),
            )
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
        if not port:
            raise OSError(f"could not bind {address}")
        await server.start()
        return server, port

    def _lead(self, epoch: int) -> None:
        """Take over: rebuild the state from the store, start the loop, serve jobs and agents
        (whose re-registration adopts their running ranks: no job restarts)."""
        self.reconciler.load()
        self.reconciler.start()
        self._gate.open()
        for service in _SERVICES:
            self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.metrics.metrics.set("hpt_controller_leader", 1)
        self.metrics.metrics.set("hpt_controller_leader_epoch", epoch)
        if epoch:
            log.info("leading with epoch %d", epoch)

    def wait_for_termination(self, timeout_s: float | None = None) -> bool:
        """Block until stopped (or the control loop crashed); True if it ended."""
        return self._done.wait(timeout_s)

    def stop(self, grace_s: float = 1.0) -> None:
        if self._health_server is not None:
            self._health_server.stop(0)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                asyncio.run_coroutine_threadsafe(self._server.stop(grace_s), self._loop).result(
                    grace_s + 5.0)
            self._server = None
        if self._intake is not None:
            self._intake.close()
        self._close_loop()
        self.metrics.close()
        if self.status_page is not None:
            self.status_page.close()
        try:
            self.reconciler.stop()
        except FencedError as e:  # deposed: the new leader owns the state; nothing to flush
            log.warning("final flush refused: %s", e)
        if self.elector is not None:
            self.elector.stop()
        self.store.close()
        self._done.set()

    def _close_loop(self) -> None:
        if self._loop_thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(timeout=10.0)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._agent_pool.shutdown(wait=False, cancel_futures=True)
