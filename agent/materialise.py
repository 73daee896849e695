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
from dataclasses import dataclass

import torch

from hpt._proto import checkpoint_pb2
from hpt.agent import blob as blobs
from hpt.agent.peers import PieceUnavailable
from hpt.agent.protect import Layout, Protector
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
    """Rebuild node ``target``'s blob of ``step`` from the other members and parity pieces."""
    me = layout.index_of(protector.node)
    segments, blob_bytes = [], -1
    for stripe in layout.data_stripes(target):
        data, parity = layout.stripes[stripe]
        k, m = len(data), len(parity)
        shards: list[torch.Tensor | None] = [None] * (k + m)
        data_alive = [(pos, n) for pos, n in enumerate(data) if n not in lost]
        parity_alive = [(pos, n) for pos, n in enumerate(parity) if n not in lost]
        need = max(k - len(data_alive), 1)  # parity pieces: one at least, for the sizes
        todo = ([("parity", n) for _, n in parity_alive[:need]]
                + [("data", n) for _, n in data_alive])
        spare = [n for _, n in parity_alive[need:]]
        size, segments_of = -1, {}
        while todo:  # every piece of a round at once; a failure costs a spare parity piece
            requests = []
            for kind, node in todo:
                request = (checkpoint_pb2.FetchRequest(
                    job_id=job_id, attempt=attempt, step=step,
                    kind=checkpoint_pb2.PIECE_KIND_PARITY, stripe=stripe)
                    if kind == "parity" else
                    layout.segment_request(job_id, attempt, step, node, stripe))
                requests.append((layout, node, request, node == me))
            results = protector.fetch_all(requests)
            retry = []
            for (kind, node), result in zip(todo, results, strict=True):
                if isinstance(result, Exception):
                    log.warning("[%s/-/%s/-] %s piece of stripe %d from %s: %s", job_id,
                                protector.node, kind, stripe, layout.nodes[node].node, result)
                    if spare:
                        retry.append(("parity", spare.pop(0)))
                    continue
                header, piece = result
                if kind == "data":
                    segments_of[data.index(node)] = piece
                    continue
                shards[k + header.parity_index] = piece
                size = piece.numel()
                for member in header.members:
                    if member.node_index == target:
                        blob_bytes = int(member.blob_bytes)
            todo = retry
        if size < 0:
            raise MaterialiseError(f"no parity piece of stripe {stripe} at step {step} is "
                                   "reachable")
        for pos, seg in segments_of.items():
            shards[pos] = seg if seg.numel() == size else _pad(seg, size)
        if sum(s is not None for s in shards) < k:
            raise MaterialiseError(f"stripe {stripe} at step {step}: fewer than k={k} pieces "
                                   "reachable")
        if k == 1:
            rebuilt = next(s for s in shards[k:] if s is not None)  # a mirror
        else:
            rebuilt = protector.codec.decode(shards, k, m)[data.index(target)]
        segments.append(rebuilt)
    if blob_bytes < 0 or not segments:
        raise MaterialiseError(f"no stripe describes node {layout.nodes[target].node}")
    each = blobs.segment_bytes(blob_bytes, len(segments))
    return torch.cat([s[:each] for s in segments])[:blob_bytes]

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

def _pad(t: torch.Tensor, size: int) -> torch.Tensor:
    out = torch.zeros(size, dtype=torch.uint8)
    out[:min(size, t.numel())].copy_(t[:size])
    return out

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
