"""The agent's one proto mapping: the commands the controller sends (wire -> agent) and what
the agent reports about its ranks (agent -> wire).

The job's spec comes whole inside every ``Launch`` and goes through ``hpt.jobspec.from_proto``
like on the controller: the same defaults, the same validation. An option only agents use is
read where it is used (``LaunchSpec.job``), never named here.
"""

from __future__ import annotations

from collections.abc import Iterable

from hpt import jobspec
from hpt._proto import agent_pb2, common_pb2
from hpt.agent.launcher import LaunchSpec, RankPhase, RankProcess
from hpt.monitor.columns import pack_collectives, pack_steps
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


def step_columns(records: Iterable[StepRecord]) -> list[agent_pb2.StepColumns]:
    """Completed steps as one columnar summary per (job, attempt), what a heartbeat carries
    instead of one ``StepTiming`` per record: packed (``hpt.monitor.columns``), which the
    controller turns into lists in one C call."""
    out: dict[tuple[str, int], agent_pb2.StepColumns] = {}
    cols: dict[tuple[str, int], tuple[list[int], list[int], list[float], list[float],
                                      list[float]]] = {}
    for rec in records:
        key = (rec.job_id, rec.attempt)
        c = cols.get(key)
        if c is None:
            c = cols[key] = ([], [], [], [], [])
        c[0].append(rec.rank)
        c[1].append(rec.step)
        c[2].append(rec.end_s - rec.start_s)
        c[3].append(rec.data_wait_s)
        c[4].append(rec.compute_s)
    for (job_id, attempt), (rank, step, step_s, wait, compute) in cols.items():
        out[(job_id, attempt)] = agent_pb2.StepColumns(
            job_id=job_id, attempt=attempt, packed=pack_steps(rank, step, step_s, wait, compute))
    return list(out.values())


def collective_columns(records: Iterable[CollectiveRecord]) -> list[agent_pb2.CollectiveColumns]:
    """Completed collectives as one columnar summary per (job, attempt)."""
    cols: dict[tuple[str, int], tuple[dict[str, int], list[int], list[int], list[int],
                                      list[float]]] = {}
    for rec in records:
        key = (rec.job_id, rec.attempt)
        c = cols.get(key)
        if c is None:
            c = cols[key] = ({}, [], [], [], [])
        ops = c[0]
        index = ops.get(rec.op)
        if index is None:
            index = ops[rec.op] = len(ops)
        c[1].append(rec.rank)
        c[2].append(rec.seq)
        c[3].append(index)
        c[4].append(rec.exit_s - rec.enter_s if rec.exit_s is not None else 0.0)
    return [
        agent_pb2.CollectiveColumns(job_id=job_id, attempt=attempt, ops=list(ops),
                                    packed=pack_collectives(rank, seq, op_index, duration))
        for (job_id, attempt), (ops, rank, seq, op_index, duration) in cols.items()
    ]


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
