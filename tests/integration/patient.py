"""Starting a test cluster with more patience than ``LocalCluster.start``."""

from __future__ import annotations

from tests.integration.cluster import LocalCluster


def start_slowly(cluster: LocalCluster, ready_timeout_s: float = 180) -> LocalCluster:
    """``cluster.start()`` that waits longer for the agents' health checks (a loaded machine,
    interpreters importing large trainers)."""
    cluster.start_controller()
    for i in range(cluster.num_agents):
        cluster.start_agent(f"node-{i}")
    cluster.wait_nodes_ready(cluster.num_agents, timeout_s=ready_timeout_s)
    return cluster
