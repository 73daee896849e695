"""Wire -> agent, for the commands the controller sends: the one place the agent reads them.

The job's spec comes whole inside every ``Launch`` and goes through ``hpt.jobspec.from_proto``
like on the controller: the same defaults, the same validation. An option only agents use is
read where it is used (``LaunchSpec.job``), never named here.
"""

from __future__ import annotations

from hpt import jobspec
from hpt._proto import agent_pb2
from hpt.agent.launcher import LaunchSpec


def launch_from_proto(msg: agent_pb2.Launch) -> LaunchSpec:
    """Raises ValueError naming the field when the launch or its spec is unusable."""
    if not msg.job_id or msg.attempt < 1:
        raise ValueError("launch.job_id and launch.attempt must be set")
    if not msg.ranks:
        raise ValueError("launch.ranks must not be empty")
    if not msg.HasField("spec"):
        raise ValueError("launch.spec must be set (a controller older than this agent?)")
    try:
        job = jobspec.from_proto(msg.spec)
    except ValueError as exc:
        raise ValueError(f"launch.spec: {exc}") from None
    return LaunchSpec(
        job_id=msg.job_id,
        attempt=msg.attempt,
        job=job,
        ranks=tuple((r.rank, r.local_rank) for r in msg.ranks),
        world_size=msg.world_size,
        local_world_size=msg.local_world_size,
        master_addr=msg.master_addr,
        master_port=msg.master_port,
        node_rank=msg.node_rank,
        num_nodes=msg.num_nodes,
        restore_step=msg.restore_step,
    )
