"""The agents' streams (``AgentService.Connect``) as coroutines, and the heartbeat intake.

Every agent holds one bidirectional stream for its whole life. A thread per stream (the sync
gRPC server's model) capped the controller at its thread pool: 127 agents registered, the
128th waited forever (tests/bench/bench_scale.py). Here each stream is a coroutine on the gRPC
server's event loop, so an idle stream costs a few KiB and no thread:

- ``AgentServicer.Connect`` decodes the registration, answers ``Registered``, hands the
  registration to the reconciler on a worker thread (it takes the reconciler's lock and writes
  the store), then forwards commands from its ``_Link`` queue onto the stream while a reader
  task feeds heartbeats to the intake.
- ``HeartbeatIntake`` applies heartbeats on one thread in batches: one acquisition of the
  reconciler's lock per batch rather than per heartbeat, the control loop woken once per batch
  and only when a rank changed state, the detectors fed outside the lock, and the acks sent
  back to the loop in one call. A heartbeat is acknowledged only after it was applied: the ack
  is the agent's lease.

Commands flow the other way: the control loop (its own thread) calls ``_Link.send``, which
encodes the command and hands it to the stream's queue through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from hpt._proto import agent_pb2, agent_pb2_grpc
from hpt.controller import auth
from hpt.controller.detect import health_problem
from hpt.controller.model import Command
from hpt.controller.reconcile import DuplicateNodeError, Reconciler
from hpt.controller.server import (
    _MAX_REPORTS,
    _command_to_proto,
    _decode_events,
    _decode_register,
    _decode_reports,
    _restore_failures,
    _targets_to_proto,
)

log = logging.getLogger(__name__)

_MAX_BATCH = 4096
"""Heartbeats applied under one acquisition of the reconciler's lock, at most."""
_INTAKE_WAIT_S = 0.5
_ROUNDS_MAX_AGE_S = 0.2
"""Protection targets sent with acks are recomputed at most this often: finding them scans
every rank of every protected job, and a round's target moves once per snapshot at most."""


class _Link:
    """One agent's command queue; ``send`` may be called from any thread."""

    _CLOSE = object()

    def __init__(self, node: str, loop: asyncio.AbstractEventLoop, *,
                 layout_shares: bool = False) -> None:
        self.node = node
        self._share_for = node if layout_shares else ""  # "": the whole layout
        self._loop = loop
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.last_received = 0.0
        """Monotonic time the stream's last heartbeat arrived (set on the event loop): the
        node is alive even while its heartbeat waits in the intake's queue."""
        self.pieces: list[tuple[str, int, int, int, int]] | None = None
        """The protection pieces this stream's last heartbeat reported (intake thread only)."""

    def send(self, command: Command) -> None:
        self.put(_command_to_proto(command, self._share_for))

    def put(self, message: object) -> None:
        # RuntimeError: the loop is closed (the server stopped, and the stream with it)
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self.queue.put_nowait, message)

    def close(self) -> None:
        self.put(self._CLOSE)


def _deliver(acks: list[tuple[_Link, agent_pb2.ControllerMessage]]) -> None:
    for link, msg in acks:
        link.queue.put_nowait(msg)


class HeartbeatIntake:
    """Applies heartbeats from every stream on one thread, in batches (see the module doc)."""

    def __init__(self, rec: Reconciler, loop: asyncio.AbstractEventLoop) -> None:
        self._rec = rec
        self._loop = loop
        self._items: collections.deque[tuple[str, _Link, Any]] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.num_batches = 0
        self.num_heartbeats = 0
        self._rounds: list[tuple[str, int, int, int, frozenset[str]]] = []
        self._rounds_at = -1e9  # monotonic
        self._rounds_version = -1
        self._thread = threading.Thread(target=self._run, name="hpt-heartbeats", daemon=True)
        self._thread.start()

    def put(self, node: str, link: _Link, heartbeat: Any) -> None:
        with self._cond:
            self._items.append((node, link, heartbeat))
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=10.0)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._items or self._stopping, _INTAKE_WAIT_S)
                if self._stopping:
                    return
                batch = [self._items.popleft()
                         for _ in range(min(len(self._items), _MAX_BATCH))]
            if batch:
                self._apply(batch)

    def _apply(self, batch: list[tuple[str, _Link, Any]]) -> None:
        rec = self._rec
        accepted = []
        for node, link, hb in batch:
            try:
                accepted.append((node, link, hb, _decode_reports(hb.ranks)))
            except ValueError as exc:
                log.warning("[-/-/%s/-] bad heartbeat refused: %s", node, exc)
        changed = False
        with rec.lock:
            for node, _link, hb, reports in accepted:
                logs = [(c.job_id, c.attempt, c.rank, c.stream, c.text) for c in hb.logs]
                changed |= rec.heartbeat(node, reports, logs, hb.free_port, hb.warm_ready,
                                         wake=False)
        rec.detection.on_heartbeats([(node, hb) for node, _l, hb, _r in accepted])
        mono = time.monotonic()
        if mono - self._rounds_at >= _ROUNDS_MAX_AGE_S:  # O(ranks): not once per small batch
            self._rounds, self._rounds_at = rec.protect_targets(), mono
        acks = []
        changed_pieces = []
        for node, link, hb, _reports in accepted:
            if hb.events:
                rec.agent_events(node, _decode_events(node, hb.events))
            for job_id, step in _restore_failures(hb.events):
                rec.restore_failed(job_id, step)
            pieces = [(p.job_id, p.attempt, p.stripe, p.step, p.bytes)
                      for p in hb.pieces[:_MAX_REPORTS]]
            if pieces != link.pieces:  # each beat repeats the node's whole list: pass changes on
                link.pieces = pieces
                changed_pieces.append((node, pieces))
        # pieces first: a round they complete is named to its attempt's nodes at once, and the
        # acks of this batch name the next one too (older targets would send nodes back)
        rec.held_pieces(changed_pieces)
        if rec.rounds_version != self._rounds_version:
            self._rounds_version = rec.rounds_version
            self._rounds, self._rounds_at = rec.rounds_pushed, mono
        rounds = self._rounds
        for node, link, hb, _reports in accepted:
            protect = _targets_to_proto((j, a, s, p) for j, a, s, p, nodes in rounds
                                        if node in nodes)
            acks.append((link, agent_pb2.ControllerMessage(
                ack=agent_pb2.HeartbeatAck(seq=hb.seq, protect=protect))))
        if changed:
            rec.wake()
        self.num_batches += 1
        self.num_heartbeats += len(accepted)
        with contextlib.suppress(RuntimeError):  # the server stopped
            self._loop.call_soon_threadsafe(_deliver, acks)


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    """``Connect`` as a coroutine per agent; blocking work goes to ``executor``. With ``mtls``
    an agent registers only as a node its certificate names
    (:func:`hpt.controller.auth.identity_error`), and everything on its stream is that node's."""

    def __init__(
        self, rec: Reconciler, intake: HeartbeatIntake, executor: Executor, *,
        mtls: bool = False, on_auth_failure: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self._rec = rec
        self._intake = intake
        self._executor = executor
        self._mtls = mtls
        self._on_auth_failure = on_auth_failure

    async def Connect(self, request_iterator, context):  # type: ignore[no-untyped-def]
        try:
            first = await context.read()
        except DecodeError as exc:  # the caller's error, not ours (see controller/decode.py)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request to "
                                f"/hpt.v1.AgentService/Connect is not a valid protobuf message: {exc}")
        if first is grpc.aio.EOF:
            return
        if first.WhichOneof("kind") != "register":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "first message must be register")
        reg = first.register
        try:
            node, reports = _decode_register(reg)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"register.{exc}")
        denied = auth.identity_error(context, node.name, mtls=self._mtls)
        if denied:
            self._on_auth_failure("wrong_identity")
            log.warning("[-/-/%s/-] registration refused: %s", node.name, denied)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, denied)
        loop = asyncio.get_running_loop()
        link = _Link(node.name, loop, layout_shares=reg.layout_shares)
        cfg = self._rec.cfg
        # registered before the answer, so an agent told "Registered" can be placed; commands
        # the registration queues (stop a stale rank) wait in the link until after it
        try:
            await loop.run_in_executor(self._executor, functools.partial(
                self._rec.register, node, link, reports, reg.free_port,
                health_problem=health_problem(reg), instance_id=reg.instance_id[:64]))
        except DuplicateNodeError as exc:
            log.error("[-/-/%s/-] registration refused: %s", node.name, exc)
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        await context.write(agent_pb2.ControllerMessage(registered=agent_pb2.Registered(
            node=node.name, heartbeat_period_s=cfg.heartbeat_period_s, lease_s=cfg.agent_lease_s)))
        reader = asyncio.create_task(self._read(node.name, link, context))
        try:
            while True:
                item = await link.queue.get()
                if item is _Link._CLOSE:
                    return
                await context.write(item)
        finally:
            reader.cancel()
            # never awaited: a cancelled handler must not block on the reconciler's lock
            loop.run_in_executor(self._executor, self._rec.disconnect, node.name, link)

    async def _read(self, node: str, link: _Link, context) -> None:  # type: ignore[no-untyped-def]
        try:
            while True:
                msg = await context.read()
                if msg is grpc.aio.EOF:
                    break
                if msg.WhichOneof("kind") != "heartbeat":
                    log.warning("[-/-/%s/-] unexpected %s message ignored", node,
                                msg.WhichOneof("kind"))
                    continue
                link.last_received = time.monotonic()
                self._intake.put(node, link, msg.heartbeat)
        except (grpc.aio.AioRpcError, grpc.RpcError, DecodeError):
            pass  # the stream ended (or sent garbage); Connect's finally reports the disconnect
        finally:
            link.close()




class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class _RefusalContext:
    """What a sync refusal handler sees: it only ever calls ``abort``."""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Refused(code, details)


_MAKERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class SyncInterceptorAdapter(grpc.aio.ServerInterceptor):
    """Runs a sync ``grpc.ServerInterceptor`` (auth, the standby gate) on the asyncio server.

    The handler is looked up first and the sync interceptor picks it or a refusal. A refusal
    (a sync handler that aborts) is run at once against a stand-in context and its status is
    answered from a coroutine: sync streaming handlers that abort before reading do not end the
    call on the asyncio server."""

    def __init__(self, inner: grpc.ServerInterceptor, *, wraps: bool = False) -> None:
        self._inner = inner
        self._wraps = wraps
        """The interceptor wraps handlers (decoding) rather than refusing calls: it applies to
        sync handlers and async generators (the follow-streams); the agent stream's coroutine
        keeps grpcio's own decoding."""

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        if handler is not None and self._wraps:
            behaviour = (handler.unary_unary or handler.unary_stream or handler.stream_unary
                         or handler.stream_stream)
            if inspect.iscoroutinefunction(behaviour):
                return handler
            return self._inner.intercept_service(lambda details: handler, handler_call_details)
        chosen = self._inner.intercept_service(lambda details: handler, handler_call_details)
        if chosen is handler or chosen is None:
            return chosen
        kind = (chosen.request_streaming, chosen.response_streaming)
        refuse = (chosen.unary_unary or chosen.unary_stream or chosen.stream_unary
                  or chosen.stream_stream)
        try:
            refuse(None, _RefusalContext())
            refused = _Refused(grpc.StatusCode.PERMISSION_DENIED, "refused")
        except _Refused as exc:
            refused = exc

        async def answer(request, context):  # type: ignore[no-untyped-def]
            await context.abort(refused.code, refused.details)

        return _MAKERS[kind](answer, request_deserializer=chosen.request_deserializer,
                             response_serializer=chosen.response_serializer)


__all__ = ["AgentServicer", "HeartbeatIntake", "SyncInterceptorAdapter"]
