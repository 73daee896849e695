"""The unix socket ``hpt.init()`` connects to (``HPT_AGENT_SOCKET``).

One JSON object per line, rank to agent; never pickle. Messages:
``{"op": "hello", "job_id", "attempt", "rank", "pid"}`` once, then
``{"op": "step", "step": N, "at": wall_seconds}`` per reported step. A connection that sends
something else is closed; the rank-side client latches that and carries on training.
"""

from __future__ import annotations

import json
import logging
import os
import socketserver
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_MAX_LINE_BYTES = 1024 * 1024

Handler = Callable[[dict[str, Any], dict[str, Any]], None]
"""``handler(hello, message)``: called for every message after the hello on a connection."""


class RankSocketServer:
    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self._handler = handler
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

    def _serve(self, rfile) -> None:  # type: ignore[no-untyped-def]
        hello: dict[str, Any] | None = None
        for raw in iter(lambda: rfile.readline(_MAX_LINE_BYTES), b""):
            try:
                msg = json.loads(raw)
                if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
                    raise ValueError("message must be an object with a string 'op'")
                if hello is None:
                    hello = _check_hello(msg)
                    continue
                self._handler(hello, msg)
            except (ValueError, TypeError, KeyError) as exc:
                log.warning("rank socket: closing connection after bad message: %s", exc)
                return

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if os.path.exists(self.path):
            os.unlink(self.path)


def _check_hello(msg: dict[str, Any]) -> dict[str, Any]:
    if msg["op"] != "hello":
        raise ValueError("first message must be hello")
    job_id, attempt, rank = msg.get("job_id"), msg.get("attempt"), msg.get("rank")
    if not isinstance(job_id, str) or not job_id:
        raise ValueError("hello.job_id must be a non-empty string")
    if not isinstance(attempt, int) or attempt < 1:
        raise ValueError("hello.attempt must be an int >= 1")
    if not isinstance(rank, int) or rank < 0:
        raise ValueError("hello.rank must be an int >= 0")
    return {"job_id": job_id, "attempt": attempt, "rank": rank}
