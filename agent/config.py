"""Agent configuration: one frozen record built by ``hptctl agent``/``hptctl up``."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from hpt.monitor.detectors.hang import HangConfig


def _default_slots() -> int:
    return os.cpu_count() or 1


@dataclass(frozen=True, kw_only=True, slots=True)
class AgentConfig:
    controller: str
    """``host:port`` of the controller, or a comma-separated list of the replicas' addresses
    (the agent tries them in turn until one that leads accepts it)."""
    name: str = field(default_factory=socket.gethostname)
    """Node name, unique in the cluster."""
    address: str = "127.0.0.1"
    """Address other nodes reach this node's ranks on (MASTER_ADDR when rank 0 lives here)."""
    slots: int = field(default_factory=_default_slots)
    """How many ranks this node may run at once."""
    run_dir: str = ""
    """Where the agent keeps its socket, rank logs and error files; default a fresh temp dir."""
    token: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    """PEM files for TLS to the controller (CA) and mTLS (client certificate and key)."""
    lease_s: float = 0.0
    """Self-fence after losing the controller this long; 0 takes the controller's value."""
    stop_grace_s: float = 5.0
    """Default seconds between SIGTERM and SIGKILL when stopping ranks."""
    warm_ranks: bool = True
    """Keep one pre-started Python (torch imported) per slot to cut restart time."""
    fork_server: bool = True
    """Fork the warm interpreters from one Python that imported torch once (``zygote.py``),
    instead of starting each on its own."""
    health_check: bool = True
    """Run the pre-flight health check at start and report it at registration."""
    metrics_port: int | None = None
    """Serve Prometheus ``/metrics`` on this port; None: off; 0: a free port (logged)."""
    hang: HangConfig = field(default_factory=HangConfig)
    """Hang deadline of local ranks: max(min_s, factor x median step time)."""
    peer_port: int = 0
    """Port of the peer service (snapshot protection between agents) on ``address``; 0: free."""
    peer_advertise: str = ""
    """``host:port`` other agents reach the peer service at; empty: ``address:peer_port``."""

    def __post_init__(self) -> None:
        if not self.controllers or any(":" not in a for a in self.controllers):
            raise ValueError(f"controller ({self.controller!r}) must be host:port[,host:port...]")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_cert and not self.tls_ca:
            raise ValueError("tls_cert/tls_key need tls_ca (mTLS runs over TLS)")
        if not self.name:
            raise ValueError("name must not be empty")
        if self.slots < 1:
            raise ValueError(f"slots ({self.slots}) must be >= 1")
        if self.lease_s < 0:
            raise ValueError(f"lease_s ({self.lease_s}) must be >= 0")
        if self.stop_grace_s < 0:
            raise ValueError(f"stop_grace_s ({self.stop_grace_s}) must be >= 0")
        if not 0 <= self.peer_port <= 65535:
            raise ValueError(f"peer_port ({self.peer_port}) must be in 0..65535")
        if self.peer_advertise and ":" not in self.peer_advertise:
            raise ValueError(f"peer_advertise ({self.peer_advertise!r}) must be host:port")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port ({self.metrics_port}) must be in 0..65535")

    @property
    def controllers(self) -> tuple[str, ...]:
        """Every controller address, in the order the agent tries them."""
        return tuple(a.strip() for a in self.controller.split(",") if a.strip())
