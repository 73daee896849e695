"""The unix socket ``hpt.init()`` connects to (``HPT_AGENT_SOCKET``).

The messages and their framing (one JSON line each, rank to agent; never pickle) are defined
once, in :mod:`hpt._rank_protocol`. The first message of a connection must be a ``Hello``;
every later line is decoded into its typed message and handed to the handler with that hello.

A line that does not decode (unknown type, wrong version, oversized, a bad field) or that the
handler refuses (it raises ``ValueError``) is an error: counted by reason (``on_error``, the
agent's ``hpt_rank_message_errors_total``) and logged, then skipped; the connection stays open,
since closing it would also lose the rank's step reports and make a healthy rank look hung. A
connection whose first message is not a valid hello is closed: nothing it sends could be
attributed to a rank.
"""

from __future__ import annotations

import logging
import os
import socketserver
import threading
from collections import Counter
from collections.abc import Callable
from typing import BinaryIO

from hpt._rank_protocol import (
    MAX_MESSAGE_BYTES,
    ErrorReason,
    Hello,
    ProtocolError,
    RankMessage,
    decode,
)

log = logging.getLogger(__name__)

_MAX_LOGGED_ERRORS = 10
"""Errors logged per connection; later ones are only counted (a broken rank must not flood)."""

Handler = Callable[[Hello, RankMessage], None]
"""``handler(hello, message)``: called for every message after the hello on a connection;
raises ``ValueError`` to refuse one."""
ErrorHook = Callable[[ErrorReason], None]
"""``on_error(reason)``: called once per message that was not applied."""


class RankSocketServer:
    def __init__(self, path: str, handler: Handler, on_error: ErrorHook | None = None) -> None:
        self.path = path
        self._handler = handler
        self._on_error = on_error
        self._lock = threading.Lock()
        self.errors: Counter[ErrorReason] = Counter()
        """Messages not applied since start, by reason."""
        if os.path.exists(path):
            os.unlink(path)
        outer = self

        class _Conn(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                outer._serve(self.rfile)

        self._server = socketserver.ThreadingUnixStreamServer(path, _Conn)
        self._server.daemon_threads = True
        os.chmod(path, 0o600)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
            name="hpt-rank-socket", daemon=True,
        )

    def start(self) -> None:
        self._thread.start()

    def _serve(self, rfile: BinaryIO) -> None:
        hello: Hello | None = None
        num_errors = 0
        while True:
            raw = rfile.readline(MAX_MESSAGE_BYTES + 1)
            if not raw:
                return
            if len(raw) > MAX_MESSAGE_BYTES and not raw.endswith(b"\n"):
                _skip_line(rfile)  # the rest of the oversized line; decode() reports it
            try:
                msg = decode(raw)
                if hello is None:
                    if not isinstance(msg, Hello):
                        raise ProtocolError(ErrorReason.REFUSED,
                                            f"first message must be hello, not {msg.OP}")
                    hello = msg
                    continue
                if isinstance(msg, Hello):
                    raise ProtocolError(ErrorReason.REFUSED, "a second hello on one connection")
                self._handler(hello, msg)
            except ValueError as exc:  # ProtocolError, or the handler refused the message
                reason = exc.reason if isinstance(exc, ProtocolError) else ErrorReason.REFUSED
                num_errors += 1
                self._count(reason)
                who = "-/-/-" if hello is None else f"{hello.job_id}/{hello.attempt}/{hello.rank}"
                if hello is None:
                    log.warning("[%s] rank socket: closing a connection without a valid hello "
                                "(%s): %s", who, reason.value, exc)
                    return
                if num_errors <= _MAX_LOGGED_ERRORS:
                    log.warning("[%s] rank socket: message not applied (%s): %s%s", who,
                                reason.value, exc,
                                "; further errors on this connection are only counted"
                                if num_errors == _MAX_LOGGED_ERRORS else "")

    def _count(self, reason: ErrorReason) -> None:
        with self._lock:
            self.errors[reason] += 1
        if self._on_error is not None:
            self._on_error(reason)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if os.path.exists(self.path):
            os.unlink(self.path)


def _skip_line(rfile: BinaryIO) -> None:
    while True:
        chunk = rfile.readline(64 * 1024)
        if not chunk or chunk.endswith(b"\n"):
            return
