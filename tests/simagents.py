"""Simulated agents: many per process, each speaking the real ``AgentService.Connect`` protocol.

Used by the scale harness (``tests/bench/bench_scale.py``) and by small functional tests of the
controller under many agents. One asyncio loop runs every agent of a ``Fleet``; each agent holds
its own bidirectional gRPC stream (agents share a channel per ``agents_per_channel``, as many
HTTP/2 streams on one connection), registers with ``slots`` slots, then heartbeats every period
the controller hands back in ``Registered``. Each heartbeat carries what a real agent's does:
one ``RankReport`` per live rank with step progress and held/persisted snapshot steps, the step
timing records of the steps its ranks made since the last beat (``steps_per_s`` per rank), and
``collectives_per_step`` collective records per step. A ``Launch`` starts simulated ranks at
once (state RUNNING, reported on the next beat, which is sent immediately as a real agent
does); a ``Stop`` ends them as STOPPED. With ``protect_build_s`` (default), a node that the
launch's protection layout makes a parity holder protects the step each protection round names
(the targets of every ack, pushed ones included): ``protect_build_s`` after a target its ranks
hold, it reports the piece at once, as a real agent's early heartbeat does, and keeps
reporting it (two per stripe: the newest two steps built).

The fleet measures what the controller does with it: the latency from sending heartbeat ``seq``
to receiving its ``HeartbeatAck``, when each ``Launch`` arrived, and it can silence an agent
(``silence``: the stream stays open, heartbeats stop; what a node that hangs or loses its
network looks like to the controller).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections.abc import Iterable

import grpc

from hpt._proto import agent_pb2, agent_pb2_grpc, checkpoint_pb2, common_pb2
from hpt.monitor.columns import pack_collectives, pack_steps
from hpt.monitor.records import timing_stride


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class FleetConfig:
    target: str
    """Controller address, ``host:port``."""
    num_agents: int
    slots: int = 8
    """Ranks each node runs (GPUs per node)."""
    steps_per_s: float = 1.0
    """Training steps per second per rank (timing records shipped per beat follow from it)."""
    collectives_per_step: int = 0
    """Collective timing records per rank per step."""
    columns: bool = True
    """Send completed steps and collectives as columnar summaries (``step_columns``,
    ``collective_columns``), as the agent does; False: one message per record (older agents,
    and the only form a controller from before the summaries reads)."""
    packed: bool = True
    """Columns packed into bytes (``packed``), as the agent sends them; False: the repeated
    fields (agents before the packed form)."""
    snapshot_every: int = 10
    """A snapshot every N steps; the newest 3 are reported as held in memory."""
    replicated: bool = False
    """The ranks report data-parallel snapshots (no sharded tensor: ``snapshot_replicated``),
    as DDP does; False: sharded state (ZeRO/FSDP), as by default."""
    split: str = "chunk:4096,14336,128256"
    """How sharded state is cut, as the ranks report it (``snapshot_split``: FSDP2's
    ``Shard(0)`` of a Llama-3-8B-like model's dims); "": not reported (cut some other way)."""
    protect_build_s: float = 0.05
    """Seconds a parity holder takes to build a round's piece; 0: no protection simulated
    (pieces never reported: no round ever completes)."""
    agents_per_channel: int = 100
    name_prefix: str = "sim"
    connect_concurrency: int = 256
    """Registrations in flight at once (a fleet of 10,000 does not dial in one instant)."""

    def __post_init__(self) -> None:
        if self.num_agents < 1:
            raise ValueError(f"num_agents ({self.num_agents}) must be >= 1")
        if self.slots < 1:
            raise ValueError(f"slots ({self.slots}) must be >= 1")


@dataclasses.dataclass(slots=True)
class _SimRank:
    job_id: str
    attempt: int
    rank: int
    local_rank: int
    step: int
    state: int = common_pb2.RANK_STATE_RUNNING
    started: float = 0.0  # monotonic
    last_step_at: float = 0.0  # wall clock
    first_step_at: float = 0.0
    stride: int = 1  # steps per timing entry (timing_stride of the world size), as the agent


class SimAgent:
    """One simulated node; all of its work runs on the fleet's loop."""

    def __init__(self, fleet: Fleet, index: int, channel: grpc.aio.Channel) -> None:
        self.fleet = fleet
        self.name = f"{fleet.cfg.name_prefix}-{index:05d}"
        self._stub = agent_pb2_grpc.AgentServiceStub(channel)
        self._outbox: asyncio.Queue[agent_pb2.AgentMessage | None] = asyncio.Queue()
        self.period_s = 0.5
        self.registered = asyncio.Event()
        self.ended = asyncio.Event()
        self.silenced_at = 0.0  # wall clock of the last heartbeat before silence, 0 if talking
        self.last_beat_at = 0.0  # wall clock
        self.ranks: dict[tuple[str, int, int], _SimRank] = {}
        self.launches: list[tuple[str, int, float]] = []  # (job, attempt, wall clock received)
        self._seq = 0
        self._sent: dict[int, float] = {}  # seq -> monotonic send time
        self._kick = asyncio.Event()
        self.error: str = ""
        self.stripes: dict[tuple[str, int], list[int]] = {}  # (job, attempt) -> parity stripes
        self.pieces: dict[tuple[str, int, int], list[int]] = {}  # (job, attempt, stripe) -> steps
        self._building: set[tuple[str, int, int]] = set()  # (job, attempt, step) in progress

    # ---------------------------------------------------------------- stream

    async def run(self, start_sem: asyncio.Semaphore) -> None:
        async def requests():  # type: ignore[no-untyped-def]
            yield agent_pb2.AgentMessage(register=agent_pb2.Register(
                node=self.name, address="127.0.0.1", slots=self.fleet.cfg.slots,
                hostname=self.name, free_port=20000 + (hash(self.name) % 30000),
                layout_shares=True))
            while True:
                msg = await self._outbox.get()
                if msg is None:
                    return
                yield msg

        beat: asyncio.Task[None] | None = None
        try:
            async with start_sem:
                call = self._stub.Connect(requests())
                first = await call.read()
                if first is grpc.aio.EOF or first.WhichOneof("kind") != "registered":
                    self.error = "no Registered reply"
                    return
                self.period_s = first.registered.heartbeat_period_s or self.period_s
                self.registered.set()
            beat = asyncio.create_task(self._beat_loop())
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    break
                self._on_message(msg)
        except grpc.aio.AioRpcError as exc:
            if not self.fleet.closing:
                self.error = f"{exc.code().name}: {exc.details()}"
        finally:
            self.ended.set()
            if beat is not None:
                beat.cancel()
            self._outbox.put_nowait(None)

    def _on_message(self, msg: agent_pb2.ControllerMessage) -> None:
        kind = msg.WhichOneof("kind")
        if kind == "ack":
            sent = self._sent.pop(msg.ack.seq, None)
            if sent is not None:
                self.fleet.record_latency(time.monotonic() - sent)
            for target in msg.ack.protect:
                self._protect(target)
        elif kind == "launch":
            launch = msg.launch
            now = time.time()
            self.launches.append((launch.job_id, launch.attempt, now))
            self.fleet.on_launch(launch.job_id, launch.attempt, now, msg.ByteSize())
            mono = time.monotonic()
            layout = launch.protection  # this node's share of it (num_nodes set), or whole
            share = layout.num_nodes > 0
            me = next(((n.index if share else i) for i, n in enumerate(layout.nodes)
                       if n.node == self.name), None)
            if me is not None:
                self.stripes[(launch.job_id, launch.attempt)] = [
                    (stripe.index if share else j) for j, stripe in enumerate(layout.stripes)
                    if me in stripe.parity]
            for r in launch.ranks:
                self.ranks[(launch.job_id, launch.attempt, r.rank)] = _SimRank(
                    job_id=launch.job_id, attempt=launch.attempt, rank=r.rank,
                    local_rank=r.local_rank, step=max(launch.restore_step, 0), started=mono,
                    stride=timing_stride(launch.world_size))
            self._kick.set()  # a real agent reports a launch at once
        elif kind == "stop":
            stop = msg.stop
            for rank in self.ranks.values():
                if rank.job_id == stop.job_id and rank.attempt <= stop.attempt \
                        and rank.state == common_pb2.RANK_STATE_RUNNING:
                    rank.state = common_pb2.RANK_STATE_STOPPED
            self._kick.set()
        elif kind == "release":
            for key in [k for k in self.ranks if k[0] == msg.release.job_id]:
                del self.ranks[key]
            for key in [k for k in self.stripes if k[0] == msg.release.job_id]:
                del self.stripes[key]
            for key in [k for k in self.pieces if k[0] == msg.release.job_id]:
                del self.pieces[key]

    def _protect(self, target: checkpoint_pb2.ProtectTarget) -> None:
        """A round's target: build this node's pieces of it (once its ranks hold the step)."""
        cfg = self.fleet.cfg
        stripes = self.stripes.get((target.job_id, target.attempt))
        key = (target.job_id, target.attempt, target.step)
        if not stripes or not cfg.protect_build_s or key in self._building:
            return
        held = [s for (j, a, s) in self.pieces if (j, a) == key[:2]]
        if held and all(target.step in self.pieces[(*key[:2], s)] for s in held):
            return  # built already
        newest = max((r.step - r.step % cfg.snapshot_every for r in self.ranks.values()
                      if (r.job_id, r.attempt) == key[:2]), default=-1)
        if newest < target.step:
            return  # named ahead: the next ack names it again
        self._building.add(key)

        def built() -> None:
            self._building.discard(key)
            if (target.job_id, target.attempt) not in self.stripes:
                return
            for stripe in stripes:
                steps = self.pieces.setdefault((target.job_id, target.attempt, stripe), [])
                self.pieces[(target.job_id, target.attempt, stripe)] = (steps + [target.step])[-2:]
            self.fleet.num_pieces_built += len(stripes)
            self._kick.set()  # reported at once
        asyncio.get_running_loop().call_later(cfg.protect_build_s, built)

    def silence(self) -> None:
        """Stop heartbeating but keep the stream open (a hung or partitioned node)."""
        self.silenced_at = self.last_beat_at or time.time()

    def close(self) -> None:
        self._outbox.put_nowait(None)

    # ---------------------------------------------------------------- heartbeats

    async def _beat_loop(self) -> None:
        # spread the fleet's beats over the period instead of all at once
        await asyncio.sleep(random.uniform(0, self.period_s))
        while not self.silenced_at:
            try:
                self._send_beat()
            except Exception as exc:  # a harness bug: say it in the figures, do not go quiet
                self.error = f"heartbeat not built: {type(exc).__name__}: {exc}"
                raise
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self.period_s)
            self._kick.clear()

    def _send_beat(self) -> None:
        cfg = self.fleet.cfg
        self._seq += 1
        now, mono = time.time(), time.monotonic()
        reports: list[agent_pb2.RankReport] = []
        steps: list[_Step] = []
        colls: list[_Collective] = []
        ended = []
        for key, r in self.ranks.items():
            if r.state == common_pb2.RANK_STATE_RUNNING:
                target = int((mono - r.started) * cfg.steps_per_s)
                first = max(r.step + 1, target - 4 * int(cfg.steps_per_s * self.period_s + 1))
                for s in range(first, target + 1):  # (plain tuples: the simulator's CPU
                    # is taken from the controller's two cores, so it builds as little as it can)
                    if s % r.stride == r.stride - 1:  # a window's mean, at its last step
                        steps.append((r.job_id, r.attempt, r.rank, s, 0.9 / cfg.steps_per_s,
                                      0.001, 0.8 / cfg.steps_per_s))
                    for c in range(cfg.collectives_per_step):
                        seq = s * cfg.collectives_per_step + c
                        if seq % r.stride == 0:
                            colls.append((r.job_id, r.attempt, r.rank, seq, 0.01))
                if target > r.step:
                    r.step, r.last_step_at = target, now
                    r.first_step_at = r.first_step_at or now
            else:
                ended.append(key)
            newest = r.step - r.step % cfg.snapshot_every
            held = [s for s in (newest - 2 * cfg.snapshot_every, newest - cfg.snapshot_every,
                                newest) if s > 0]
            reports.append(agent_pb2.RankReport(
                job_id=r.job_id, attempt=r.attempt, status=common_pb2.RankStatus(
                    rank=r.rank, local_rank=r.local_rank, node=self.name, pid=100000 + r.rank,
                    state=r.state, step=r.step if r.step > 0 else -1, step_at=r.last_step_at,
                    first_step_at=r.first_step_at, snapshot_steps=held,
                    snapshot_bytes=1 << 30, snapshot_replicated=cfg.replicated,
                    snapshot_split="" if cfg.replicated else cfg.split)))
        for key in ended:  # reported once as ended, then forgotten (as the real launcher does)
            del self.ranks[key]
        self._sent[self._seq] = mono
        self.last_beat_at = now
        self.fleet.num_records += len(steps) + len(colls)
        hb = agent_pb2.Heartbeat(seq=self._seq, ranks=reports, pieces=[
            checkpoint_pb2.HeldPiece(job_id=j, attempt=a, stripe=s, step=step, bytes=1 << 29)
            for (j, a, s), steps in self.pieces.items() for step in steps])
        if cfg.columns:
            hb.step_columns.extend(_step_columns(steps, cfg.packed))
            hb.collective_columns.extend(_collective_columns(colls, cfg.packed))
        else:
            hb.steps.extend(agent_pb2.StepTiming(
                job_id=j, attempt=a, rank=rank, step=step, start_s=mono - took, end_s=mono,
                data_wait_s=wait, compute_s=compute)
                for j, a, rank, step, took, wait, compute in steps)
            hb.collectives.extend(agent_pb2.CollectiveTiming(
                job_id=j, attempt=a, rank=rank, seq=seq, op="all_reduce", nbytes=1 << 20,
                enter_s=mono - took, exit_s=mono) for j, a, rank, seq, took in colls)
        self._outbox.put_nowait(agent_pb2.AgentMessage(heartbeat=hb))

    def unacked(self, older_than_s: float) -> int:
        """Heartbeats sent more than ``older_than_s`` ago that were never acknowledged."""
        limit = time.monotonic() - older_than_s
        return sum(1 for t in self._sent.values() if t < limit)


class Fleet:
    """``num_agents`` simulated agents on the running asyncio loop.

    Use ``async with Fleet(cfg) as fleet: await fleet.wait_registered(deadline_s)``.
    """

    def __init__(self, cfg: FleetConfig) -> None:
        self.cfg = cfg
        self.closing = False
        self.latencies: list[float] = []
        self.num_records = 0
        self.num_pieces_built = 0
        self._channels: list[grpc.aio.Channel] = []
        self.agents: list[SimAgent] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._launch_waiters: dict[tuple[str, int], list[float]] = {}
        self._launch_bytes: dict[tuple[str, int], list[int]] = {}

    async def __aenter__(self) -> Fleet:
        options = [("grpc.max_receive_message_length", 64 << 20),
                   ("grpc.max_send_message_length", 64 << 20)]
        sem = asyncio.Semaphore(self.cfg.connect_concurrency)
        for i in range(self.cfg.num_agents):
            if i % self.cfg.agents_per_channel == 0:
                # a distinct option per channel keeps gRPC from sharing one subchannel (TCP
                # connection) between them
                self._channels.append(grpc.aio.insecure_channel(
                    self.cfg.target, options=[*options, ("hpt.sim.channel", i)]))
            agent = SimAgent(self, i, self._channels[-1])
            self.agents.append(agent)
            self._tasks.append(asyncio.create_task(agent.run(sem)))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self.closing = True
        for agent in self.agents:
            agent.close()
        for channel in self._channels:
            await channel.close(grace=None)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def wait_registered(self, deadline_s: float) -> int:
        """Wait until every agent registered, or ``deadline_s``; the number registered."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            done = sum(1 for a in self.agents if a.registered.is_set())
            if done == len(self.agents):
                return done
            if any(a.ended.is_set() and not a.registered.is_set() for a in self.agents):
                break
            await asyncio.sleep(0.05)
        return sum(1 for a in self.agents if a.registered.is_set())

    def record_latency(self, seconds: float) -> None:
        self.latencies.append(seconds)

    def on_launch(self, job_id: str, attempt: int, at: float, nbytes: int = 0) -> None:
        self._launch_waiters.setdefault((job_id, attempt), []).append(at)
        self._launch_bytes.setdefault((job_id, attempt), []).append(nbytes)

    def launch_bytes(self, job_id: str, attempt: int) -> list[int]:
        """Serialized size of each Launch of (job, attempt) the agents received."""
        return list(self._launch_bytes.get((job_id, attempt), []))

    def launches(self, job_id: str, attempt: int) -> list[float]:
        """Wall-clock times at which agents received a Launch of (job, attempt)."""
        return list(self._launch_waiters.get((job_id, attempt), []))

    def errors(self) -> list[str]:
        return [f"{a.name}: {a.error}" for a in self.agents if a.error]

    def running_ranks(self, job_id: str, attempt: int) -> int:
        return sum(1 for a in self.agents for r in a.ranks.values()
                   if (r.job_id, r.attempt) == (job_id, attempt)
                   and r.state == common_pb2.RANK_STATE_RUNNING)

    def by_name(self, names: Iterable[str]) -> list[SimAgent]:
        wanted = set(names)
        return [a for a in self.agents if a.name in wanted]


_Step = tuple[str, int, int, int, float, float, float]  # job, attempt, rank, step, step_s,
#                                                         data_wait_s, compute_s
_Collective = tuple[str, int, int, int, float]  # job, attempt, rank, seq, duration_s


def _step_columns(steps: list[_Step], packed: bool) -> list[agent_pb2.StepColumns]:
    by_attempt: dict[tuple[str, int], list[_Step]] = {}
    for t in steps:
        by_attempt.setdefault((t[0], t[1]), []).append(t)
    out = []
    for (job_id, attempt), ts in by_attempt.items():
        cols = ([t[2] for t in ts], [t[3] for t in ts], [t[4] for t in ts],
                [t[5] for t in ts], [t[6] for t in ts])
        if packed:
            out.append(agent_pb2.StepColumns(job_id=job_id, attempt=attempt,
                                             packed=pack_steps(*cols)))
        else:
            out.append(agent_pb2.StepColumns(
                job_id=job_id, attempt=attempt, rank=cols[0], step=cols[1], step_s=cols[2],
                data_wait_s=cols[3], compute_s=cols[4]))
    return out


def _collective_columns(colls: list[_Collective], packed: bool,
                        ) -> list[agent_pb2.CollectiveColumns]:
    by_attempt: dict[tuple[str, int], list[_Collective]] = {}
    for c in colls:
        by_attempt.setdefault((c[0], c[1]), []).append(c)
    out = []
    for (job_id, attempt), cs in by_attempt.items():
        cols = ([c[2] for c in cs], [c[3] for c in cs], [0] * len(cs), [c[4] for c in cs])
        if packed:
            out.append(agent_pb2.CollectiveColumns(job_id=job_id, attempt=attempt,
                                                   ops=["all_reduce"],
                                                   packed=pack_collectives(*cols)))
        else:
            out.append(agent_pb2.CollectiveColumns(
                job_id=job_id, attempt=attempt, ops=["all_reduce"], rank=cols[0], seq=cols[1],
                op_index=cols[2], duration_s=cols[3]))
    return out


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by nearest rank; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))]
