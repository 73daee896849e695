"""The lazy asynchronous snapshot engine (DataStates-LLM style).

`SnapshotEngine.save(step, state)` flattens the state (layout.py), picks a generation buffer from
the sink (sink.py), LAUNCHES the copies of every tensor into it and returns. The copies overlap
whatever the training loop does next (forward, backward); only code that mutates the saved
tensors must wait for them, via `wait_copied()` (the Checkpointer hooks it in front of
`optimizer.step`). Each worker thread checksums the byte range it copied (checksum.py); when the
last range is done the sink is told with `commit`, and only then is the snapshot complete.

CPU tensors are copied by `num_threads` worker threads (`Tensor.copy_` releases the GIL), large
tensors cut into ranges of about `chunk_bytes`. CUDA tensors are copied on a side stream per
device into the (pinned) host buffer, ordered after the current stream's work; `wait_copied`
makes the current stream wait on the copy's event instead of blocking the host.

Errors in worker threads are latched and raised by the next `save` or `wait` (never lost, never
raised from the optimizer hook, STYLE rule 10); a failed snapshot is never committed, so the
newest complete snapshot stays what it was.

Pinned generations: whoever owns the sink's memory may keep up to `MAX_PINNED` generations
from being overwritten for a while (the node agent pins the steps its protection rounds build
and the newest protected one: `pinned`). The engine then writes into as many more buffers, so
the rotation of unpinned generations, and with it every guarantee of `num_generations`, stays
as it was; a save never waits for a pin.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from hpt.ckpt.checksum import RangeChecksum, checksum
from hpt.ckpt.errors import CkptError
from hpt.ckpt.layout import ALIGN_BYTES, Layout, ShardInfo, flatten
from hpt.ckpt.sink import SnapshotSink

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 32 << 20
DEFAULT_NUM_THREADS = max(1, min(4, os.cpu_count() or 1))
"""One copy worker per core, at most 4: with 4 workers on 2 cores the copy reached 61 % of
memcpy bandwidth, with 2 workers 84 % (50M-parameter state, checksums queued after copies)."""
MAX_PINNED = 2
"""Pinned generations the engine honours at a time (each costs one more snapshot buffer)."""


class SnapshotError(CkptError):
    """A snapshot could not be completed (a copy, checksum or commit failed); it was not
    committed and the previous complete snapshot is still the newest one."""


@dataclass(frozen=True, slots=True)
class _Piece:
    entry: int
    """Index into layout.entries / the tensor list."""
    lo: int
    hi: int
    """Byte range inside the tensor; the whole tensor for non-contiguous and CUDA tensors."""


@dataclass(frozen=True, slots=True)
class _Task:
    start: int
    end: int
    """Buffer range [start, end) this task copies into and then checksums (padding included)."""
    pieces: tuple[_Piece, ...]


@dataclass(eq=False)
class _Inflight:
    """One launched snapshot; shared between the launching thread and the workers."""

    step: int
    generation: int
    layout: Layout
    meta_json: str
    buffer: torch.Tensor
    tensors: list[torch.Tensor]
    tasks: list[_Task]
    fresh: bool
    """The buffer was just acquired: each task zeroes (touches) its range before copying."""
    cuda_events: dict[int, Any] = field(default_factory=dict)
    cuda_ordered: bool = False
    """The current streams already wait on `cuda_events` (set by wait_copied)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    copies_left: int = 0
    tasks_left: int = 0
    copied: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    checksums: list[RangeChecksum | None] = field(default_factory=list)
    error: BaseException | None = None


class SnapshotEngine:
    """Copies a state into sink-owned buffers in the background and commits it.

    Args:
        sink: where buffers come from and complete snapshots are reported.
        num_threads: worker threads for CPU copies and checksums.
        chunk_bytes: target size of one copy+checksum task (a multiple of 64 B).
        num_generations: buffers written in turn (>= 2); the one being written is never the one
            holding the newest complete snapshot.
        before_copy: fault-injection hook for tests, called in the worker thread as
            `before_copy(step, task_index)` before each task copies anything.
        pinned: called before each save; the generations not to overwrite now (the sink's
            owner holds them), beyond the `num_generations` in rotation. At most `MAX_PINNED`
            are honoured (the lowest), so a save never waits for one.
    """

    def __init__(
        self,
        sink: SnapshotSink,
        *,
        num_threads: int = DEFAULT_NUM_THREADS,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        num_generations: int = 2,
        before_copy: Callable[[int, int], None] | None = None,
        pinned: Callable[[], Collection[int]] | None = None,
    ) -> None:
        if num_threads < 1:
            raise ValueError(f"num_threads ({num_threads}) must be >= 1")
        if chunk_bytes < ALIGN_BYTES or chunk_bytes % ALIGN_BYTES:
            raise ValueError(
                f"chunk_bytes ({chunk_bytes}) must be a positive multiple of {ALIGN_BYTES}"
            )
        if num_generations < 2:
            raise ValueError(f"num_generations ({num_generations}) must be >= 2")
        self._sink = sink
        self._chunk_bytes = chunk_bytes
        self._num_generations = num_generations
        self._before_copy = before_copy
        self._pinned = pinned
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="hpt-snapshot")
        self._buffers: dict[int, tuple[Layout, torch.Tensor]] = {}
        self._plan_key: tuple[Layout, tuple[bool, ...]] | None = None
        self._plan: list[_Task] = []
        self._inflight: _Inflight | None = None
        self._newest_generation: int | None = None
        self._held: dict[int, int] = {}  # generation -> step of the complete snapshot in it
        self._synced_with_sink = False
        self._cuda_streams: dict[int, Any] = {}
        self._host_registered: list[int] = []
        self._closed = False

    # -- public ------------------------------------------------------------------------------

    @property
    def sink(self) -> SnapshotSink:
        return self._sink

    @property
    def pending(self) -> bool:
        """True while a launched snapshot is not yet committed (or failed)."""
        infl = self._inflight
        return infl is not None and not infl.done.is_set()

    def save(
        self,
        step: int,
        state: Any,
        *,
        shards: Mapping[str, ShardInfo] | None = None,
        timeout_s: float | None = None,
        copy_now: Callable[[str], bool] | None = None,
    ) -> None:
        """Launch the snapshot of `state` as the state after `step` completed steps.

        Waits (up to `timeout_s`) for the previous snapshot to finish first, then returns as soon
        as the copies are launched. The tensors in `state` must not be mutated until
        `wait_copied()` returns, except those whose fqn `copy_now` accepts: they are cloned
        before this returns (small tensors mutated where no hook can wait for the copies, found
        in the one walk of the state that flatten does). Plain values are encoded before this
        returns.

        Picking the generation and its buffer and queueing the copies happen on a worker
        thread (CPU tensors): a failure there (the sink's acquire, say) fails this snapshot and
        is raised by the next `save` or `wait`, as a failed copy is.

        Raises:
            SnapshotError: the PREVIOUS snapshot failed (this one is then not launched).
            TimeoutError: the previous snapshot did not finish within `timeout_s`.
        """
        if self._closed:
            raise RuntimeError("SnapshotEngine is closed")
        if step < 0:
            raise ValueError(f"step ({step}) must be >= 0")
        self.wait(timeout_s)
        layout, meta, tensors = flatten(state, shards)
        if copy_now is not None:
            tensors = [t.detach().clone() if copy_now(e.fqn) else t
                       for e, t in zip(layout.entries, tensors, strict=True)]
        infl = _Inflight(step=step, generation=-1, layout=layout, meta_json="",
                         buffer=_NO_BUFFER, tensors=tensors, tasks=[], fresh=False,
                         copies_left=1, tasks_left=1)
        self._inflight = infl
        if any(t.is_cuda for t in tensors):
            # CUDA copies are ordered after the caller's current stream: launched from here
            self._launch(infl, meta, cuda=True)
        else:
            # The rest (meta JSON, the generation, its buffer, the sink's discard, the task
            # plan) is bookkeeping nothing on the training thread waits for: a worker does it
            # and then queues the copies; wait_copied/wait wait for it like for a copy.
            self._pool.submit(self._launch, infl, meta, cuda=False)

    def _launch(self, infl: _Inflight, meta: Any, *, cuda: bool) -> None:
        """Pick the generation and buffer of `infl` and queue its copies (its one pending copy
        and task, set by `save`, are this launch: a failure here fails the snapshot)."""
        try:
            infl.meta_json = json.dumps(meta, separators=(",", ":"), allow_nan=False)
            generation = self._next_generation(infl.step)
            buffer, fresh = self._buffer_for(infl.layout, generation, pin=cuda)
            self._sink.discard(generation)
            self._held.pop(generation, None)
            tasks = self._plan_for(infl.layout, infl.tensors)
            with infl.lock:
                infl.generation, infl.buffer, infl.fresh, infl.tasks = (
                    generation, buffer, fresh, tasks)
                infl.checksums = [None] * len(tasks)
                # the launch's own pending copy and task are replaced by the tasks'
                infl.copies_left += len(tasks) - 1
                infl.tasks_left += len(tasks) - 1
            if cuda:
                if fresh:  # zero before the DMA lands, not after it (the workers would race it)
                    buffer.zero_()
                    infl.fresh = False
                self._launch_cuda(infl)
        except BaseException as e:
            if cuda:  # on the caller's thread: raised from save, nothing in flight
                self._inflight = None
                raise
            with infl.lock:  # latched; raised by the next save/wait
                if infl.error is None:
                    infl.error = e
            self._mark_copied(infl)
            self._mark_task_done(infl)
            return
        for k in range(len(tasks)):
            self._pool.submit(self._run_task, infl, k)

    def wait_copied(self, timeout_s: float | None = None) -> None:
        """Return once the saved tensors may be mutated: every copy of the in-flight snapshot has
        finished (CPU), or the current CUDA stream is ordered after the copies (GPU).

        Cheap when nothing is in flight; never raises a latched error (that waits for `save` or
        `wait`), only TimeoutError.
        """
        infl = self._inflight
        if infl is None:
            return
        if infl.cuda_events and not infl.cuda_ordered:
            for device, event in infl.cuda_events.items():
                torch.cuda.current_stream(device).wait_event(event)
            infl.cuda_ordered = True
        if not infl.copied.wait(timeout_s):
            raise TimeoutError(
                f"copies of the snapshot of step {infl.step} did not finish within {timeout_s} s"
            )

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until the in-flight snapshot is committed (or failed).

        Raises:
            SnapshotError: it failed; raised once, after which the engine is usable again.
            TimeoutError: it did not finish within `timeout_s` seconds.
        """
        infl = self._inflight
        if infl is None:
            return
        if not infl.done.wait(timeout_s):
            raise TimeoutError(
                f"snapshot of step {infl.step} did not complete within {timeout_s} s"
            )
        self._inflight = None
        if infl.error is not None:
            raise SnapshotError(
                f"snapshot of step {infl.step} failed and was not committed: {infl.error!r}"
            ) from infl.error

    def close(self, timeout_s: float | None = None) -> None:
        """Wait for the in-flight snapshot, stop the workers and drop the buffers. The sink is
        left open (its owner closes it)."""
        if self._closed:
            return
        finished = False
        try:
            self.wait(timeout_s)
            finished = True
        except SnapshotError:
            finished = True
            raise
        finally:
            self._closed = True
            # After a timeout a worker is stuck: do not hang close() on it as well.
            self._pool.shutdown(wait=finished, cancel_futures=not finished)
            self._drop_buffers(keep=None)

    # -- generations and buffers -------------------------------------------------------------

    def _next_generation(self, step: int) -> int:
        """The buffer the save of `step` writes: never the newest complete snapshot nor a
        pinned one; an unused one first, or one holding `step` or a later one (left by a
        predecessor that got further before the restore: a step is never held twice), else the
        one holding the oldest step."""
        if not self._synced_with_sink:
            # A restarted rank must not overwrite the snapshot its predecessor left behind.
            held = self._sink.held()
            self._held = {ref.generation: ref.step for ref in held}
            self._newest_generation = held[0].generation if held else None
            self._synced_with_sink = True
        pins = sorted(set(self._pinned()))[:MAX_PINNED] if self._pinned is not None else []
        pool = self._num_generations + len(pins)
        free = [g for g in range(pool) if g != self._newest_generation and g not in pins]
        # free has >= num_generations - 1 >= 1 members: len(pool) minus the pins and the newest
        steps = self._held
        return min(free, key=lambda g: (g in steps and steps[g] < step, steps.get(g, 0), g))

    def _buffer_for(
        self, layout: Layout, generation: int, *, pin: bool
    ) -> tuple[torch.Tensor, bool]:
        held = self._buffers.get(generation)
        if held is not None and held[0] == layout:
            return held[1], False
        self._drop_buffers(keep=layout)
        buf = self._sink.acquire(layout, generation)
        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != layout.total_bytes:
            raise ValueError(
                f"sink.acquire returned {buf.dtype} {tuple(buf.shape)}, expected a 1-D uint8 "
                f"tensor of {layout.total_bytes} bytes"
            )
        if pin and buf.numel() and not buf.is_pinned():
            self._pin(buf)
        self._buffers[generation] = (layout, buf)
        log.info(
            "[ckpt] acquired generation %d buffer: %d bytes, %d tensors",
            generation,
            layout.total_bytes,
            len(layout),
        )
        return buf, True

    def _drop_buffers(self, keep: Layout | None) -> None:
        for generation, (layout, buf) in list(self._buffers.items()):
            if layout != keep:
                del self._buffers[generation]
                self._unpin(buf)

    def _pin(self, buf: torch.Tensor) -> None:
        # Registering the sink's memory (e.g. the agent's shm) makes non_blocking copies truly
        # asynchronous; without it they silently become synchronous, which is still correct.
        err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0)  # type: ignore[no-untyped-call]
        if int(err) == 0:
            self._host_registered.append(buf.data_ptr())
        else:
            log.warning("[ckpt] cudaHostRegister failed (%s); GPU copies will block", err)

    def _unpin(self, buf: torch.Tensor) -> None:
        if buf.numel() and buf.data_ptr() in self._host_registered:
            self._host_registered.remove(buf.data_ptr())
            torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())  # type: ignore[no-untyped-call]

    # -- planning ----------------------------------------------------------------------------

    def _plan_for(self, layout: Layout, tensors: Sequence[torch.Tensor]) -> list[_Task]:
        splittable = tuple(t.is_contiguous() and not t.is_cuda for t in tensors)
        key = (layout, splittable)
        if key != self._plan_key:
            self._plan = plan_tasks(layout, splittable, self._chunk_bytes)
            self._plan_key = key
        return self._plan

    # -- copying -----------------------------------------------------------------------------

    def _launch_cuda(self, infl: _Inflight) -> None:
        by_device: dict[int, list[int]] = {}
        for i, t in enumerate(infl.tensors):
            if t.is_cuda and t.numel():
                by_device.setdefault(t.device.index or 0, []).append(i)
        for device, indices in by_device.items():
            stream = self._cuda_streams.get(device)
            if stream is None:
                stream = self._cuda_streams[device] = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream), torch.no_grad():
                for i in indices:
                    _typed_view(infl.buffer, infl.layout, i).copy_(
                        infl.tensors[i].detach(), non_blocking=True
                    )
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(stream)
            infl.cuda_events[device] = event

    def _run_task(self, infl: _Inflight, k: int) -> None:
        task = infl.tasks[k]
        copied = False
        try:
            with torch.no_grad():
                if self._before_copy is not None:
                    self._before_copy(infl.step, k)
                if infl.fresh:
                    infl.buffer[task.start : task.end].zero_()
                for piece in task.pieces:
                    t = infl.tensors[piece.entry]
                    if t.is_cuda:
                        continue
                    entry = infl.layout.entries[piece.entry]
                    if t.is_contiguous():
                        src = t.detach().reshape(-1).view(torch.uint8)[piece.lo : piece.hi]
                        infl.buffer[entry.offset + piece.lo : entry.offset + piece.hi].copy_(src)
                    else:
                        _typed_view(infl.buffer, infl.layout, piece.entry).copy_(t.detach())
                self._mark_copied(infl)
                copied = True
            # Checksums go to the back of the queue: every copy (what the optimizer step waits
            # for) runs first, then the checksums (what only the commit waits for). Done inline
            # they interleaved with the copies and cost ~40 % of the copy bandwidth on 2 cores.
            self._pool.submit(self._checksum_task, infl, k)
        except BaseException as e:  # latched; raised by the next save/wait
            with infl.lock:
                if infl.error is None:
                    infl.error = e
            if not copied:
                self._mark_copied(infl)
            self._mark_task_done(infl)

    def _checksum_task(self, infl: _Inflight, k: int) -> None:
        task = infl.tasks[k]
        try:
            with torch.no_grad():
                devices = {
                    infl.tensors[p.entry].device.index or 0
                    for p in task.pieces
                    if infl.tensors[p.entry].is_cuda
                }
                for device in devices:
                    infl.cuda_events[device].synchronize()
                value = checksum(infl.buffer[task.start : task.end])
                infl.checksums[k] = RangeChecksum(task.start, task.end - task.start, value)
        except BaseException as e:  # latched; raised by the next save/wait
            with infl.lock:
                if infl.error is None:
                    infl.error = e
        finally:
            self._mark_task_done(infl)

    @staticmethod
    def _mark_copied(infl: _Inflight) -> None:
        with infl.lock:
            infl.copies_left -= 1
            last = infl.copies_left == 0
        if last:
            infl.copied.set()

    def _mark_task_done(self, infl: _Inflight) -> None:
        with infl.lock:
            infl.tasks_left -= 1
            last = infl.tasks_left == 0
        if not last:
            return
        try:
            if infl.error is None:
                checksums = [c for c in infl.checksums if c is not None]
                assert len(checksums) == len(infl.tasks)
                self._sink.commit(
                    infl.step, infl.generation, infl.layout, infl.meta_json, checksums
                )
                self._newest_generation = infl.generation
                self._held[infl.generation] = infl.step
        except BaseException as e:
            infl.error = e
        finally:
            infl.tensors = []  # do not keep the caller's tensors alive
            infl.done.set()


_NO_BUFFER = torch.empty(0, dtype=torch.uint8)
"""The buffer of a snapshot whose launch has not picked one yet."""


def _typed_view(buffer: torch.Tensor, layout: Layout, i: int) -> torch.Tensor:
    e = layout.entries[i]
    return buffer[e.offset : e.offset + e.nbytes].view(e.torch_dtype).view(e.shape)


def plan_tasks(layout: Layout, splittable: Sequence[bool], chunk_bytes: int) -> list[_Task]:
    """Cut the buffer [0, total_bytes) into consecutive ranges of about `chunk_bytes`.

    A tensor whose flag in `splittable` is true may be cut anywhere (at a 64-byte boundary);
    others (non-contiguous or CUDA tensors, copied in one piece) end up whole inside one range.
    Every byte of the buffer, padding included, belongs to exactly one range.
    """
    tasks: list[_Task] = []
    start = 0
    pieces: list[_Piece] = []

    def cut(at: int) -> None:
        nonlocal start, pieces
        tasks.append(_Task(start, at, tuple(pieces)))
        start, pieces = at, []

    for i, entry in enumerate(layout.entries):
        pos = 0
        while pos < entry.nbytes:
            here = entry.offset + pos
            room = start + chunk_bytes - here
            if room <= 0 and here > start:
                cut(here)
                continue
            if not splittable[i] or entry.nbytes - pos <= room:
                pieces.append(_Piece(i, pos, entry.nbytes))
                pos = entry.nbytes
            else:
                pieces.append(_Piece(i, pos, pos + room))
                pos += room
                cut(entry.offset + pos)
    if start < layout.total_bytes or not tasks:
        cut(layout.total_bytes)
    return tasks
