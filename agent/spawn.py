"""Every process the agent starts is started here, on one long-lived thread.

Children get ``PR_SET_PDEATHSIG = SIGKILL``: if the agent dies, even by ``kill -9``, the kernel
kills its ranks and warm interpreters, so a lost node leaves no orphans. The signal is armed by
an exec wrapper (:mod:`hpt._pdeathsig`), never by ``preexec_fn``: the agent has gRPC threads,
and Python run between fork and exec runs gRPC's fork handlers in the child. The death signal
fires when the *thread* that forked the child exits, which is why forks happen on this one
thread that lives exactly as long as the agent, never on short-lived worker threads.
"""

from __future__ import annotations

import queue
import subprocess
import threading
from concurrent.futures import Future
from typing import Any

from hpt import _pdeathsig

_SPAWN_TIMEOUT_S = 30.0


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
                result.set_result(subprocess.Popen(_pdeathsig.wrap(argv), **kwargs))
            except BaseException as exc:  # handed to the caller, which raises it
                result.set_exception(exc)

    def close(self) -> None:
        """Called last at agent shutdown; children still alive then die with the thread."""
        self._requests.put(None)
        self._thread.join(timeout=5.0)
