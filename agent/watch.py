"""Watching the local ranks: timing records up to the controller, hangs found here.

The agent's rank socket hands every rank message (typed, :mod:`hpt._rank_protocol`) to
:meth:`RankWatch.on_rank_message`:

- ``step`` marks progress: the agent's monotonic receive time is the rank's last progress;
- ``records`` carries timing records (:mod:`hpt.monitor.records` dicts). They are validated,
  kept in bounded buffers (oldest dropped and counted) and taken by the heartbeat as typed
  ``StepTiming``/``CollectiveTiming`` messages (:meth:`RankWatch.take`), a bounded number per
  beat; step durations also feed this node's median step time and the agent's metrics;
- ``inflight`` lists the collectives the rank is blocked in, sent by the rank's watchdog thread
  every second; they travel up like records, marked ``in_flight``;
- ``finished`` says the rank's training is over (a trainer callback sends it when the fit ends):
  its hang check stops, since tearing a trainer down and exiting is silent by nature.

Every ``period_s`` the watch thread runs :func:`hpt.monitor.detectors.hang.check_hang` over the
running ranks of each (job, attempt) on this node, with the median step time measured here.
This catches ranks that are alive but make no progress, including one stopped by SIGSTOP and one
spinning while it holds the GIL (its own threads cannot report; the agent sees the silence).

Which ranks are judged, and by what deadline (the job's hang policy):

- the job's ``hang_timeout_s`` (``hptctl submit --hang-timeout S``) fixes the deadline at S once
  the attempt made a step, and at ``max(S, startup_s)`` before (start-up takes what it takes),
  whether or not the script has hooks (a script that never reports progress is then ended
  after ``max(S, startup_s)``: that is what asking for it on such a script means);
- without it, silence is judged only once the job has reported a step on this node (this
  attempt or an earlier one): a script that never calls ``hpt.step`` is never declared hung
  for being silent, and the deadline is the detector's (start-up, then ``max(min_s, factor x
  median step)``);
- a rank that has not made a step of its own in this attempt is still starting (importing
  torch, joining the process group: slow on a loaded machine) and is judged by the start-up
  deadline only, however fast its peers already step; the controller's launch timeout covers
  a rank that never even starts;
- a rank inside ``with hpt.section(name, timeout=T)`` is judged by T from the section's start
  (an evaluation or a final save is not a hang);
- the second signal, for ranks not judged by silence: the rank's watchdog reports a collective
  still in flight (``inflight``) past the deadline;
- a rank whose script is done (``exiting``, sent by hpt's exit hook) is in teardown: it gets
  ``exit_deadline_s`` to end.

On a hang the agent sends SIGUSR1 to each hung rank that told it (``stack_dump``) which pid
registered the ``faulthandler`` dump (``hpt.init()`` does), never to another process: a
diagnostic must not kill. The handler writes every thread's Python stack to the rank's stack
file even while the GIL is held; a stopped rank (state ``T`` in ``/proc/<pid>/stat``) cannot
dump, and the finding says so. One HANG finding per (job, attempt) and node goes to the controller with the stacks, naming
the likeliest culprit among the local ranks; the controller decides and restarts.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from hpt._proto import agent_pb2
from hpt._rank_protocol import (
    ErrorReason,
    Exiting,
    Finished,
    Hello,
    InFlight,
    RankMessage,
    Records,
    SectionBegin,
    SectionEnd,
    StackDump,
    Step,
)
from hpt.agent import convert
from hpt.agent.launcher import Launcher, RankPhase, RankProcess
from hpt.monitor.detectors._common import median
from hpt.monitor.detectors.hang import HangConfig, check_hang, hang_deadline_s
from hpt.monitor.records import (
    CollectiveRecord,
    FindingKind,
    StepRecord,
    record_from_dict,
    timing_stride,
)

log = logging.getLogger(__name__)

_MAX_STACK_BYTES = 16 * 1024
"""Per rank, the part of a stack dump that travels to the controller."""
_MAX_OPEN_SECTIONS = 64
_MAX_STEPPED_JOBS = 1024
_EXIT_DEADLINE_S = 120.0
"""A rank whose script is done gets this long for interpreter teardown before it counts as hung."""


def stack_file(run_dir: Path, job_id: str, attempt: int, rank: int) -> Path:
    """Where a rank's faulthandler writes its stacks (the launcher passes it in HPT_STACK_FILE)."""
    return run_dir / "jobs" / job_id / f"attempt-{attempt}" / f"rank-{rank}.stacks.txt"


def proc_state(pid: int) -> str:
    """The one-letter state of ``pid`` from /proc (R, S, D, T, t, Z...), "" when unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


@dataclass(frozen=True, kw_only=True, slots=True)
class WatchConfig:
    """Tuning of the agent's rank watch."""

    hang: HangConfig = field(default_factory=HangConfig)
    """Hang deadline: max(min_s, factor x median step time); startup_s before the first step."""
    period_s: float = 0.5
    """How often the hang check runs."""
    stack_deadline_s: float = 2.0
    """How long to wait for hung ranks to write their stacks after SIGUSR1."""
    max_buffered_records: int = 20_000
    """Records kept per kind while waiting for a heartbeat; the oldest are dropped beyond."""
    max_steps_per_beat: int = 2_000
    max_collectives_per_beat: int = 8_000

    def __post_init__(self) -> None:
        if not self.period_s > 0:
            raise ValueError(f"period_s ({self.period_s}) must be > 0")
        if not self.stack_deadline_s >= 0:
            raise ValueError(f"stack_deadline_s ({self.stack_deadline_s}) must be >= 0")
        for name in ("max_buffered_records", "max_steps_per_beat", "max_collectives_per_beat"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 1")


class Taken(NamedTuple):
    """The monitoring part of one heartbeat (``RankWatch.take``)."""

    step_columns: list[agent_pb2.StepColumns]
    collective_columns: list[agent_pb2.CollectiveColumns]
    inflight: list[agent_pb2.CollectiveTiming]
    findings: list[agent_pb2.Finding]
    dropped: int


@dataclass(slots=True)
class _AttemptWatch:
    step_s: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    progress: dict[int, float] = field(default_factory=dict)  # rank -> monotonic
    first_seen: dict[int, float] = field(default_factory=dict)  # rank -> monotonic
    inflight: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    stuck: dict[int, tuple[int, str, float]] = field(default_factory=dict)
    """rank -> (seq, op, monotonic first seen) of the oldest collective it reports in flight."""
    sections: dict[int, list[tuple[str, float, float]]] = field(default_factory=dict)
    """rank -> open sections with a deadline: (name, monotonic entered, timeout_s), innermost last."""
    handlers: dict[int, int] = field(default_factory=dict)
    """rank -> pid that registered the SIGUSR1 stack dump."""
    reported: bool = False
    stepped: bool = False
    stepped_ranks: set[int] = field(default_factory=set)
    """Ranks that made a step in this attempt; the others are still starting."""
    finished: set[int] = field(default_factory=set)  # ranks past training, shutting down
    stride: int = 1
    """Steps per timing entry of a rank (``timing_stride`` of the attempt's world size)."""
    window: dict[int, list[float]] = field(default_factory=dict)
    """rank -> [window (step // stride), steps, step_s, data_wait_s, compute_s summed]."""


class RankWatch:
    """Per-node rank watching; one per agent.

    Args:
        node: this node's name (stamped on findings).
        launcher: the agent's launcher (which ranks run here, their pids).
        run_dir: the agent's run directory (stack files live under it).
        on_change: called when a finding is ready, so the heartbeat goes out at once.
        cfg: tuning.
        metrics: an ``hpt.monitor.export.Metrics`` to update, or None.
    """

    def __init__(
        self,
        *,
        node: str,
        launcher: Launcher,
        run_dir: Path,
        on_change: Callable[[], None],
        cfg: WatchConfig | None = None,
        metrics: Any = None,
    ) -> None:
        self.node = node
        self.cfg = cfg if cfg is not None else WatchConfig()
        self._launcher = launcher
        self._run_dir = run_dir
        self._on_change = on_change
        self._metrics = metrics
        self._lock = threading.Lock()
        n = self.cfg.max_buffered_records
        # completed records wait as they came (summarised into columns when a heartbeat takes
        # them); in-flight collectives as the messages they travel as
        self._steps: deque[StepRecord] = deque(maxlen=n)
        self._colls: deque[CollectiveRecord] = deque(maxlen=n)
        self._inflight: deque[agent_pb2.CollectiveTiming] = deque(maxlen=n)
        self._findings: deque[agent_pb2.Finding] = deque(maxlen=256)
        self._dropped = 0
        self._warned = False
        self._attempts: dict[tuple[str, int], _AttemptWatch] = {}
        self._strides: dict[tuple[str, int], int] = {}  # timing_stride of recent launches
        self._stepped_jobs: OrderedDict[str, None] = OrderedDict()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="hpt-watch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.cfg.stack_deadline_s + 2.0)

    # ---------------------------------------------------------------- inputs (socket threads)

    def on_rank_message(self, hello: Hello, msg: RankMessage) -> None:
        """Handle progress, timing and rank-state messages; others are someone else's.

        Raises:
            ValueError: a message this watch cannot apply (more sections open than it tracks);
                the socket counts and logs it.
        """
        key = (hello.job_id, hello.attempt)
        rank = hello.rank
        if isinstance(msg, Step):
            with self._lock:
                w = self._watch(key)
                w.progress[rank] = time.monotonic()
                w.stepped = True
                w.stepped_ranks.add(rank)
                self._stepped_jobs[key[0]] = None
                self._stepped_jobs.move_to_end(key[0])
                while len(self._stepped_jobs) > _MAX_STEPPED_JOBS:
                    self._stepped_jobs.popitem(last=False)
        elif isinstance(msg, StackDump | SectionBegin | SectionEnd | Exiting):
            self._on_rank_state(key, rank, msg)
        elif isinstance(msg, Finished):  # training is over: the silence of shutting down is no hang
            with self._lock:
                self._watch(key).finished.add(rank)
        elif isinstance(msg, Records | InFlight):
            recs = self._timing_records(key, rank, msg)
            if isinstance(msg, InFlight):
                self._on_inflight(key, rank, recs)
            else:
                self._on_records(key, recs)

    def _timing_records(self, key: tuple[str, int], rank: int,
                        msg: Records | InFlight) -> list[Any]:
        """The message's timing records of this (job, attempt, rank); a bad one is dropped and
        counted, not refused: the rest of the batch is good."""
        recs = []
        for d in msg.records:
            try:
                rec = record_from_dict(d)
                if (
                    getattr(rec, "job_id", None),
                    getattr(rec, "attempt", None),
                    getattr(rec, "rank", None),
                ) != (key[0], key[1], rank):
                    raise ValueError(f"{msg.OP}: a record of another job, attempt or rank")
            except ValueError as exc:
                with self._lock:
                    self._dropped += 1
                    warn = not self._warned
                    self._warned = True
                if warn:
                    log.warning(
                        "[%s/%d/%s/%d] bad timing record dropped (warned once): %s",
                        key[0],
                        key[1],
                        self.node,
                        rank,
                        exc,
                    )
                continue
            recs.append(rec)
        return recs

    def _on_rank_state(self, key: tuple[str, int], rank: int,
                       msg: StackDump | SectionBegin | SectionEnd | Exiting) -> None:
        """``StackDump``: that pid registered the SIGUSR1 dump; ``SectionBegin`` /
        ``SectionEnd``: a section with its own deadline opened / closed; ``Exiting``: teardown."""
        now = time.monotonic()
        if isinstance(msg, Exiting):
            with self._lock:
                self._watch(key).sections[rank] = [("interpreter exit", now, _EXIT_DEADLINE_S)]
        elif isinstance(msg, StackDump):
            with self._lock:
                self._watch(key).handlers[rank] = msg.pid
        elif isinstance(msg, SectionBegin):
            with self._lock:
                stack = self._watch(key).sections.setdefault(rank, [])
                if len(stack) >= _MAX_OPEN_SECTIONS:
                    raise ValueError(f"more than {_MAX_OPEN_SECTIONS} sections open")
                stack.append((msg.name, now, msg.timeout_s))
        else:
            with self._lock:
                w = self._watch(key)
                stack = w.sections.get(rank, [])
                for i in range(len(stack) - 1, -1, -1):
                    if stack[i][0] == msg.name:
                        del stack[i:]
                        break
                w.progress[rank] = now  # leaving a section is progress

    def expect(self, job_id: str, attempt: int, world_size: int) -> None:
        """An attempt of ``world_size`` ranks launches here: its ranks' timing goes up one
        entry per ``timing_stride(world_size)`` steps."""
        key = (job_id, attempt)
        with self._lock:
            # kept apart from the attempt's watch, which the hang check drops while the
            # attempt has no rank running here (before its launch, between ranks)
            self._strides[key] = self._watch(key).stride = timing_stride(world_size)
            while len(self._strides) > _MAX_STEPPED_JOBS:
                del self._strides[next(iter(self._strides))]

    def _on_records(self, key: tuple[str, int], recs: list[Any]) -> None:
        m = self._metrics
        with self._lock:
            w = self._watch(key)
            for rec in recs:
                if isinstance(rec, StepRecord):
                    w.step_s.append(rec.step_s)
                    if m is not None:
                        m.set("hpt_step_seconds", rec.step_s, rank=rec.rank)
                    if w.stride == 1:
                        self._push(self._steps, rec)
                    else:
                        self._window_step(w, rec)
                elif isinstance(rec, CollectiveRecord):
                    if w.stride == 1 or (rec.seq >= 0 and rec.seq % w.stride == 0):
                        self._push(self._colls, rec)
                    if m is not None and rec.duration_s is not None:
                        m.observe("hpt_collective_seconds", rec.duration_s, op=rec.op)

    def _window_step(self, w: _AttemptWatch, rec: StepRecord) -> None:
        """Add a step to its rank's window; the window's last step sends their mean."""
        window = rec.step // w.stride
        acc = w.window.get(rec.rank)
        if acc is None or acc[0] != window:  # a window whose end it skipped is dropped
            acc = w.window[rec.rank] = [window, 0, 0.0, 0.0, 0.0]
        acc[1] += 1
        acc[2] += rec.step_s
        acc[3] += rec.data_wait_s
        acc[4] += rec.compute_s
        if rec.step % w.stride == w.stride - 1:
            n = acc[1]
            del w.window[rec.rank]
            self._push(self._steps, replace(rec, start_s=rec.end_s - acc[2] / n,
                                            data_wait_s=acc[3] / n, compute_s=acc[4] / n))

    def _on_inflight(self, key: tuple[str, int], rank: int, recs: list[Any]) -> None:
        now = time.monotonic()
        with self._lock:
            w = self._watch(key)
            w.inflight[rank] = [r.to_dict() for r in recs]
            colls = [r for r in recs if isinstance(r, CollectiveRecord)]
            if not colls:
                w.stuck.pop(rank, None)
            else:
                oldest = min(colls, key=lambda r: r.seq)
                if w.stuck.get(rank, (None,))[0] != oldest.seq:
                    w.stuck[rank] = (oldest.seq, oldest.op, now)
            for rec in recs:
                if isinstance(rec, CollectiveRecord):
                    self._push(self._inflight, convert.collective_timing(rec, in_flight=True))

    def _push(self, buf: deque[Any], item: Any) -> None:
        if len(buf) == buf.maxlen:
            self._dropped += 1
        buf.append(item)

    def _watch(self, key: tuple[str, int]) -> _AttemptWatch:
        w = self._attempts.get(key)
        if w is None:
            w = self._attempts[key] = _AttemptWatch(stride=self._strides.get(key, 1))
        return w

    # ---------------------------------------------------------------- output (heartbeat)

    def take(self) -> Taken:
        """What the next heartbeat carries: completed records summarised into columns and
        in-flight collectives (bounded: ``max_steps_per_beat`` steps, ``max_collectives_per_beat``
        collectives, in-flight ones first), findings, records dropped."""
        cfg = self.cfg
        with self._lock:
            steps = [
                self._steps.popleft() for _ in range(min(len(self._steps), cfg.max_steps_per_beat))
            ]
            inflight = [
                self._inflight.popleft()
                for _ in range(min(len(self._inflight), cfg.max_collectives_per_beat))
            ]
            room = cfg.max_collectives_per_beat - len(inflight)
            colls = [self._colls.popleft() for _ in range(min(len(self._colls), room))]
            findings = list(self._findings)
            self._findings.clear()
            dropped, self._dropped = self._dropped, 0
        return Taken(
            step_columns=convert.step_columns(steps),
            collective_columns=convert.collective_columns(colls),
            inflight=inflight,
            findings=findings,
            dropped=dropped,
        )

    # ---------------------------------------------------------------- hang check

    def _loop(self) -> None:
        while not self._stop.wait(self.cfg.period_s):
            try:
                self.check(time.monotonic())
            except Exception:  # the watch must outlive a bug in one pass
                log.exception("[-/-/%s/-] hang check failed", self.node)

    def check(self, now: float) -> list[agent_pb2.Finding]:
        """One pass of the hang check over every running (job, attempt) on this node."""
        by_attempt: dict[tuple[str, int], list[RankProcess]] = {}
        for proc in self._launcher.ranks():
            if proc.phase == RankPhase.RUNNING and not proc.stop_requested and proc.pid > 0:
                by_attempt.setdefault((proc.job_id, proc.attempt), []).append(proc)
        out: list[agent_pb2.Finding] = []
        with self._lock:
            for key in [k for k in self._attempts if k not in by_attempt]:
                if not any(
                    p.job_id == key[0] and p.attempt == key[1] and not p.ended
                    for p in self._launcher.ranks()
                ):
                    del self._attempts[key]
            todo = []
            for key, procs in by_attempt.items():
                w = self._watch(key)
                if w.reported:
                    continue
                med = median(list(w.step_s)) if w.step_s and w.stepped else None
                last, own, cfg = self._judged(key, w, procs, med, now)
                starting = [r for r in last if r not in w.stepped_ranks]
                if not last:
                    continue
                det = check_hang(
                    last,
                    med,
                    now,
                    cfg,
                    job_id=key[0],
                    attempt=key[1],
                    nodes_by_rank={p.rank: self.node for p in procs},
                    own_deadlines=own,
                    starting=starting,
                )
                if det.findings:
                    w.reported = True
                    inflight = {r: list(v) for r, v in w.inflight.items()}
                    todo.append((key, procs, det, inflight, dict(w.handlers)))
        for key, procs, det, inflight, handlers in todo:
            finding = self._report_hang(key, procs, det, inflight, now, handlers)
            out.append(finding)
            with self._lock:
                self._findings.append(finding)
            self._on_change()
        return out

    def _judged(
        self, key: tuple[str, int], w: _AttemptWatch, procs: list[RankProcess],
        med: float | None, now: float,
    ) -> tuple[dict[int, float], dict[int, tuple[float, str]], HangConfig]:
        """The job's hang policy applied to its ranks here (called with the lock held): when
        each judged rank last made progress, the ranks with a deadline of their own, and the
        deadline's tuning. Ranks not judged are left out."""
        timeout = max((p.hang_timeout_s for p in procs), default=0.0)
        cfg = replace(self.cfg.hang, timeout_s=timeout) if timeout > 0 else self.cfg.hang
        by_silence = timeout > 0 or key[0] in self._stepped_jobs
        last: dict[int, float] = {}
        own: dict[int, tuple[float, str]] = {}
        for p in procs:
            if p.rank in w.finished:
                continue  # training is over (a trainer callback said so): shutting down
            first = w.first_seen.setdefault(p.rank, now)
            progress = w.progress.get(p.rank, first)
            sections = w.sections.get(p.rank)
            if sections:
                name, entered, section_s = sections[-1]
                last[p.rank] = max(entered, progress)
                own[p.rank] = (section_s, f"section {name!r} timeout {section_s:g} s")
            elif by_silence:
                last[p.rank] = progress
            elif p.rank in w.stuck:
                seq, op, since = w.stuck[p.rank]
                deadline = hang_deadline_s(med if p.rank in w.stepped_ranks else None, cfg)
                last[p.rank] = max(since, w.progress.get(p.rank, since))
                own[p.rank] = (deadline, f"deadline {deadline:g} s for {op} seq {seq} in flight")
        return last, own, cfg

    def _report_hang(
        self,
        key: tuple[str, int],
        procs: list[RankProcess],
        det: Any,
        inflight: dict[int, list[dict[str, Any]]],
        now: float,
        handlers: dict[int, int],
    ) -> agent_pb2.Finding:
        job_id, attempt = key
        by_rank = {p.rank: p for p in procs}
        hung = [f.rank for f in det.findings]
        states = {r: proc_state(by_rank[r].pid) for r in hung}
        stacks = self._dump_stacks(job_id, attempt, [by_rank[r] for r in hung], states, handlers)
        stopped = [r for r in hung if states[r] in ("T", "t")]
        waiting = {r: v for r, v in inflight.items() if v and r in by_rank}
        outside = [r for r in hung if r not in waiting]
        if stopped:
            culprit, why = stopped[0], "its process is stopped (state T: SIGSTOP or a debugger)"
            named = agent_pb2.HANG_CULPRIT_STOPPED
        elif waiting and outside:
            culprit, named = outside[0], agent_pb2.HANG_CULPRIT_OUTSIDE_COLLECTIVE
            ops = sorted({f"{c['op']} seq {c['seq']}" for v in waiting.values() for c in v})
            why = (
                f"it is in no collective while rank(s) {sorted(waiting)} on this node wait in "
                f"{', '.join(ops)}"
            )
        else:
            culprit, why = hung[0], "it has been silent longest"
            named = agent_pb2.HANG_CULPRIT_SILENT_LONGEST
        first = next(f for f in det.findings if f.rank == culprit)
        ev: dict[str, str] = {k: str(v) for k, v in first.evidence.items()}
        ev["hung_ranks"] = ",".join(map(str, hung))
        ev["proc_states"] = ",".join(f"{r}:{states[r] or '?'}" for r in hung)
        ev["culprit_reason"] = why
        if waiting:
            ev["waiting"] = "; ".join(
                f"rank {r}: " + ", ".join(f"{c['op']} seq {c['seq']}" for c in v)
                for r, v in sorted(waiting.items())
            )
        silent_s = float(first.evidence.get("silent_s", 0.0))
        note = " (stopped: no stack can be dumped)" if culprit in stopped else ""
        message = f"{first.message}{note}; named because {why}"
        log.error("[%s/%d/%s/%d] hang: %s", job_id, attempt, self.node, culprit, message)
        return agent_pb2.Finding(
            kind=FindingKind.HANG.value,
            job_id=job_id,
            attempt=attempt,
            rank=culprit,
            node=self.node,
            message=message,
            evidence=ev,
            stacks=stacks,
            detected_at=time.time(),
            silent_since=time.time() - silent_s,
            culprit=named,
        )

    def _dump_stacks(
        self, job_id: str, attempt: int, procs: list[RankProcess], states: dict[int, str],
        handlers: dict[int, int],
    ) -> list[agent_pb2.RankStack]:
        sizes: dict[int, int] = {}
        out: dict[int, str] = {}
        for p in procs:
            path = stack_file(self._run_dir, job_id, attempt, p.rank)
            if states.get(p.rank) in ("T", "t"):
                out[p.rank] = (
                    "no stack: the process is stopped (state T) and cannot run its handler"
                )
                continue
            if states.get(p.rank) in ("Z", "X", ""):
                out[p.rank] = "no stack: the process is gone"
                continue
            pid = handlers.get(p.rank)
            if pid is None or not path.exists() or not _in_group(pid, p.pid):
                # SIGUSR1 kills a process without the handler: signal only the one that has it
                out[p.rank] = (
                    "no stack: no process of this rank registered the SIGUSR1 stack dump "
                    "(hpt.init() does)"
                )
                continue
            sizes[p.rank] = path.stat().st_size
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                out[p.rank] = "no stack: the process is gone"
                sizes.pop(p.rank)
        deadline = time.monotonic() + self.cfg.stack_deadline_s
        tick = threading.Event()
        last: dict[int, int] = {}
        while sizes and time.monotonic() < deadline:
            grown = {r: stack_file(self._run_dir, job_id, attempt, r).stat().st_size for r in sizes}
            # done when every file grew and stopped growing since the previous look
            if all(grown[r] > sizes[r] and last.get(r) == grown[r] for r in sizes):
                break
            last = grown
            tick.wait(0.05)
        for rank, start in sizes.items():
            path = stack_file(self._run_dir, job_id, attempt, rank)
            try:
                with open(path, "rb") as f:
                    f.seek(start)
                    text = f.read(_MAX_STACK_BYTES).decode(errors="replace")
            except OSError as exc:
                text = ""
                out[rank] = f"no stack: {exc}"
                continue
            out[rank] = text or (f"no stack within {self.cfg.stack_deadline_s:g} s of SIGUSR1")
        return [
            agent_pb2.RankStack(
                rank=p.rank, pid=p.pid, proc_state=states.get(p.rank, ""), text=out.get(p.rank, "")
            )
            for p in procs
        ]


def _in_group(pid: int, group: int) -> bool:
    """Whether ``pid`` is alive in process group ``group`` (a rank's session leads its group)."""
    try:
        return os.getpgid(pid) == group
    except OSError:
        return False


class AgentMonitoring:
    """What the agent runs for monitoring, behind a few calls from ``daemon.py``.

    The pre-flight health check (:mod:`hpt.agent.health`), the rank watch, and the agent's
    ``/metrics`` endpoint (when ``metrics_port`` is not None; 0 picks a free port).
    """

    def __init__(
        self,
        *,
        node: str,
        launcher: Launcher,
        run_dir: Path,
        on_change: Callable[[], None],
        cfg: WatchConfig | None = None,
        health_check: bool = True,
        metrics_host: str = "127.0.0.1",
        metrics_port: int | None = None,
    ) -> None:
        self.node = node
        self._health_check = health_check
        self._metrics_host = metrics_host
        self._metrics_port = metrics_port
        self.metrics: Any = None
        self.metrics_port = 0
        self._server: Any = None
        self._ckpt_metrics: Any = None
        if metrics_port is not None:
            from hpt.agent.ckpt_metrics import CheckpointMetrics
            from hpt.monitor.export import Metrics

            self.metrics = Metrics()
            self._ckpt_metrics = CheckpointMetrics(self.metrics)
        self.watch = RankWatch(
            node=node,
            launcher=launcher,
            run_dir=run_dir,
            on_change=on_change,
            cfg=cfg,
            metrics=self.metrics,
        )
        from hpt.agent.health import SKIPPED

        self.health = SKIPPED

    def start(self) -> None:
        """Run the health check (blocking, with its deadline), then watch and serve metrics."""
        if self._health_check:
            from hpt.agent.health import check_node

            self.health = check_node()
            level = logging.INFO if self.health.ok else logging.ERROR
            log.log(
                level,
                "[-/-/%s/-] health check %s in %.1f s: %s",
                self.node,
                "passed" if self.health.ok else "FAILED",
                self.health.duration_s,
                self.health.reason,
            )
        self.watch.start()
        if self.metrics is not None:
            self._server, self.metrics_port = self.metrics.serve(
                self._metrics_host, self._metrics_port or 0
            )
            log.info(
                "[-/-/%s/-] metrics on http://%s:%d/metrics",
                self.node,
                self._metrics_host,
                self.metrics_port,
            )

    def close(self) -> None:
        self.watch.close()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def on_rank_message(self, hello: Hello, msg: RankMessage) -> None:
        self.watch.on_rank_message(hello, msg)
        if self._ckpt_metrics is not None:
            self._ckpt_metrics.on_rank_message(msg)

    def rank_message_error(self, reason: ErrorReason) -> None:
        """A rank's message was not applied (the rank socket's ``on_error``)."""
        if self.metrics is not None:
            self.metrics.inc("hpt_rank_message_errors_total", reason=reason.value)

    def persisted(self, seconds: float, nbytes: int) -> None:
        """A snapshot reached durable storage (the snapshot keeper's callback)."""
        if self._ckpt_metrics is not None:
            self._ckpt_metrics.persisted(seconds, nbytes)

    def register_fields(self) -> dict[str, Any]:
        """Extra fields of the Register message."""
        h = self.health
        return {
            "health": agent_pb2.HealthReport(
                ran=h.ran, ok=h.ok, reason=h.reason, duration_s=h.duration_s, checks=h.checks
            )
        }

    def heartbeat_fields(self) -> dict[str, Any]:
        """Extra fields of a Heartbeat message (drains the watch's buffers)."""
        taken = self.watch.take()
        return {
            "step_columns": taken.step_columns,
            "collective_columns": taken.collective_columns,
            "collectives": taken.inflight,
            "findings": taken.findings,
            "dropped_records": taken.dropped,
        }
