"""Launch, watch and stop rank processes on this node.

Each rank runs in its own session (so its process group is the rank and everything it spawned);
stopping sends SIGTERM to the group, waits the grace period, then SIGKILLs the group, and a rank
that ends has its group SIGKILLed too so nothing it left behind outlives it. Output goes to a
file per rank and to a bounded outbox the agent ships to the controller. A rank that raised
writes an error file (``HPT_ERROR_FILE``, written by ``hpt.init``'s excepthook) that the
launcher reads back to name the exception.

A rank whose script finished (hpt's exit hook said so: its main returned or it called
``sys.exit``, with no uncaught exception) and that then dies of a crash signal (SIGABRT, SIGSEGV,
SIGBUS: a C++ destructor or a library thread in interpreter teardown, "terminate called without
an active exception") has done its work: it counts as SUCCEEDED, and a ``teardown_crash`` event
says what happened so the crash is not hidden. A non-zero exit *code* is what the script chose
(``sys.exit(n)``) and stays a failure, as does an uncaught exception (its error file names it).

Where possible a rank starts from a warm interpreter (``warm.py``: torch already imported)
instead of a fresh ``python``; that removes the import floor from every restart.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from hpt.agent import oom
from hpt.agent.error_file import MAX_BYTES as ERROR_FILE_MAX_BYTES
from hpt.agent.error_file import parse_error_file
from hpt.agent.guard import Guard, kill_session
from hpt.agent.snapshots import SnapshotKeeper
from hpt.agent.spawn import Spawner
from hpt.agent.warm import WarmPool
from hpt.jobspec import JobSpec, Placement

log = logging.getLogger(__name__)

_ERROR_FILE_MAX_BYTES = ERROR_FILE_MAX_BYTES
_LOG_OUTBOX_MAX_BYTES = 4 * 1024 * 1024
_TEARDOWN_CRASH_SIGNALS = frozenset({"SIGABRT", "SIGSEGV", "SIGBUS"})
_PYTHON_NAMES = frozenset({"python", "python3", f"python3.{sys.version_info.minor}"})


class RankPhase:
    """Closed vocabulary of a rank's life on this node (mirrors the wire RankState names)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"
    TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


@dataclass(frozen=True, kw_only=True, slots=True)
class LaunchSpec(Placement):
    """One attempt's ranks on this node: the job's spec and this node's placement."""

    job: JobSpec
    """What to run and every per-job option, defaults applied (``hpt/jobspec.py``)."""
    restore_shards: str = ""
    """HPT_RESTORE_SHARDS: the old snapshots of restore_step in this node's memory (JSON)."""


@dataclass(kw_only=True, slots=True)
class RankProcess:
    job_id: str
    attempt: int
    rank: int
    local_rank: int
    node: str
    pid: int = 0
    phase: str = RankPhase.PENDING
    exit_code: int = 0
    signal: str = ""
    error_type: str = ""
    error_message: str = ""
    traceback: str = ""
    ended_at: float = 0.0
    started_at: float = 0.0
    step: int = -1
    step_at: float = 0.0
    first_step_at: float = 0.0
    stop_requested: bool = False
    stop_reason: str = ""
    reports_after_end: int = 0
    hang_timeout_s: float = 0.0
    """The job's hang deadline (0: the agent's automatic one); see ``watch.py``."""
    oom_kills_at_start: int = -1
    script_finished: bool = False
    """hpt's exit hook ran: the script is done and the interpreter is tearing down."""
    teardown_crash: str = ""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    error_file: Path | None = None

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.job_id, self.attempt, self.rank)

    @property
    def ended(self) -> bool:
        return self.phase in RankPhase.TERMINAL

    def exit_reason(self) -> str:
        if self.phase == RankPhase.STOPPED:
            return f"stopped: {self.stop_reason}" if self.stop_reason else "stopped"
        if self.phase == RankPhase.SUCCEEDED:
            return self.teardown_crash or "exited 0"
        how = f"killed by {self.signal}" if self.signal else f"exited with code {self.exit_code}"
        if self.error_type:
            return f"{how}: {self.error_type}: {self.error_message}"
        return how


@dataclass(slots=True)
class LogOutbox:
    """Bounded buffer of output chunks awaiting the next heartbeat; drops oldest when full."""

    chunks: deque[tuple[str, int, int, str, str]] = field(default_factory=deque)
    size: int = 0
    dropped_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def put(self, job_id: str, attempt: int, rank: int, stream: str, text: str) -> None:
        with self.lock:
            self.chunks.append((job_id, attempt, rank, stream, text))
            self.size += len(text)
            while self.size > _LOG_OUTBOX_MAX_BYTES and self.chunks:
                dropped = self.chunks.popleft()
                self.size -= len(dropped[4])
                self.dropped_bytes += len(dropped[4])

    def take(self, max_bytes: int) -> tuple[list[tuple[str, int, int, str, str]], int]:
        with self.lock:
            out, total = [], 0
            while self.chunks and total < max_bytes:
                chunk = self.chunks.popleft()
                total += len(chunk[4])
                out.append(chunk)
            self.size -= total
            dropped, self.dropped_bytes = self.dropped_bytes, 0
            return out, dropped


class RankLog:
    """A rank's log file on this node, written by its stdout and stderr pumps together.

    With ``max_bytes`` (the job's ``rank_log_max_bytes``; 0: no limit) the file stops growing
    at the first line that would pass it, and one line says so: a rank printing in a loop
    cannot fill the node's disk. The output still goes to the controller (``hptctl logs``).
    """

    def __init__(self, path: Path, max_bytes: int, *, writers: int) -> None:
        self._file = open(path, "ab")  # noqa: SIM115  (closed by the last writer)
        self._max = max_bytes
        self._written = 0
        self._cut = False
        self._writers = writers
        self._lock = threading.Lock()

    def write(self, raw: bytes) -> None:
        with self._lock:
            if self._cut:
                return
            if self._max and self._written + len(raw) > self._max:
                self._cut = True
                raw = (f"[hpt] this log stops at the job's rank_log_max_bytes ({self._max}); "
                       "the rest of the output is in 'hptctl logs'\n").encode()
            self._file.write(raw)
            self._file.flush()
            self._written += len(raw)

    def close(self) -> None:
        with self._lock:
            self._writers -= 1
            if self._writers == 0:
                self._file.close()


class Launcher:
    def __init__(
        self,
        *,
        node: str,
        run_dir: Path,
        agent_socket: str,
        on_change: Callable[[], None],
        spawner: Spawner,
        snapshots: SnapshotKeeper,
        warm_pool: WarmPool | None = None,
        guard: Guard | None = None,
    ) -> None:
        self._guard = guard
        self._spawner = spawner
        self._snapshots = snapshots
        self.node = node
        self.run_dir = run_dir
        self.agent_socket = agent_socket
        self.outbox = LogOutbox()
        self._on_change = on_change
        self._warm = warm_pool
        self._lock = threading.Lock()
        self._ranks: dict[tuple[str, int, int], RankProcess] = {}
        self._highest_attempt: dict[str, int] = {}
        self._stores: dict[str, tuple[int, Any]] = {}
        """job id -> (attempt, the TCPStore server this agent hosts for it: see _host_store)"""

    # ---------------------------------------------------------------- queries

    def ranks(self) -> list[RankProcess]:
        with self._lock:
            return list(self._ranks.values())

    def alive(self) -> list[RankProcess]:
        return [r for r in self.ranks() if not r.ended]

    def find(self, job_id: str, attempt: int, rank: int) -> RankProcess | None:
        with self._lock:
            return self._ranks.get((job_id, attempt, rank))

    def record_step(self, job_id: str, attempt: int, rank: int, step: int, at: float) -> None:
        proc = self.find(job_id, attempt, rank)
        if proc is not None and step > proc.step:
            proc.step, proc.step_at = step, at
            if not proc.first_step_at:
                proc.first_step_at = at

    def script_finished(self, job_id: str, attempt: int, rank: int) -> None:
        proc = self.find(job_id, attempt, rank)
        if proc is not None:
            proc.script_finished = True

    def reported(self, ranks: list[RankProcess]) -> None:
        """Called after a heartbeat carrying ``ranks`` went out on a live stream; records that
        ended and were reported a few times are forgotten."""
        with self._lock:
            for r in ranks:
                if r.ended:
                    r.reports_after_end += 1
                    if r.reports_after_end >= 4:
                        self._ranks.pop(r.key, None)

    # ---------------------------------------------------------------- launch

    def launch(self, spec: LaunchSpec) -> list[RankProcess]:
        with self._lock:
            highest = self._highest_attempt.get(spec.job_id, 0)
            if spec.attempt <= highest:
                log.warning("[%s/%d/%s/-] launch refused: attempt %d already seen", spec.job_id,
                            spec.attempt, self.node, highest)
                return []
            self._highest_attempt[spec.job_id] = spec.attempt
        self.fence(spec.job_id, spec.attempt)
        refused = self._host_store(spec)
        started = []
        for rank, local_rank in spec.ranks:
            proc = RankProcess(job_id=spec.job_id, attempt=spec.attempt, rank=rank,
                               local_rank=local_rank, node=self.node,
                               hang_timeout_s=spec.job.hang_timeout_s)
            with self._lock:
                self._ranks[proc.key] = proc
            if refused:  # never joined to a store some other job may be serving on that port
                proc.phase, proc.exit_code, proc.ended_at = RankPhase.FAILED, 127, time.time()
                proc.error_type, proc.error_message = "LaunchError", refused
            else:
                self._start(proc, spec)
            started.append(proc)
        self._on_change()
        return started

    def _host_store(self, spec: LaunchSpec) -> str:
        """The agent of node rank 0 serves the attempt's rendezvous store (torch's TCPStore on
        MASTER_ADDR:MASTER_PORT) before any rank starts; every rank connects to it as a client
        (TORCHELASTIC_USE_AGENT_STORE, as under torchrun). When rank 0 hosted it, a rank of
        another node that came up first was refused and retried after a backoff (0.3-0.7 s
        measured, about one restart in two). The store lives until this node's ranks of the
        attempt have ended, the next attempt replaces it, or the job is released.

        Returns why the store cannot be served ("" when it is): the port is taken (by another
        job's store, say). This node's ranks then fail to launch, an ordinary fault; the next
        attempt gets another port."""
        self.close_store(spec.job_id)
        if spec.node_rank != 0:
            return ""
        from torch.distributed import TCPStore

        try:
            store = TCPStore(spec.master_addr, spec.master_port, None, True,
                             timedelta(seconds=60), wait_for_workers=False, use_libuv=False)
        except (RuntimeError, OSError) as exc:
            why = f"cannot serve the rendezvous store on port {spec.master_port}: {exc}"
            log.error("[%s/%d/%s/-] %s", spec.job_id, spec.attempt, self.node, why)
            return why
        with self._lock:
            self._stores[spec.job_id] = (spec.attempt, store)
        return ""

    def close_store(self, job_id: str, attempt: int | None = None) -> None:
        """Stop serving ``job_id``'s rendezvous store (only ``attempt``'s, when given)."""
        with self._lock:
            held = self._stores.get(job_id)
            if held is None or (attempt is not None and held[0] != attempt):
                return
            del self._stores[job_id]
        del held  # the last reference: the server stops and frees its port

    def _start(self, proc: RankProcess, spec: LaunchSpec) -> None:
        rank_dir = self.run_dir / "jobs" / spec.job_id / f"attempt-{spec.attempt}"
        rank_dir.mkdir(parents=True, exist_ok=True)
        proc.error_file = rank_dir / f"rank-{proc.rank}.error.json"
        env = dict(os.environ)
        # torch's libuv TCPStore server takes ~0.5 s to come up; the classic one ~10 ms
        env["USE_LIBUV"] = "0"
        env.update(spec.job.env)
        env.update(
            RANK=str(proc.rank),
            LOCAL_RANK=str(proc.local_rank),
            GROUP_RANK=str(spec.node_rank),
            NODE_RANK=str(spec.node_rank),
            WORLD_SIZE=str(spec.world_size),
            LOCAL_WORLD_SIZE=str(spec.local_world_size),
            MASTER_ADDR=spec.master_addr,
            MASTER_PORT=str(spec.master_port),
            TORCHELASTIC_USE_AGENT_STORE="True",  # node rank 0's agent serves it (_host_store)
            TORCHELASTIC_RESTART_COUNT=str(spec.attempt - 1),
            HPT_JOB_ID=spec.job_id,
            HPT_ATTEMPT=str(spec.attempt),
            HPT_NODE=self.node,
            HPT_AGENT_SOCKET=self.agent_socket,
            HPT_ERROR_FILE=str(proc.error_file),
            # torchelastic's @record writes here: a torchrun script names its error unchanged
            TORCHELASTIC_ERROR_FILE=str(proc.error_file),
            HPT_STACK_FILE=str(rank_dir / f"rank-{proc.rank}.stacks.txt"),
            HPT_RESTORE_STEP=str(spec.restore_step),
            PYTHONUNBUFFERED="1",
        )
        if spec.restore_shards:
            env["HPT_RESTORE_SHARDS"] = spec.restore_shards
        env.update(self._snapshots.prepare(
            spec.job_id, proc.rank, world_size=spec.world_size, persist_dir=spec.job.persist_dir,
            persist_every=spec.job.persist_every, keep_persisted=spec.job.keep_persisted,
            attempt=spec.attempt, snapshot_every=spec.job.snapshot_every))
        argv = list(spec.job.command)
        if argv[0] in _PYTHON_NAMES:
            argv[0] = sys.executable
        cwd = spec.job.workdir or None
        proc.started_at = time.time()
        proc.oom_kills_at_start = oom.oom_kills()
        try:
            popen = None
            if self._warm is not None:
                popen = self._warm.take(argv, env, cwd)
            if popen is None:
                if cwd is not None and not Path(cwd).is_dir():
                    raise NotADirectoryError(f"workdir {cwd!r} does not exist on {self.node}")
                if shutil.which(argv[0], path=env.get("PATH")) is None and not Path(argv[0]).exists():
                    raise FileNotFoundError(f"command {argv[0]!r} not found on {self.node}")
                popen = self._spawner.popen(
                    argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, start_new_session=True,
                )
        except OSError as exc:
            proc.phase, proc.exit_code, proc.ended_at = RankPhase.FAILED, 127, time.time()
            proc.error_type, proc.error_message = "LaunchError", str(exc)
            log.error("[%s/%d/%s/%d] launch failed: %s", proc.job_id, proc.attempt, self.node,
                      proc.rank, exc)
            return
        proc.proc, proc.pid, proc.phase = popen, popen.pid, RankPhase.RUNNING
        if self._guard is not None:  # the rank's session dies with this agent, however it dies
            self._guard.watch(popen.pid)
        sink = RankLog(rank_dir / f"rank-{proc.rank}.log", spec.job.rank_log_max_bytes,
                       writers=2)
        for stream, pipe in (("stdout", popen.stdout), ("stderr", popen.stderr)):
            threading.Thread(target=self._pump, args=(proc, stream, pipe, sink), daemon=True,
                             name=f"hpt-log-{proc.rank}-{stream}").start()
        threading.Thread(target=self._wait, args=(proc,), daemon=True,
                         name=f"hpt-wait-{proc.rank}").start()

    def _pump(self, proc: RankProcess, stream: str, pipe, sink: RankLog) -> None:  # type: ignore[no-untyped-def]
        try:
            for raw in iter(pipe.readline, b""):
                sink.write(raw)
                self.outbox.put(proc.job_id, proc.attempt, proc.rank, stream,
                                raw.decode(errors="replace"))
        finally:
            sink.close()
            pipe.close()

    def _wait(self, proc: RankProcess) -> None:
        assert proc.proc is not None
        code = proc.proc.wait()
        kill_session(proc.pid)  # whatever the rank left in its session goes too
        if self._guard is not None:
            self._guard.unwatch(proc.pid)
        proc.ended_at = time.time()
        proc.exit_code = code
        if code < 0:
            proc.signal = signal.Signals(-code).name
        self._read_error_file(proc)
        if code == -signal.SIGKILL and not proc.stop_requested and not proc.error_type:
            now_kills = oom.oom_kills()
            if 0 <= proc.oom_kills_at_start < now_kills:
                proc.error_type = oom.ERROR_TYPE
                proc.error_message = oom.oom_message(proc.oom_kills_at_start, now_kills)
        if proc.stop_requested:
            proc.phase = RankPhase.STOPPED
        elif (proc.script_finished and proc.signal in _TEARDOWN_CRASH_SIGNALS
              and not proc.error_type):
            proc.phase = RankPhase.SUCCEEDED
            proc.teardown_crash = (f"finished its script, then killed by {proc.signal} in "
                                   "interpreter teardown (counted as success)")
            self._snapshots.event("teardown_crash", proc.job_id, proc.attempt, proc.rank,
                                  f"rank {proc.rank} {proc.teardown_crash}")
        elif code == 0:
            proc.phase = RankPhase.SUCCEEDED
        else:
            proc.phase = RankPhase.FAILED
        log.info("[%s/%d/%s/%d] %s", proc.job_id, proc.attempt, self.node, proc.rank,
                 proc.exit_reason())
        with self._lock:
            done = all(r.ended for r in self._ranks.values()
                       if (r.job_id, r.attempt) == (proc.job_id, proc.attempt))
        if done:
            self.close_store(proc.job_id, proc.attempt)
        self._on_change()

    def _read_error_file(self, proc: RankProcess) -> None:
        path = proc.error_file
        if path is None or not path.is_file() or path.stat().st_size > _ERROR_FILE_MAX_BYTES:
            return
        try:
            error = parse_error_file(path.read_text())
            proc.error_type, proc.error_message = error.type, error.message
            proc.traceback = error.traceback
        except (OSError, ValueError) as exc:
            log.warning("[%s/%d/%s/%d] unreadable error file %s: %s", proc.job_id, proc.attempt,
                        self.node, proc.rank, path, exc)

    # ---------------------------------------------------------------- stop

    def stop(self, job_id: str, max_attempt: int, *, grace_s: float, reason: str) -> int:
        """SIGTERM every live rank of ``job_id`` with attempt <= ``max_attempt``; SIGKILL the
        group after ``grace_s``. Returns how many were signalled. Never blocks."""
        targets = []
        with self._lock:
            self._highest_attempt[job_id] = max(self._highest_attempt.get(job_id, 0), max_attempt)
            for proc in self._ranks.values():
                if proc.job_id == job_id and proc.attempt <= max_attempt and not proc.ended:
                    if not proc.stop_requested:
                        proc.stop_requested, proc.stop_reason = True, reason
                    targets.append(proc)
        for proc in targets:
            self._terminate(proc, grace_s)
        return len(targets)

    def fence(self, job_id: str, attempt: int, timeout_s: float = 5.0) -> None:
        """SIGKILL every rank of ``job_id`` older than ``attempt`` still alive here and wait (up
        to ``timeout_s``) until they are gone: a rank that outlives its SIGTERM (Lightning turns
        SIGTERM into a graceful stop that runs more hooks) must not write snapshots while the
        agent reads them for the next attempt."""
        self.stop(job_id, attempt - 1, grace_s=0.0, reason="superseded")
        deadline = time.monotonic() + timeout_s
        for proc in self.ranks():
            if proc.job_id != job_id or proc.attempt >= attempt or proc.proc is None:
                continue
            try:
                proc.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("[%s/%d/%s/%d] still alive %.1fs after SIGKILL", job_id,
                            proc.attempt, self.node, proc.rank, timeout_s)

    def stop_all(self, *, grace_s: float, reason: str) -> None:
        """Stop every live rank. Fences each job only up to the newest attempt it ran here, so
        the controller's next attempt is still accepted (self-fencing is not a verdict on it)."""
        newest: dict[str, int] = {}
        for p in self.alive():
            newest[p.job_id] = max(newest.get(p.job_id, 0), p.attempt)
        for job_id, attempt in newest.items():
            self.stop(job_id, attempt, grace_s=grace_s, reason=reason)

    def wait_all(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        for proc in self.ranks():
            if proc.proc is None:
                continue
            try:
                proc.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return True

    def _terminate(self, proc: RankProcess, grace_s: float) -> None:
        if proc.pid <= 0:
            proc.phase = RankPhase.STOPPED
            self._on_change()
            return
        if grace_s <= 0:
            _kill_group(proc.pid, signal.SIGKILL)
            return
        _kill_group(proc.pid, signal.SIGTERM)

        def escalate() -> None:
            assert proc.proc is not None
            try:
                proc.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("[%s/%d/%s/%d] still alive %.1fs after SIGTERM: SIGKILL",
                            proc.job_id, proc.attempt, self.node, proc.rank, grace_s)
                _kill_group(proc.pid, signal.SIGKILL)

        threading.Thread(target=escalate, daemon=True, name=f"hpt-stop-{proc.rank}").start()


def _kill_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
