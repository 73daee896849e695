"""What RPC handlers tell the control loop: observations, queued, applied by the next pass.

An RPC handler (a user's submit or cancel, an agent's events, its report of the pieces it
holds, of a restore it could not do, of its stream closing) builds one of the records below and puts it in the
:class:`Inbox`; it changes no state itself. Each pass of the loop (``reconcile.py``) first takes
every queued observation and applies it, then decides (``decide.py``) and acts. A caller that
needs to answer after the effect (``CancelJob`` returns the job as cancelling) waits on the
observation's ``applied`` event with a deadline; ``SubmitJob`` does too, and answers with
what the pass found (stored, or the store's refusal in ``Queued.error``).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True, slots=True)
class SubmitRequested:
    """A user's new job, not stored yet: the pass stores it (or fails to, in ``Queued.error``)."""

    job: Any
    """The ``model.Job``, built by the handler with its id."""


@dataclass(frozen=True, kw_only=True, slots=True)
class AgentEvents:
    """Events an agent or its ranks raised (persist failures, skipped checkpoints...)."""

    node: str
    events: tuple[Any, ...]
    """``model.Event`` records."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CancelRequested:
    job_id: str
    grace_s: float | None
    """Seconds between SIGTERM and SIGKILL; None: the job's ``stop_grace_s``."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RestoreFailed:
    """An agent could not put ``step`` in place: never choose it again for this job."""

    job_id: str
    step: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Disconnected:
    """The agent stream ``link`` of ``node`` ended at ``at`` (this process's monotonic clock)."""

    node: str
    link: Any
    at: float


Observation = SubmitRequested | AgentEvents | CancelRequested | RestoreFailed | Disconnected


@dataclass(slots=True)
class Queued:
    observation: Observation
    applied: threading.Event = field(default_factory=threading.Event)
    """Set by the pass that applied the observation."""
    error: BaseException | None = None
    """Why the pass could not apply it (a submit the store refused); set before ``applied``."""


class Inbox:
    """Observations in arrival order; thread-safe. Never blocks a handler."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: deque[Queued] = deque()

    def put(self, observation: Observation) -> threading.Event:
        """Queue ``observation``; returns the event the applying pass sets."""
        return self.queue(observation).applied

    def queue(self, observation: Observation) -> Queued:
        """Queue ``observation``; returns its entry (``applied``, then ``error``)."""
        queued = Queued(observation)
        with self._lock:
            self._queue.append(queued)
        return queued

    def withdraw(self, queued: Queued) -> bool:
        """Take ``queued`` back unless a pass took it already; True when withdrawn."""
        with self._lock:
            try:
                self._queue.remove(queued)
            except ValueError:
                return False
            return True

    def take(self) -> list[Queued]:
        """Everything queued so far, oldest first (the pass sets ``applied`` once done)."""
        with self._lock:
            out = list(self._queue)
            self._queue.clear()
        return out

    def __len__(self) -> int:
        with self._lock:
            return len(self._queue)
