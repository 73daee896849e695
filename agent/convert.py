"""The agent's one proto mapping: the commands the controller sends (wire -> agent) and what
the agent reports about its ranks (agent -> wire).

The job's spec comes whole inside every ``Launch`` and goes through ``hpt.jobspec.from_proto``
like on the controller: the same defaults, the same validation. An option only agents use is
read where it is used (``LaunchSpec.job``), never named here.
"""

from __future__ import annotations

from hpt import jobspec
from hpt._proto import agent_pb2, common_pb2
from hpt.agent.launcher import LaunchSpec, RankPhase, RankProcess
from hpt.monitor.records import CollectiveRecord, StepRecord

_RANK_STATE = {
    RankPhase.PENDING: common_pb2.RANK_STATE_PENDING,
    RankPhase.RUNNING: common_pb2.RANK_STATE_RUNNING,
    RankPhase.SUCCEEDED: common_pb2.RANK_STATE_SUCCEEDED,
    RankPhase.FAILED: common_pb2.RANK_STATE_FAILED,
    RankPhase.STOPPED: common_pb2.RANK_STATE_STOPPED,
}


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

def rank_report(proc: RankProcess) -> agent_pb2.RankReport:
    status = common_pb2.RankStatus(
        rank=proc.rank,
        local_rank=proc.local_rank,
        node=proc.node,
        pid=proc.pid,
        state=_RANK_STATE[proc.phase],
        step=proc.step,
        step_at=proc.step_at,
        first_step_at=proc.first_step_at,
    )
    if proc.ended:
        status.exit_reason = proc.exit_reason()
        status.exit.CopyFrom(
            common_pb2.ExitInfo(
                exit_code=proc.exit_code,
                signal=proc.signal,
                error_type=proc.error_type,
                error_message=proc.error_message,
                traceback=proc.traceback,
                ended_at=proc.ended_at,
            )
        )
    return agent_pb2.RankReport(job_id=proc.job_id, attempt=proc.attempt, status=status)


def step_timing(rec: StepRecord) -> agent_pb2.StepTiming:
    return agent_pb2.StepTiming(
        job_id=rec.job_id,
        attempt=rec.attempt,
        rank=rec.rank,
        step=rec.step,
        start_s=rec.start_s,
        end_s=rec.end_s,
        data_wait_s=rec.data_wait_s,
        compute_s=rec.compute_s,
    )


def collective_timing(rec: CollectiveRecord, *, in_flight: bool) -> agent_pb2.CollectiveTiming:
    return agent_pb2.CollectiveTiming(
        job_id=rec.job_id,
        attempt=rec.attempt,
        rank=rec.rank,
        seq=rec.seq,
        op=rec.op,
        nbytes=rec.nbytes,
        enter_s=rec.enter_s,
        exit_s=rec.exit_s or 0.0,
        in_flight=in_flight,
    )
