"""A userspace TCP proxy on loopback that breaks the network between an agent and the controller.

``TcpProxy(upstream_port).start()`` listens on ``127.0.0.1:<port>`` and forwards every connection
to ``127.0.0.1:<upstream_port>``, one thread per direction. Its mode applies to every connection,
live and new, and can change at any time:

- ``heal()``: forward everything (the default).
- ``delay(seconds)``: forward each chunk after ``seconds`` (latency, order kept).
- ``blackhole()``: forward nothing and close nothing: a silent partition. Bytes wait in the
  kernel's buffers (TCP would retransmit them) and flow again after ``heal()``.
- ``drop()``: close every live connection and every new one at once (a peer that is gone).
- ``reset_after(nbytes)``: each live or new connection carries ``nbytes`` more bytes (both
  directions together), then both of its sockets are reset (RST) mid-transfer. With
  ``once=True`` only the first connection to run out is reset; then the proxy heals.

Bounded: at most ``max_connections`` at once (more are closed on accept), chunks of
``CHUNK_BYTES``, every blocking call has a timeout, and ``close()`` joins every thread.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field

CHUNK_BYTES = 64 * 1024
_POLL_S = 0.05
_JOIN_S = 5.0


@dataclass(slots=True)
class _Conn:
    client: socket.socket
    upstream: socket.socket
    budget: int | None = None  # bytes left before a reset; None: no reset armed
    closed: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)


class TcpProxy:
    def __init__(self, upstream_port: int, *, max_connections: int = 16) -> None:
        self.upstream_port = upstream_port
        self.max_connections = max_connections
        self._lock = threading.Lock()
        self._mode = "pass"
        self._delay_s = 0.0
        self._reset_bytes = 0
        self._reset_once = False
        self._conns: list[_Conn] = []
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._listener.settimeout(_POLL_S)
        self.port = int(self._listener.getsockname()[1])
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True,
                                          name=f"proxy-{self.port}")
        self.num_accepted = 0
        self.num_resets = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        self._acceptor.start()
        return self

    # ---------------------------------------------------------------- modes

    def heal(self) -> None:
        with self._lock:
            self._mode, self._delay_s = "pass", 0.0
            for conn in self._conns:
                conn.budget = None

    def delay(self, seconds: float) -> None:
        if not 0 <= seconds <= 10:
            raise ValueError(f"seconds ({seconds}) must be in 0..10")
        with self._lock:
            self._mode, self._delay_s = "pass", seconds

    def blackhole(self) -> None:
        with self._lock:
            self._mode = "blackhole"

    def drop(self) -> None:
        with self._lock:
            self._mode = "drop"
            conns = list(self._conns)
        for conn in conns:
            self._close(conn, reset=False)

    def reset_after(self, nbytes: int, *, once: bool = False) -> None:
        if nbytes < 0:
            raise ValueError(f"nbytes ({nbytes}) must be >= 0")
        with self._lock:
            self._mode, self._reset_bytes, self._reset_once = "reset", nbytes, once
            for conn in self._conns:
                conn.budget = nbytes

    @property
    def num_live(self) -> int:
        with self._lock:
            return sum(not c.closed.is_set() for c in self._conns)

    # ---------------------------------------------------------------- plumbing

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._conns = [c for c in self._conns if not c.closed.is_set()]
                refuse = self._mode == "drop" or len(self._conns) >= self.max_connections
            if refuse:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            try:  # before the connection is published: drop() may close it any time after
                client.settimeout(_POLL_S)
                upstream.settimeout(_POLL_S)
            except OSError:
                client.close()
                upstream.close()
                continue
            conn = _Conn(client, upstream)
            with self._lock:  # the mode may have changed while we connected upstream
                dropped = self._mode == "drop"
                if not dropped:
                    if self._mode == "reset":
                        conn.budget = self._reset_bytes
                    self._conns.append(conn)
            if dropped:
                self._close(conn, reset=False)
                continue
            self.num_accepted += 1
            for src, dst, name in ((client, upstream, "up"), (upstream, client, "down")):
                t = threading.Thread(target=self._pump, args=(conn, src, dst), daemon=True,
                                     name=f"proxy-{self.port}-{name}")
                conn.threads.append(t)
                t.start()

    def _pump(self, conn: _Conn, src: socket.socket, dst: socket.socket) -> None:
        while not conn.closed.is_set() and not self._stop.is_set():
            with self._lock:
                mode, delay_s = self._mode, self._delay_s
            if mode == "blackhole":
                conn.closed.wait(_POLL_S)  # the partition itself: nothing moves
                continue
            try:
                data = src.recv(CHUNK_BYTES)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            while self._mode == "blackhole" and not conn.closed.is_set():
                conn.closed.wait(_POLL_S)  # read just before the partition: held until healed
            with self._lock:
                budget = conn.budget
                cut = budget is not None and len(data) >= budget
                if cut:  # this thread resets the connection; the other direction never does
                    conn.budget = None
                    self.num_resets += 1
                    if self._reset_once:
                        self._mode = "pass"
                        for other in self._conns:
                            other.budget = None
                elif budget is not None:
                    conn.budget = budget - len(data)
            if cut:
                assert budget is not None
                with contextlib.suppress(OSError):
                    dst.sendall(data[:budget])
                self._close(conn, reset=True)
                return
            if delay_s:
                conn.closed.wait(delay_s)  # the injected latency
            try:
                dst.settimeout(5.0)
                dst.sendall(data)
            except OSError:
                break
        self._close(conn, reset=False)

    def _close(self, conn: _Conn, *, reset: bool) -> None:
        if conn.closed.is_set():
            return
        conn.closed.set()
        for sock in (conn.client, conn.upstream):
            with contextlib.suppress(OSError):
                if reset:  # linger 0: close() sends RST instead of FIN
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._acceptor.join(_JOIN_S)
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            self._close(conn, reset=False)
            for t in conn.threads:
                t.join(_JOIN_S)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
