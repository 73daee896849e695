"""Before a new attempt's ranks start: put every old snapshot they need into this node's memory.

The controller's ``RestorePlan`` names the step, the old attempt's protection layout, the old
nodes whose memory is gone (``lost``) and the old ranks this node's new ranks need. For each
such rank the sources are tried in order, each verified by checksum before use:

1. this node's shared memory (a rank that ran here, or was materialised here before);
2. the old node that ran it, if it survived: its whole blob (k = 1 segment) over the peer
   service, verified at the source and per chunk;
3. decoding: the lost node's blob is rebuilt stripe by stripe from the surviving data members'
   segments and the parity pieces (``hpt.ckpt.codec``; k = 1 stripes are mirrors), then
   checked against every rank's commit-record checksums.

The result is ordinary ``ShmSink`` files named by ``SnapshotKeeper.prefix(job, old_rank)`` in
the agent's shared-memory directory; ``restore_shards_env`` lists them for the ranks in
``HPT_RESTORE_SHARDS`` (the rank side reads it; a restore at the same world size needs only its
own old rank's entry, a resize any of them).
"""

from __future__ import annotations

import json
import logging
import threading
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hpt._proto import checkpoint_pb2
from hpt.agent import blob as blobs
from hpt.agent.peers import Piece, PieceUnavailable
from hpt.agent.protect import Layout, Protector
from hpt.ckpt.checksum import block_checksums
from hpt.ckpt.errors import CkptError, DecodeError
from hpt.ckpt.layout import Layout as LayoutOf
from hpt.ckpt.sink import ShmSink, SnapshotRef
from hpt.ckpt.sources import replica_rank, split_needs

log = logging.getLogger(__name__)

class MaterialiseError(Exception):
    """An old rank's snapshot could not be put in place from any source."""

@dataclass(frozen=True, slots=True)
class Materialised:
    """Where each old rank's snapshot of ``step`` came from (rank -> "local"|"peer"|"decoded"),
    and the old ranks of the plan left alone because no new rank here reads them."""

    step: int
    sources: dict[int, str]
    not_needed: tuple[int, ...] = ()
    why: str = ""
    """Why the old ranks in ``not_needed`` are: what the new ranks here read instead."""

def materialise(protector: Protector, job_id: str, plan: checkpoint_pb2.RestorePlan,
                adopt, *, new_ranks: Sequence[int] = (),  # type: ignore[no-untyped-def]
                world_size: int = 0) -> Materialised:
    """Make every rank of ``plan.need_ranks`` hold ``plan.step`` in this node's memory.

    ``adopt(rank, step, generation, nbytes)`` registers a written snapshot with the keeper.
    ``new_ranks`` and ``world_size`` (this node's ranks in the new attempt, and its world)
    narrow a resize of data-parallel state (no sharded tensor: every rank holds the same model
    and optimizer; ``plan.replicated``, or this node's own old snapshots say so): a new rank
    reads one replica (``hpt.ckpt.sources.replica_rank``, as the rank side does): its
    preferred old rank when this node holds it, else one this node holds, else its preferred
    one or another whose node survived, fetched whole. The other old
    ranks, the lost nodes' among them, are neither fetched nor decoded: the replicas that
    survived are the protection. The same at the same world size when the controller found no
    step recoverable rank for rank (``plan.any_replica``).

    Raises:
        MaterialiseError: a needed rank is in no source (the caller starts the ranks anyway;
            they fall back to disk or scratch and say so).
    """
    layout = Layout.from_proto(plan.layout)
    step, lost = plan.step, set(plan.lost)
    me = layout.index_of(protector.node)
    sources: dict[int, str] = {}
    need = sorted(set(plan.need_ranks))
    not_needed: list[int] = []
    owners = layout.owners()
    read: set[int] | None = None
    why = ""
    if new_ranks and world_size and (world_size != plan.world_size or plan.any_replica):
        if plan.replicated or _replicated(protector, job_id, need, step):
            held = {r for r in need if _held(protector, job_id, r, step)}
            alive = {r for r in need if owners.get(r, -1) not in lost}
            read = {replica_rank(r, plan.world_size, held, alive) for r in new_ranks}
            why = "no sharded tensor: each new rank reads one surviving replica"
        else:
            read = split_needs(_held_layouts(protector, job_id, need, step), plan.world_size,
                               new_ranks, world_size)
            why = ("split evenly on one dim: no new rank here takes part of their slices; "
                   "the new ranks' slices lie in the others")
    if read is not None and read & set(need) < set(need):
        not_needed = [r for r in need if r not in read]
        need = sorted(read & set(need))
        log.info("[%s/-/%s/-] step %d: old rank(s) %s not needed here (%s; new ranks %s read "
                 "old rank(s) %s)", job_id, protector.node, step, not_needed, why,
                 sorted(new_ranks), need)
    missing = [r for r in need if not _local_ok(protector, job_id, r, step)]
    sources.update({r: "local" for r in need if r not in missing})
    by_owner: dict[int, list[int]] = {}
    for rank in missing:
        if rank not in owners:
            raise MaterialiseError(f"old rank {rank} is not in the old attempt's layout")
        by_owner.setdefault(owners[rank], []).append(rank)
    for owner, ranks in sorted(by_owner.items()):
        how = ""
        if owner not in lost and owner != me:
            try:
                rebuild(protector, job_id, plan.attempt, layout, owner, step, ranks, set(),
                        adopt)
                how = "peer"
            except MaterialiseError as exc:
                log.warning("[%s/-/%s/-] old node %s cannot serve step %d (%s); decoding",
                            job_id, protector.node, layout.nodes[owner].node, step, exc)
        if not how:
            rebuild(protector, job_id, plan.attempt, layout, owner, step, ranks,
                    lost | {owner}, adopt)
            how = "decoded"
        sources.update({r: how for r in ranks})
    return Materialised(step, sources, tuple(not_needed), why if not_needed else "")

def _replicated(protector: Protector, job_id: str, ranks: list[int], step: int) -> bool:
    """Every old snapshot of ``step`` this node holds (one at least) has no sharded tensor."""
    layouts = _held_layouts(protector, job_id, ranks, step)
    return bool(layouts) and all(layout.is_replica for layout in layouts.values())

def _held_layouts(protector: Protector, job_id: str, ranks: list[int],
                  step: int) -> dict[int, LayoutOf]:
    """The layouts of the old snapshots of ``step`` this node holds (commit records only)."""
    out = {}
    for rank in ranks:
        sink = ShmSink(protector.prefix_of(job_id, rank), directory=protector.shm_dir)
        generation = blobs.find_generation(sink, step)
        if generation is None:
            continue
        try:
            out[rank] = sink.layout(SnapshotRef(step=step, generation=generation))
        except (OSError, ValueError, CkptError):
            continue
    return out

def _held(protector: Protector, job_id: str, rank: int, step: int) -> bool:
    """This node's memory holds a committed snapshot of ``step`` of old rank ``rank``."""
    sink = ShmSink(protector.prefix_of(job_id, rank), directory=protector.shm_dir)
    return blobs.find_generation(sink, step) is not None

def _local_ok(protector: Protector, job_id: str, rank: int, step: int) -> bool:
    prefix = protector.prefix_of(job_id, rank)
    try:
        blob = blobs.NodeBlob(protector.shm_dir, [(rank, prefix)], step)
    except blobs.BlobError:
        return False
    if blob.verify():
        log.error("[%s/-/%s/%d] local snapshot of step %d fails its checksums: rebuilding it",
                  job_id, protector.node, rank, step)
        return False
    return True

def rebuild(protector: Protector, job_id: str, attempt: int, layout: Layout, target: int,
            step: int, ranks: list[int], lost: set[int], adopt) -> None:  # type: ignore[no-untyped-def]
    """Write node ``target``'s snapshots of ``ranks`` at ``step`` into this node's memory.

    ``lost`` empty: the target itself serves its whole blob (one segment). Else the blob is
    decoded: every stripe's k pieces (surviving data members' segments, parity pieces) stream
    at once and are decoded chunk by chunk, as the same byte range of all of them has arrived.
    Either way the bytes go straight where they belong: the blob's header comes first (it
    starts segment 0), says where each rank's buffer lies, and every later range is written
    into the ``ShmSink`` buffer of its rank (ranges of ranks not wanted are not decoded at all).
    No piece and no whole blob is ever held: the memory a rebuild needs is the snapshots it
    writes plus the chunks in flight. A stripe whose source fails is streamed again with a
    spare parity piece in its place. Each snapshot is verified against its checksums before it
    is committed and ``adopt(rank, step, generation, nbytes)`` is called.

    Raises:
        MaterialiseError: too few sources, or what arrived does not verify.
    """
    me = layout.index_of(protector.node)
    stripes = layout.data_stripes(target) if lost else [-1]
    if not stripes:
        raise MaterialiseError(f"no stripe describes node {layout.nodes[target].node}")
    assembly = _Assembly(protector, job_id, step, ranks, len(stripes), target)
    sources: dict[int, list[int]] = {}  # stripe -> shard positions to stream (k of them)
    spare: dict[int, list[int]] = {-1: []}
    if not lost:
        sources[-1] = [0]  # the owner's own blob, k = 1
    for stripe in stripes if lost else []:
        data, parity = layout.stripes[stripe]
        k = len(data)
        alive = [pos for pos, n in enumerate(data) if n not in lost]
        parity_alive = [k + i for i, n in enumerate(parity) if n not in lost]
        need = max(k - len(alive), 1)  # parity pieces: one at least, for the sizes
        sources[stripe] = parity_alive[:need] + alive
        spare[stripe] = parity_alive[need:]
    todo = list(stripes)
    opened: list[Piece] = []  # local pieces, whose views decoders may hold till the end
    try:
        while todo:
            decoders = {}
            for stripe in todo:
                k, m, position = ((1, 0, 0) if stripe < 0 else
                                  (len(layout.stripes[stripe][0]), len(layout.stripes[stripe][1]),
                                   layout.stripes[stripe][0].index(target)))
                decoders[stripe] = _StripeDecoder(assembly, protector.codec,
                                                  stripes.index(stripe), k, m, position)
            assembly.decoders = list(decoders.values())
            if assembly.spans is None:  # a new segment 0 decodes the header from its start
                assembly.head, assembly.head_len = bytearray(), -1
            jobs, owners = [], []
            for stripe in todo:
                for pos in sources[stripe]:
                    if stripe < 0:
                        node, request = target, checkpoint_pb2.FetchRequest(
                            job_id=job_id, attempt=attempt, step=step,
                            kind=checkpoint_pb2.PIECE_KIND_SEGMENT,
                            ranks=layout.nodes[target].ranks, k=1)
                    else:
                        data, parity = layout.stripes[stripe]
                        node = data[pos] if pos < len(data) else parity[pos - len(data)]
                        request = (layout.segment_request(job_id, attempt, step, node, stripe)
                                   if pos < len(data) else
                                   checkpoint_pb2.FetchRequest(
                                       job_id=job_id, attempt=attempt, step=step,
                                       kind=checkpoint_pb2.PIECE_KIND_PARITY, stripe=stripe))
                    jobs.append((layout, node, request, node == me, decoders[stripe].sink(pos)))
                    owners.append((stripe, pos, node))
            results = protector.stream_all(jobs, opened)
            retry = []
            for (stripe, pos, node), result in zip(owners, results, strict=True):
                if isinstance(result, Exception):
                    log.warning("[%s/-/%s/-] piece %d of stripe %d from %s: %s", job_id,
                                protector.node, pos, stripe, layout.nodes[node].node, result)
                    sources[stripe].remove(pos)
                    if not spare[stripe]:
                        raise MaterialiseError(f"stripe {stripe} at step {step}: fewer than k "
                                               f"pieces reachable ({result})")
                    sources[stripe].append(spare[stripe].pop(0))
                    if stripe not in retry:
                        retry.append(stripe)
                else:
                    decoders[stripe].finish(pos, result)
            for stripe, decoder in decoders.items():
                if stripe not in retry:
                    decoder.check(step)
            todo = retry
        assembly.commit(adopt, lambda part, buf: _fill(protector, job_id, attempt, layout,
                                                       step, lost | {target}, part, buf))
    finally:
        assembly.close()

def _fill(protector: Protector, job_id: str, attempt: int, layout: Layout, step: int,
          gone: set[int], part: blobs.Part, buf: torch.Tensor) -> None:
    """Copy into ``buf`` the blocks of ``part`` its thin blob left out, each from a surviving
    replica of ``step`` whose same block has the checksum the blob recorded: this node's
    own ranks first, then the rank it was compared with, then the others (whole blobs
    fetched from their nodes, verified at the source).

    Raises:
        BlobError: a left-out block matches no surviving replica.
    """
    assert part.thin is not None
    block, left = part.thin.block, dict(part.thin.omit)
    me = layout.index_of(protector.node)
    owners = layout.owners()
    candidates = sorted((r for r, i in owners.items() if i not in gone and r != part.rank),
                        key=lambda r: (owners[r] != me, r != part.thin.ref, r))
    for rank in candidates:
        if not left:
            break
        try:
            replica = _replica(protector, job_id, attempt, layout, owners[rank] == me,
                               owners[rank], rank, step)
        except (PieceUnavailable, blobs.BlobError, OSError, ValueError) as exc:
            log.info("[%s/-/%s/-] step %d: replica of rank %d unavailable for rank %d's "
                     "left-out blocks (%s)", job_id, protector.node, step, rank, part.rank, exc)
            continue
        if replica.numel() != part.nbytes:
            continue
        sums = block_checksums(replica, block)
        found = [i for i, value in left.items() if sums[i] == value]
        for first, last in _runs(found):  # consecutive blocks in one copy
            lo, hi = first * block, min((last + 1) * block, part.nbytes)
            buf[lo:hi].copy_(replica[lo:hi])
        for index in found:
            del left[index]
    if left:
        raise blobs.BlobError(f"{len(left)} block(s) of rank {part.rank}'s step {step} left "
                              "out of its blob match no surviving replica")

def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Ascending ``indices`` as (first, last) runs of consecutive ones."""
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out

def _replica(protector: Protector, job_id: str, attempt: int, layout: Layout, local: bool,
             owner: int, rank: int, step: int) -> torch.Tensor:
    """Old rank ``rank``'s buffer of ``step``: in place in this node's memory (verified), or
    fetched whole from node ``owner``."""
    if local:
        blob = blobs.NodeBlob(protector.shm_dir, [(rank, protector.prefix_of(job_id, rank))],
                              step)
        if blob.verify():
            raise blobs.BlobError(f"local snapshot of rank {rank} fails its checksums")
        (_, _, _, snap), = blob.parts()
        return snap.buffer
    request = checkpoint_pb2.FetchRequest(job_id=job_id, attempt=attempt, step=step,
                                          kind=checkpoint_pb2.PIECE_KIND_SEGMENT,
                                          ranks=[rank], k=1)
    header, raw = protector.fetch(layout, owner, request, local=False)
    head = 16 + blobs.header_length(blobs.tensor_bytes(raw[:16]))
    _, (other,) = blobs.parse_header(blobs.tensor_bytes(raw[:head]), int(header.blob_bytes))
    if other.thin is not None:
        raise blobs.BlobError(f"rank {rank}'s blob came thin")
    return raw[other.offset:other.offset + other.nbytes]

class _Assembly:
    """Where the rebuilt blob's bytes go.

    Segment 0 starts with the blob's header: its decoder writes the first bytes into ``head``
    until the whole header is there, then the header is parsed and every wanted rank gets its
    ``Landing`` (a ShmSink buffer); ``spans`` maps blob offsets onto them from then on and the
    other segments' decoders, which waited with their chunks, go on. A header longer than
    segment 0 (a blob of tiny snapshots cut into many segments) lands the whole blob in one
    buffer instead, parsed and copied out at the end.
    """

    def __init__(self, protector: Protector, job_id: str, step: int, ranks: list[int],
                 segments: int, target: int) -> None:
        self.protector, self.job_id, self.step = protector, job_id, step
        self.wanted, self.segments, self.target = set(ranks), segments, target
        self.lock = threading.Lock()
        self.blob_bytes = -1
        self.each = 0
        self.head = bytearray()
        self.head_len = -1
        self.spans: list[tuple[int, int, torch.Tensor]] | None = None
        self.parts: list[tuple[blobs.Part, blobs.Landing]] = []
        self.whole: torch.Tensor | None = None  # the fallback: the blob in one buffer
        self.decoders: list[_StripeDecoder] = []

    def learn(self, header: checkpoint_pb2.PieceHeader, whole: bool) -> None:
        """The blob's size, from the first header that names it."""
        with self.lock:
            if self.blob_bytes >= 0:
                return
            if whole:
                self.blob_bytes = int(header.blob_bytes)
            for member in header.members:
                if member.node_index == self.target:
                    self.blob_bytes = int(member.blob_bytes)
            if self.blob_bytes >= 0:
                self.each = blobs.segment_bytes(self.blob_bytes, self.segments)

    def head_need(self) -> int:
        """Bytes of the blob's start still to be decoded before the header can be parsed."""
        if len(self.head) < 16:
            return 16 - len(self.head)
        if self.head_len < 0:
            self.head_len = 16 + blobs.header_length(bytes(self.head[:16]))
            if self.head_len > min(self.each, self.blob_bytes):
                self.whole = torch.empty(self.blob_bytes, dtype=torch.uint8)
                self.whole[:len(self.head)].copy_(torch.frombuffer(self.head, dtype=torch.uint8))
                self.spans = [(0, self.blob_bytes, self.whole)]
                return 0
        return self.head_len - len(self.head)

    def resolve(self) -> None:
        """The header is complete: a Landing for every wanted rank (a thin blob's rank: one
        span per run of kept blocks)."""
        self._land()
        self.spans = sorted(((at, at + end - start, landing.buf[start:end])
                             for p, landing in self.parts for at, start, end in p.spans()),
                            key=lambda span: span[0])

    def _land(self) -> None:
        """Parse the header in ``head``; a Landing for every wanted rank."""
        found_step, parts = blobs.parse_header(bytes(self.head), self.blob_bytes)
        if found_step != self.step:
            raise blobs.BlobError(f"rebuilt blob holds step {found_step}, not {self.step}")
        missing = self.wanted - {p.rank for p in parts}
        if missing:
            raise blobs.BlobError(f"blob of step {self.step} lacks rank(s) {sorted(missing)}")
        for part in parts:
            if part.rank in self.wanted:
                prefix = self.protector.prefix_of(self.job_id, part.rank)
                self.parts.append((part, blobs.Landing(self.protector.shm_dir, prefix,
                                                       self.step, part.layout)))

    def commit(self, adopt, fill) -> None:  # type: ignore[no-untyped-def]
        """Verify and commit every wanted rank's snapshot, each adopted once committed;
        ``fill(part, buf)`` first copies the blocks a thin blob left out from a replica."""
        try:
            if self.whole is not None:  # the fallback: parse the blob, copy each rank out
                self.head = bytearray(blobs.tensor_bytes(self.whole[:self.head_len]))
                self._land()
                for part, landing in self.parts:
                    for at, start, end in part.spans():
                        landing.buf[start:end].copy_(self.whole[at:at + end - start])
            for part, landing in self.parts:
                if part.thin is not None:
                    fill(part, landing.buf)
            while self.parts:
                part, landing = self.parts[0]
                generation = landing.commit(part.meta_json, part.checksums)
                self.parts.pop(0)
                adopt(part.rank, self.step, generation, part.nbytes)
        except blobs.BlobError as exc:
            raise MaterialiseError(str(exc)) from exc

    def close(self) -> None:
        """Drop what was not committed (a failed rebuild leaves no half snapshot behind: a
        Landing has no commit record, so nothing reads its buffer)."""
        for _, landing in self.parts:
            landing.sink.discard(landing.generation)
        self.parts = []

class _StripeDecoder:
    """Decodes one segment of the blob as the same range of its k sources arrives.

    Each source's chunks come in order and contiguous (``PeerClient.stream``); they wait here
    only until the other sources reach the same bytes (or, for segments after the first, until
    the blob's header says where the bytes go). A source shorter than the range (a segment
    padded to the stripe's longest member) counts as zeros past its end.
    """

    def __init__(self, assembly: _Assembly, codec, segment: int, k: int, m: int,  # type: ignore[no-untyped-def]
                 position: int) -> None:
        self.assembly, self.codec = assembly, codec
        self.segment, self.k, self.m, self.position = segment, k, m, position
        self.whole = m == 0  # the target's own blob, not a stripe
        self.lock = threading.Lock()
        self.pending: dict[int, deque[tuple[int, memoryview]]] = {}
        self.length: dict[int, int] = {}
        self.done = 0
        self.error = ""
        self._zeros = torch.zeros(0, dtype=torch.uint8)

    def sink(self, pos: int):  # type: ignore[no-untyped-def]
        self.pending[pos] = deque()

        def feed(header: checkpoint_pb2.PieceHeader, offset: int, view: memoryview) -> None:
            with self.lock:
                self.length[pos] = header.piece_bytes
                self.pending[pos].append((offset, view))
            self._learn(pos, header)
            self._poke()
        return feed

    def finish(self, pos: int, header: checkpoint_pb2.PieceHeader) -> None:
        with self.lock:
            self.length[pos] = header.piece_bytes
        self._learn(pos, header)
        self._poke()

    def _learn(self, pos: int, header: checkpoint_pb2.PieceHeader) -> None:
        if self.whole or pos >= self.k:
            self.assembly.learn(header, self.whole)

    def _poke(self) -> None:
        with self.lock:
            resolved = self._advance()
        if resolved:  # the other segments waited for the header
            for other in self.assembly.decoders:
                if other is not self:
                    other._poke()

    def check(self, step: int) -> None:
        with self.lock:
            self.pending.clear()  # views into memory that may be gone
            if self.error:
                raise MaterialiseError(f"segment {self.segment} of step {step}: {self.error}")
            if self.assembly.blob_bytes < 0:
                raise MaterialiseError(f"no piece of step {step} tells the lost blob's size")
            if self.done < self._need():
                raise MaterialiseError(f"segment {self.segment} of step {step}: the pieces "
                                       f"ended after {self.done} of {self._need()} bytes")

    def _need(self) -> int:
        a = self.assembly
        return max(0, min(a.each, a.blob_bytes - self.segment * a.each))

    def _advance(self) -> bool:
        """Decode every range all sources have (under ``self.lock``); True when this call
        completed the blob's header."""
        a = self.assembly
        if a.blob_bytes < 0 or self.error:
            return False
        need, base = self._need(), self.segment * a.each
        resolved = False
        try:
            while self.done < need:
                n, at = need - self.done, base + self.done
                dest = None
                if a.spans is None:
                    if self.segment:
                        return resolved  # the header decides where these bytes go
                    n = min(n, a.head_need())
                    if n == 0:  # the header is complete (or the blob goes to one buffer)
                        if a.spans is None:
                            a.resolve()
                            resolved = True
                        continue
                else:
                    for start, end, buf in a.spans:
                        if at < end:
                            if at < start:  # bytes no wanted rank holds: not decoded
                                n = min(n, start - at)
                            else:
                                n, dest = min(n, end - at), buf[at - start:]
                            break
                    if dest is None:  # skipped: no source needs to have reached them
                        self.done += n
                        continue
                views = {}
                for pos, queue in self.pending.items():
                    while queue and queue[0][0] + len(queue[0][1]) <= self.done:
                        queue.popleft()
                    if queue:
                        offset, view = queue[0]
                        n = min(n, offset + len(view) - self.done)
                        views[pos] = view[self.done - offset:]
                    elif self.length.get(pos, self.done + 1) > self.done:
                        return resolved  # this source has not reached these bytes yet
                if dest is None:  # header bytes: decoded into a small buffer first
                    head = torch.empty(n, dtype=torch.uint8)
                    self._decode(views, n, head)
                    a.head += blobs.tensor_bytes(head)
                else:
                    self._decode(views, n, dest[:n])
                self.done += n
        except (ValueError, DecodeError, blobs.BlobError) as exc:
            self.error = str(exc)
        return resolved

    def _decode(self, views: dict[int, memoryview], n: int, out: torch.Tensor) -> None:
        if self._zeros.numel() < n:
            self._zeros = torch.zeros(n, dtype=torch.uint8)
        shards: list[memoryview | torch.Tensor | None] = [None] * (self.k + self.m)
        for pos in self.pending:
            shards[pos] = views[pos][:n] if pos in views else self._zeros[:n]
        if self.k == 1:  # the blob itself, or a mirror: every parity piece is a copy
            piece = next(x for x in shards if x is not None)
            with warnings.catch_warnings():  # read only, never written
                warnings.simplefilter("ignore", UserWarning)
                out.copy_(piece if isinstance(piece, torch.Tensor)
                          else torch.frombuffer(piece, dtype=torch.uint8))
            return
        dst: list[torch.Tensor | None] = [None] * (self.k + self.m)
        dst[self.position] = out
        self.codec.decode(shards, self.k, self.m, out=dst, rebuild=[self.position])

def restore_shards_env(protector: Protector, job_id: str, step: int, world_size: int) -> str:
    """``HPT_RESTORE_SHARDS``: every old rank's snapshot of ``step`` in this node's memory."""
    shards = {}
    for rank in range(world_size):
        prefix = protector.prefix_of(job_id, rank)
        generation = blobs.find_generation(ShmSink(prefix, directory=protector.shm_dir), step)
        if generation is not None:
            shards[str(rank)] = {"prefix": prefix, "generation": generation}
    return json.dumps({"step": step, "world_size": world_size, "dir": protector.shm_dir,
                       "shards": shards}, separators=(",", ":"))
