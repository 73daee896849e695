"""The job spec: every option of a job, defined once.

``JobSpec`` is the one definition of what a user may ask for. Each field carries its default,
its help text, its bounds and its command-line flags (``spec_field``); from that one place

- the spec validates itself on construction (errors name the field),
- ``from_proto`` / ``to_proto`` map it to and from the wire ``hpt.v1.JobSpec`` by field name
  (the controller's and the agent's convert modules call them; nothing else names spec fields
  on the wire), resolving proto3's "zero means unset" to the default in one function,
- ``hptctl submit`` builds its options (``hpt/cli/spec_options.py``), and ``JobClient.submit`` takes them as
  keyword arguments.

The controller stores the spec and copies it whole into every ``Launch`` it sends, so an
option only agents use is read where it is used and nowhere else. Adding one: a field here,
its line in ``JobSpec`` of ``protos/hpt/v1/common.proto``, and its use.

This module imports nothing of hpt's: the controller, the agent and the CLI all import it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

MAX_NODES = 16384
"""Nodes of the largest job: one controller is built for clusters of 10,000 nodes."""
MAX_PROCS_PER_NODE = 64
MAX_RESTARTS = 1000
MAX_COMMAND_ARGS = 256
MAX_ARG_BYTES = 16 * 1024
MAX_ENV_VARS = 256
MAX_ENV_VALUE_BYTES = 32 * 1024
MAX_SPEC_BYTES = 1024 * 1024
"""One size budget for the whole spec (command, env, paths): a spec within it fits every hop
(submit, the stored record, the launch command on each agent's stream, a page of ``ls``) with
the channels' 16 MiB limits to spare, however many restarts the job goes through."""
MAX_NODE_WAIT_S = 7 * 24 * 3600.0
MAX_GRACE_S = 3600.0
MAX_HANG_TIMEOUT_S = 7 * 24 * 3600.0
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_REDUNDANCY = re.compile(r"^(\d{1,3})\+(\d{1,3})$")
RESERVED_ENV = frozenset(
    {
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "NODE_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "TORCHELASTIC_RESTART_COUNT",
    }
)
RESERVED_ENV_PREFIX = "HPT_"
FAULT_ENV_PREFIX = "HPT_FAULT_"
"""Fault-injection knobs (hpt/_faults.py) are the one HPT_ family a job may set."""


@dataclass(frozen=True, slots=True)
class Bounds:
    """The closed range ``lo..hi`` (``(lo, hi]`` with ``lo_open``) a numeric option must be in."""

    lo: float
    hi: float
    lo_open: bool = False

    def holds(self, value: float) -> bool:
        if math.isnan(value):
            return False
        return (self.lo < value if self.lo_open else self.lo <= value) and value <= self.hi

    def __str__(self) -> str:
        lo, hi = _num(self.lo), _num(self.hi)
        return f"({lo}, {hi}]" if self.lo_open else f"{lo}..{hi}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True, slots=True)
class Option:
    """What ``spec_field`` attaches to a field: everything but its name, type and default."""

    help: str
    bounds: Bounds | None = None
    flags: tuple[str, ...] = ()
    """Command-line spellings, first the canonical one; empty: ``--name-with-dashes``."""
    metavar: str = ""
    path: bool = False
    """A directory: the CLI makes it absolute (relative to where ``hptctl`` runs)."""
    cli: bool = True
    """False: ``hptctl submit`` spells this option its own way (command, nodes, env)."""
    default_text: str = ""
    """How ``--help`` shows the default when the value alone would mislead."""
    zero_means_default: bool = False
    """0 on the wire means "the default" (older clients sent 0 for it); only for a field whose
    bounds exclude 0. Any other field without presence: 0 is the value, and is validated."""


def spec_field(default: Any = MISSING, help: str = "", *, lo: float | None = None,  # noqa: A002
               hi: float | None = None, lo_open: bool = False, **opts: Any) -> Any:
    """A ``JobSpec`` field with its default, help, bounds (``lo..hi``) and CLI spelling."""
    bounds = None if lo is None or hi is None else Bounds(lo, hi, lo_open)
    meta = {"option": Option(help=help, bounds=bounds, **opts)}
    return field(default=default, metadata=meta)


def option_of(f: Field[Any]) -> Option:
    option = f.metadata["option"]
    assert isinstance(option, Option)
    return option


@dataclass(frozen=True, kw_only=True, slots=True)
class JobSpec:
    """What a user asked to run; validated on construction, stored unchanged."""

    command: tuple[str, ...] = spec_field(
        help="argv of every rank; ``python`` resolves to the agent's interpreter.", cli=False)
    nodes: int = spec_field(
        1, "Nodes to run on; MIN:MAX shrinks to MIN after faults and grows back to MAX.",
        lo=1, hi=MAX_NODES, cli=False)
    procs_per_node: int = spec_field(
        1, "Ranks per node.", lo=1, hi=MAX_PROCS_PER_NODE,
        flags=("--procs-per-node", "-p", "--nproc-per-node", "--nproc_per_node"))
    min_nodes: int = spec_field(
        0, "Fewest nodes to continue on after a fault.", default_text="NODES", cli=False)
    """0 means ``nodes`` (not elastic); bounded by ``nodes``."""
    max_restarts: int = spec_field(
        3, "Restarts after a fault before the job fails.", lo=0, hi=MAX_RESTARTS)
    env: tuple[tuple[str, str], ...] = spec_field(
        (), "Environment variable for every rank (repeatable).", cli=False)
    """Extra environment for every rank, sorted by name."""
    name: str = spec_field(
        "", "Job name (a DNS-1123 label).", default_text="derived from the job id")
    workdir: str = spec_field(
        "", "Working directory of the ranks.", path=True, default_text="current directory")
    """Absolute; empty means the agent's."""
    node_wait_timeout_s: float = spec_field(
        300.0, "Seconds to wait for enough nodes.", lo=0, hi=MAX_NODE_WAIT_S, lo_open=True,
        flags=("--node-wait",))
    stop_grace_s: float = spec_field(
        5.0, "Seconds between SIGTERM and SIGKILL when stopping ranks.", lo=0, hi=MAX_GRACE_S,
        flags=("--grace",))
    persist_dir: str = spec_field(
        "", "Directory the agents persist snapshots to (DCP format + verified manifest).",
        path=True, default_text="never persist")
    persist_every: int = spec_field(
        0, "Persist every Nth complete snapshot (needs --persist-dir).", lo=0, hi=1_000_000,
        default_text="never")
    snapshot_every: int = spec_field(
        0, "Snapshot every N steps, in place of the script's Checkpointer(every=) (hpt's "
        "Checkpointer and trainer callbacks).", lo=0, hi=1_000_000,
        default_text="0, the script's")
    adapt_cadence: bool = spec_field(
        False, "Let the controller retune the cadences while the job runs, from the failures "
        "it sees and the costs its agents measure (Young/Daly per tier): how often the ranks "
        "snapshot (the failures memory and peers restore, at most 5 minutes apart) and, with "
        "--persist-dir, how often the agents persist (the failures only disk restores, at "
        "least hourly). Each change is a cadence_changed event; the job goes on.",
        default_text="off")
    keep_persisted: int = spec_field(
        3, "Persisted checkpoints kept per rank (older ones are deleted).", lo=1, hi=1000,
        zero_means_default=True)
    straggler_restart_after: int = spec_field(
        0, "Restart without a straggler's node once it was flagged for N of its steps.",
        lo=0, hi=100_000, default_text="0, report only")
    hang_timeout_s: float = spec_field(
        0.0, "Seconds without progress (a step, a section's end) after which a rank is hung, "
        "also for a script without hpt hooks; before the first step S or the 300 s start-up "
        "deadline, whichever is longer.", lo=0, hi=MAX_HANG_TIMEOUT_S,
        flags=("--hang-timeout",),
        default_text="0, automatic: 10 x the median step, at least 5 s, and only once the "
        "script reports steps")
    """A ``hpt.section(timeout=)`` overrides it."""
    redundancy: str = spec_field(
        "", "Protect snapshots across nodes: Reed-Solomon K data + M parity nodes per group, "
        "or 'off'.", metavar="K+M", default_text="M=1, K from the node count (at most 16); 2 nodes: a mirror")
    rank_log_max_bytes: int = spec_field(
        0, "Bytes each rank may write to its log file on its node; past them the agent stops "
        "writing the file (one line says so) and still ships the output to the controller.",
        lo=0, hi=1 << 40, default_text="0, unlimited")

    def __post_init__(self) -> None:
        for f in fields(self):
            bounds = option_of(f).bounds
            value = getattr(self, f.name)
            if bounds is not None and not bounds.holds(value):  # also refuses NaN
                raise ValueError(f"{f.name} ({value!r}) must be in {bounds}")
        if not self.command:
            raise ValueError("command must not be empty")
        if len(self.command) > MAX_COMMAND_ARGS:
            raise ValueError(f"command has {len(self.command)} args, at most {MAX_COMMAND_ARGS}")
        for i, arg in enumerate(self.command):
            if "\x00" in arg or len(arg.encode()) > MAX_ARG_BYTES:
                raise ValueError(f"command[{i}] must be <= {MAX_ARG_BYTES} bytes without NUL")
        if not self.command[0]:
            raise ValueError("command[0] must not be empty")
        if not 0 <= self.min_nodes <= self.nodes:
            raise ValueError(f"min_nodes ({self.min_nodes}) must be in 0..nodes ({self.nodes})")
        if len(self.env) > MAX_ENV_VARS:
            raise ValueError(f"env has {len(self.env)} variables, at most {MAX_ENV_VARS}")
        for key, value in self.env:
            if not _ENV_NAME.match(key):
                raise ValueError(f"env name {key!r} must match [A-Za-z_][A-Za-z0-9_]*")
            if key in RESERVED_ENV or (
                key.startswith(RESERVED_ENV_PREFIX) and not key.startswith(FAULT_ENV_PREFIX)
            ):
                raise ValueError(f"env name {key!r} is reserved: hpt sets it for every rank")
            if "\x00" in value or len(value.encode()) > MAX_ENV_VALUE_BYTES:
                raise ValueError(f"env[{key}] must be <= {MAX_ENV_VALUE_BYTES} bytes without NUL")
        sizes = {
            "command": sum(len(arg.encode()) for arg in self.command),
            "env": sum(len(k) + len(v.encode()) for k, v in self.env),
            "workdir": len(self.workdir.encode()),
            "persist_dir": len(self.persist_dir.encode()),
        }
        if sum(sizes.values()) > MAX_SPEC_BYTES:
            biggest = max(sizes, key=lambda k: sizes[k])
            raise ValueError(
                f"{biggest} ({sizes[biggest]} bytes) makes the spec {sum(sizes.values())} bytes; "
                f"a spec must be <= {MAX_SPEC_BYTES} bytes in all (command, env and paths)"
            )
        if self.name and not _DNS1123.match(self.name):
            raise ValueError(
                f"name ({self.name!r}) must be a DNS-1123 label: lowercase letters, digits "
                "and '-', at most 63, starting and ending with a letter or digit"
            )
        for path_field in ("workdir", "persist_dir"):
            path = getattr(self, path_field)
            if path and (not path.startswith("/") or "\x00" in path):
                raise ValueError(f"{path_field} ({path!r}) must be an absolute path")
        if self.persist_every and not self.persist_dir:
            raise ValueError(f"persist_every ({self.persist_every}) needs persist_dir")
        parse_redundancy(self.redundancy, self.nodes)

    @property
    def effective_min_nodes(self) -> int:
        return self.min_nodes or self.nodes


def parse_redundancy(text: str, nodes: int) -> tuple[int, int] | None:
    """``(k, m)`` of a job's ``redundancy`` field; None for "off"; (0, 1) for the default.

    Raises:
        ValueError: naming the field, when the text is not ``K+M`` or does not fit ``nodes``.
    """
    if text == "":
        return (0, 1)
    if text == "off":
        return None
    match = _REDUNDANCY.match(text)
    if not match:
        raise ValueError(f"redundancy ({text!r}) must be K+M (e.g. 2+1), or 'off'")
    k, m = int(match.group(1)), int(match.group(2))
    if k < 1 or m < 1:
        raise ValueError(f"redundancy ({text!r}) needs k >= 1 and m >= 1")
    if k + m > nodes:
        raise ValueError(f"redundancy ({text!r}) needs k + m <= nodes ({nodes})")
    return (k, m)


def options() -> Iterator[tuple[Field[Any], Option]]:
    """Every field of the spec with its option metadata, in declaration order."""
    for f in fields(JobSpec):
        yield f, option_of(f)


# ---------------------------------------------------------------- wire (hpt.v1.JobSpec)
# The generated class is passed in: this module stays free of hpt._proto and grpc.


def from_proto(msg: Any) -> JobSpec:
    """The spec a wire ``JobSpec`` describes: the one place unset fields take their defaults.

    A field with presence (``optional`` in the proto) takes its default when absent; one marked
    ``zero_means_default`` when zero. Otherwise zero is the value (and is validated).

    Raises:
        ValueError: naming the field, when the spec is invalid.
    """
    wire = msg.DESCRIPTOR.fields_by_name
    values: dict[str, Any] = {}
    for f, option in options():
        desc = wire[f.name]
        value = getattr(msg, f.name)
        if _is_map(desc):
            values[f.name] = tuple(sorted(value.items()))
        elif _is_repeated(desc):
            values[f.name] = tuple(value)
        elif not _unset(msg, desc, value, option):
            values[f.name] = value
    return JobSpec(**values)


def wire_values(msg: Any) -> dict[str, Any]:
    """A wire ``JobSpec`` as plain values by field name, as sent (None: a presence field left
    unset, so the spec's default applies); for display, unvalidated."""
    wire = msg.DESCRIPTOR.fields_by_name
    out: dict[str, Any] = {}
    for f, _ in options():
        desc, value = wire[f.name], getattr(msg, f.name)
        if _is_map(desc):
            out[f.name] = dict(value)
        elif _is_repeated(desc):
            out[f.name] = list(value)
        else:
            out[f.name] = None if desc.has_presence and not msg.HasField(f.name) else value
    return out


def _unset(msg: Any, desc: Any, value: Any, option: Option) -> bool:
    if desc.has_presence:
        return not msg.HasField(desc.name)
    return option.zero_means_default and value == 0


def to_proto(spec: JobSpec, msg: Any) -> Any:
    """Fill ``msg`` (an empty wire ``JobSpec``) with every field of ``spec``; returns it."""
    return fill_proto({f.name: getattr(spec, f.name) for f in fields(spec)}, msg)


def fill_proto(values: Mapping[str, Any], msg: Any) -> Any:
    """Set the given spec fields on ``msg`` by name, unvalidated (the controller validates).

    ``env`` may be a mapping or (name, value) pairs. Raises TypeError naming an unknown field.
    """
    known = {f.name for f in fields(JobSpec)}
    wire = msg.DESCRIPTOR.fields_by_name
    for name, value in values.items():
        if name not in known:
            raise TypeError(f"{name!r} is not a job spec field (one of {', '.join(sorted(known))})")
        desc = wire[name]
        if _is_map(desc):
            getattr(msg, name).update(dict(value))
        elif _is_repeated(desc):
            getattr(msg, name).extend(value)
        else:
            setattr(msg, name, value)
    return msg


def submit_proto(given: Mapping[str, Any], msg: Any) -> Any:
    """Fill ``msg`` with what a client sends for the options ``given`` (None: not given).

    A field with presence on the wire is sent only when given, so the controller applies the
    spec's default; one without presence is always sent (its default when not given), because
    its zero may be a value of its own (``max_restarts=0``).
    """
    wire = msg.DESCRIPTOR.fields_by_name
    values = {k: v for k, v in given.items() if v is not None}
    for f, _ in options():
        if f.name not in values and not wire[f.name].has_presence and f.default is not MISSING:
            values[f.name] = f.default
    return fill_proto(values, msg)


def _is_map(desc: Any) -> bool:
    return desc.message_type is not None and bool(desc.message_type.GetOptions().map_entry)


def _is_repeated(desc: Any) -> bool:
    # protobuf >= 6 has is_repeated (and no label); older runtimes only the label
    flag = getattr(desc, "is_repeated", None)
    return bool(flag) if flag is not None else bool(desc.label == desc.LABEL_REPEATED)


__all__ = ["JobSpec", "Bounds", "Option", "from_proto", "to_proto", "fill_proto",
           "submit_proto", "wire_values", "options", "parse_redundancy", "spec_field"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Placement:
    """What one node runs of one attempt: its ranks and the attempt's world. The controller's
    launch command (``controller/model.py``) and the agent's launch (``agent/launcher.py``) are
    this plus the spec and what each side adds."""

    job_id: str
    attempt: int
    ranks: tuple[tuple[int, int], ...]
    """(rank, local_rank) pairs this node runs."""
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    node_rank: int
    num_nodes: int
    restore_step: int = 0
    """Newest snapshot complete on every rank (0: start fresh)."""
