"""Hang detection: ranks that stopped making progress.

A rank stuck in a collective, a deadlock or a loop that holds the GIL simply stops reporting
steps. The caller (the controller, fed by agents' step reports) keeps, per rank, the time it last
saw progress on *its own* monotonic clock and asks :func:`check_hang` with its ``now``.

The deadline scales with the job: ``max(min_s, factor x median step time)``; before any step has
completed (imports, data loading, compilation, restore) the much longer ``startup_s`` applies,
and it keeps applying to a rank that has not made a step of its own while its peers already
step (on a loaded machine one rank may still be importing torch when another is at step 3).
Findings are ordered by how long each rank has been silent, longest first: in a hang the rank
that stopped first is the likeliest root cause.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from hpt.monitor.detectors._common import is_finite, require
from hpt.monitor.records import Detection, Finding, FindingKind

__all__ = ["HangConfig", "check_hang", "hang_deadline_s"]


@dataclass(frozen=True, kw_only=True, slots=True)
class HangConfig:
    """Tuning of the hang deadline."""

    factor: float = 10.0
    """Deadline as a multiple of the median step time."""
    min_s: float = 5.0
    """The deadline never goes below this, however fast steps are."""
    startup_s: float = 300.0
    """Deadline before the attempt's first step completes."""
    timeout_s: float = 0.0
    """A fixed deadline (the job's ``hang_timeout_s``) instead of the derived one; before the
    first step it is ``max(timeout_s, startup_s)``: start-up takes what it takes. 0: derive."""

    def __post_init__(self) -> None:
        require(is_finite(self.factor) and self.factor >= 1.0, "factor", self.factor, "be >= 1")
        require(is_finite(self.min_s) and self.min_s > 0.0, "min_s", self.min_s, "be > 0")
        require(
            is_finite(self.startup_s) and self.startup_s >= self.min_s,
            "startup_s",
            self.startup_s,
            f"be >= min_s ({self.min_s})",
        )
        require(is_finite(self.timeout_s) and self.timeout_s >= 0.0, "timeout_s", self.timeout_s,
                "be >= 0")


def hang_deadline_s(median_step_s: float | None, cfg: HangConfig) -> float:
    """Seconds without progress after which a rank counts as hung.

    Args:
        median_step_s: median step time of the attempt, None before any step completed.
        cfg: the deadline's tuning.

    Returns:
        ``cfg.startup_s`` when ``median_step_s`` is None (``max(cfg.timeout_s, cfg.startup_s)``
        when a timeout is set); else ``cfg.timeout_s`` when set, else
        ``max(cfg.min_s, cfg.factor * median_step_s)``.

    Raises:
        ValueError: ``median_step_s`` is negative or not finite.
    """
    if median_step_s is None:
        return max(cfg.timeout_s, cfg.startup_s)
    if cfg.timeout_s > 0:
        return cfg.timeout_s
    require(
        is_finite(median_step_s) and median_step_s >= 0.0,
        "median_step_s",
        median_step_s,
        "be a finite number >= 0 or None",
    )
    return max(cfg.min_s, cfg.factor * median_step_s)


def check_hang(
    last_progress_s_by_rank: Mapping[int, float],
    median_step_s: float | None,
    now: float,
    cfg: HangConfig,
    *,
    job_id: str,
    attempt: int,
    nodes_by_rank: Mapping[int, str] | None = None,
    own_deadlines: Mapping[int, tuple[float, str]] | None = None,
    starting: Collection[int] = (),
) -> Detection:
    """Name the ranks with no progress for longer than the hang deadline.

    Args:
        last_progress_s_by_rank: per rank, when it last made progress (a step report; before
            the first step, when it was launched), on the same clock as ``now``.
        median_step_s: median step time of the attempt, None before any step completed.
        now: the caller's monotonic clock.
        cfg: the deadline's tuning.
        job_id: stamped on the findings.
        attempt: stamped on the findings.
        nodes_by_rank: node of each rank, for the findings; missing ranks get "".
        own_deadlines: ranks judged by a deadline of their own instead, with what sets it
            (a section with its own timeout: ``(600.0, "section 'eval' timeout")``).
        starting: ranks that have made no step of their own yet (importing torch, joining the
            process group while a peer already steps): judged by the start-up deadline
            whatever ``median_step_s`` says, since a peer's step time says nothing about
            how long this rank's start-up takes.

    Returns:
        One HANG finding per hung rank, longest silent first, and a one-line reason.
    """
    require(is_finite(now), "now", now, "be a finite number")
    deadline = hang_deadline_s(median_step_s, cfg)
    nodes = nodes_by_rank or {}
    own = own_deadlines or {}
    startup = hang_deadline_s(None, cfg)
    startup_basis = f"startup deadline {startup:.1f} s (no step completed yet)"
    if median_step_s is None:
        basis = startup_basis
    elif cfg.timeout_s > 0:
        basis = f"the job's hang timeout {deadline:g} s"
    else:
        basis = (
            f"deadline {deadline:.1f} s = max({cfg.min_s:g} s, {cfg.factor:g} x median step "
            f"{median_step_s:.3f} s)"
        )
    # Longest silent first; ties by rank so the order is stable.
    silent = sorted(
        ((now - t, rank) for rank, t in last_progress_s_by_rank.items() if not math.isnan(t)),
        key=lambda x: (-x[0], x[1]),
    )
    findings: list[Finding] = []
    for silent_s, rank in silent:
        if rank in own:
            (rank_deadline, rank_basis), phase = own[rank], "section"
        elif median_step_s is None or rank in starting:
            rank_deadline, rank_basis, phase = startup, startup_basis, "startup"
        else:
            rank_deadline, rank_basis, phase = deadline, basis, "steady"
        if silent_s <= rank_deadline:
            continue
        node = nodes.get(rank, "")
        who = f"rank {rank} ({node})" if node else f"rank {rank}"
        evidence: dict[str, float | int | str] = {
            "silent_s": round(silent_s, 3),
            "deadline_s": rank_deadline,
            "phase": phase,
        }
        if median_step_s is not None:
            evidence["median_step_s"] = median_step_s
        findings.append(
            Finding(
                kind=FindingKind.HANG,
                job_id=job_id,
                attempt=attempt,
                rank=rank,
                node=node,
                message=f"{who} made no progress for {silent_s:.1f} s, past its {rank_basis}",
                detected_at_s=now,
                evidence=evidence,
            )
        )
    if not silent:
        reason = f"job {job_id} attempt {attempt}: no ranks to check"
    elif findings:
        ranks = ", ".join(str(f.rank) for f in findings)
        reason = f"job {job_id} attempt {attempt}: rank(s) {ranks} hung past {basis}"
    else:
        reason = (
            f"job {job_id} attempt {attempt}: longest silence {silent[0][0]:.1f} s "
            f"(rank {silent[0][1]}) within {basis}"
        )
    return Detection(tuple(findings), reason)
