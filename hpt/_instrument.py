"""Rank-side instrumentation: time steps, sections and ``torch.distributed`` collectives.

:func:`install` wraps the collectives of ``torch.distributed`` (the module attributes, so calls
written ``dist.all_reduce(...)`` are seen; code that imported the function itself before
:func:`install`, and DDP's C++ reducer, are not) and returns a :class:`StepTimer` that the
training loop (or ``hpt.init()``'s hooks) drives::

    timer = install(job_id, attempt, rank, node, sink)
    for step in range(start, end):
        timer.begin_step(step)
        with timer.section("data"):
            batch = next(it)
        loss = model(batch).sum(); loss.backward()   # collectives are recorded
        opt.step()
        timer.end_step(step)                          # hands the step's records to sink
    uninstall()

What is recorded, as ``to_dict()`` of :mod:`hpt.monitor.records`:

- one :class:`~hpt.monitor.records.CollectiveRecord` per collective. ``seq`` counts calls on the
  default group (other groups get -1). Blocking calls: ``enter_s``/``exit_s`` around the call.
  ``async_op=True``: exit is when the work completes, taken from a callback on its future;
  where a backend has no future (gloo's reduce_scatter) it is when the call returned. CUDA
  tensors: CUDA events are recorded on the current stream before and after the call and read
  back at a later step end without synchronising (``event.query()``); then
  ``exit_s = enter_s + device time between the events``. For a blocking call the current
  stream waits for the collective, so that is its device time; for ``async_op=True`` on CUDA
  the end event is recorded at return and covers only the launch.
- one :class:`~hpt.monitor.records.SectionRecord` per ``with timer.section(name)``.
- one :class:`~hpt.monitor.records.StepRecord` per step: ``data_wait_s`` is the time in
  ``section("data")`` blocks plus, if :meth:`StepTimer.data_ready` is called, the time from
  ``begin_step`` to that call (only explicit marks count: an unmarked input wait is part of
  compute). ``compute_s`` is the step minus data wait minus time blocked in collectives on the
  host (for CUDA and async collectives that host time is only the launch, so waiting for peers
  shows up as compute).

Records are buffered in a bounded deque (the oldest are dropped and counted when it is full)
and handed to ``sink`` as one ``list[dict]`` at each step end. Nothing here raises into the
training loop: an error in bookkeeping or in the sink is latched and available from
:func:`last_error` / :meth:`StepTimer.last_error`; errors of the collectives themselves
propagate unchanged.

This module imports only torch (the record dicts it writes follow :mod:`hpt.monitor.records`
``to_dict`` forms, which a test checks).
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final

import torch
import torch.distributed as dist

__all__ = ["COLLECTIVES", "Sink", "StepTimer", "install", "installed", "last_error", "uninstall"]

Sink = Callable[[list[dict[str, Any]]], None]

COLLECTIVES: Final = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "barrier",
    "all_to_all",
    "reduce",
    "gather",
    "scatter",
    # The non-deprecated names of newer torch releases, wrapped when present.
    "all_gather_single",
    "reduce_scatter_single",
    "all_to_all_single",
)

# Which argument carries the bytes a call moves: (parameter name, is a list of tensors).
_PAYLOAD: Final[dict[str, tuple[str, bool] | None]] = {
    "all_reduce": ("tensor", False),
    "broadcast": ("tensor", False),
    "reduce": ("tensor", False),
    "gather": ("tensor", False),
    "scatter": ("tensor", False),
    "all_gather": ("tensor_list", True),
    "all_gather_into_tensor": ("output_tensor", False),
    "all_gather_single": ("output_tensor", False),
    "reduce_scatter": ("input_list", True),
    "reduce_scatter_tensor": ("input", False),
    "reduce_scatter_single": ("input", False),
    "all_to_all": ("input_tensor_list", True),
    "all_to_all_single": ("input", False),
    "barrier": None,
}

_mono = time.monotonic

# (seq, op, nbytes, enter_s, exit_s)
_Coll = tuple[int, str, int, float, float]


class _Section:
    """Context manager returned by :meth:`StepTimer.section` (a class: cheaper than a generator)."""

    __slots__ = ("_name", "_start", "_timer")

    def __init__(self, timer: StepTimer, name: str) -> None:
        self._timer = timer
        self._name = name
        self._start = 0.0

    def __enter__(self) -> _Section:
        self._start = _mono()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._timer._end_section(self._name, self._start, _mono())


class StepTimer:
    """Times steps and sections of one rank and batches records to a sink.

    Usable on its own (no collective hooks); :func:`install` creates one and also feeds it the
    collectives. Drive it from the training thread; :meth:`flush`, :meth:`in_flight` and
    :meth:`last_error` may be called from any thread (e.g. a watchdog that reports what a
    stuck rank is blocked in).

    Args:
        job_id, attempt, rank, node: identity stamped on every record.
        sink: receives each batch of records as ``list[dict]``; called from the thread that
            ends the step (or calls :meth:`flush`). Keep it cheap and non-blocking.
        max_buffered: records kept between flushes; beyond it the oldest are dropped.
    """

    def __init__(
        self,
        job_id: str,
        attempt: int,
        rank: int,
        node: str,
        sink: Sink,
        *,
        max_buffered: int = 10_000,
    ) -> None:
        if max_buffered < 1:
            raise ValueError(f"max_buffered ({max_buffered}) must be >= 1")
        self.job_id = job_id
        self.attempt = attempt
        self.rank = rank
        self.node = node
        self._sink = sink
        self._max = max_buffered
        self._colls: deque[_Coll] = deque(maxlen=max_buffered)
        self._sections: deque[tuple[int, str, float, float]] = deque(maxlen=max_buffered)
        self._steps: deque[tuple[int, float, float, float, float]] = deque(maxlen=max_buffered)
        # In flight: the blocking call now running, async calls awaiting their future, CUDA
        # calls awaiting their events. Lists of [seq, op, nbytes, enter_s, exit_s|None].
        self._current: list[Any] | None = None
        self._async: deque[list[Any]] = deque(maxlen=max_buffered)
        self._cuda: deque[tuple[list[Any], Any, Any]] = deque(maxlen=max_buffered)
        self._seq = 0
        self._step: int | None = None
        self._step_start = 0.0
        self._data_s = 0.0
        self._data_marked = False
        self._coll_s = 0.0
        self._error: BaseException | None = None
        self._num_errors = 0
        self.num_dropped = 0
        """Records lost: buffer overflow, or a batch the sink raised on."""
        self._flush_lock = threading.Lock()

    # -- the training loop's API ----------------------------------------------------------------

    def begin_step(self, step: int) -> None:
        """Mark the start of ``step``."""
        self._step = step
        self._data_s = 0.0
        self._data_marked = False
        self._coll_s = 0.0
        self._step_start = _mono()

    def data_ready(self) -> None:
        """Mark that the step's input is ready: time since ``begin_step`` counts as data wait."""
        now = _mono()
        if self._step is not None and not self._data_marked:
            self._data_marked = True
            self._data_s += now - self._step_start

    def section(self, name: str) -> _Section:
        """Context manager timing a named part of the step; ``"data"`` counts as data wait."""
        return _Section(self, name)

    def end_step(self, step: int) -> None:
        """Mark the end of ``step`` and hand this step's records to the sink."""
        end = _mono()
        try:
            if self._step != step:
                self._latch(ValueError(f"end_step({step}) does not match begin_step({self._step})"))
                start = end if self._step is None else self._step_start
            else:
                start = self._step_start
            compute = max(0.0, (end - start) - self._data_s - self._coll_s)
            self._append(self._steps, (step, start, end, self._data_s, compute))
            self._step = None
        except Exception as e:
            self._latch(e)
        self.flush()

    def flush(self) -> None:
        """Hand every finished record buffered so far to the sink (never raises)."""
        with self._flush_lock:
            try:
                batch = self._drain()
            except Exception as e:
                self._latch(e)
                return
            if not batch:
                return
            try:
                self._sink(batch)
            except Exception as e:
                self.num_dropped += len(batch)
                self._latch(e)

    def in_flight(self) -> list[dict[str, Any]]:
        """Collectives entered and not yet finished, as records with ``exit_s=None``."""
        pending: list[list[Any]] = [e for e in list(self._async) if e[4] is None]
        pending += [e for e, _, _ in list(self._cuda)]
        current = self._current
        if current is not None:
            pending.append(current)
        return [self._coll_dict(e[0], e[1], e[2], e[3], None) for e in pending]

    def last_error(self) -> BaseException | None:
        """The most recent error latched by the instrumentation or the sink, if any."""
        return self._error

    @property
    def num_errors(self) -> int:
        return self._num_errors

    # -- collective hooks (called by the wrappers) -----------------------------------------------

    def _enter(self, op: str, is_world: bool, nbytes: int, cuda: bool) -> list[Any]:
        seq = -1
        if is_world:
            seq = self._seq
            self._seq += 1
        entry: list[Any] = [seq, op, nbytes, 0.0, None]
        if cuda:
            start_ev = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start_ev.record()
            entry.append(start_ev)
        self._current = entry
        entry[3] = _mono()
        return entry

    def _exit(self, entry: list[Any], async_op: bool, work: Any) -> None:
        exit_s = _mono()
        self._current = None
        if len(entry) > 5:  # CUDA: resolve from events at a later flush
            end_ev = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end_ev.record()
            self._append(self._cuda, (entry, entry.pop(), end_ev))
            return
        if async_op and work is not None:
            try:
                fut = work.get_future()
            except RuntimeError:  # the backend has no future for this op
                fut = None
            if fut is not None:
                self._append(self._async, entry)
                fut.add_done_callback(functools.partial(_set_exit, entry))
                return
        elif self._step is not None:
            self._coll_s += exit_s - entry[3]
        self._append(self._colls, (entry[0], entry[1], entry[2], entry[3], exit_s))

    def _abort(self) -> None:
        self._current = None

    # -- internals ------------------------------------------------------------------------------

    def _append(self, buf: deque[Any], item: Any) -> None:
        if len(buf) == self._max:
            self.num_dropped += 1
        buf.append(item)

    def _latch(self, e: BaseException) -> None:
        self._error = e
        self._num_errors += 1

    def _end_section(self, name: str, start: float, end: float) -> None:
        step = -1 if self._step is None else self._step
        if name == "data" and self._step is not None:
            self._data_s += end - start
        self._append(self._sections, (step, name, start, end))

    def _coll_dict(
        self, seq: int, op: str, nbytes: int, enter: float, exit_s: float | None
    ) -> dict[str, Any]:
        # Literal dicts in CollectiveRecord.to_dict() form: 5x cheaper than building the
        # dataclass first; a test checks both forms stay identical.
        return {
            "type": "collective",
            "job_id": self.job_id,
            "attempt": self.attempt,
            "rank": self.rank,
            "node": self.node,
            "seq": seq,
            "op": op,
            "nbytes": nbytes,
            "enter_s": enter,
            "exit_s": exit_s,
        }

    def _drain(self) -> list[dict[str, Any]]:
        # popleft, not iteration: the training thread may append while a watchdog flushes.
        out: list[dict[str, Any]] = []
        colls: list[_Coll] = []
        pending = self._async
        while pending and pending[0][4] is not None:
            e = pending.popleft()
            colls.append((e[0], e[1], e[2], e[3], e[4]))
        cuda = self._cuda
        while cuda and cuda[0][2].query():
            e, start_ev, end_ev = cuda.popleft()
            colls.append((e[0], e[1], e[2], e[3], e[3] + start_ev.elapsed_time(end_ev) / 1e3))
        buf = self._colls
        if colls:  # async and CUDA ones interleave with blocking ones: order by entry
            while buf:
                colls.append(buf.popleft())
            colls.sort(key=lambda c: c[3])
            out += [self._coll_dict(*c) for c in colls]
        else:
            while buf:
                out.append(self._coll_dict(*buf.popleft()))
        job_id, attempt, rank, node = self.job_id, self.attempt, self.rank, self.node
        sections = self._sections
        while sections:
            step, name, start, end = sections.popleft()
            out.append(
                {
                    "type": "section",
                    "job_id": job_id,
                    "attempt": attempt,
                    "rank": rank,
                    "node": node,
                    "step": step,
                    "name": name,
                    "start_s": start,
                    "end_s": end,
                }
            )
        steps = self._steps
        while steps:
            step, start, end, data_s, compute_s = steps.popleft()
            out.append(
                {
                    "type": "step",
                    "job_id": job_id,
                    "attempt": attempt,
                    "rank": rank,
                    "node": node,
                    "step": step,
                    "start_s": start,
                    "end_s": end,
                    "data_wait_s": data_s,
                    "compute_s": compute_s,
                }
            )
        return out


def _set_exit(entry: list[Any], _fut: Any) -> None:
    # Runs on the backend's thread when the async work completes.
    entry[4] = _mono()


# -- patching torch.distributed ------------------------------------------------------------------


def _arg_index(sig: inspect.Signature, name: str) -> int | None:
    names = list(sig.parameters)
    return names.index(name) if name in names else None


def _make_wrapper(timer: StepTimer, op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    sig = inspect.signature(fn)
    gi = _arg_index(sig, "group")
    ai = _arg_index(sig, "async_op")
    spec = _PAYLOAD.get(op)
    pname, plist = spec if spec is not None else ("", False)
    pi = _arg_index(sig, pname) if spec is not None else None
    gi_ = gi if gi is not None else 10_000
    ai_ = ai if ai is not None else 10_000
    pi_ = pi if pi is not None else 10_000
    group_member = dist.GroupMember

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        entry = None
        async_op = False
        try:
            n = len(args)
            group = args[gi_] if n > gi_ else kwargs.get("group")
            async_op = bool(args[ai_] if n > ai_ else kwargs.get("async_op", False))
            nbytes = 0
            cuda = False
            if spec is not None:
                payload = args[pi_] if n > pi_ else kwargs.get(pname)
                if plist:
                    if payload:
                        cuda = payload[0].is_cuda
                        nbytes = sum(t.nbytes for t in payload)
                elif payload is not None:
                    cuda = payload.is_cuda
                    nbytes = payload.nbytes
            is_world = group is None or group is group_member.WORLD
            entry = timer._enter(op, is_world, nbytes, cuda)
        except Exception as e:
            timer._latch(e)
        try:
            result = fn(*args, **kwargs)
        except BaseException:
            if entry is not None:
                timer._abort()
            raise
        if entry is not None:
            try:
                timer._exit(entry, async_op, result)
            except Exception as e:
                timer._latch(e)
        return result

    wrapper.__hpt_original__ = fn  # type: ignore[attr-defined]
    return wrapper


_installed: StepTimer | None = None
_originals: dict[str, Callable[..., Any]] = {}


def install(
    job_id: str,
    attempt: int,
    rank: int,
    node: str,
    sink: Sink,
    *,
    max_buffered: int = 10_000,
) -> StepTimer:
    """Wrap the ``torch.distributed`` collectives and return the timer they report to.

    Patching a module is process-wide, so one installation at a time.

    Raises:
        RuntimeError: already installed (call :func:`uninstall` first).
    """
    global _installed
    if _installed is not None:
        raise RuntimeError("hpt instrumentation is already installed; call uninstall() first")
    timer = StepTimer(job_id, attempt, rank, node, sink, max_buffered=max_buffered)
    if dist.is_available():
        for op in COLLECTIVES:
            fn = getattr(dist, op, None)
            if fn is None:
                continue
            _originals[op] = fn
            setattr(dist, op, _make_wrapper(timer, op, fn))
    _installed = timer
    return timer


def uninstall(*, flush: bool = True) -> None:
    """Restore the original collectives; by default flush what is still buffered first."""
    global _installed
    timer = _installed
    for op, fn in _originals.items():
        setattr(dist, op, fn)
    _originals.clear()
    _installed = None
    if timer is not None and flush:
        timer.flush()


def installed() -> StepTimer | None:
    """The timer of the current installation, None when not installed."""
    return _installed


def last_error() -> BaseException | None:
    """The last error latched by the current installation, None if none or not installed."""
    return None if _installed is None else _installed.last_error()
