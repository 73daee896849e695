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
from dataclasses import dataclass

import torch

from hpt._proto import checkpoint_pb2
from hpt.agent import blob as blobs
from hpt.agent.peers import PieceUnavailable
from hpt.agent.protect import Layout, Protector
from hpt.ckpt.errors import DecodeError
from hpt.ckpt.sink import ShmSink

log = logging.getLogger(__name__)

class MaterialiseError(Exception):
    """An old rank's snapshot could not be put in place from any source."""

@dataclass(frozen=True, slots=True)
class Materialised:
    """Where each old rank's snapshot of ``step`` came from (rank -> "local"|"peer"|"decoded")."""

    step: int
    sources: dict[int, str]

def materialise(protector: Protector, job_id: str, plan: checkpoint_pb2.RestorePlan,
                adopt) -> Materialised:  # type: ignore[no-untyped-def]
    """Make every rank of ``plan.need_ranks`` hold ``plan.step`` in this node's memory.

    ``adopt(rank, step, generation, nbytes)`` registers a written snapshot with the keeper.

    Raises:
        MaterialiseError: a needed rank is in no source (the caller starts the ranks anyway;
            they fall back to disk or scratch and say so).
    """
    layout = Layout.from_proto(plan.layout)
    step, lost = plan.step, set(plan.lost)
    me = layout.index_of(protector.node)
    sources: dict[int, str] = {}
    need = sorted(set(plan.need_ranks))
    missing = [r for r in need if not _local_ok(protector, job_id, r, step)]
    sources.update({r: "local" for r in need if r not in missing})
    owners = {r: i for i, n in enumerate(layout.nodes) for r in n.ranks}
    by_owner: dict[int, list[int]] = {}
    for rank in missing:
        if rank not in owners:
            raise MaterialiseError(f"old rank {rank} is not in the old attempt's layout")
        by_owner.setdefault(owners[rank], []).append(rank)
    for owner, ranks in sorted(by_owner.items()):
        blob, how = None, ""
        if owner not in lost and owner != me:
            request = checkpoint_pb2.FetchRequest(
                job_id=job_id, attempt=plan.attempt, step=step,
                kind=checkpoint_pb2.PIECE_KIND_SEGMENT, ranks=layout.nodes[owner].ranks, k=1)
            try:
                header, data = protector.fetch(layout, owner, request, local=False)
                blob, how = data[:header.blob_bytes], "peer"
            except PieceUnavailable as exc:
                log.warning("[%s/-/%s/-] old node %s cannot serve step %d (%s); decoding",
                            job_id, protector.node, layout.nodes[owner].node, step, exc)
        if blob is None:
            blob, how = decode_blob(protector, job_id, plan.attempt, layout, owner, step,
                                    lost | {owner}), "decoded"
        _write(protector, job_id, blob, step, ranks, adopt)
        sources.update({r: how for r in ranks})
    return Materialised(step, sources)

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

def decode_blob(protector: Protector, job_id: str, attempt: int, layout: Layout, target: int,
                step: int, lost: set[int]) -> torch.Tensor:
    """Rebuild node ``target``'s blob of ``step`` from the other members and parity pieces.

    Every stripe's k pieces stream at once and are decoded chunk by chunk, as the same byte
    range of all of them has arrived, straight into the blob: no piece is ever held whole, so
    a rebuild needs the blob's memory plus the chunks in flight, not k pieces per stripe. A
    stripe whose source fails is streamed again with a spare parity piece in its place.
    """
    me = layout.index_of(protector.node)
    stripes = layout.data_stripes(target)
    if not stripes:
        raise MaterialiseError(f"no stripe describes node {layout.nodes[target].node}")
    assembly = _Assembly(target, len(stripes))
    sources: dict[int, list[int]] = {}  # stripe -> shard positions to stream (k of them)
    spare: dict[int, list[int]] = {}
    for stripe in stripes:
        data, parity = layout.stripes[stripe]
        k = len(data)
        alive = [pos for pos, n in enumerate(data) if n not in lost]
        parity_alive = [k + i for i, n in enumerate(parity) if n not in lost]
        need = max(k - len(alive), 1)  # parity pieces: one at least, for the sizes
        sources[stripe] = parity_alive[:need] + alive
        spare[stripe] = parity_alive[need:]
    todo = list(stripes)
    while todo:
        decoders = {stripe: _StripeDecoder(assembly, protector.codec, stripes.index(stripe),
                                           len(layout.stripes[stripe][0]),
                                           len(layout.stripes[stripe][1]),
                                           layout.stripes[stripe][0].index(target))
                    for stripe in todo}
        jobs, owners = [], []
        for stripe in todo:
            data, parity = layout.stripes[stripe]
            for pos in sources[stripe]:
                node = data[pos] if pos < len(data) else parity[pos - len(data)]
                request = (layout.segment_request(job_id, attempt, step, node, stripe)
                           if pos < len(data) else
                           checkpoint_pb2.FetchRequest(
                               job_id=job_id, attempt=attempt, step=step,
                               kind=checkpoint_pb2.PIECE_KIND_PARITY, stripe=stripe))
                jobs.append((layout, node, request, node == me, decoders[stripe].sink(pos)))
                owners.append((stripe, pos, node))
        results = protector.stream_all(jobs)
        retry = []
        for (stripe, pos, node), result in zip(owners, results, strict=True):
            if isinstance(result, Exception):
                log.warning("[%s/-/%s/-] piece %d of stripe %d from %s: %s", job_id,
                            protector.node, pos, stripe, layout.nodes[node].node, result)
                sources[stripe].remove(pos)
                if not spare[stripe]:
                    raise MaterialiseError(f"stripe {stripe} at step {step}: fewer than k "
                                           "pieces reachable")
                sources[stripe].append(spare[stripe].pop(0))
                if stripe not in retry:
                    retry.append(stripe)
            else:
                decoders[stripe].finish(pos, result)
        for stripe, decoder in decoders.items():
            if stripe not in retry:
                decoder.check(step)
        todo = retry
    assert assembly.blob is not None  # every stripe checked
    return assembly.blob

class _Assembly:
    """The blob being rebuilt, allocated when the first parity header tells its size."""

    def __init__(self, target: int, segments: int) -> None:
        self.target = target
        self.segments = segments
        self.lock = threading.Lock()
        self.blob: torch.Tensor | None = None
        self.each = 0

    def learn(self, header: checkpoint_pb2.PieceHeader) -> None:
        with self.lock:
            if self.blob is not None:
                return
            for member in header.members:
                if member.node_index == self.target:
                    self.each = blobs.segment_bytes(int(member.blob_bytes), self.segments)
                    self.blob = torch.empty(int(member.blob_bytes), dtype=torch.uint8)

class _StripeDecoder:
    """Decodes one stripe's share of the blob as the same range of its k sources arrives.

    Each source's chunks come in order and contiguous (``PeerClient.stream``); they wait here
    only until the other sources reach the same bytes. A source shorter than the range (a
    segment padded to the stripe's longest member) counts as zeros past its end.
    """

    def __init__(self, assembly: _Assembly, codec, segment: int, k: int, m: int,  # type: ignore[no-untyped-def]
                 position: int) -> None:
        self.assembly, self.codec = assembly, codec
        self.segment, self.k, self.m, self.position = segment, k, m, position
        self.lock = threading.Lock()
        self.pending: dict[int, deque[tuple[int, memoryview]]] = {}
        self.length: dict[int, int] = {}
        self.done = 0
        self.error = ""
        self._zeros = torch.zeros(0, dtype=torch.uint8)

    def sink(self, pos: int):  # type: ignore[no-untyped-def]
        self.pending[pos] = deque()

        def feed(header: checkpoint_pb2.PieceHeader, offset: int, view: memoryview) -> None:
            if pos >= self.k:
                self.assembly.learn(header)
            with self.lock:
                self.length[pos] = header.piece_bytes
                self.pending[pos].append((offset, view))
                self._advance()
        return feed

    def finish(self, pos: int, header: checkpoint_pb2.PieceHeader) -> None:
        if pos >= self.k:
            self.assembly.learn(header)
        with self.lock:
            self.length[pos] = header.piece_bytes
            self._advance()

    def check(self, step: int) -> None:
        with self.lock:
            self.pending.clear()  # views into memory that may be gone
            if self.error:
                raise MaterialiseError(f"segment {self.segment} of step {step}: {self.error}")
            if self.assembly.blob is None:
                raise MaterialiseError(f"no parity piece of step {step} names the lost node")
            if self.done < self._need():
                raise MaterialiseError(f"segment {self.segment} of step {step}: the pieces "
                                       f"ended after {self.done} of {self._need()} bytes")

    def _need(self) -> int:
        a = self.assembly
        assert a.blob is not None
        return max(0, min(a.each, a.blob.numel() - self.segment * a.each))

    def _advance(self) -> None:
        """Decode every range all sources have (under ``self.lock``)."""
        blob = self.assembly.blob
        if blob is None or self.error:
            return
        need, base = self._need(), self.segment * self.assembly.each
        while self.done < need:
            n, views = need - self.done, {}
            for pos, queue in self.pending.items():
                while queue and queue[0][0] + len(queue[0][1]) <= self.done:
                    queue.popleft()
                if queue:
                    offset, view = queue[0]
                    n = min(n, offset + len(view) - self.done)
                    views[pos] = view[self.done - offset:]
                elif self.length.get(pos, self.done + 1) > self.done:
                    return  # this source has not reached these bytes yet
            if self._zeros.numel() < n:
                self._zeros = torch.zeros(n, dtype=torch.uint8)
            out = blob[base + self.done:base + self.done + n]
            shards: list[memoryview | torch.Tensor | None] = [None] * (self.k + self.m)
            for pos in self.pending:
                shards[pos] = views[pos][:n] if pos in views else self._zeros[:n]
            try:
                if self.k == 1:  # a mirror: every parity piece is a copy
                    piece = next(x for x in shards if x is not None)
                    with warnings.catch_warnings():  # read only, never written
                        warnings.simplefilter("ignore", UserWarning)
                        out.copy_(piece if isinstance(piece, torch.Tensor)
                                  else torch.frombuffer(piece, dtype=torch.uint8))
                else:
                    dst: list[torch.Tensor | None] = [None] * (self.k + self.m)
                    dst[self.position] = out
                    self.codec.decode(shards, self.k, self.m, out=dst, rebuild=[self.position])
            except (ValueError, DecodeError) as exc:
                self.error = str(exc)
                return
            self.done += n

def _write(protector: Protector, job_id: str, blob: torch.Tensor, step: int, ranks: list[int],
           adopt) -> None:  # type: ignore[no-untyped-def]
    try:
        found_step, parts = blobs.parse(blob)
    except blobs.BlobError as exc:
        raise MaterialiseError(f"rebuilt snapshot of step {step} is not a blob: {exc}") from exc
    if found_step != step:
        raise MaterialiseError(f"rebuilt blob holds step {found_step}, not {step}")
    wanted = set(ranks)
    for rank, layout, meta_json, checksums, buf in parts:
        if rank not in wanted:
            continue
        prefix = protector.prefix_of(job_id, rank)
        try:
            generation = blobs.write_snapshot(protector.shm_dir, prefix, step, layout,
                                              meta_json, checksums, buf)
        except blobs.BlobError as exc:
            raise MaterialiseError(str(exc)) from exc
        adopt(rank, step, generation, layout.total_bytes)
        wanted.discard(rank)
    if wanted:
        raise MaterialiseError(f"rebuilt blob of step {step} lacks rank(s) {sorted(wanted)}")

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
