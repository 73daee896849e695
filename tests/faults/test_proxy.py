"""The fault suite's TCP proxy itself, against a real echo server on loopback."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from tests.faults.proxy import TcpProxy


@contextlib.contextmanager
def echo_server() -> Iterator[int]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.05)
    stop = threading.Event()
    threads = []

    def serve(conn: socket.socket) -> None:
        conn.settimeout(0.05)
        with conn:
            while not stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                with contextlib.suppress(OSError):
                    conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=serve, args=(conn,), daemon=True)
            threads.append(t)
            t.start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        acceptor.join(5)
        listener.close()
        for t in threads:
            t.join(5)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


@pytest.fixture
def proxy():
    with echo_server() as port, TcpProxy(port) as p:
        yield p


def connect(p: TcpProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    sock.settimeout(10)
    return sock


def test_passes_bytes_both_ways_in_order(proxy):
    payload = bytes(range(256)) * 2048  # 512 KiB: several chunks
    with connect(proxy) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        assert recv_exactly(sock, len(payload)) == payload
        sender.join(10)


def test_delay_keeps_every_byte_and_their_order(proxy):
    proxy.delay(0.05)
    with connect(proxy) as sock:
        for i in range(5):
            sock.sendall(f"m{i};".encode())
        assert recv_exactly(sock, 15) == b"m0;m1;m2;m3;m4;"


def test_blackhole_passes_nothing_until_healed_then_everything(proxy):
    with connect(proxy) as sock:
        sock.sendall(b"before")
        assert recv_exactly(sock, 6) == b"before"
        proxy.blackhole()
        sock.sendall(b"during")
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(16)
        assert proxy.num_live == 1, "a partition closes nothing"
        proxy.heal()
        sock.settimeout(10)
        assert recv_exactly(sock, 6) == b"during"


def test_reset_mid_transfer_resets_the_connection_after_the_budget(proxy):
    with connect(proxy) as sock:
        proxy.reset_after(100)
        sock.sendall(b"x" * 40)
        assert recv_exactly(sock, 40) == b"x" * 40  # 80 bytes of budget spent
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            sock.sendall(b"y" * 4096)
            while sock.recv(4096):
                pass
    assert proxy.num_resets == 1


def test_drop_closes_live_and_new_connections(proxy):
    with connect(proxy) as sock:
        proxy.drop()
        assert sock.recv(16) == b""
    with connect(proxy) as sock:
        assert sock.recv(16) in (b"",)
    proxy.heal()
    with connect(proxy) as sock:
        sock.sendall(b"back")
        assert recv_exactly(sock, 4) == b"back"


def test_connections_beyond_the_bound_are_refused():
    with echo_server() as port, TcpProxy(port, max_connections=2) as p:
        socks = [connect(p) for _ in range(3)]
        try:
            for s in socks[:2]:
                s.sendall(b"ok")
                assert recv_exactly(s, 2) == b"ok"
            assert socks[2].recv(16) == b""
        finally:
            for s in socks:
                s.close()
