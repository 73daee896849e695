"""Snapshot protection on the agent: parity pieces pulled, encoded and held for peers.

The controller sends each node the attempt's ``ProtectionLayout``: its nodes (with their ranks
and peer addresses) cut into stripes of k data members and m parity holders, the holders
rotating so every node holds parity for m stripes of its group and is a data member of k.
Each node's blob (blob.py) is cut into k segments, one per stripe it is data in. For every
stripe it holds parity for, this agent's protector thread:

1. takes the step the controller named for the attempt's current protection round
   (``set_targets``, from every heartbeat ack; controller/rounds.py): every holder of every
   stripe protects that same step, so a lost node's stripes all decode at one step. A holder
   never picks a step itself; steps saved while a round runs are skipped, never queued, so a
   slow network costs freshness, not memory. A step named ahead of the ranks is pulled once
   this node's own ranks have saved it (the agents pin it meanwhile: snapshots.py);
2. pulls the k segments of that step (``PeerClient.fetch``: chunked, CRC-checked, resumable;
   the owners verify their ranks' checksums before sending and check nothing was overwritten
   after);
3. encodes them with ``hpt.ckpt.codec`` (ISA-L through ctypes; k = 1 is a mirror: the piece
   is a copy) into a parity buffer in shared memory, checksums it, and only then marks it
   held; a failure leaves the previous piece as it was.

Two buffers per stripe alternate, so the newest verified piece stays valid while the next is
built. Held pieces go to the controller with every heartbeat; a step is protected when every
holder of every stripe reports it. Ranks never wait for any of this: it reads their committed
generations only. Serving (``open_piece``) verifies what it serves: a rank buffer against its
commit record's checksums, a parity piece against the checksum taken when it was built.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hpt._proto import checkpoint_pb2
from hpt.agent import blob as blobs
from hpt.agent import chunks
from hpt.agent.peers import ChunkSink, PeerClient, Piece, PieceUnavailable
from hpt.ckpt.checksum import block_checksums, checksum
from hpt.ckpt.codec import Codec, best_codec
from hpt.ckpt.sink import Snapshot

log = logging.getLogger(__name__)

_TICK_S = 0.2
_FETCH_TIMEOUT_S = 60.0
_SUMS_TIMEOUT_S = 2.0  # a reference replica's block checksums: small, else served whole
_SERVED_BLOBS = 8
_SERVED_S = 1.0
_OTHER_LAYOUT = "another layout"
_REFERENCE_NODES = 8
"""Nodes after its own a rank looks on for a replica of its snapshot (``Layout.references``);
the controller puts as many in a node's share of a layout (``convert.REFERENCE_NODES``)."""
_LOCAL_CHUNK_BYTES = 4 << 20  # a local piece handed to a stream's sink in views this long


@dataclass(frozen=True, slots=True)
class GroupNode:
    node: str
    peer_address: str
    ranks: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Layout:
    """A ProtectionLayout, decoded: the whole of it (a restore plan's), or the share of it one
    node needs (a launch's: ``num_nodes`` set), where ``nodes`` and ``stripes`` hold only
    their members of that share, by index."""

    k: int
    m: int
    nodes: Mapping[int, GroupNode]
    stripes: Mapping[int, tuple[tuple[int, ...], tuple[int, ...]]]  # (data, parity) indices
    num_nodes: int

    @classmethod
    def from_proto(cls, msg: checkpoint_pb2.ProtectionLayout) -> Layout:
        share = msg.num_nodes > 0
        nodes = {(n.index if share else i): GroupNode(n.node, n.peer_address, tuple(n.ranks))
                 for i, n in enumerate(msg.nodes)}
        stripes = {(s.index if share else i): (tuple(s.data), tuple(s.parity))
                   for i, s in enumerate(msg.stripes)}
        num_nodes = msg.num_nodes if share else len(nodes)
        if any(i >= num_nodes for i in nodes) or len(nodes) != len(msg.nodes):
            raise ValueError("protection.nodes: an index out of range or given twice")
        for i, (data, parity) in stripes.items():
            if not data or any(x not in nodes for x in (*data, *parity)):
                raise ValueError(f"protection.stripes[{i}] names a node out of range")
        return cls(msg.k, msg.m, nodes, stripes, num_nodes)

    def index_of(self, node: str) -> int | None:
        for i, n in self.nodes.items():
            if n.node == node:
                return i
        return None

    def owners(self) -> dict[int, int]:
        """Rank -> the index of the node that ran it (of the nodes at hand)."""
        return {r: i for i, n in self.nodes.items() for r in n.ranks}

    def data_stripes(self, index: int) -> list[int]:
        """Stripes node ``index`` is a data member of, in order: segment s of its blob is in
        the s-th of them, and their count is the number of segments its blob is cut into. (A
        node's share holds every stripe of its group: complete for the group's nodes.)"""
        return sorted(j for j, (data, _) in self.stripes.items() if index in data)

    def segment_request(self, job_id: str, attempt: int, step: int, index: int,
                        stripe: int) -> checkpoint_pb2.FetchRequest:
        own = self.data_stripes(index)
        return checkpoint_pb2.FetchRequest(
            job_id=job_id, attempt=attempt, step=step, kind=checkpoint_pb2.PIECE_KIND_SEGMENT,
            ranks=self.nodes[index].ranks, k=len(own), index=own.index(stripe), thin=True)

    def references(self, index: int, rank: int) -> list[tuple[int, int]]:
        """(node index, rank) of the replicas a thin blob of ``rank`` (on node ``index``) may
        be compared with, in the order they are asked: the rank in the same position on each
        of the next ``_REFERENCE_NODES`` nodes of the layout (data parallel: the first holds
        the same state; HSDP: the replica of a shard is a replica group's width of nodes on)."""
        position = self.nodes[index].ranks.index(rank) if rank in self.nodes[index].ranks else 0
        out = []
        for step in range(1, min(self.num_nodes, _REFERENCE_NODES + 1)):
            other = (index + step) % self.num_nodes
            node = self.nodes.get(other)
            if node is not None and node.ranks:
                out.append((other, node.ranks[position % len(node.ranks)]))
        return out


@dataclass(slots=True)
class _Slot:
    path: Path
    buf: torch.Tensor | None = None
    step: int = -1
    value: int = 0
    members: tuple[tuple[int, int], ...] = ()  # (node index, blob bytes)
    parity_index: int = 0
    version: int = 0
    valid: bool = False

    def ensure(self, nbytes: int) -> torch.Tensor:
        if self.buf is None or self.buf.numel() != nbytes:
            self.buf = None
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.ftruncate(fd, nbytes)
                mm = mmap.mmap(fd, max(nbytes, 1), flags=mmap.MAP_SHARED)
            finally:
                os.close(fd)
            self.buf = torch.frombuffer(mm, dtype=torch.uint8)[:nbytes]
        return self.buf


@dataclass(slots=True)
class _Protected:
    job_id: str
    attempt: int
    layout: Layout
    me: int
    slots: dict[int, list[_Slot]] = field(default_factory=dict)  # stripe -> two slots
    previous: _Protected | None = None
    """The attempt before: still served (peers may be rebuilding from it) until this one
    protected a step newer than any it held, which needs every rank of this attempt running."""

    def newest(self) -> int:
        return max((s.step for slots in self.slots.values() for s in slots if s.valid),
                   default=-1)


class Protector:
    """Holds and serves this node's protection pieces; implements ``peers.PieceSource``."""

    def __init__(self, node: str, shm_dir: str, prefix_of: Callable[[str, int], str],
                 client: PeerClient, *, codec: Codec | None = None,
                 on_built: Callable[[], None] = lambda: None) -> None:
        self.node = node
        self._on_built = on_built
        """Called once a piece is verified: the agent reports it at once (the controller names
        the next round on that report), not at its next periodic heartbeat."""
        self.shm_dir = shm_dir
        self.prefix_of = prefix_of  # (job_id, rank) -> ShmSink prefix of this node
        self.client = client
        self.codec = codec or best_codec()
        self._lock = threading.Lock()
        self._thin_lock = threading.Lock()  # one decision per (rank, step), made once
        # (held across a decision's fetch of a replica's checksums, seconds on a slow link:
        # what a release or a new attempt clears takes this one, never that one)
        self._refs_lock = threading.Lock()
        self._served: dict[tuple[str, tuple[int, ...], int, bool],
                           tuple[float, blobs.NodeBlob]] = {}
        """Blobs served within ``_SERVED_S``, verified and cut (thin) once: the k holders of
        a round each ask for a segment of the same blob within moments. A rebuild asks later
        and gets a blob verified again (memory damaged meanwhile is refused, not served)."""
        self._sums: dict[tuple[str, int, int, tuple[object, ...]], list[int]] = {}
        self._refs: dict[tuple[str, int, int], tuple[int, int] | None] = {}
        """(job, attempt, rank) -> the replica found for it ((node index, rank)), or None when
        every node asked holds another layout: asked once per attempt, not per round."""
        self._jobs: dict[str, _Protected] = {}
        self._targets: dict[str, tuple[int, int]] = {}  # job id -> (attempt, round's step)
        self._wake = threading.Event()
        self._failed: dict[tuple[str, int, int], int] = {}
        """(job, attempt, stripe) -> the step whose build last failed: a round retried at
        every tick until a peer's ranks reach its step is logged once, not at every try."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hpt-protect", daemon=True)
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="hpt-pull")
        self.num_built = 0
        self.bytes_pulled = 0

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)  # a pull in flight gives up within its retries
        self._pool.shutdown(wait=False, cancel_futures=True)
        for job_id in list(self._jobs):
            self.release(job_id)

    # ---------------------------------------------------------------- attempts

    def protect(self, job_id: str, attempt: int, msg: checkpoint_pb2.ProtectionLayout) -> None:
        """Called at launch: from now on protect ``attempt`` of ``job_id`` by ``msg``."""
        layout = Layout.from_proto(msg)
        me = layout.index_of(self.node)
        drop = []
        with self._lock:
            old = self._jobs.pop(job_id, None)
            if old is not None and old.previous is not None:
                drop.append(old.previous)
                old.previous = None
            entry = self._jobs[job_id] = _Protected(job_id, attempt, layout, me or 0,
                                                    previous=old)
            if me is not None:
                for j, (_, parity) in layout.stripes.items():
                    if me in parity:
                        entry.slots[j] = [_Slot(self._piece_path(job_id, attempt, j, s))
                                          for s in range(2)]
        for e in drop:
            self._drop(e)
        with self._refs_lock:  # replicas found for attempts older than the one before
            for key in [k for k in self._refs if k[0] == job_id and k[1] < attempt - 1]:
                del self._refs[key]
        with self._lock:
            for failed in [k for k in self._failed if k[0] == job_id and k[1] < attempt]:
                del self._failed[failed]
        self._wake.set()

    def set_targets(self, targets: list[tuple[str, int, int]]) -> None:
        """The controller's current rounds: (job, attempt, step) for every protected attempt
        this node takes part in (the complete list; a job not named has no round now)."""
        new = {job_id: (attempt, step) for job_id, attempt, step in targets}
        with self._lock:
            changed, self._targets = new != self._targets, new
        if changed:
            self._wake.set()

    def notify(self) -> None:
        """A rank committed a snapshot: look for a newer step to protect."""
        self._wake.set()

    def release(self, job_id: str) -> None:
        with self._lock:
            entry = self._jobs.pop(job_id, None)
        with self._refs_lock:  # (not the decisions' lock: a fetch may hold it for seconds)
            for key in [k for k in self._refs if k[0] == job_id]:
                del self._refs[key]
        with self._lock:
            for served in [k for k in self._served if k[0] == job_id]:
                del self._served[served]
            for taken in [k for k in self._sums if k[0] == job_id]:
                del self._sums[taken]
            for failed in [k for k in self._failed if k[0] == job_id]:
                del self._failed[failed]
        while entry is not None:
            self._drop(entry)
            entry = entry.previous
        blobs.remove_files(self.shm_dir, self._job_piece_prefix(job_id))

    def _drop(self, entry: _Protected) -> None:
        for slots in entry.slots.values():
            for slot in slots:
                slot.buf = None
                slot.path.unlink(missing_ok=True)

    def _job_piece_prefix(self, job_id: str) -> str:
        # the job's part of a rank prefix ("<node prefix><job>-r0"): sweeps find pieces too
        return f"{self.prefix_of(job_id, 0).removesuffix('-r0')}-par-"

    def _piece_path(self, job_id: str, attempt: int, stripe: int, slot: int) -> Path:
        return Path(self.shm_dir) / f"{self._job_piece_prefix(job_id)}a{attempt}-s{stripe}-{slot}"

    # ---------------------------------------------------------------- reports

    def pieces(self) -> list[checkpoint_pb2.HeldPiece]:
        """Verified pieces held now (for the heartbeat)."""
        out = []
        with self._lock:
            for entry in self._jobs.values():
                for j, slots in entry.slots.items():
                    for slot in slots:
                        if slot.valid and slot.buf is not None:
                            out.append(checkpoint_pb2.HeldPiece(
                                job_id=entry.job_id, attempt=entry.attempt, stripe=j,
                                step=slot.step, bytes=slot.buf.numel()))
        return out

    def parity_bytes(self, job_id: str) -> int:
        with self._lock:
            entry = self._jobs.get(job_id)
            if entry is None:
                return 0
            return sum(s.buf.numel() for e in (entry, entry.previous) if e is not None
                       for slots in e.slots.values() for s in slots if s.buf is not None)

    # ---------------------------------------------------------------- PieceSource

    def open_piece(self, request: checkpoint_pb2.FetchRequest) -> Piece:
        if request.kind == checkpoint_pb2.PIECE_KIND_SEGMENT:
            return self._open_segment(request.job_id, list(request.ranks), request.step,
                                      request.k, request.index, request.thin)
        if request.kind == checkpoint_pb2.PIECE_KIND_PARITY:
            return self._open_parity(request.job_id, request.attempt, request.stripe,
                                     request.step)
        if request.kind == checkpoint_pb2.PIECE_KIND_SUMS:
            return self._open_sums(request.job_id, list(request.ranks), request.step,
                                   request.layout_digest)
        raise PieceUnavailable(f"kind ({request.kind}) must be SEGMENT, PARITY or SUMS")

    def _verified_blob(self, job_id: str, ranks: list[int], step: int) -> blobs.NodeBlob:
        try:
            blob = blobs.NodeBlob(self.shm_dir, [(r, self.prefix_of(job_id, r)) for r in ranks],
                                  step)
        except (blobs.BlobError, ValueError) as exc:
            raise PieceUnavailable(f"[{self.node}] {exc}") from exc
        bad = blob.verify()
        if bad:
            raise PieceUnavailable(f"[{self.node}] snapshot of step {step} of rank(s) {bad} "
                                   "fails its checksums")
        return blob

    def _open_segment(self, job_id: str, ranks: list[int], step: int, k: int,
                      index: int, thin: bool = False) -> Piece:
        if not ranks or not 1 <= k <= 255 or index >= k:
            raise PieceUnavailable(f"segment request invalid (ranks {ranks}, k {k}, "
                                   f"index {index})")
        key, now = (job_id, tuple(ranks), step, thin), time.monotonic()
        with self._lock:
            at, blob = self._served.get(key, (0.0, None))
        if blob is None or now - at > _SERVED_S or not blob.intact():
            blob = self._verified_blob(job_id, ranks, step)
            if thin:
                plans = self._thin_plans(job_id, blob)
                if plans:
                    blob.thin(plans)
            with self._lock:
                self._served[key] = (now, blob)
                while len(self._served) > _SERVED_BLOBS:
                    del self._served[next(iter(self._served))]
        size = blobs.segment_bytes(blob.nbytes, k)
        base = index * size
        header = checkpoint_pb2.PieceHeader(piece_bytes=size, blob_bytes=blob.nbytes)
        return Piece(header, lambda off, n: blob.view(base + off, n), blob.intact)

    def _open_sums(self, job_id: str, ranks: list[int], step: int, digest: str = "") -> Piece:
        """The block checksums of one rank's snapshot of ``step`` (a thin blob's reference),
        when its layout is ``digest`` (any, when empty)."""
        if len(ranks) != 1:
            raise PieceUnavailable(f"sums request invalid (ranks {ranks}: one rank)")
        try:  # not verified first: a damaged block's checksum differs, so it is never left out
            blob = blobs.NodeBlob(self.shm_dir, [(ranks[0], self.prefix_of(job_id, ranks[0]))],
                                  step)
        except (blobs.BlobError, ValueError) as exc:
            raise PieceUnavailable(f"[{self.node}] {exc}") from exc
        (_, _, _, snap), = blob.parts()
        if digest and snap.layout.digest != digest:
            raise PieceUnavailable(f"[{self.node}] rank {ranks[0]} holds {_OTHER_LAYOUT}")
        total = snap.layout.total_bytes
        sums = self._block_sums(job_id, ranks[0], step, snap)
        if not blob.intact():
            raise PieceUnavailable(f"[{self.node}] rank {ranks[0]}'s step {step} was overwritten")
        data = json.dumps({"bytes": total, "sums": [f"{v:016x}" for v in sums]}).encode()
        header = checkpoint_pb2.PieceHeader(piece_bytes=len(data))
        return Piece(header, lambda off, n: data[off:off + n], lambda: True)

    def _block_sums(self, job_id: str, rank: int, step: int, snap: Snapshot) -> list[int]:
        """Block checksums of a rank's snapshot, taken once: a round needs them twice on each
        node (its own thin decision, and the answer to the node before it)."""
        key = (job_id, rank, step, tuple(snap.checksums))
        with self._lock:
            sums = self._sums.get(key)
        if sums is None:
            sums = block_checksums(snap.buffer, blobs.block_bytes(snap.layout.total_bytes))
            with self._lock:
                self._sums[key] = sums
                while len(self._sums) > _SERVED_BLOBS:
                    del self._sums[next(iter(self._sums))]
        return sums

    def _thin_plans(self, job_id: str, blob: blobs.NodeBlob) -> dict[int, blobs.Thin]:
        """Rank -> the blocks its blob leaves out, decided once per (rank, step) and kept
        beside the rank's generation (``<prefix>.g<N>.thin``), so every segment of the blob
        served for that step, in a round or in a rebuild, comes from the same blob. Only a
        snapshot is compared with a replica of the same layout on another node
        (``Layout.references``: fetched block checksums); without one nothing is left out."""
        with self._lock:
            entry = self._jobs.get(job_id)
        me = entry.layout.index_of(self.node) if entry is not None else None
        plans = {}
        with self._thin_lock:
            for rank, sink, generation, snap in blob.parts():
                total = snap.layout.total_bytes
                if total < 2 * blobs.block_bytes(total):
                    continue
                path = sink.thin_path(generation)
                sums_of = [c.to_json() for c in snap.checksums]
                try:
                    plan = _read_thin(path, blob.step, sums_of, total)
                except LookupError:  # not decided for this snapshot yet
                    plan = (self._compare(entry, me, rank, blob.step, snap)
                            if entry is not None and me is not None else None)
                    try:
                        _write_thin(path, blob.step, sums_of, plan)
                    except OSError as exc:  # unkept, a later segment might differ: serve none
                        raise PieceUnavailable(f"[{self.node}] cannot keep the thin blob "
                                               f"decision for rank {rank}: {exc}") from exc
                if plan is not None:
                    plans[rank] = plan
        return plans

    def _compare(self, entry: _Protected, me: int, rank: int, step: int,
                 snap: Snapshot) -> blobs.Thin | None:
        """The blocks of ``snap`` a replica on another node holds too (None: none, or no
        replica answered). The replica is looked for once per attempt (``_refs``)."""
        key = (entry.job_id, entry.attempt, rank)
        with self._refs_lock:
            known = key in self._refs
            found = self._refs.get(key)
        candidates = ([found] if found else []) if known else entry.layout.references(me, rank)
        definite = True  # every node asked answered "another layout"
        deadline = time.monotonic() + _SUMS_TIMEOUT_S  # the search, all nodes together
        for node, other in candidates:
            if time.monotonic() >= deadline:
                definite = False
                break
            request = checkpoint_pb2.FetchRequest(
                job_id=entry.job_id, attempt=entry.attempt, step=step,
                kind=checkpoint_pb2.PIECE_KIND_SUMS, ranks=[other],
                layout_digest=snap.layout.digest)
            try:
                _, raw = self.client.fetch(entry.layout.nodes[node].peer_address, request,
                                           timeout_s=max(deadline - time.monotonic(), 0.05))
                reply = json.loads(blobs.tensor_bytes(raw))
                sums = [int(v, 16) for v in reply["sums"]]
            except PieceUnavailable as exc:
                if "holds no snapshot of step" in str(exc):  # not saved there yet: later
                    raise PieceUnavailable(f"[{self.node}] step {step} not yet at rank {other},"
                                           " a replica its blob is compared with") from exc
                definite &= _OTHER_LAYOUT in str(exc)
                continue
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.info("[%s/%d/%s/-] step %d: bad block checksums from rank %d (%s)",
                         entry.job_id, entry.attempt, self.node, step, other, exc)
                definite = False
                continue
            with self._refs_lock:
                self._refs[key] = (node, other)
            return blobs.thin_against(snap.buffer, sums, other,
                                      self._block_sums(entry.job_id, rank, step, snap))
        if not known:
            if definite:
                with self._refs_lock:  # sharded state: no replica anywhere near, ask no more
                    self._refs[key] = None
            log.info("[%s/%d/%s/-] step %d: no replica of rank %d's snapshot answered%s: its "
                     "blob is served whole", entry.job_id, entry.attempt, self.node, step, rank,
                     " (none holds its layout)" if definite else "")
        return None

    def _open_parity(self, job_id: str, attempt: int, stripe: int, step: int) -> Piece:
        with self._lock:
            entry = self._jobs.get(job_id)
            if entry is not None and entry.attempt != attempt:
                entry = entry.previous
            slots = entry.slots.get(stripe, []) if entry and entry.attempt == attempt else []
            found = [s for s in slots if s.valid and s.step == step and s.buf is not None]
        if not found:
            raise PieceUnavailable(f"[{self.node}] no parity of stripe {stripe} at step {step}")
        slot = found[0]
        buf, version = slot.buf, slot.version
        assert buf is not None
        if checksum(buf) != slot.value:
            with self._lock:
                slot.valid = False
            raise PieceUnavailable(f"[{self.node}] parity of stripe {stripe} at step {step} "
                                   "fails its checksum (dropped)")
        header = checkpoint_pb2.PieceHeader(
            piece_bytes=buf.numel(), parity_index=slot.parity_index,
            members=[checkpoint_pb2.MemberBlob(node_index=i, blob_bytes=b)
                     for i, b in slot.members])
        return Piece(header, lambda off, n: chunks.shm_view(buf.data_ptr() + off, n),
                     lambda: slot.version == version and slot.valid)

    # ---------------------------------------------------------------- the protector thread

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(_TICK_S)
            self._wake.clear()
            with self._lock:
                work = [(e, j) for e in self._jobs.values() for j in e.slots]
            for entry, stripe in work:
                if self._stop.is_set():
                    return
                key = (entry.job_id, entry.attempt, stripe)
                try:
                    if self.build(entry, stripe) is not None:
                        with self._lock:
                            self._failed.pop(key, None)
                except (PieceUnavailable, blobs.BlobError, OSError, ValueError) as exc:
                    with self._lock:
                        step = self._targets.get(entry.job_id, (0, -1))[1]
                        again = self._failed.get(key) == step
                        self._failed[key] = step
                    log.log(logging.DEBUG if again else logging.INFO,
                            "[%s/%d/%s/-] stripe %d not protected this round: %s%s",
                            entry.job_id, entry.attempt, self.node, stripe, exc,
                            "" if again else " (retried until the round moves on)")

    def build(self, entry: _Protected, stripe: int) -> int | None:
        """Protect the step of the attempt's current round on ``stripe``; returns it, or None
        when there is no round or this stripe holds that step (or a newer one) already."""
        layout = entry.layout
        data, parity = layout.stripes[stripe]
        slots = entry.slots[stripe]
        with self._lock:
            attempt, step = self._targets.get(entry.job_id, (0, -1))
        if attempt != entry.attempt or step < 0:
            return None
        if any(s.valid and s.step >= step for s in slots):
            return None
        if not self._reached(entry, step):
            return None  # a round named ahead of the ranks: nothing to pull yet
        # the k segments come from k nodes: pull them at the same time
        pulled = list(self._pool.map(lambda member: self._segment(entry, member, stripe, step),
                                     data))
        segments = [seg for _, seg in pulled]
        members = [(member, int(header.blob_bytes))
                   for member, (header, _) in zip(data, pulled, strict=True)]
        size = max(s.numel() for s in segments)
        segments = [s if s.numel() == size else _padded(s, size) for s in segments]
        row = parity.index(entry.me)
        target = min(slots, key=lambda s: (s.valid, s.step))  # never the newest valid one
        with self._lock:
            target.valid = False
            target.version += 1
        out = target.ensure(size)
        if len(data) == 1:
            out.copy_(segments[0])  # a mirror
        else:
            rows = [out if r == row else torch.empty(size, dtype=torch.uint8)
                    for r in range(len(parity))]
            self.codec.encode(segments, rows)
        value = checksum(out)
        with self._lock:
            target.step, target.value, target.members = step, value, tuple(members)
            target.parity_index, target.valid = row, True
            self.num_built += 1
            old = entry.previous
            if old is not None and step > old.newest():
                entry.previous = None
            else:
                old = None
        if old is not None:
            self._drop(old)
        log.debug("[%s/%d/%s/-] stripe %d protected at step %d (%d bytes)", entry.job_id,
                  entry.attempt, self.node, stripe, step, size)
        self._on_built()
        return step

    def _reached(self, entry: _Protected, step: int) -> bool:
        """This node's ranks of the attempt have saved ``step`` or a later one (the ranks of
        a job step together, so its data members are about there too)."""
        for rank in entry.layout.nodes[entry.me].ranks:
            if max(blobs.held_steps(self.shm_dir, self.prefix_of(entry.job_id, rank)),
                   default=-1) < step:
                return False
        return True

    def _segment(self, entry: _Protected, member: int, stripe: int,
                 step: int) -> tuple[checkpoint_pb2.PieceHeader, torch.Tensor]:
        request = entry.layout.segment_request(entry.job_id, entry.attempt, step, member, stripe)
        return self.fetch(entry.layout, member, request, local=member == entry.me)

    def stream_all(self, jobs: list[tuple[Layout, int, checkpoint_pb2.FetchRequest, bool,
                                          ChunkSink]], opened: list[Piece] | None = None,
                   ) -> list[checkpoint_pb2.PieceHeader | Exception]:
        """Several pieces at once, each delivered chunk by chunk to its sink (``PeerClient.
        stream``; a local piece straight from this node's memory); a failed one gives its
        exception. A local piece's views point into its memory: the pieces stay open in
        ``opened`` (the caller's, when a sink keeps views after this returns: a decoder
        waiting for another source's bytes), else until every stream is done."""
        if opened is None:
            opened = []

        def one(job):  # type: ignore[no-untyped-def]
            layout, member, request, local, sink = job
            try:
                if not local:
                    header = self.client.stream(layout.nodes[member].peer_address, request, sink,
                                                timeout_s=_FETCH_TIMEOUT_S)
                    self.bytes_pulled += header.piece_bytes
                    return header
                piece = self.open_piece(request)
                opened.append(piece)
                total = piece.header.piece_bytes
                for offset in range(0, total, _LOCAL_CHUNK_BYTES):
                    n = min(_LOCAL_CHUNK_BYTES, total - offset)
                    sink(piece.header, offset, memoryview(piece.read(offset, n)))
                if not piece.intact():
                    raise PieceUnavailable(f"[{self.node}] the local source changed while read")
                return piece.header
            except (PieceUnavailable, blobs.BlobError, OSError) as exc:
                return exc
        return list(self._pool.map(one, jobs))

    def fetch(self, layout: Layout, member: int, request: checkpoint_pb2.FetchRequest, *,
              local: bool) -> tuple[checkpoint_pb2.PieceHeader, torch.Tensor]:
        """One piece from node ``member`` of ``layout`` (this node's memory when ``local``)."""
        if local:
            piece = self.open_piece(request)
            out = torch.empty(piece.header.piece_bytes, dtype=torch.uint8)
            chunks.copy_into(out.data_ptr(), piece.read(0, out.numel()))
            if not piece.intact():
                raise PieceUnavailable(f"[{self.node}] the local source changed while read")
            return piece.header, out
        header, out = self.client.fetch(layout.nodes[member].peer_address, request,
                                        timeout_s=_FETCH_TIMEOUT_S)
        self.bytes_pulled += out.numel()
        return header, out


def _read_thin(path: Path, step: int, sums_of: list, total: int,  # type: ignore[type-arg]
               ) -> blobs.Thin | None:
    """The thin decision kept for this generation (None: nothing left out).

    Raises:
        LookupError: none is kept for this very snapshot (or it is unreadable).
    """
    try:
        rec = json.loads(path.read_text())
        if rec.get("step") == step and rec.get("checksums") == sums_of:
            return (blobs.Thin.from_json(rec["thin"], total, str(path))
                    if rec.get("thin") else None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    raise LookupError(path)


def _write_thin(path: Path, step: int, sums_of: list,  # type: ignore[type-arg]
                plan: blobs.Thin | None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"step": step, "checksums": sums_of,
                               "thin": plan.to_json() if plan else None}))
    os.replace(tmp, path)


def _padded(t: torch.Tensor, size: int) -> torch.Tensor:
    out = torch.zeros(size, dtype=torch.uint8)
    out[:t.numel()].copy_(t)
    return out


__all__ = ["GroupNode", "Layout", "Protector"]
