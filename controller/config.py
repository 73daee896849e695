"""Controller configuration: one frozen record built by ``hptctl controller``/``hptctl up``."""

from __future__ import annotations

from dataclasses import dataclass

from hpt._address import DEFAULT_HOST, DEFAULT_PORT


@dataclass(frozen=True, kw_only=True, slots=True)
class ControllerConfig:
    host: str = DEFAULT_HOST
    """Address to bind. Anything but loopback needs TLS (or ``insecure=True``)."""
    port: int = DEFAULT_PORT
    """Port to bind; 0 picks a free one (the bound port is returned by ``Controller.start``)."""
    redis_url: str = ""
    """``redis://host:port/db`` to keep state in Redis; empty keeps it in this process."""
    heartbeat_period_s: float = 0.5
    """How often agents send a heartbeat."""
    node_lease_s: float = 0.0
    """A node whose agent sent nothing for this many seconds is declared lost (the time since
    its last heartbeat *arrived*, so a backlog in this controller never counts against it);
    checked on every pass of the control loop, at least every ``reconcile_period_s``. 0: the
    default, ``max(2, 2.5 x heartbeat_period_s)`` (2 s at the 0.5 s period, 2.5 s at 1 s:
    node-loss detection within 3 s at one heartbeat a second). At least two periods."""
    agent_lease_s: float = 10.0
    """Agents kill their ranks after losing the controller for this long (self-fencing)."""
    reconcile_period_s: float = 0.1
    """Upper bound between two passes of the control loop (events wake it sooner)."""
    token: str = ""
    """Bearer token of the client role (``hptctl``): required on every JobService RPC when set."""
    agent_token: str = ""
    """Bearer token of the agent role: required on AgentService when set. Set both or neither;
    they must differ (a CLI token never acts as an agent)."""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    """PEM files: server certificate and key; client CA to require mTLS."""
    insecure: bool = False
    """Allow a non-loopback bind without TLS."""
    max_message_bytes: int = 16 * 1024 * 1024
    log_lines_per_rank: int = 20_000
    """Log lines the controller keeps in memory per (job, rank)."""
    progress_flush_s: float = 2.0
    """Step and snapshot progress of a running job is written to the store at most this often
    (state changes are written at once)."""
    log_bytes_per_rank: int = 4 * 1024 * 1024
    """Log characters the controller keeps in memory per (job, rank) (older lines go first)."""
    launch_timeout_s: float = 120.0
    """A rank still PENDING this long after its launch command left is a fault (launch_timeout)."""
    keep_finished_jobs: int = 1000
    """Finished jobs kept (memory and store); older ones beyond this count are dropped."""
    keep_finished_s: float = 7 * 24 * 3600.0
    """Finished jobs are dropped this long after they ended."""
    keep_finished_bytes: int = 256 * 1024 * 1024
    """Finished jobs' specs kept in all; the oldest beyond it are dropped first."""
    max_streams: int = 32
    """Concurrent ``logs -f``/``events -f`` streams; more are refused (RESOURCE_EXHAUSTED) so
    they never take the worker threads unary RPCs and agents need."""
    metrics_port: int | None = None
    """Serve Prometheus ``/metrics`` on ``host`` at this port; None: off; 0: a free port."""
    status_port: int | None = None
    """Serve the read-only status page (status_page.py) on ``host`` at this port; None: off."""
    health_port: int | None = None
    """Also serve the gRPC health service alone, in plaintext, on ``host`` at this port
    (Kubernetes gRPC probes cannot speak TLS); None: off."""
    leader_lease_s: float = 0.0
    """> 0: run leader election through a lease of this many seconds in Redis (replicated
    controllers, :mod:`hpt.controller.leader`); 0: this process always leads."""
    grow_hysteresis_s: float = 10.0
    """A node must stay free this long before a shrunk job grows back onto it."""
    max_snapshot_interval_s: float = 300.0
    """The most seconds apart the snapshot cadence of an adapting job is set (a crash of the
    script, which the failure model does not count, loses at most that)."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port ({self.port}) must be in 0..65535")
        if self.heartbeat_period_s <= 0:
            raise ValueError(f"heartbeat_period_s ({self.heartbeat_period_s}) must be > 0")
        if self.node_lease_s and not self.node_lease_s >= 2 * self.heartbeat_period_s:
            raise ValueError(f"node_lease_s ({self.node_lease_s}) must be 0 (automatic) or >= "
                             f"2 x heartbeat_period_s ({2 * self.heartbeat_period_s:g})")
        if self.agent_lease_s <= self.heartbeat_timeout_s:
            raise ValueError(
                f"agent_lease_s ({self.agent_lease_s}) must be > the heartbeat timeout "
                f"({self.heartbeat_timeout_s})"
            )
        if not self.progress_flush_s >= 0:
            raise ValueError(f"progress_flush_s ({self.progress_flush_s}) must be >= 0")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port ({self.metrics_port}) must be in 0..65535")
        if self.status_port is not None and not 0 <= self.status_port <= 65535:
            raise ValueError(f"status_port ({self.status_port}) must be in 0..65535")
        if self.health_port is not None and not 0 <= self.health_port <= 65535:
            raise ValueError(f"health_port ({self.health_port}) must be in 0..65535")
        if bool(self.token) != bool(self.agent_token):
            raise ValueError("token and agent_token must be given together (or neither)")
        if self.token and self.token == self.agent_token:
            raise ValueError("agent_token must differ from token (separate roles)")
        if self.leader_lease_s < 0:
            raise ValueError(f"leader_lease_s ({self.leader_lease_s}) must be >= 0")
        if self.leader_lease_s and not self.redis_url.startswith(("redis://", "rediss://")):
            raise ValueError("leader_lease_s needs redis_url: replicas share their state in Redis")
        if self.leader_lease_s and self.leader_lease_s >= self.agent_lease_s:
            raise ValueError(
                f"leader_lease_s ({self.leader_lease_s}) must be < agent_lease_s "
                f"({self.agent_lease_s}): agents must outlive a failover"
            )
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca needs tls_cert/tls_key (mTLS runs over TLS)")
        if self.max_message_bytes < 4 * 1024 * 1024:
            raise ValueError(f"max_message_bytes ({self.max_message_bytes}) must be >= 4 MiB")
        if self.log_bytes_per_rank < 1024:
            raise ValueError(f"log_bytes_per_rank ({self.log_bytes_per_rank}) must be >= 1024")
        if not self.launch_timeout_s > 0:
            raise ValueError(f"launch_timeout_s ({self.launch_timeout_s}) must be > 0")
        if self.keep_finished_jobs < 0:
            raise ValueError(f"keep_finished_jobs ({self.keep_finished_jobs}) must be >= 0")
        if not self.keep_finished_s > 0:
            raise ValueError(f"keep_finished_s ({self.keep_finished_s}) must be > 0")
        if not 1 <= self.max_streams <= 64:
            raise ValueError(f"max_streams ({self.max_streams}) must be in 1..64")
        if not 1 <= self.max_snapshot_interval_s <= 86400:
            raise ValueError(f"max_snapshot_interval_s ({self.max_snapshot_interval_s}) must be "
                             "in 1..86400")
        if not 0 <= self.grow_hysteresis_s <= 86400:
            raise ValueError(f"grow_hysteresis_s ({self.grow_hysteresis_s}) must be in 0..86400")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key must be given together")

    @property
    def heartbeat_timeout_s(self) -> float:
        """The node lease in effect (``node_lease_s``, or its automatic value)."""
        return self.node_lease_s or max(2.0, 2.5 * self.heartbeat_period_s)
