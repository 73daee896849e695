"""The rank <-> agent protocol: every message a training rank sends its agent, typed.

The unix socket ``hpt.init()`` connects to (``HPT_AGENT_SOCKET``) carries one JSON object per
line (UTF-8, ``\\n``-terminated, at most :data:`MAX_MESSAGE_BYTES` with the newline), rank to
agent; never pickle. Every object carries ``"v"`` (:data:`PROTOCOL_VERSION`) and ``"op"`` (the
message type), then exactly the fields of that type's dataclass below. The first message on a
connection is :class:`Hello`; it names the job, attempt and rank every later message speaks for.

Both sides import this module and nothing else defines the messages: the rank side
(``hpt/__init__.py``, ``hpt/_rank.py``, ``hpt/_rank_monitor.py``, ``hpt/checkpoint.py``,
``hpt/integrations``) builds them and calls :meth:`encode`; the agent
(``agent/rank_socket.py``) calls :func:`decode` on each line and hands the typed message to its
handlers (``agent/watch.py``, ``agent/ckpt_metrics.py``, ``agent/daemon.py``). A message that
does not decode raises :class:`ProtocolError` naming the field and carrying a
:class:`ErrorReason`; the agent counts it (``hpt_rank_message_errors_total{reason}``) and logs
it. Constructing a message with a bad field raises the same error, so the rank side cannot send
what the agent would refuse.

Standard library only (``tests/unit/test_import_contracts.py`` checks it): the agent and a rank
import it without torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, dataclass, fields
from enum import Enum
from typing import Any, ClassVar, Final

__all__ = [
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "ErrorReason",
    "Exiting",
    "Finished",
    "Hello",
    "InFlight",
    "ProtocolError",
    "RankEvent",
    "RankEventKind",
    "RankMessage",
    "Records",
    "SectionBegin",
    "SectionEnd",
    "SnapshotCommitted",
    "SnapshotDiscarded",
    "StackDump",
    "Step",
    "decode",
    "from_dict",
]

PROTOCOL_VERSION: Final = 1
"""Bumped on any change of a message's fields; the agent refuses every other version."""
MAX_MESSAGE_BYTES: Final = 1024 * 1024
"""One encoded line, newline included."""
MAX_RECORDS: Final = 2000
"""Timing records in one ``records``/``inflight`` message (a larger batch is split)."""
MAX_SECTION_TIMEOUT_S: Final = 7 * 24 * 3600.0
MAX_NAME_CHARS: Final = 200
"""A section's name."""
MAX_ID_CHARS: Final = 256
"""A job id, an event's restore source."""
MAX_TEXT_CHARS: Final = 16 * 1024
"""An event's message (the agent keeps 4 KiB of it)."""
MAX_GENERATIONS: Final = 64
"""Snapshot generations are 0..MAX_GENERATIONS-1."""


class ErrorReason(str, Enum):  # noqa: UP042 (STYLE: (str, Enum) for logged values)
    """Why the agent did not apply a rank's message (the ``reason`` label of its counter)."""

    MALFORMED = "malformed"
    """Not a JSON object, a field missing, unknown or of the wrong type or range."""
    UNKNOWN_TYPE = "unknown_type"
    """An ``op`` this protocol does not define."""
    OVERSIZED = "oversized"
    """A line longer than MAX_MESSAGE_BYTES."""
    VERSION = "version"
    """A ``v`` other than PROTOCOL_VERSION."""
    REFUSED = "refused"
    """Well formed, but the agent could not apply it (no hello first, a second hello, more
    sections open than it tracks, a snapshot of a rank it does not know)."""


class ProtocolError(ValueError):
    """A message that does not decode (or cannot be built); ``reason`` classifies it."""

    def __init__(self, reason: ErrorReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RankEventKind(str, Enum):  # noqa: UP042 (STYLE: (str, Enum) for logged values)
    """Events a rank's checkpointer reports for the controller's log."""

    CHECKPOINT_SKIPPED = "checkpoint_skipped"
    """A restore source offered a step this rank could not use (the message says why)."""
    RESTORED = "restored"
    """The rank restored a step (``seconds`` and ``source`` feed the restore metrics)."""


# ---------------------------------------------------------------- field checks (__post_init__)


def _fail(op: str, name: str, value: Any, rule: str) -> ProtocolError:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return ProtocolError(ErrorReason.MALFORMED, f"{op}.{name} ({text}) must be {rule}")


def _int(msg: Any, name: str, lo: int, hi: int | None = None) -> None:
    v = getattr(msg, name)
    rule = f"an int >= {lo}" if hi is None else f"an int in {lo}..{hi}"
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        raise _fail(msg.OP, name, v, rule)


def _float(msg: Any, name: str, *, positive: bool = False, hi: float = math.inf,
           optional: bool = False) -> None:
    v = getattr(msg, name)
    if v is None and optional:
        return
    low = "> 0" if positive else ">= 0"
    rule = f"a finite number {low}" if hi == math.inf else f"a number in (0, {hi:g}]"
    if optional:
        rule += " or null"
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _fail(msg.OP, name, v, rule)
    if not math.isfinite(v) or v < 0 or (positive and v == 0) or v > hi:
        raise _fail(msg.OP, name, v, rule)
    object.__setattr__(msg, name, float(v))  # JSON writes 600.0 as 600


def _str(msg: Any, name: str, *, lo: int, hi: int) -> None:
    v = getattr(msg, name)
    if not isinstance(v, str) or not lo <= len(v) <= hi:
        raise _fail(msg.OP, name, v, f"a string of {lo}..{hi} characters")


def _opt_int(msg: Any, name: str) -> None:
    if getattr(msg, name) is not None:
        try:
            _int(msg, name, 0)
        except ProtocolError as exc:
            raise ProtocolError(exc.reason, f"{exc} or null") from None


def _records(msg: Any) -> None:
    v = msg.records
    if isinstance(v, list):
        v = tuple(v)
        object.__setattr__(msg, "records", v)
    if not isinstance(v, tuple) or len(v) > MAX_RECORDS:
        raise _fail(msg.OP, "records", v, f"a list of at most {MAX_RECORDS} objects")
    for i, rec in enumerate(v):
        if not isinstance(rec, dict):
            raise _fail(msg.OP, f"records[{i}]", rec, "an object")


# ---------------------------------------------------------------- messages


class _Message:
    """Encoding shared by every message: ``{"v", "op", <fields>}`` on one line."""

    __slots__ = ()
    OP: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"v": PROTOCOL_VERSION, "op": self.OP}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, Enum) else value
        return out

    def encode(self) -> bytes:
        """The message as one line, newline included.

        Raises:
            ProtocolError: the line would exceed MAX_MESSAGE_BYTES (reason OVERSIZED).
        """
        data = json.dumps(self.to_dict(), separators=(",", ":")).encode() + b"\n"
        if len(data) > MAX_MESSAGE_BYTES:
            raise ProtocolError(ErrorReason.OVERSIZED, f"{self.OP} message of {len(data)} bytes "
                                f"exceeds the limit of {MAX_MESSAGE_BYTES} bytes")
        return data


@dataclass(frozen=True, kw_only=True, slots=True)
class Hello(_Message):
    """First message of a connection: whose messages follow."""

    OP: ClassVar[str] = "hello"
    job_id: str
    attempt: int
    """From 1."""
    rank: int
    """Global rank."""
    pid: int
    """The rank's process id."""

    def __post_init__(self) -> None:
        _str(self, "job_id", lo=1, hi=MAX_ID_CHARS)
        _int(self, "attempt", 1)
        _int(self, "rank", 0)
        _int(self, "pid", 1)


@dataclass(frozen=True, kw_only=True, slots=True)
class Step(_Message):
    """``hpt.step(n)`` (or a trainer callback's beat): ``step`` steps are done; progress."""

    OP: ClassVar[str] = "step"
    step: int
    at: float
    """Wall-clock seconds (``time.time()``) on the rank when it reported."""

    def __post_init__(self) -> None:
        _int(self, "step", 0)
        _float(self, "at")


@dataclass(frozen=True, kw_only=True, slots=True)
class Records(_Message):
    """A batch of finished timing records, each a :mod:`hpt.monitor.records` dict.

    The records themselves are decoded (and a bad one dropped and counted) by the agent with
    ``record_from_dict``: their schema has one owner, ``monitor/records.py``.
    """

    OP: ClassVar[str] = "records"
    records: tuple[dict[str, Any], ...]

    def __post_init__(self) -> None:
        _records(self)


@dataclass(frozen=True, kw_only=True, slots=True)
class InFlight(_Message):
    """The collectives the rank is blocked in now (its watchdog thread, every second); an empty
    list after a non-empty one says it got out."""

    OP: ClassVar[str] = "inflight"
    records: tuple[dict[str, Any], ...]

    def __post_init__(self) -> None:
        _records(self)


@dataclass(frozen=True, kw_only=True, slots=True)
class StackDump(_Message):
    """Process ``pid`` registered the SIGUSR1 stack dump: the agent may signal it, no other."""

    OP: ClassVar[str] = "stack_dump"
    pid: int

    def __post_init__(self) -> None:
        _int(self, "pid", 1)


@dataclass(frozen=True, kw_only=True, slots=True)
class SectionBegin(_Message):
    """``with hpt.section(name, timeout=T)`` opened: the rank is hung only past T from now."""

    OP: ClassVar[str] = "section"
    name: str
    timeout_s: float

    def __post_init__(self) -> None:
        _str(self, "name", lo=1, hi=MAX_NAME_CHARS)
        _float(self, "timeout_s", positive=True, hi=MAX_SECTION_TIMEOUT_S)


@dataclass(frozen=True, kw_only=True, slots=True)
class SectionEnd(_Message):
    """The innermost open section called ``name`` closed (leaving it is progress)."""

    OP: ClassVar[str] = "section_end"
    name: str

    def __post_init__(self) -> None:
        _str(self, "name", lo=1, hi=MAX_NAME_CHARS)


@dataclass(frozen=True, kw_only=True, slots=True)
class Exiting(_Message):
    """hpt's exit hook ran: the script is done and the interpreter is tearing down."""

    OP: ClassVar[str] = "exiting"


@dataclass(frozen=True, kw_only=True, slots=True)
class Finished(_Message):
    """Training is over on this rank (a trainer callback at the end of fit)."""

    OP: ClassVar[str] = "finished"


@dataclass(frozen=True, kw_only=True, slots=True)
class SnapshotCommitted(_Message):
    """The rank's snapshot of ``step`` is complete in shared-memory generation ``generation``."""

    OP: ClassVar[str] = "snapshot"
    step: int
    generation: int
    nbytes: int
    """Bytes of the snapshot."""
    copy_s: float | None = None
    """Seconds from the start of the save to the commit, when the rank timed it."""
    blocked_s: float | None = None
    """Seconds the newest snapshot the rank measured held its training thread (its save and
    the next optimizer step's wait for the copies: ``Checkpointer.blocked_s``)."""

    def __post_init__(self) -> None:
        _int(self, "step", 0)
        _int(self, "generation", 0, MAX_GENERATIONS - 1)
        _int(self, "nbytes", 0)
        _float(self, "copy_s", optional=True)
        _float(self, "blocked_s", optional=True)


@dataclass(frozen=True, kw_only=True, slots=True)
class SnapshotDiscarded(_Message):
    """Generation ``generation`` is being overwritten: the step it held is gone."""

    OP: ClassVar[str] = "discard"
    generation: int

    def __post_init__(self) -> None:
        _int(self, "generation", 0, MAX_GENERATIONS - 1)


@dataclass(frozen=True, kw_only=True, slots=True)
class RankEvent(_Message):
    """An event of the rank's checkpointer for the controller's log."""

    OP: ClassVar[str] = "event"
    kind: RankEventKind
    message: str
    seconds: float | None = None
    """``restored``: seconds the restore took."""
    nbytes: int | None = None
    """``restored``: bytes restored."""
    source: str = ""
    """``restored``: the tier the bytes came from (a ``RESTORE_SOURCES`` label), or empty."""

    def __post_init__(self) -> None:
        if not isinstance(self.kind, RankEventKind):
            try:
                object.__setattr__(self, "kind", RankEventKind(self.kind))
            except ValueError:
                raise _fail(self.OP, "kind", self.kind,
                            f"one of {sorted(k.value for k in RankEventKind)}") from None
        _str(self, "message", lo=0, hi=MAX_TEXT_CHARS)
        _float(self, "seconds", optional=True)
        _opt_int(self, "nbytes")
        _str(self, "source", lo=0, hi=MAX_ID_CHARS)


RankMessage = (
    Hello | Step | Records | InFlight | StackDump | SectionBegin | SectionEnd | Exiting | Finished
    | SnapshotCommitted | SnapshotDiscarded | RankEvent
)
"""Any message of the protocol."""

MESSAGE_TYPES: Final[tuple[type[_Message], ...]] = (
    Hello, Step, Records, InFlight, StackDump, SectionBegin, SectionEnd, Exiting, Finished,
    SnapshotCommitted, SnapshotDiscarded, RankEvent,
)
_BY_OP: Final[dict[str, type[_Message]]] = {t.OP: t for t in MESSAGE_TYPES}
assert len(_BY_OP) == len(MESSAGE_TYPES), "message ops must be unique"
_FIELDS: Final[dict[str, tuple[frozenset[str], frozenset[str]]]] = {
    t.OP: (
        frozenset(f.name for f in fields(t)),  # type: ignore[arg-type]
        frozenset(f.name for f in fields(t)  # type: ignore[arg-type]
                  if f.default is MISSING and f.default_factory is MISSING),
    )
    for t in MESSAGE_TYPES
}


# ---------------------------------------------------------------- decoding (the agent side)


def decode(line: bytes) -> RankMessage:
    """One received line (newline optional) as its typed message.

    Raises:
        ProtocolError: oversized, not JSON, an unknown version or op, or a bad field (the
            message names the field).
    """
    if len(line) > MAX_MESSAGE_BYTES:
        raise ProtocolError(ErrorReason.OVERSIZED,
                            f"message of more than {MAX_MESSAGE_BYTES} bytes")
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(ErrorReason.MALFORMED, f"message is not JSON: {exc}") from None
    return from_dict(obj)


def from_dict(obj: Any) -> RankMessage:
    """A parsed JSON object as its typed message (see :func:`decode`)."""
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorReason.MALFORMED,
                            f"message must be a JSON object, not {type(obj).__name__}")
    version = obj.get("v")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise ProtocolError(ErrorReason.VERSION, f"v ({version!r}) must be the protocol version "
                            f"{PROTOCOL_VERSION}")
    op = obj.get("op")
    if not isinstance(op, str):
        raise ProtocolError(ErrorReason.MALFORMED, f"op ({op!r:.80}) must be a string")
    cls = _BY_OP.get(op)
    if cls is None:
        raise ProtocolError(ErrorReason.UNKNOWN_TYPE,
                            f"op ({op!r:.80}) must be one of {sorted(_BY_OP)}")
    known, required = _FIELDS[op]
    kwargs = {k: v for k, v in obj.items() if k not in ("v", "op")}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ProtocolError(ErrorReason.MALFORMED, f"{op}.{unknown[0][:80]} is not a field of "
                            f"{op} (fields: {sorted(known)})")
    missing = sorted(required - set(kwargs))
    if missing:
        raise ProtocolError(ErrorReason.MALFORMED, f"{op}.{missing[0]} is missing")
    return cls(**kwargs)  # type: ignore[return-value]  # __post_init__ checks every field
