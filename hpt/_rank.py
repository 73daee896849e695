"""Rank side of the agent socket: what ``hpt.init()`` and ``hpt.step()`` talk through.

The messages are those of :mod:`hpt._rank_protocol` (the agent decodes them with it).

Never raises into the training loop: a failure to reach the agent is latched (``error``) and
the rank carries on; progress reports are then simply missing, which the agent treats like a
rank that makes no progress.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import socket
import sys
import threading
import time
import traceback

from hpt._rank_protocol import Hello, ProtocolError, RankMessage, Step

log = logging.getLogger(__name__)


class AgentChannel:
    """The rank's end of the agent socket: sends :mod:`hpt._rank_protocol` messages."""

    def __init__(self, path: str, hello: Hello) -> None:
        self.error: BaseException | None = None
        self._refused: set[str] = set()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5.0)
            sock.connect(path)
            self._sock = sock
        except OSError as exc:
            self.error = exc
            log.warning("hpt: cannot reach the agent at %s: %s", path, exc)
            return
        self.send(hello)

    def step(self, completed: int) -> None:
        """Report ``completed`` steps done, stamped with the wall clock now. A value that is not
        a count (a float, a negative number) is logged once and not sent, never raised."""
        try:
            msg = Step(step=operator.index(completed), at=time.time())
        except (TypeError, ValueError) as exc:
            self._refuse(Step.OP, exc)
            return
        self.send(msg)

    def send(self, msg: RankMessage) -> None:
        if self._sock is None:
            return
        try:
            data = msg.encode()
        except ProtocolError as exc:  # too large to send: say so once per type, train on
            self._refuse(msg.OP, exc)
            return
        with self._lock:
            try:
                self._sock.sendall(data)
            except OSError as exc:
                self.error = exc
                self._sock.close()
                self._sock = None

    def _refuse(self, op: str, exc: Exception) -> None:
        if op not in self._refused:
            self._refused.add(op)
            log.warning("hpt: %s not sent to the agent (warned once): %s", op, exc)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def install_error_file_hook(path: str) -> None:
    """On an uncaught exception, write ``{type, message, traceback, time}`` to ``path`` (read
    back by the agent to name the failure), then defer to the previous hook."""
    previous = sys.excepthook

    def hook(exc_type, exc, tb):  # type: ignore[no-untyped-def]
        try:
            record = {
                "type": exc_type.__name__,
                "message": str(exc),
                "traceback": "".join(traceback.format_exception(exc_type, exc, tb)),
                "time": time.time(),
                "pid": os.getpid(),
            }
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                json.dump(record, f)
            os.replace(tmp, path)
        except OSError:
            pass
        previous(exc_type, exc, tb)

    sys.excepthook = hook
