"""gRPC servicers: decode, call the reconciler, encode. Nothing else lives here.

The agents' stream lives in ``agent_stream``; the decoders it shares are here."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from typing import TypeVar

import grpc

from hpt._proto import agent_pb2, checkpoint_pb2, jobs_pb2, jobs_pb2_grpc
from hpt.controller import convert, limits
from hpt.controller.model import (
    CadenceCommand,
    Command,
    Event,
    EventKind,
    Node,
    NodeState,
    ProtectCommand,
    RankReport,
    ReleaseCommand,
    StopCommand,
)
from hpt.controller.reconcile import Reconciler
from hpt.controller.store import FencedError, StoreUnavailableError

log = logging.getLogger(__name__)

_CANCEL_REPLY_DEADLINE_S = 5.0

_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")
_MAX_SLOTS = 4096
_MAX_REPORTS = 4096
_STREAM_POLL_S = 0.5

T = TypeVar("T")


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, rec: Reconciler, executor: Executor | None = None) -> None:
        self._rec = rec
        self._streams = limits.StreamSlots(rec.cfg.max_streams)
        self._executor = executor
        """Where the follow-streams' blocking calls run (None: the loop's default executor)."""

    async def _blocking(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def SubmitJob(self, request, context):  # type: ignore[no-untyped-def]
        try:
            spec = convert.spec_from_proto(request.spec)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"spec.{exc}")
        try:
            job_id = self._rec.submit(spec)
        except StoreUnavailableError as exc:  # not acknowledged: nothing was stored
            context.abort(grpc.StatusCode.UNAVAILABLE, f"job not submitted, store down: {exc}")
        except FencedError as exc:  # another controller leads: this one steps down
            context.abort(grpc.StatusCode.UNAVAILABLE, f"job not submitted: {exc}")
        return jobs_pb2.SubmitJobResponse(job_id=job_id)

    def GetJob(self, request, context):  # type: ignore[no-untyped-def]
        with self._rec.lock:
            job = self._rec.jobs.get(request.job_id)
            if job is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"job_id ({request.job_id!r}) not found")
            return convert.job_to_proto(job)

    def ListJobs(self, request, context):  # type: ignore[no-untyped-def]
        page_size = request.page_size or limits.DEFAULT_PAGE_SIZE
        if page_size > limits.MAX_PAGE_SIZE:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"page_size ({page_size}) must be <= {limits.MAX_PAGE_SIZE}")
        after = None
        if request.page_token:
            try:
                after = limits.parse_page_token(request.page_token)
            except ValueError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        with self._rec.lock:
            jobs = sorted(self._rec.jobs.values(), key=lambda j: (j.created_at, j.id))
            if after is not None:
                jobs = [j for j in jobs if (j.created_at, j.id) > after]
            protos = (convert.job_to_proto(j) for j in jobs)
            # half the channel's limit: the rest of the response and its framing fit too
            chosen, more = limits.page(list(protos), size_of=lambda m: m.ByteSize(),
                                       page_size=page_size,
                                       max_bytes=self._rec.cfg.max_message_bytes // 2)
        token = ""
        if more:
            last = chosen[-1]
            token = limits.page_token(last.created_at, last.id)
        return jobs_pb2.ListJobsResponse(jobs=chosen, next_page_token=token)

    def CancelJob(self, request, context):  # type: ignore[no-untyped-def]
        if request.grace_s < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "grace_s must be >= 0")
        if request.job_id not in self._rec.jobs:
            context.abort(grpc.StatusCode.NOT_FOUND, f"job_id ({request.job_id!r}) not found")
        applied = self._rec.cancel(request.job_id,
                                   request.grace_s if request.grace_s > 0 else None)
        # answer with the job as the pass that applied the cancel left it (a loop that does not
        # get to it in time answers with the job as it is: the cancel stays queued)
        applied.wait(_CANCEL_REPLY_DEADLINE_S)
        return self.GetJob(jobs_pb2.GetJobRequest(job_id=request.job_id), context)

    def ListNodes(self, request, context):  # type: ignore[no-untyped-def]
        with self._rec.lock:
            nodes = [rt.node for _, rt in sorted(self._rec.nodes.items())]
            health = self._rec.store_health()
            store = jobs_pb2.StoreStatus(up=health.up, down_since=health.down_since,
                                         error=health.last_error[:1024],
                                         pending_events=self._rec.events.num_pending)
            return jobs_pb2.ListNodesResponse(nodes=[convert.node_to_proto(n) for n in nodes],
                                              store=store)

    # The two follow-streams are coroutines of the asyncio server, not sync generators: grpcio
    # runs a sync streaming handler on a pool thread that hands each message to the event loop
    # and blocks until it is sent, and such a thread never returned once the client or the loop
    # was gone (a controller that had served one did not exit on SIGTERM). Here every blocking
    # call (the reconciler's lock, the store, the wait for news) runs on the RPC pool and
    # returns within _STREAM_POLL_S; a cancelled RPC cancels the coroutine at its await.

    async def _take_stream_slot(self, context) -> None:  # type: ignore[no-untyped-def]
        if not self._streams.try_acquire():
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"too many streams ({self._streams.limit} follow at once, the "
                                "controller's max_streams); stop one or retry later")

    def _job_running(self, job_id: str) -> bool:
        with self._rec.lock:
            job = self._rec.jobs.get(job_id)
            return job is not None and not job.state.is_terminal

    async def StreamLogs(self, request, context):  # type: ignore[no-untyped-def]
        if request.job_id not in self._rec.jobs:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"job_id ({request.job_id!r}) not found")
        rank = request.rank if request.has_rank else None
        if request.follow:
            await self._take_stream_slot(context)
        try:
            cursor = 0
            while True:
                lines = self._rec.logs.read(request.job_id, cursor, rank)  # (memory only)
                for line in lines:
                    yield jobs_pb2.LogLine(attempt=line.attempt, rank=line.rank,
                                           stream=line.stream, text=line.text)
                if lines:
                    cursor = lines[-1].seq
                if not request.follow or not await self._blocking(self._job_running,
                                                                  request.job_id):
                    return
                await self._blocking(self._rec.logs.wait_beyond, cursor, _STREAM_POLL_S)
        finally:
            if request.follow:
                self._streams.release()

    async def StreamEvents(self, request, context):  # type: ignore[no-untyped-def]
        cursor = request.after_seq
        if request.follow:
            await self._take_stream_slot(context)
        try:
            while True:
                try:
                    events = await self._blocking(self._rec.events.read, cursor)
                except StoreUnavailableError as exc:
                    await context.abort(grpc.StatusCode.UNAVAILABLE,
                                        f"event log unavailable: {exc}")
                for event in events:
                    cursor = event.seq
                    if not request.job_id or event.job_id == request.job_id:
                        yield convert.event_to_proto(event)
                if not request.follow:
                    return
                if not events:
                    await self._blocking(self._rec.events.wait_beyond, cursor, _STREAM_POLL_S)
        finally:
            if request.follow:
                self._streams.release()


def _decode_register(reg: agent_pb2.Register) -> tuple[Node, list[RankReport]]:
    if not _NODE_NAME.match(reg.node):
        raise ValueError(f"node ({reg.node!r}) must match {_NODE_NAME.pattern}")
    if not 1 <= reg.slots <= _MAX_SLOTS:
        raise ValueError(f"slots ({reg.slots}) must be in 1..{_MAX_SLOTS}")
    if not reg.address or len(reg.address) > 255:
        raise ValueError("address must be a host name or IP address")
    if reg.peer_address and (len(reg.peer_address) > 300 or ":" not in reg.peer_address):
        raise ValueError(f"peer_address ({reg.peer_address[:300]!r}) must be host:port")
    node = Node(name=reg.node, address=reg.address, slots=reg.slots, state=NodeState.READY,
                hostname=reg.hostname[:255], warm_ready=reg.warm_ready,
                peer_address=reg.peer_address)
    return node, _decode_reports(reg.ranks)


_MAX_EVENTS_PER_BEAT = 256


def _decode_events(node: str, events) -> list[Event]:  # type: ignore[no-untyped-def]
    out = []
    for e in list(events)[:_MAX_EVENTS_PER_BEAT]:
        try:
            kind = convert.event_kind_from_proto(e.event_kind, e.kind)
        except ValueError as exc:
            log.warning("[-/-/%s/-] agent event dropped: %s", node, exc)
            continue
        out.append(Event(kind=kind, at=e.at, job_id=e.job_id[:256], attempt=e.attempt,
                         node=node, rank=e.rank, message=e.message[:4096]))
    return out


def _restore_failures(events) -> list[tuple[str, int]]:  # type: ignore[no-untyped-def]
    """(job, step) of every ``restore_failed`` event: a step an agent could not put in place."""
    out = []
    for e in list(events)[:_MAX_EVENTS_PER_BEAT]:
        try:
            kind = convert.event_kind_from_proto(e.event_kind, e.kind)
        except ValueError:
            continue  # dropped (and logged) by _decode_events
        if kind == EventKind.RESTORE_FAILED and e.step > 0:
            out.append((e.job_id[:256], e.step))
    return out


def _decode_reports(reports) -> list[RankReport]:  # type: ignore[no-untyped-def]
    if len(reports) > _MAX_REPORTS:
        raise ValueError(f"ranks ({len(reports)}) must be at most {_MAX_REPORTS}")
    out = []
    for r in reports:
        if not r.job_id or r.attempt < 1:
            raise ValueError("ranks[].job_id and attempt must be set")
        out.append(RankReport(job_id=r.job_id, attempt=r.attempt,
                              rank=convert.rank_from_proto(r.status)))
    return out


def _targets_to_proto(
    targets: Iterable[tuple[str, int, int, int]],
) -> list[checkpoint_pb2.ProtectTarget]:
    """(job, attempt, round's step, newest protected step) as a heartbeat ack carries them."""
    return [checkpoint_pb2.ProtectTarget(job_id=j, attempt=a, step=s, protected_step=p)
            for j, a, s, p in targets]


def _command_to_proto(command: Command, node: str = "") -> agent_pb2.ControllerMessage:
    """``command`` as sent to ``node`` (a launch carries that node's share of its layout)."""
    if isinstance(command, ProtectCommand):  # an ack no heartbeat asked for (seq 0)
        return agent_pb2.ControllerMessage(ack=agent_pb2.HeartbeatAck(
            seq=0, protect=_targets_to_proto(command.targets)))
    if isinstance(command, ReleaseCommand):
        return agent_pb2.ControllerMessage(release=agent_pb2.Release(job_id=command.job_id))
    if isinstance(command, StopCommand):
        return agent_pb2.ControllerMessage(stop=convert.stop_to_proto(command))
    if isinstance(command, CadenceCommand):
        return agent_pb2.ControllerMessage(cadence=agent_pb2.Cadence(
            job_id=command.job_id, attempt=command.attempt,
            persist_every=command.persist_every, reason=command.reason,
            snapshot_every=command.snapshot_every, snapshot_from=command.snapshot_from,
            snapshot_before=command.snapshot_before))
    msg = agent_pb2.ControllerMessage()
    convert.launch_to_proto(command, msg.launch, node)
    return msg


__all__ = ["JobServicer"]
