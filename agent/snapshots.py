"""Snapshot memory the agent holds for its ranks, and the background persistence of it.

Each rank of a job on this node writes its snapshots into files in /dev/shm named by the agent
(``HPT_SNAPSHOT_PREFIX``), so they belong to the node, not to the rank: a rank that crashes
leaves its newest complete snapshot behind for the next attempt, which reuses the same prefix
(same job, same rank). The rank tells the agent over its socket when a generation becomes
complete (``snapshot``) or is about to be overwritten (``discard``); the agent reports the steps
it holds per rank to the controller, whose catalog picks the step every rank can restore.

Every ``persist_every``-th complete snapshot is persisted in the background by a ``Persister``
(one per rank, one-slot mailbox: a slow disk skips snapshots instead of queueing them). The
persister copies the generation out of shared memory and checks it against the checksums of its
commit record before writing, so a generation the rank overwrote meanwhile is skipped, never
written torn. ``release(job)`` unlinks everything of a job when the controller says it ended.

Pins: a protection round (controller/rounds.py) reads one step from every data member, and a
node loss is decoded from the newest protected step, so both must stay in the ranks' memory
while the ranks save on. ``pin_rounds`` takes both steps of each job from the controller's
acks; the generations holding them are written to a pin file next to the rank's snapshots
(``ShmSink.pin``) that the rank's engine reads before each save; it writes other buffers
meanwhile and never waits (ckpt/engine.py). A target the ranks have not saved yet is pinned
the moment a rank reports its commit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hpt._proto import agent_pb2, common_pb2
from hpt.agent.ownership import node_prefix
from hpt.ckpt.checksum import verify
from hpt.ckpt.errors import CkptError
from hpt.ckpt.sink import ShmSink, SnapshotRef
from hpt.ckpt.sources import even_split
from hpt.splits import MAX_SPLIT_SIZES

if TYPE_CHECKING:
    from hpt.ckpt import fmt  # DCP: ~1.5 s of CPU to import; only jobs that persist need it

log = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9_-]")
_MAX_EVENTS = 1000
_RELEASE_WAIT_S = 65.0
"""How long closing the keeper waits for a release in progress (its persister gets 60 s)."""


@dataclass(slots=True)
class _RankSnapshots:
    prefix: str
    generations: dict[int, int] = field(default_factory=dict)  # generation -> step
    persister: fmt.Persister | None = None
    persist_every: int = 0
    persisted: set[int] = field(default_factory=set)
    world_size: int = 0
    attempt: int = 0  # the attempt whose ranks write this rank's persisted parts
    nbytes: int = 0
    persist_started: dict[int, float] = field(default_factory=dict)  # step -> monotonic
    persist_s: float = 0.0  # the newest persist, copy-out to verified manifest (0: none yet)
    pinned: list[int] = field(default_factory=list)  # generations in the rank's pin file
    replicated: bool | None = None  # every tensor whole (None: not read yet this attempt)
    split: str = ""  # EvenSplit.encode() of its sharded tensors ("": none, or not known)
    blocked_s: float = 0.0  # training blocked per snapshot, a moving average (0: not measured)


class SnapshotKeeper:
    def __init__(self, node: str, *, shm_dir: str = "/dev/shm", owner: str = "") -> None:
        self.node = node
        self.owner = owner
        self.shm_dir = shm_dir
        self._lock = threading.Lock()
        self._ranks: dict[tuple[str, int], _RankSnapshots] = {}
        self._events: deque[agent_pb2.AgentEvent] = deque(maxlen=_MAX_EVENTS)
        self._rounds: dict[str, set[int]] = {}  # job id -> steps to pin (target, protected)
        self._releasing: list[threading.Thread] = []
        self.on_persisted: Callable[[float, int], None] | None = None
        """Called with (seconds from copy-out to manifest, bytes written) per persisted step."""

    # ---------------------------------------------------------------- events

    def event(self, kind: str, job_id: str, attempt: int, rank: int, message: str,
              step: int = 0) -> None:
        """Queue an event for the controller's log (sent with the next heartbeat).

        Raises ValueError when ``kind`` names no ``EventKind`` of the wire."""
        self._events.append(agent_pb2.AgentEvent(kind=kind, event_kind=event_kind(kind),
                                                 job_id=job_id, attempt=attempt,
                                                 rank=rank, message=message[:4096],
                                                 at=time.time(), step=step))

    def take_events(self) -> list[agent_pb2.AgentEvent]:
        out = []
        while self._events:
            out.append(self._events.popleft())
        return out

    @property
    def node_prefix(self) -> str:
        """Every shared-memory file of this agent starts with it ('--' ends the node name, then
        the owning agent's instance id: see ``ownership.py``)."""
        if self.owner:
            return node_prefix(self.node, self.owner)
        return f"hpt-{_SAFE.sub('_', self.node)}--"

    def prefix(self, job_id: str, rank: int) -> str:
        return f"{self.node_prefix}{_SAFE.sub('_', job_id)}-r{rank}"

    def prepare(self, job_id: str, rank: int, *, world_size: int, persist_dir: str,
                persist_every: int, keep_persisted: int, attempt: int = 0,
                snapshot_every: int = 0) -> dict[str, str]:
        """Called at launch of each rank; returns the environment the rank's Checkpointer uses.
        ``snapshot_every`` > 0: the rank snapshots the steps divisible by it (the job's
        ``snapshot_every``, or the cadence the controller set), whatever its script says."""
        sink = ShmSink(self.prefix(job_id, rank), directory=self.shm_dir)
        if snapshot_every > 0:
            sink.set_cadence(snapshot_every)
        else:  # an earlier attempt's retuned cadence no longer applies
            sink.clear_cadence()
        with self._lock:
            entry = self._ranks.get((job_id, rank))
            if entry is None:
                entry = self._ranks[(job_id, rank)] = _RankSnapshots(self.prefix(job_id, rank))
            entry.world_size = world_size
            entry.attempt = attempt
            entry.replicated = None  # a new attempt may shard its state differently
            entry.split = ""
            entry.persist_every = persist_every if persist_dir else 0
            if persist_dir and entry.persister is None:
                # one global checkpoint per step: every rank writes its part under the job's dir
                root = Path(persist_dir)
                entry.persisted = set(_verified_steps(root))
                from hpt.ckpt import fmt

                entry.persister = fmt.Persister(
                    root, keep_last=keep_persisted, name=f"hpt-persist-{rank}",
                    on_result=lambda step, path, err, e=entry, r=root: self._persisted(
                        job_id, rank, e, r, step, path, err),
                )
        env = {"HPT_SNAPSHOT_PREFIX": entry.prefix, "HPT_SNAPSHOT_DIR": self.shm_dir}
        if persist_dir:
            env["HPT_PERSIST_DIR"] = persist_dir
        return env

    # ---------------------------------------------------------------- reports from ranks

    def committed(self, job_id: str, rank: int, step: int, generation: int,
                  nbytes: int = 0, blocked_s: float | None = None) -> None:
        with self._lock:
            entry = self._ranks.get((job_id, rank))
            if entry is None:
                raise ValueError(f"snapshot report for unknown rank {rank} of job {job_id}")
            entry.generations[generation] = step
            entry.nbytes = nbytes or entry.nbytes
            if blocked_s is not None:  # one slow save (a page fault storm) moves it a fifth
                entry.blocked_s = round(blocked_s if not entry.blocked_s else
                                        0.8 * entry.blocked_s + 0.2 * blocked_s, 4)
            due = (entry.persister is not None and entry.persist_every > 0
                   and step % entry.persist_every == 0)
            self._pin(entry, self._rounds.get(job_id, set()))
            learn = entry.replicated is None
        if learn:  # once per attempt: the commit record's layout (a rank keeps its sharding)
            try:
                layout = ShmSink(entry.prefix, directory=self.shm_dir).layout(
                    SnapshotRef(step=step, generation=generation))
            except CkptError as exc:  # (overwritten meanwhile: the next commit tells)
                log.debug("[%s/-/%s/%d] layout of step %d not read: %s", job_id, self.node,
                          rank, step, exc)
            else:
                split = None if layout.is_replica else even_split({rank: layout},
                                                                  entry.world_size)
                entry.split = split.encode() if split is not None and 0 < len(
                    split.sizes) <= MAX_SPLIT_SIZES else ""
                entry.replicated = layout.is_replica
        if due:
            self._offer(job_id, rank, entry, step, generation)

    def adopt(self, job_id: str, rank: int, step: int, generation: int, nbytes: int) -> None:
        """A snapshot the agent itself put in place (rebuilt from peers before a restore)."""
        with self._lock:
            entry = self._ranks.get((job_id, rank))
            if entry is None:
                entry = self._ranks[(job_id, rank)] = _RankSnapshots(self.prefix(job_id, rank))
            entry.generations = {g: s for g, s in entry.generations.items() if g != generation}
            entry.generations[generation] = step
            entry.nbytes = nbytes

    def _offer(self, job_id: str, rank: int, entry: _RankSnapshots, step: int,
               generation: int) -> None:
        assert entry.persister is not None
        ref = SnapshotRef(step=step, generation=generation)
        sink = ShmSink(entry.prefix, directory=self.shm_dir)
        try:
            snap = sink.read(ref)
            layout_json, meta_json = snap.layout.to_json(), snap.meta_json
        except (OSError, ValueError, CkptError) as exc:
            log.warning("[%s/-/%s/%d] snapshot of step %d gone before persisting: %s", job_id,
                        self.node, rank, step, exc)
            return
        finally:
            sink.close()
        # layout + meta let hpt rebuild the rank's exact state; plain DCP users ignore them
        entry.persister.offer(step, lambda: self._copy_out(entry, ref),
                              {"step": step, "rank": rank, "world_size": entry.world_size,
                               "job_id": job_id, "node": self.node, "layout": layout_json,
                               "attempt": entry.attempt,
                               "meta_json": meta_json})

    def discarded(self, job_id: str, rank: int, generation: int) -> None:
        with self._lock:
            entry = self._ranks.get((job_id, rank))
            if entry is not None:
                entry.generations.pop(generation, None)

    def steps(self, job_id: str, rank: int) -> tuple[list[int], list[int], int, float]:
        """(in-memory steps, persisted steps, bytes of one snapshot, seconds of the newest
        persist) of the rank, steps ascending."""
        with self._lock:
            entry = self._ranks.get((job_id, rank))
            if entry is None:
                return [], [], 0, 0.0
            held = sorted(set(entry.generations.values()))
            return held, sorted(entry.persisted), entry.nbytes, entry.persist_s

    def set_snapshot_cadence(self, job_id: str, every: int, from_step: int,
                             before: int = 0) -> int:
        """The controller retuned the job's snapshot cadence: its ranks snapshot the steps
        divisible by ``every`` from step ``from_step`` on, those divisible by ``before`` until
        then (0: the script's own; they read it at their next save). Returns the ranks it was
        written for."""
        with self._lock:
            prefixes = [e.prefix for (job, _), e in self._ranks.items() if job == job_id]
        for prefix in prefixes:
            ShmSink(prefix, directory=self.shm_dir).set_cadence(every, from_step, before)
        return len(prefixes)

    def set_persist_every(self, job_id: str, persist_every: int) -> int:
        """The controller retuned the job's persist cadence: complete snapshots of steps
        divisible by ``persist_every`` are persisted from now on. Returns the ranks it applies
        to (those that persist at all)."""
        if persist_every < 1:
            raise ValueError(f"persist_every ({persist_every}) must be >= 1")
        with self._lock:
            entries = [e for (job, _), e in self._ranks.items()
                       if job == job_id and e.persister is not None]
            for entry in entries:
                entry.persist_every = persist_every
        return len(entries)

    def replicated(self, job_id: str, rank: int) -> bool:
        """Every tensor of the rank's snapshots is whole (a data-parallel replica); False
        until a snapshot of this attempt was read."""
        with self._lock:
            entry = self._ranks.get((job_id, rank))
            return bool(entry is not None and entry.replicated)

    def blocked(self, job_id: str, rank: int) -> float:
        """Seconds a snapshot holds the rank's training thread, a moving average of what the
        rank measured (0: not measured)."""
        with self._lock:
            entry = self._ranks.get((job_id, rank))
            return entry.blocked_s if entry is not None else 0.0

    def split(self, job_id: str, rank: int) -> str:
        """``EvenSplit.encode()`` of how the rank's sharded tensors are cut ("": replicated, not
        an even split on one dim, or no snapshot read yet this attempt)."""
        with self._lock:
            entry = self._ranks.get((job_id, rank))
            return entry.split if entry is not None else ""

    def pin_rounds(self, rounds: Iterable[tuple[str, int, int]]) -> None:
        """The controller's protection rounds now: (job, target step, newest protected step or
        -1) each. Every rank of a named job keeps the generations holding these two steps
        pinned. A job not named keeps its pins: its newest protected step is what a restore
        after a node loss decodes from."""
        with self._lock:
            for job_id, step, protected in rounds:
                self._rounds[job_id] = {s for s in (step, protected) if s >= 0}
            for (job_id, _), entry in self._ranks.items():
                if job_id in self._rounds:
                    self._pin(entry, self._rounds[job_id])

    def _pin(self, entry: _RankSnapshots, steps: set[int]) -> None:
        """Pin the generations of ``entry`` holding ``steps`` (under the lock: pin files are
        written in the order the pins were decided; a small tmpfs file)."""
        generations = sorted(g for g, s in entry.generations.items() if s in steps)
        if generations == entry.pinned:
            return
        try:
            ShmSink(entry.prefix, directory=self.shm_dir).pin(generations)
        except OSError as exc:  # the rank may overwrite them then: a round fails, no more
            log.warning("[-/-/%s/-] pins of %s not written: %s", self.node, entry.prefix, exc)
            return
        entry.pinned = generations

    # ---------------------------------------------------------------- persistence

    def _copy_out(self, entry: _RankSnapshots, ref: SnapshotRef) -> dict[str, torch.Tensor]:
        entry.persist_started[ref.step] = time.monotonic()
        sink = ShmSink(entry.prefix, directory=self.shm_dir)
        try:
            snap = sink.read(ref)
            private = snap.buffer.clone()  # the rank may reuse this generation from here on
            bad = verify(private, list(snap.checksums))
            if bad:
                from hpt.ckpt import fmt

                raise fmt.PersistError(
                    f"generation {ref.generation} was overwritten before step {ref.step} could be "
                    "persisted; skipped")
            names = [e.fqn for e in snap.layout.entries]
            views = [private[e.offset:e.offset + e.nbytes].view(e.torch_dtype).view(e.shape)
                     for e in snap.layout.entries]
            return dict(zip(names, views, strict=True))
        finally:
            sink.close()

    def _persisted(self, job_id: str, rank: int, entry: _RankSnapshots, root: Path, step: int,
                   path: Path | None, err: BaseException | None) -> None:
        if err is not None:
            log.error("[%s/-/%s/%d] persisting step %d failed: %s", job_id, self.node, rank,
                      step, err)
            self.event("persist_failed", job_id, 0, rank,
                       f"step {step} not persisted (previous checkpoints intact, training goes "
                       f"on): {err}")
            return
        with self._lock:
            entry.persisted = set(_verified_steps(root, trust_newest=step))
        started = entry.persist_started.pop(step, None)
        if started is not None and path is not None:
            seconds = time.monotonic() - started
            entry.persist_s = seconds
            if self.on_persisted is not None:
                self.on_persisted(seconds, _tree_bytes(path))

    def persist_newest(self, job_id: str | None) -> None:
        """Offer the newest complete snapshot of every rank (of ``job_id``, or of every job) to
        its persister, whatever the cadence: a cancel or a shutdown keeps the latest state."""
        with self._lock:
            entries = [(k, e) for k, e in self._ranks.items()
                       if (job_id is None or k[0] == job_id) and e.persister is not None
                       and e.generations]
        for (job, rank), entry in entries:
            generation, step = max(entry.generations.items(), key=lambda kv: kv[1])
            if step not in entry.persisted:
                self._offer(job, rank, entry, step, generation)

    # ---------------------------------------------------------------- cleanup

    def release(self, job_id: str) -> None:
        with self._lock:
            entries = [(k, v) for k, v in self._ranks.items() if k[0] == job_id]
            for key, _ in entries:
                del self._ranks[key]
            self._rounds.pop(job_id, None)
        for _, entry in entries:
            if entry.persister is not None:
                entry.persister.close(timeout_s=60.0)
            removed = ShmSink.remove(entry.prefix, directory=self.shm_dir)
            log.info("[%s/-/%s/-] released %d snapshot file(s) of %s", job_id, self.node,
                     removed, entry.prefix)

    def release_later(self, job_id: str) -> None:
        """``release`` on a thread of its own: a persister finishing its last write (up to 60 s)
        must not hold up the caller (the controller stream); ``close`` waits for it."""
        thread = threading.Thread(target=self.release, args=(job_id,), daemon=True,
                                  name=f"hpt-release-{job_id[:32]}")
        with self._lock:
            self._releasing = [t for t in self._releasing if t.is_alive()] + [thread]
        thread.start()

    def close(self) -> None:
        with self._lock:
            releasing, self._releasing = self._releasing, []
        for thread in releasing:
            thread.join(timeout=_RELEASE_WAIT_S)
        for job_id in {k[0] for k in list(self._ranks)}:
            self.release(job_id)


def _verified_steps(root: Path, trust_newest: int | None = None) -> list[int]:
    """Steps of the checkpoints under ``root`` whose manifest is present (full verification
    happens before any load; this is the cheap view for reporting)."""
    if not root.is_dir():
        return []
    from hpt.ckpt import fmt

    steps = []
    for child in root.iterdir():
        step = fmt.parse_step_dir(child.name)
        if step is not None and (child / fmt.MANIFEST_NAME).is_file():
            steps.append(step)
    if trust_newest is not None and trust_newest not in steps:
        steps.append(trust_newest)
    return sorted(steps)



def event_kind(kind: str) -> int:
    """The wire ``EventKind`` of an event the agent or a rank names (``"restore_failed"``);
    the agent's one mapping of event names. Raises ValueError when there is none."""
    try:
        return common_pb2.EventKind.Value(f"EVENT_KIND_{kind.upper()}")
    except ValueError:
        raise ValueError(f"event kind ({kind[:70]!r}) is not a known EventKind") from None


def _tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path``. The other ranks' parts of the same step are staged
    and renamed beside it meanwhile: what vanishes while it is walked is not counted."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_size
    return total
