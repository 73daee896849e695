"""The agent-to-agent data path of snapshot protection: ``PeerService`` server and client.

Bulk bytes (blob segments and parity pieces, see blob.py and protect.py) go from agent to agent
over their own gRPC service, never through the controller. A piece travels as a stream of
chunks (``chunk_bytes``, 1 MiB by default), each carrying its offset and a CRC-32 (frames
encoded and decoded in chunks.py: one copy out of the source, one into the destination); the stream
ends with a trailer that says the source was still intact after the last byte (a rank may have
overwritten the generation meanwhile; it removes the commit record first, so the check is
sound). The client resumes a broken stream at the first byte it has not verified, a bounded
number of times with backoff; a piece is handed to its caller only when every byte arrived,
every chunk matched its CRC and the trailer came. HTTP/2 flow control bounds what is in
flight: the server's generator blocks while the client has not consumed the window.

Authentication lives in one place, ``PeerAuth``: the agent's bearer token on every call (the
agent role's token, which the CLI never holds) and, when the agent has a certificate, mTLS with
the same certificate it presents to the controller (``hpt.agent.tls``).
"""

from __future__ import annotations

import ctypes
import hmac
import logging
import random
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Protocol

import grpc
import torch

from hpt._proto import checkpoint_pb2, checkpoint_pb2_grpc
from hpt.agent import chunks, tls

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
_MAX_CHUNK_BYTES = 8 << 20
_MAX_MESSAGE_BYTES = 16 << 20
_OPTIONS = [("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES)]
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                        grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED})


class PieceUnavailable(Exception):
    """The peer does not hold the piece, or its copy failed verification, or every retry of
    the transfer failed. The caller tries another source."""


# --------------------------------------------------------------------------- authentication

@dataclass(frozen=True, slots=True)
class PeerAuth:
    """Credentials of the peer service, from the agent's controller settings."""

    token: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""

    @property
    def metadata(self) -> list[tuple[str, str]] | None:
        return [("authorization", f"Bearer {self.token}")] if self.token else None

    def channel(self, address: str) -> grpc.Channel:
        creds = tls.channel_credentials(self)  # the same mTLS identity as with the controller
        if creds is not None:
            return grpc.secure_channel(address, creds, options=_OPTIONS)
        return grpc.insecure_channel(address, options=_OPTIONS)

    def bind(self, server: grpc.Server, address: str) -> int:
        """Add the listening port (mTLS when the agent has a certificate: callers must present
        one from the same CA); returns the port."""
        creds = tls.server_credentials(self) if self.tls_cert else None
        if creds is not None:
            return server.add_secure_port(address, creds)
        return server.add_insecure_port(address)

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        return [_TokenCheck(self.token)] if self.token else []


class _TokenCheck(grpc.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        def deny(request, context):  # type: ignore[no-untyped-def]
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    def intercept_service(self, continuation, details):  # type: ignore[no-untyped-def]
        for key, value in details.invocation_metadata or ():
            if key == "authorization" and hmac.compare_digest(value.encode(), self._expected):
                return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        return self._deny_stream if handler.response_streaming else self._deny_unary


# --------------------------------------------------------------------------- server

@dataclass(slots=True)
class Piece:
    """A piece a ``PieceSource`` serves: its header, a reader of byte ranges (offset, length;
    bytes, or a memoryview straight over the source's memory) and a check run after the last
    byte was sent (False: the bytes may have changed)."""

    header: checkpoint_pb2.PieceHeader
    read: Callable[[int, int], bytes | memoryview]
    intact: Callable[[], bool]


ChunkSink = Callable[[checkpoint_pb2.PieceHeader, int, memoryview], None]
"""Where ``PeerClient.stream`` delivers a piece: (its header, offset, verified bytes)."""


class PieceSource(Protocol):
    """What the peer service serves; implemented by protect.Protector."""

    def open_piece(self, request: checkpoint_pb2.FetchRequest) -> Piece:
        """The piece ``request`` names, verified against its checksums.

        Raises:
            PieceUnavailable: not held here, or it failed verification.
        """
        ...


_SERVICE = "hpt.v1.PeerService"


def _as_is(frame: bytes) -> bytes:
    return frame


class _Servicer(checkpoint_pb2_grpc.PeerServiceServicer):
    def __init__(self, source: PieceSource, node: str) -> None:
        self._source = source
        self._node = node

    def Fetch(self, request, context):  # type: ignore[no-untyped-def]
        chunk = request.chunk_bytes or CHUNK_BYTES
        if not 0 < chunk <= _MAX_CHUNK_BYTES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"chunk_bytes ({chunk}) must be in 1..{_MAX_CHUNK_BYTES}")
        try:
            piece = self._source.open_piece(request)
        except PieceUnavailable as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        total = piece.header.piece_bytes
        if request.offset > total:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset ({request.offset}) > {total}")
        yield checkpoint_pb2.PieceChunk(header=piece.header,
                                        offset=request.offset).SerializeToString()
        offset = request.offset
        while offset < total:
            n = min(chunk, total - offset)
            yield chunks.encode_data(offset, piece.read(offset, n))
            offset += n
        if not piece.intact():
            context.abort(grpc.StatusCode.DATA_LOSS,
                          f"[{self._node}] the source changed while it was sent")
        yield checkpoint_pb2.PieceChunk(offset=total, last=True).SerializeToString()


class PeerServer:
    """The node's ``PeerService`` on ``host:port`` (port 0: a free one)."""

    def __init__(self, source: PieceSource, node: str, host: str, port: int,
                 auth: PeerAuth) -> None:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8,
                                                              thread_name_prefix="hpt-peer"),
                                   interceptors=auth.interceptors(), options=_OPTIONS)
        servicer = _Servicer(source, node)
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            _SERVICE, {
                # frames come encoded (chunks.py): no second serialisation
                "Fetch": grpc.unary_stream_rpc_method_handler(
                    servicer.Fetch, request_deserializer=checkpoint_pb2.FetchRequest.FromString,
                    response_serializer=_as_is),
            }),))
        self.port = auth.bind(self._server, f"{host}:{port}")
        if not self.port:
            raise OSError(f"cannot listen for peers on {host}:{port}")
        if host not in ("127.0.0.1", "localhost", "::1") and not auth.tls_cert:
            log.warning("[-/-/%s/-] peer service on %s:%d without TLS: snapshot bytes travel "
                        "in clear", node, host, self.port)
        self._server.start()

    def close(self) -> None:
        self._server.stop(grace=0).wait(2.0)  # a pull cut here is retried elsewhere


# --------------------------------------------------------------------------- client

class PeerClient:
    """Fetches pieces from peers; one channel per peer address, reused.

    A transfer that stops moving (no message for ``stall_s``: a silently dead connection, a
    peer that froze) is cancelled and resumed, so a stall costs ``stall_s``, not the whole
    deadline. Every retry starts at the first byte not yet verified: bytes verified before a
    break are kept, and only attempts that verified nothing new count toward ``retries``.
    """

    def __init__(self, auth: PeerAuth, *, retries: int = 4, backoff_s: float = 0.05,
                 stall_s: float = 10.0) -> None:
        if stall_s <= 0:
            raise ValueError(f"stall_s ({stall_s}) must be > 0")
        self._auth = auth
        self._retries = retries
        self._backoff_s = backoff_s
        self._stall_s = stall_s
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}

    def _channel(self, address: str) -> grpc.Channel:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = self._auth.channel(address)
        return channel

    def _fetch_call(self, address: str) -> Callable[..., Iterator[bytes]]:
        """Fetch with the chunks left as received bytes (decoded by chunks.decode)."""
        return self._channel(address).unary_stream(
            f"/{_SERVICE}/Fetch", request_serializer=checkpoint_pb2.FetchRequest.SerializeToString,
            response_deserializer=_as_is)

    def fetch(self, address: str, request: checkpoint_pb2.FetchRequest, *,
              timeout_s: float) -> tuple[checkpoint_pb2.PieceHeader, torch.Tensor]:
        """The whole piece, every chunk verified; resumes a broken stream where it broke.

        Raises:
            PieceUnavailable: the peer lacks the piece, it changed at the source, the
                deadline passed, or ``retries`` attempts in a row verified no new byte.
        """
        header, out = self._transfer(address, request, _Transfer(got=request.offset),
                                     timeout_s)
        assert out is not None
        return header, out

    def stream(self, address: str, request: checkpoint_pb2.FetchRequest, sink: ChunkSink, *,
               timeout_s: float) -> checkpoint_pb2.PieceHeader:
        """``fetch`` without a destination: ``sink(header, offset, view)`` gets every verified
        chunk, in order and each byte once (a resumed stream goes on where the last verified
        chunk ended). ``view`` stays valid as long as it is referenced. Same errors."""
        header, _ = self._transfer(address, request, _Transfer(got=request.offset, sink=sink),
                                   timeout_s)
        return header

    def _transfer(self, address: str, request: checkpoint_pb2.FetchRequest, xfer: _Transfer,
                  timeout_s: float) -> tuple[checkpoint_pb2.PieceHeader, torch.Tensor | None]:
        deadline = time.monotonic() + timeout_s
        failures = 0
        while True:
            progress = xfer.got
            try:
                if self._stream(address, request, xfer, deadline):
                    assert xfer.header is not None
                    return xfer.header, xfer.out
                reason = "stream ended before its trailer"
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
                if xfer.stalled:
                    reason = f"no chunk for {self._stall_s:g} s (stalled; cancelled)"
                elif code not in _RETRYABLE:
                    raise PieceUnavailable(f"{address}: {_code(exc)}") from exc
                else:
                    reason = _code(exc)
            except _BadChunk as exc:
                reason = str(exc)
            failures = 0 if xfer.got > progress else failures + 1
            if failures > self._retries or time.monotonic() >= deadline:
                raise PieceUnavailable(f"{address}: transfer failed at byte {xfer.got} "
                                       f"after {failures} attempt(s) without progress: {reason}")
            log.info("peer fetch from %s broke at byte %d (%s); resuming", address, xfer.got,
                     reason)
            time.sleep(min(self._backoff_s * (2 ** failures), 1.0) * (0.5 + random.random()))

    def _stream(self, address: str, request: checkpoint_pb2.FetchRequest, xfer: _Transfer,
                deadline: float) -> bool:
        """One stream from ``xfer.got`` on; updates ``xfer`` chunk by chunk (what was verified
        stays verified when the stream breaks). True when the trailer came."""
        req = checkpoint_pb2.FetchRequest()
        req.CopyFrom(request)
        req.offset = xfer.got
        xfer.stalled = False
        call = self._fetch_call(address)(
            req, timeout=max(deadline - time.monotonic(), 0.01), metadata=self._auth.metadata)
        watchdog = _StallWatchdog(call, self._stall_s, xfer)
        try:
            for frame in call:
                watchdog.moved()
                try:
                    chunk = chunks.decode(frame)
                except chunks.FrameError as exc:
                    raise _BadChunk(f"malformed chunk after byte {xfer.got}: {exc}") from exc
                if chunk.header is not None:
                    if xfer.header is not None and xfer.header != chunk.header:
                        raise PieceUnavailable(f"{address}: the piece changed between two streams")
                    xfer.header = chunk.header
                    if xfer.out is None and xfer.sink is None:
                        xfer.out = torch.empty(chunk.header.piece_bytes, dtype=torch.uint8)
                header, out = xfer.header, xfer.out
                if header is None:
                    raise _BadChunk("chunk before the header")
                if chunk.length:
                    n, at = chunk.length, chunk.start
                    if chunk.offset != xfer.got or xfer.got + n > header.piece_bytes:
                        raise _BadChunk(f"chunk at {chunk.offset}, expected {xfer.got}")
                    view = memoryview(frame)[at:at + n]
                    if zlib.crc32(view) != chunk.crc32:
                        raise _BadChunk(f"CRC mismatch in the chunk at byte {xfer.got}")
                    if out is not None:  # the one copy on this side: frame -> destination
                        ctypes.memmove(out.data_ptr() + xfer.got, _address(frame) + at, n)
                    else:
                        assert xfer.sink is not None
                        xfer.sink(header, xfer.got, view)
                    xfer.got += n
                if chunk.last:
                    if xfer.got != header.piece_bytes:
                        raise _BadChunk(f"trailer after {xfer.got} of {header.piece_bytes} bytes")
                    return True
            return False
        finally:
            watchdog.stop()
            call.cancel()  # no-op when the stream ended; frees it when we stop reading early

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()


@dataclass(slots=True)
class _Transfer:
    """What a fetch verified so far, kept across its streams."""

    got: int
    header: checkpoint_pb2.PieceHeader | None = None
    out: torch.Tensor | None = None
    sink: ChunkSink | None = None
    stalled: bool = False


class _StallWatchdog:
    """Cancels ``call`` when no message arrived for ``stall_s`` (one short-lived thread per
    stream; it ends with the stream)."""

    def __init__(self, call: grpc.Call, stall_s: float, xfer: _Transfer) -> None:
        self._call = call
        self._stall_s = stall_s
        self._xfer = xfer
        self._last = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="hpt-peer-stall")
        self._thread.start()

    def moved(self) -> None:
        self._last = time.monotonic()

    def _run(self) -> None:
        while not self._done.wait(min(self._stall_s / 4, 1.0)):
            if time.monotonic() - self._last > self._stall_s:
                self._xfer.stalled = True
                self._call.cancel()
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=5.0)


class _BadChunk(Exception):
    pass


def _address(data: bytes) -> int:
    """Where the bytes of ``data`` live (ctypes points at a bytes object's buffer, no copy)."""
    address = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
    assert address is not None
    return address


def _code(exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else ""
    return f"{code.name if code else 'error'}: {details}"
