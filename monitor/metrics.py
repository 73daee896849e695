"""Every Prometheus metric hpt exports, as data.

This module only *describes* metrics; :mod:`hpt.monitor.export` (the one module that imports
``prometheus_client``) builds them, and the dashboards in ``dashboards/`` query them. A test
checks that every name a dashboard uses is defined here.

Rules, checked by :class:`MetricDef` itself: names start with ``hpt_``, are snake_case and carry
base units (``_seconds``, ``_bytes``); counters and only counters end in ``_total``; no label is
called ``job`` or ``instance`` (Prometheus sets those) and no label carries a job id, so
cardinality stays bounded by the cluster (nodes, ranks of a job, fault kinds). Labels whose
values form a closed set list them in ``label_values`` and the exporter refuses anything else.

Who sets what: the controller exports job, node, attempt, fault, detection, recovery, goodput,
heartbeat and straggler metrics; agents export step, collective and checkpoint metrics of their
local ranks (each agent is its own scrape target, so ``rank`` does not collide across nodes
of one job).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

__all__ = [
    "GOODPUT_CATEGORIES",
    "JOB_STATES",
    "METRICS",
    "METRICS_BY_NAME",
    "NODE_STATES",
    "RANK_MESSAGE_ERRORS",
    "RESTORE_SOURCES",
    "AUTH_FAILURES",
    "MetricDef",
    "MetricType",
]


class MetricType(str, Enum):  # noqa: UP042 (STYLE: (str, Enum) for logged values)
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


_NAME_RE: Final = re.compile(r"^hpt_[a-z][a-z0-9_]*[a-z0-9]$")
_LABEL_RE: Final = re.compile(r"^[a-z][a-z0-9_]*$")
_FORBIDDEN_LABELS: Final = frozenset({"job", "instance", "job_id", "le", "quantile"})
_RESERVED_SUFFIXES: Final = ("_bucket", "_count", "_sum", "_created", "_info")


@dataclass(frozen=True, kw_only=True, slots=True)
class MetricDef:
    """One metric: name, type, help text, labels and (histograms) buckets."""

    name: str
    """Full exposition name, ``_total`` included for counters."""
    type: MetricType
    help: str
    """One sentence, shown by Prometheus and Grafana."""
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    """Upper bounds of histogram buckets, ascending, in the metric's unit (no +Inf)."""
    label_values: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Closed sets of allowed values for some labels; the exporter refuses others."""

    def __post_init__(self) -> None:
        n = self.name
        if not _NAME_RE.match(n):
            raise ValueError(f"name ({n!r}) must be snake_case starting with 'hpt_'")
        if n.endswith(_RESERVED_SUFFIXES):
            raise ValueError(f"name ({n!r}) must not end in one of {_RESERVED_SUFFIXES}")
        is_counter = self.type is MetricType.COUNTER
        if is_counter != n.endswith("_total"):
            raise ValueError(f"name ({n!r}) must end in '_total' if and only if it is a counter")
        if not self.help.strip():
            raise ValueError(f"help of {n} ({self.help!r}) must not be empty")
        for label in self.labels:
            if not _LABEL_RE.match(label) or label.startswith("__"):
                raise ValueError(f"label of {n} ({label!r}) must be snake_case")
            if label in _FORBIDDEN_LABELS:
                raise ValueError(
                    f"label of {n} ({label!r}) must not be one of {sorted(_FORBIDDEN_LABELS)}"
                )
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels of {n} ({self.labels!r}) must be unique")
        unknown = set(self.label_values) - set(self.labels)
        if unknown:
            raise ValueError(f"label_values of {n} ({sorted(unknown)!r}) must name labels")
        if self.type is MetricType.HISTOGRAM:
            b = self.buckets
            if not b or any(x >= y for x, y in zip(b, b[1:], strict=False)) or b[0] <= 0:
                raise ValueError(f"buckets of {n} ({b!r}) must be positive and ascending")
        elif self.buckets:
            raise ValueError(f"buckets of {n} ({self.buckets!r}) must be empty for a {self.type}")

    @property
    def series_names(self) -> tuple[str, ...]:
        """Names of the series this metric renders as (what a PromQL query may use)."""
        if self.type is MetricType.HISTOGRAM:
            return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")
        return (self.name,)


JOB_STATES: Final = ("pending", "running", "recovering", "succeeded", "failed", "cancelled")
"""Job states as in ``hpt.v1.JobState`` (lower case, without the prefix)."""
NODE_STATES: Final = ("ready", "lost", "quarantined", "unknown")
"""Node states as in ``hpt.v1.NodeState``."""
GOODPUT_CATEGORIES: Final = ("productive", "detection", "restart", "restore", "redone")
"""Where a job's wall time went: training that counted, time to notice a fault, time to stop
and relaunch ranks, time to load state, and training repeated after rolling back."""
RESTORE_SOURCES: Final = ("local", "peer", "parity", "disk")
"""Where restored tensor bytes came from, in order of preference."""
AUTH_FAILURES: Final = ("missing_token", "bad_token", "wrong_role", "wrong_identity")
"""Why the controller refused a caller: no bearer token, an unknown one, a token of the other
role (the CLI's token on the agent service or the reverse), or an agent whose certificate does
not name the node it registers as. TLS handshake failures never reach the process."""

RANK_MESSAGE_ERRORS: Final = ("malformed", "unknown_type", "oversized", "version", "refused")
"""Why an agent did not apply a message from one of its ranks (``hpt._rank_protocol``'s
``ErrorReason``; a test checks they agree): a bad field, an unknown type, an oversized line, an
unsupported protocol version, or a well-formed message the agent could not apply."""

_LATENCY_BUCKETS: Final = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
_RECOVERY_BUCKETS: Final = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
_COLLECTIVE_BUCKETS: Final = (
    1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)  # fmt: skip
_SNAPSHOT_BUCKETS: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_PERSIST_BUCKETS: Final = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

_C, _G, _H = MetricType.COUNTER, MetricType.GAUGE, MetricType.HISTOGRAM

METRICS: Final[tuple[MetricDef, ...]] = (
    # -- controller: jobs, nodes, faults ---------------------------------------------------------
    MetricDef(
        name="hpt_jobs",
        type=_G,
        help="Jobs known to the controller, by state.",
        labels=("state",),
        label_values={"state": JOB_STATES},
    ),
    MetricDef(
        name="hpt_nodes",
        type=_G,
        help="Nodes (agents) known to the controller, by state.",
        labels=("state",),
        label_values={"state": NODE_STATES},
    ),
    MetricDef(
        name="hpt_attempts_total",
        type=_C,
        help="Attempts launched, first attempts and restarts alike.",
    ),
    MetricDef(
        name="hpt_faults_total",
        type=_C,
        help="Faults recorded, by kind (rank_exit, node_lost, hang, straggler, ...).",
        labels=("kind",),
    ),
    MetricDef(
        name="hpt_fault_detection_seconds",
        type=_H,
        help="Time from a fault occurring (when known) to the controller recording it.",
        labels=("kind",),
        buckets=_LATENCY_BUCKETS,
    ),
    MetricDef(
        name="hpt_recovery_seconds",
        type=_H,
        help="Time from a fault being recorded to the next attempt's first completed step.",
        labels=("kind",),
        buckets=_RECOVERY_BUCKETS,
    ),
    MetricDef(
        name="hpt_steps_lost_total",
        type=_C,
        help="Training steps redone after restoring an older snapshot.",
    ),
    MetricDef(
        name="hpt_goodput_seconds_total",
        type=_C,
        help="Job wall time by category: productive, detection, restart, restore, redone.",
        labels=("category",),
        label_values={"category": GOODPUT_CATEGORIES},
    ),
    MetricDef(
        name="hpt_agent_heartbeats_total",
        type=_C,
        help="Heartbeats received from agents.",
        labels=("node",),
    ),
    MetricDef(
        name="hpt_store_up",
        type=_G,
        help="1 while the controller's state store answers, 0 while it is down (degraded).",
    ),
    MetricDef(
        name="hpt_store_pending_events",
        type=_G,
        help="Events held in the controller's memory until the store answers again.",
    ),
    MetricDef(
        name="hpt_store_outages_total",
        type=_C,
        help="Times the controller found its state store down.",
    ),
    MetricDef(
        name="hpt_controller_stalls_total",
        type=_C,
        help="Times the controller's own loop stalled (paused, starved) and re-observed heartbeats.",
    ),
    MetricDef(
        name="hpt_agent_heartbeat_age_seconds",
        type=_G,
        help="Time since the last heartbeat of each agent, when last evaluated.",
        labels=("node",),
    ),
    MetricDef(
        name="hpt_straggler_score",
        type=_G,
        help="Rank's step time over the median of its peers (1 = in line), window median.",
        labels=("rank",),
    ),
    MetricDef(
        name="hpt_auth_failures_total",
        type=_C,
        help="RPCs the controller refused for authentication or authorization, by reason.",
        labels=("reason",),
        label_values={"reason": AUTH_FAILURES},
    ),
    MetricDef(
        name="hpt_controller_leader",
        type=_G,
        help="1 while this controller process leads (runs the control loop), 0 on a standby.",
    ),
    MetricDef(
        name="hpt_controller_leader_epoch",
        type=_G,
        help="Leader epoch of this controller (0 on a standby or without leader election).",
    ),
    # -- agents: ranks' timings ------------------------------------------------------------------
    MetricDef(
        name="hpt_step_seconds",
        type=_G,
        help="Duration of the rank's last completed step.",
        labels=("rank",),
    ),
    MetricDef(
        name="hpt_collective_seconds",
        type=_H,
        help="Time ranks spent inside torch.distributed collectives, by operation.",
        labels=("op",),
        buckets=_COLLECTIVE_BUCKETS,
    ),
    MetricDef(
        name="hpt_rank_message_errors_total",
        type=_C,
        help="Messages from local ranks the agent did not apply, by reason.",
        labels=("reason",),
        label_values={"reason": RANK_MESSAGE_ERRORS},
    ),
    # -- agents: checkpoint tiers ----------------------------------------------------------------
    MetricDef(
        name="hpt_snapshot_seconds",
        type=_H,
        help="Time to copy a rank's snapshot into host memory.",
        buckets=_SNAPSHOT_BUCKETS,
    ),
    MetricDef(
        name="hpt_snapshot_bytes_total",
        type=_C,
        help="Bytes copied into in-memory snapshots.",
    ),
    MetricDef(
        name="hpt_job_persist_every_steps",
        type=_G,
        help="Steps between persisted checkpoints of a running job that persists: its "
        "--persist-every, or the one the controller retuned it to (--adapt-cadence).",
        labels=("hpt_job",),
    ),
    MetricDef(
        name="hpt_snapshot_memory_ratio",
        type=_G,
        help="Memory per snapshot generation over the state itself, protection included "
        "(1 + m/k with Reed-Solomon k+m; 2 with a mirror).",
        labels=("hpt_job",),
    ),
    MetricDef(
        name="hpt_persist_seconds",
        type=_H,
        help="Time to persist a snapshot shard to durable storage.",
        buckets=_PERSIST_BUCKETS,
    ),
    MetricDef(
        name="hpt_persist_bytes_total",
        type=_C,
        help="Bytes written to durable storage by snapshot persistence.",
    ),
    MetricDef(
        name="hpt_restore_seconds",
        type=_H,
        help="Time to restore a rank's state, by the tier most of its bytes came from.",
        labels=("source",),
        buckets=_PERSIST_BUCKETS,
        label_values={"source": RESTORE_SOURCES},
    ),
    MetricDef(
        name="hpt_restore_bytes_total",
        type=_C,
        help="Bytes restored, by tier: local memory, peers, parity decode or disk.",
        labels=("source",),
        label_values={"source": RESTORE_SOURCES},
    ),
)

METRICS_BY_NAME: Final[Mapping[str, MetricDef]] = {m.name: m for m in METRICS}
assert len(METRICS_BY_NAME) == len(METRICS), "metric names must be unique"
