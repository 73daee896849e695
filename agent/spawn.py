"""Every process the agent starts is started here, on one long-lived thread.

Children get ``PR_SET_PDEATHSIG = SIGKILL``: if the agent dies, even by ``kill -9``, the kernel
kills its ranks and warm interpreters, so a lost node leaves no orphans. The death signal fires
when the *thread* that forked the child exits, which is why forks happen on this one thread
that lives exactly as long as the agent, never on short-lived worker threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import queue
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future
from typing import Any

_PR_SET_PDEATHSIG = 1
_SPAWN_TIMEOUT_S = 30.0

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_prctl = _libc.prctl


def _die_with_parent() -> None:  # runs in the child between fork and exec: keep it minimal
    _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


class Spawner:
    def __init__(self) -> None:
        self._requests: queue.Queue[tuple[list[str], dict[str, Any], Future[Any]] | None] = (
            queue.Queue()
        )
        self._thread = threading.Thread(target=self._run, name="hpt-spawner", daemon=True)
        self._thread.start()

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """``subprocess.Popen(argv, **kwargs)`` on the spawner thread; raises what Popen raises."""
        result: Future[subprocess.Popen[bytes]] = Future()
        self._requests.put((argv, kwargs, result))
        return result.result(timeout=_SPAWN_TIMEOUT_S)

    def _run(self) -> None:
        while True:
            item = self._requests.get()
            if item is None:
                return
            argv, kwargs, result = item
            try:
                preexec = _die_with_parent if sys.platform == "linux" else None
                result.set_result(subprocess.Popen(argv, preexec_fn=preexec, **kwargs))
            except BaseException as exc:  # handed to the caller, which raises it
                result.set_exception(exc)

    def close(self) -> None:
        """Called last at agent shutdown; children still alive then die with the thread."""
        self._requests.put(None)
        self._thread.join(timeout=5.0)
