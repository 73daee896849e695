"""Timing records and findings: the data that flows from ranks to detectors to events.

Ranks (through ``hpt._instrument``) produce :class:`StepRecord`, :class:`CollectiveRecord` and
:class:`SectionRecord` and hand them to their agent as JSON lines; the agent batches them to the
controller, which feeds them to the detectors in :mod:`hpt.monitor.detectors`. Detectors return
:class:`Finding` objects inside a :class:`Detection`; a finding travels on as a string inside an
event.

Times are seconds on a monotonic clock (``time.monotonic``). Each record's times are on the clock
of the rank that wrote it, so detectors only compare *durations* across ranks, never raw
timestamps from different nodes.

Constructors do not validate: records are built on the training hot path by our own code.
``from_dict`` is the boundary for anything read back from the wire and validates every field,
raising ``ValueError`` that names the record type, the field, the value and the rule.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Final

__all__ = [
    "CollectiveRecord",
    "CollectiveSummary",
    "Detection",
    "Finding",
    "FindingKind",
    "Record",
    "SectionRecord",
    "StepRecord",
    "StepSummary",
    "decode_line",
    "encode_line",
    "record_from_dict",
    "timing_stride",
]

TIMING_RANKS = 8192
"""Ranks whose every step the controller's detectors judge: a world larger than this sends
one timing entry per rank per ``timing_stride`` steps (about 6 us of controller CPU per entry,
measured: 80,000 ranks at a step a second would take half a core for timing alone)."""


def timing_stride(world_size: int) -> int:
    """Steps per timing entry of each rank of a world of ``world_size``, as the agent sends
    them and the controller counts them: 1 up to ``TIMING_RANKS`` ranks, then one entry per
    rank per ``ceil(world / TIMING_RANKS)`` steps (the mean of those steps, sent at the last
    one, ``step % stride == stride - 1``), and only the collectives whose ``seq`` is a
    multiple of it. Both sides compute it from the world size alone, so every rank of an
    attempt cuts the same windows and no message carries it."""
    return max(1, -(-world_size // TIMING_RANKS))


EvidenceValue = float | int | str


class FindingKind(str, Enum):  # noqa: UP042 (STYLE: (str, Enum) for logged values)
    """What a detector found. The value is what events and metrics carry."""

    STRAGGLER = "straggler"
    """A rank is persistently slower than the median of its peers."""
    STRAGGLER_CLEARED = "straggler_cleared"
    """A rank flagged as a straggler has been back in line for long enough."""
    HANG = "hang"
    """A rank made no progress for longer than the hang deadline."""
    COLLECTIVE_LAGGARD = "collective_laggard"
    """A rank enters the same collectives last, again and again (C4)."""
    COLLECTIVE_MISSING = "collective_missing"
    """A collective is stuck and this rank never entered it (C4)."""

    @property
    def is_fault(self) -> bool:
        """True for findings that describe a problem, False for the all-clear."""
        return self is not FindingKind.STRAGGLER_CLEARED


# -- validation helpers for from_dict (the wire boundary) ---------------------------------------


def _get(d: Mapping[str, Any], cls: str, name: str) -> Any:
    if name not in d:
        raise ValueError(f"{cls}.{name} is missing")
    return d[name]


def _int(d: Mapping[str, Any], cls: str, name: str, minimum: int = 0) -> int:
    v = _get(d, cls, name)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"{cls}.{name} ({v!r}) must be an integer")
    if v < minimum:
        raise ValueError(f"{cls}.{name} ({v!r}) must be >= {minimum}")
    return v


def _float(d: Mapping[str, Any], cls: str, name: str, minimum: float | None = None) -> float:
    v = _get(d, cls, name)
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
        raise ValueError(f"{cls}.{name} ({v!r}) must be a finite number")
    if minimum is not None and v < minimum:
        raise ValueError(f"{cls}.{name} ({v!r}) must be >= {minimum}")
    return float(v)


def _str(d: Mapping[str, Any], cls: str, name: str, *, nonempty: bool = False) -> str:
    v = _get(d, cls, name)
    if not isinstance(v, str):
        raise ValueError(f"{cls}.{name} ({v!r}) must be a string")
    if nonempty and not v:
        raise ValueError(f"{cls}.{name} ({v!r}) must not be empty")
    return v


def _check_type(d: Mapping[str, Any], cls: str, tag: str) -> None:
    if not isinstance(d, Mapping):
        raise ValueError(f"{cls} ({d!r}) must be a JSON object")
    if d.get("type", tag) != tag:
        raise ValueError(f"{cls}.type ({d.get('type')!r}) must be {tag!r}")


def _check_order(cls: str, first: str, a: float, second: str, b: float) -> None:
    if b < a:
        raise ValueError(f"{cls}.{second} ({b!r}) must be >= {first} ({a!r})")


# -- records ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class StepRecord:
    """One training step of one rank."""

    TYPE: ClassVar[str] = "step"

    job_id: str
    attempt: int
    rank: int
    node: str
    step: int
    start_s: float
    """Monotonic time of ``begin_step`` on the rank's clock."""
    end_s: float
    """Monotonic time of ``end_step`` on the rank's clock."""
    data_wait_s: float
    """Time inside the step spent waiting for input data (explicitly marked by the rank)."""
    compute_s: float
    """Time inside the step that was neither data wait nor blocked in a collective."""

    @property
    def step_s(self) -> float:
        """Wall duration of the step, including time waiting for peers."""
        return self.end_s - self.start_s

    @property
    def busy_s(self) -> float:
        """Time the rank spent on its own work: data wait plus compute."""
        return self.data_wait_s + self.compute_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "job_id": self.job_id,
            "attempt": self.attempt,
            "rank": self.rank,
            "node": self.node,
            "step": self.step,
            "start_s": self.start_s,
            "end_s": self.end_s,
            "data_wait_s": self.data_wait_s,
            "compute_s": self.compute_s,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StepRecord:
        n = cls.__name__
        _check_type(d, n, cls.TYPE)
        rec = cls(
            job_id=_str(d, n, "job_id", nonempty=True),
            attempt=_int(d, n, "attempt"),
            rank=_int(d, n, "rank"),
            node=_str(d, n, "node"),
            step=_int(d, n, "step"),
            start_s=_float(d, n, "start_s"),
            end_s=_float(d, n, "end_s"),
            data_wait_s=_float(d, n, "data_wait_s", 0.0),
            compute_s=_float(d, n, "compute_s", 0.0),
        )
        _check_order(n, "start_s", rec.start_s, "end_s", rec.end_s)
        return rec


@dataclass(frozen=True, kw_only=True, slots=True)
class CollectiveRecord:
    """One collective call of one rank.

    ``seq`` counts the rank's collectives on the default (world) group from 0, so the same seq
    on every rank is the same collective. Collectives on other groups carry ``seq == -1``: they
    are timed but not compared across ranks.
    """

    TYPE: ClassVar[str] = "collective"

    job_id: str
    attempt: int
    rank: int
    node: str
    seq: int
    op: str
    """Name of the ``torch.distributed`` function, e.g. ``all_reduce``."""
    nbytes: int
    enter_s: float
    exit_s: float | None
    """None while the collective is still in flight."""

    @property
    def duration_s(self) -> float | None:
        return None if self.exit_s is None else self.exit_s - self.enter_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "job_id": self.job_id,
            "attempt": self.attempt,
            "rank": self.rank,
            "node": self.node,
            "seq": self.seq,
            "op": self.op,
            "nbytes": self.nbytes,
            "enter_s": self.enter_s,
            "exit_s": self.exit_s,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CollectiveRecord:
        n = cls.__name__
        _check_type(d, n, cls.TYPE)
        exit_s = None if _get(d, n, "exit_s") is None else _float(d, n, "exit_s")
        rec = cls(
            job_id=_str(d, n, "job_id", nonempty=True),
            attempt=_int(d, n, "attempt"),
            rank=_int(d, n, "rank"),
            node=_str(d, n, "node"),
            seq=_int(d, n, "seq", -1),
            op=_str(d, n, "op", nonempty=True),
            nbytes=_int(d, n, "nbytes"),
            enter_s=_float(d, n, "enter_s"),
            exit_s=exit_s,
        )
        if exit_s is not None:
            _check_order(n, "enter_s", rec.enter_s, "exit_s", exit_s)
        return rec


@dataclass(frozen=True, kw_only=True, slots=True)
class StepSummary:
    """Completed steps of several ranks of one attempt on one node, column by column: entry
    ``i`` is what a :class:`StepRecord` of ``rank[i]`` for ``step[i]`` carries, less the raw
    timestamps (only durations are compared). The agent sends one per attempt per heartbeat
    instead of one record per step and rank; the detectors take either. Columns have equal
    lengths (the controller checks that when it decodes one)."""

    job_id: str
    attempt: int
    node: str
    rank: Sequence[int]
    step: Sequence[int]
    step_s: Sequence[float]
    """``end_s - start_s`` of each step."""
    data_wait_s: Sequence[float]
    compute_s: Sequence[float]

    def __len__(self) -> int:
        return len(self.rank)


@dataclass(frozen=True, kw_only=True, slots=True)
class CollectiveSummary:
    """Completed collectives of several ranks of one attempt on one node, column by column:
    entry ``i`` is ``rank[i]``'s collective ``seq[i]`` (op ``ops[op_index[i]]``), which it
    waited in for ``duration_s[i]`` (``exit_s - enter_s``). In-flight collectives are never
    summarised: they travel as :class:`CollectiveRecord` with ``exit_s`` None."""

    job_id: str
    attempt: int
    node: str
    ops: Sequence[str]
    rank: Sequence[int]
    seq: Sequence[int]
    op_index: Sequence[int]
    duration_s: Sequence[float]

    def __len__(self) -> int:
        return len(self.rank)


@dataclass(frozen=True, kw_only=True, slots=True)
class SectionRecord:
    """A named span inside a step (``with timer.section("forward"):``)."""

    TYPE: ClassVar[str] = "section"

    job_id: str
    attempt: int
    rank: int
    node: str
    step: int
    """The step the section ran in, -1 when outside any step."""
    name: str
    start_s: float
    end_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "job_id": self.job_id,
            "attempt": self.attempt,
            "rank": self.rank,
            "node": self.node,
            "step": self.step,
            "name": self.name,
            "start_s": self.start_s,
            "end_s": self.end_s,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SectionRecord:
        n = cls.__name__
        _check_type(d, n, cls.TYPE)
        rec = cls(
            job_id=_str(d, n, "job_id", nonempty=True),
            attempt=_int(d, n, "attempt"),
            rank=_int(d, n, "rank"),
            node=_str(d, n, "node"),
            step=_int(d, n, "step", -1),
            name=_str(d, n, "name", nonempty=True),
            start_s=_float(d, n, "start_s"),
            end_s=_float(d, n, "end_s"),
        )
        _check_order(n, "start_s", rec.start_s, "end_s", rec.end_s)
        return rec


@dataclass(frozen=True, kw_only=True, slots=True)
class Finding:
    """Something a detector concluded about one rank of one attempt."""

    TYPE: ClassVar[str] = "finding"

    kind: FindingKind
    job_id: str
    attempt: int
    rank: int
    """The rank the finding is about (-1 when it is about no single rank)."""
    node: str
    message: str
    """One line in words, e.g. 'rank 3 (node-b) compute 1.31x peer median in 6/10 steps'."""
    detected_at_s: float
    """The ``now`` the detector was given, on the observer's monotonic clock."""
    evidence: dict[str, EvidenceValue] = field(default_factory=dict)
    """The numbers behind the decision, flat and JSON-safe."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "kind": self.kind.value,
            "job_id": self.job_id,
            "attempt": self.attempt,
            "rank": self.rank,
            "node": self.node,
            "message": self.message,
            "detected_at_s": self.detected_at_s,
            "evidence": dict(self.evidence),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Finding:
        n = cls.__name__
        _check_type(d, n, cls.TYPE)
        kind_v = _get(d, n, "kind")
        try:
            kind = FindingKind(kind_v)
        except ValueError:
            allowed = ", ".join(k.value for k in FindingKind)
            raise ValueError(f"{n}.kind ({kind_v!r}) must be one of {allowed}") from None
        ev = _get(d, n, "evidence")
        if not isinstance(ev, Mapping):
            raise ValueError(f"{n}.evidence ({ev!r}) must be an object")
        evidence: dict[str, EvidenceValue] = {}
        for k, v in ev.items():
            ok = isinstance(v, str) or (
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            )
            if not isinstance(k, str) or not ok:
                raise ValueError(f"{n}.evidence[{k!r}] ({v!r}) must be a string or a finite number")
            evidence[k] = v
        return cls(
            kind=kind,
            job_id=_str(d, n, "job_id", nonempty=True),
            attempt=_int(d, n, "attempt"),
            rank=_int(d, n, "rank", -1),
            node=_str(d, n, "node"),
            message=_str(d, n, "message"),
            detected_at_s=_float(d, n, "detected_at_s"),
            evidence=evidence,
        )


Record = StepRecord | CollectiveRecord | SectionRecord | Finding

_BY_TYPE: Final[dict[str, Any]] = {
    c.TYPE: c for c in (StepRecord, CollectiveRecord, SectionRecord, Finding)
}


def record_from_dict(d: Mapping[str, Any]) -> Record:
    """Decode any record from its ``to_dict`` form, dispatching on its ``type`` key.

    Raises:
        ValueError: unknown ``type`` or any invalid field.
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"record ({d!r}) must be a JSON object")
    tag = d.get("type")
    cls = _BY_TYPE.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise ValueError(f"record.type ({tag!r}) must be one of {', '.join(sorted(_BY_TYPE))}")
    rec: Record = cls.from_dict(d)
    return rec


def encode_line(record: Record) -> str:
    """One JSON line (no newline) for a record; NaN and infinities are refused."""
    return json.dumps(record.to_dict(), separators=(",", ":"), allow_nan=False)


def decode_line(line: str | bytes) -> Record:
    """Inverse of :func:`encode_line`.

    Raises:
        ValueError: the line is not JSON or not a valid record.
    """
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"record line is not JSON: {e}") from None
    return record_from_dict(d)


@dataclass(frozen=True, slots=True)
class Detection:
    """What one detector call concluded: findings, and one line saying why."""

    findings: tuple[Finding, ...]
    reason: str
    """One line for the event log, e.g. 'steps 10..19 over 8 ranks: rank 3 flagged (1.31x)'."""
