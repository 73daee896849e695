"""Snapshot protection between agents: real PeerService servers on loopback, real shm files.

Three nodes, one rank each, k=2 m=1 (and a 2-node mirror): every holder builds its parity
piece from segments pulled over gRPC; then a node is "lost" and another node rebuilds its
snapshot, which must equal the lost one bit for bit.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest
import torch

from hpt._proto import checkpoint_pb2
from hpt.agent import blob as blobs
from hpt.agent import materialise as materialise_mod
from hpt.agent import peers, protect
from hpt.agent.materialise import MaterialiseError, materialise, restore_shards_env
from hpt.agent.peers import PeerAuth, PeerClient, PeerServer, PieceUnavailable
from hpt.agent.protect import Protector
from hpt.agent.snapshots import SnapshotKeeper
from hpt.ckpt import ShmSink, SnapshotEngine
from hpt.ckpt.layout import shard_dim0
from hpt.controller.elastic import protection_plan
from tests.faults.proxy import TcpProxy

JOB = "job-1"
TOKEN = "s3cret"


class Node:
    def __init__(self, name: str, root: Path, auth: PeerAuth) -> None:
        self.name = name
        self.dir = root / name
        self.dir.mkdir()
        self.keeper = SnapshotKeeper(name, shm_dir=str(self.dir))
        self.client = PeerClient(auth, retries=3, backoff_s=0.01)
        self.built = 0  # pieces this node reported built (the agent's early heartbeat)
        self.protector = Protector(name, str(self.dir), self.keeper.prefix, self.client,
                                   on_built=self._built)
        self.server = PeerServer(self.protector, name, "127.0.0.1", 0, auth)
        self.address = f"127.0.0.1:{self.server.port}"
        self.adopted: list[tuple[int, int, int]] = []

    def _built(self) -> None:
        self.built += 1

    def save(self, rank: int, step: int, seed: int, floats: int = 1000) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.save_state(rank, step, {
            "w": torch.randn(floats + 37 * rank, generator=gen), "step": step,
            "b": torch.randint(0, 255, (333,), dtype=torch.uint8, generator=gen)})

    def save_state(self, rank: int, step: int, state, shards=None) -> None:  # type: ignore[no-untyped-def]
        engine = SnapshotEngine(ShmSink(self.keeper.prefix(JOB, rank), directory=str(self.dir)))
        engine.save(step, state, shards=shards)
        engine.close()

    def close(self) -> None:
        self.server.close()
        self.protector.close()
        self.client.close()


@pytest.fixture
def cluster(tmp_path: Path):
    nodes: list[Node] = []

    def make(n: int, auth: PeerAuth | None = None) -> list[Node]:
        for i in range(n):
            nodes.append(Node(f"n{i}", tmp_path, auth or PeerAuth(token=TOKEN)))
        return nodes

    yield make
    for node in nodes:
        node.close()


def _layout(nodes: list[Node], redundancy: str = "",
            ranks: dict[str, list[int]] | None = None) -> checkpoint_pb2.ProtectionLayout:
    plan = protection_plan(redundancy, [n.name for n in nodes],
                           ranks or {n.name: [i] for i, n in enumerate(nodes)},
                           {n.name: n.address for n in nodes})
    assert plan is not None
    return checkpoint_pb2.ProtectionLayout(
        k=plan.k, m=plan.m,
        nodes=[checkpoint_pb2.GroupNode(node=p.node, peer_address=p.peer_address, ranks=p.ranks)
               for p in plan.nodes],
        stripes=[checkpoint_pb2.Stripe(data=d, parity=p) for d, p in plan.stripes])


def _protect_all(nodes: list[Node], layout: checkpoint_pb2.ProtectionLayout, step: int) -> None:
    for node in nodes:
        node.protector.protect(JOB, 1, layout)
    _round(nodes, step)


def _round(nodes: list[Node], step: int) -> None:
    """One protection round of ``step``, as the controller names it (HeartbeatAck.protect)."""
    for node in nodes:
        node.protector.set_targets([(JOB, 1, step)])
    for node in nodes:
        entry = node.protector._jobs[JOB]
        for stripe in entry.slots:
            assert node.protector.build(entry, stripe) == step


def _plan(layout, step: int, lost: list[int], need: list[int]) -> checkpoint_pb2.RestorePlan:
    return checkpoint_pb2.RestorePlan(step=step, attempt=1, world_size=len(layout.nodes),
                                      layout=layout, lost=lost, need_ranks=need)


def _lose_and_rebuild(nodes: list[Node], layout, step: int, lost: int, on: Node,
                      need: list[int]) -> tuple[dict[int, str], bytes, bytes]:
    """Node ``lost`` (running old rank ``lost``) goes with its memory; ``on`` puts ``need`` of
    ``step`` in place. (where each came from, the lost rank's bytes, the bytes rebuilt)."""
    original = bytes(_record(nodes[lost], lost, step).buffer.numpy())
    nodes[lost].close()
    got = materialise(on.protector, JOB, _plan(layout, step, [lost], need), lambda *a: None)
    return got.sources, original, bytes(_record(on, lost, step).buffer.numpy())


def _record(node: Node, rank: int, step: int):
    sink = ShmSink(node.keeper.prefix(JOB, rank), directory=str(node.dir))
    g = blobs.find_generation(sink, step)
    assert g is not None
    return sink.read(blobs.SnapshotRef(step=step, generation=g))


def test_parity_k2_m1_rebuilds_a_lost_node_bit_for_bit(cluster) -> None:
    nodes = cluster(3)
    for i, node in enumerate(nodes):
        node.save(i, 7, seed=i)
    layout = _layout(nodes)
    assert (layout.k, layout.m) == (2, 1)
    _protect_all(nodes, layout, 7)
    held = [p for n in nodes for p in n.protector.pieces()]
    assert sorted((p.stripe, p.step) for p in held) == [(0, 7), (1, 7), (2, 7)]
    lost = _record(nodes[2], 2, 7)
    original = bytes(lost.buffer.numpy())
    nodes[2].close()  # the node and its memory are gone
    survivor = nodes[0]
    got = materialise(survivor.protector, JOB, _plan(layout, 7, [2], [0, 1, 2]),
                      lambda *a: survivor.adopted.append(a))
    assert got.sources == {0: "local", 1: "peer", 2: "decoded"}
    rebuilt = _record(survivor, 2, 7)
    assert bytes(rebuilt.buffer.numpy()) == original
    assert rebuilt.layout == lost.layout and rebuilt.meta_json == lost.meta_json
    assert tuple(rebuilt.checksums) == tuple(lost.checksums)
    assert bytes(_record(survivor, 1, 7).buffer.numpy()) == bytes(
        _record(nodes[1], 1, 7).buffer.numpy())
    assert sorted(r for r, *_ in survivor.adopted) == [1, 2]
    env = restore_shards_env(survivor.protector, JOB, 7, 3)
    parsed = json.loads(env)
    assert parsed["step"] == 7 and parsed["world_size"] == 3
    assert sorted(parsed["shards"]) == ["0", "1", "2"]
    assert parsed["shards"]["2"]["prefix"] == survivor.keeper.prefix(JOB, 2)


@pytest.mark.parametrize("remote,local", [(1 << 20, 4 << 20), (1000, 777)])
def test_k3_m2_rebuilds_two_lost_nodes_of_different_sizes_bit_for_bit(
        cluster, monkeypatch, remote: int, local: int) -> None:
    # chunk sizes that are not multiples of each other: the decoder lines up ranges of its
    # sources wherever their chunks end
    monkeypatch.setattr(peers, "CHUNK_BYTES", remote)
    monkeypatch.setattr(protect, "_LOCAL_CHUNK_BYTES", local)
    nodes = cluster(5)
    for i, node in enumerate(nodes):
        node.save(i, 4, seed=10 + i, floats=3000 * (i + 1))  # pieces padded to the longest
    layout = _layout(nodes, "3+2")
    assert (layout.k, layout.m) == (3, 2)
    _protect_all(nodes, layout, 4)
    originals = {r: bytes(_record(nodes[r], r, 4).buffer.numpy()) for r in (1, 3)}
    nodes[1].close()
    nodes[3].close()
    survivor = nodes[4]
    got = materialise(survivor.protector, JOB, _plan(layout, 4, [1, 3], [1, 3]),
                      lambda *a: survivor.adopted.append(a))
    assert got.sources == {1: "decoded", 3: "decoded"}
    for rank, original in originals.items():
        assert bytes(_record(survivor, rank, 4).buffer.numpy()) == original


def test_a_source_failing_mid_stream_is_replaced_by_a_spare_parity_piece(
        cluster, monkeypatch) -> None:
    monkeypatch.setattr(peers, "CHUNK_BYTES", 1000)
    nodes = cluster(5)
    for i, node in enumerate(nodes):
        node.save(i, 6, seed=20 + i, floats=4000)
    layout = _layout(nodes, "3+2")
    _protect_all(nodes, layout, 6)
    original = bytes(_record(nodes[1], 1, 6).buffer.numpy())
    nodes[1].close()
    served: list[int] = []  # node 2 sends a few chunks of each piece, then loses it for good
    open_piece = nodes[2].protector.open_piece

    def failing(req):  # type: ignore[no-untyped-def]
        if req.offset:
            raise PieceUnavailable("gone")
        piece = open_piece(req)
        read = piece.read
        piece.read = lambda off, n: (served.append(off), read(off, n) if off < 3000 else 1 // 0)[1]
        return piece

    nodes[2].protector.open_piece = failing
    survivor = nodes[0]
    got = materialise(survivor.protector, JOB, _plan(layout, 6, [1], [1]), lambda *a: None)
    assert got.sources == {1: "decoded"}
    assert served  # node 2 did send part of a piece before it failed
    assert bytes(_record(survivor, 1, 6).buffer.numpy()) == original


def test_a_header_longer_than_a_segment_still_rebuilds(cluster, monkeypatch) -> None:
    # hundreds of one-number tensors: the blob's header (their layout) is most of the blob,
    # longer than the first of its k = 2 segments
    monkeypatch.setattr(peers, "CHUNK_BYTES", 4096)
    nodes = cluster(3)
    for i, node in enumerate(nodes):
        node.save_state(i, 3, {f"t{j}": torch.tensor([float(i * 1000 + j)]) for j in range(300)})
    layout = _layout(nodes)
    _protect_all(nodes, layout, 3)
    blob = blobs.NodeBlob(str(nodes[2].dir), [(2, nodes[2].keeper.prefix(JOB, 2))], 3)
    head = torch.empty(16, dtype=torch.uint8)
    blob.read_into(0, head)
    assert 16 + blobs.header_length(bytes(head.numpy())) > blobs.segment_bytes(blob.nbytes, 2)
    sources, original, rebuilt = _lose_and_rebuild(nodes, layout, 3, 2, nodes[0], [2])
    assert sources == {2: "decoded"}
    assert rebuilt == original


def test_only_the_wanted_ranks_of_a_lost_node_are_written(cluster) -> None:
    nodes = cluster(3)
    ranks = {"n0": [0], "n1": [1], "n2": [2, 3]}
    for node in nodes:
        for rank in ranks[node.name]:
            node.save(rank, 5, seed=30 + rank, floats=20_000)
    layout = _layout(nodes, ranks=ranks)
    _protect_all(nodes, layout, 5)
    original = bytes(_record(nodes[2], 3, 5).buffer.numpy())
    nodes[2].close()
    adopted: list[tuple[int, ...]] = []
    got = materialise(nodes[1].protector, JOB, _plan(layout, 5, [2], [3]),
                      lambda *a: adopted.append(a))
    assert got.sources == {3: "decoded"}
    assert bytes(_record(nodes[1], 3, 5).buffer.numpy()) == original
    assert [a[0] for a in adopted] == [3]
    rank2 = ShmSink(nodes[1].keeper.prefix(JOB, 2), directory=str(nodes[1].dir))
    assert rank2.files() == []  # rank 2's bytes were not decoded, nor written


def _three_saved_one_lost(cluster, sharded: bool):  # type: ignore[no-untyped-def]
    """Three nodes, one rank each, step 7 of a 192-row ``w`` (each rank's 64 rows when
    ``sharded``, else the whole of it), protected; node 2 lost. (layout, survivor node 0)."""
    from hpt.ckpt.layout import ShardInfo

    nodes = cluster(3)
    for i, node in enumerate(nodes):
        shards = ({"w": ShardInfo(global_shape=(192,), global_offset=(64 * i,),
                                  local_shape=(64,))} if sharded else None)
        node.save_state(i, 7, {"w": torch.full((64,), float(i)), "step": 7}, shards)
    layout = _layout(nodes)
    _protect_all(nodes, layout, 7)
    nodes[2].close()
    return layout, nodes[0]


@pytest.mark.parametrize("sharded", [False, True])
def test_a_resize_rebuilds_the_lost_node_only_when_state_is_sharded(cluster, sharded) -> None:
    layout, survivor = _three_saved_one_lost(cluster, sharded)
    # the controller's plan for a resize 3 -> 2: every old rank; survivor n0 runs new rank 1
    got = materialise(survivor.protector, JOB, _plan(layout, 7, [2], [0, 1, 2]),
                      lambda *a: None, new_ranks=[1], world_size=2)
    rank2 = ShmSink(survivor.keeper.prefix(JOB, 2), directory=str(survivor.dir))
    if sharded:  # new rank 1's rows 96..191 of w lie in old ranks 1 and 2: the lost one too
        assert got.sources == {1: "peer", 2: "decoded"} and got.not_needed == (0,)
        assert blobs.find_generation(rank2, 7) is not None
    else:  # data parallel: new rank 1 reads the replica this node holds, nothing else
        assert got.sources == {0: "local"} and got.not_needed == (1, 2)
        assert rank2.files() == []


def test_a_sharded_resize_leaves_the_slices_no_new_rank_here_overlaps(cluster) -> None:
    layout, survivor = _three_saved_one_lost(cluster, sharded=True)
    # new rank 0 takes rows 0..95: old ranks 0 and 1; the lost node's slice is not decoded
    got = materialise(survivor.protector, JOB, _plan(layout, 7, [2], [0, 1, 2]),
                      lambda *a: None, new_ranks=[0], world_size=2)
    assert got.sources == {0: "local", 1: "peer"} and got.not_needed == (2,)
    assert ShmSink(survivor.keeper.prefix(JOB, 2), directory=str(survivor.dir)).files() == []
    # what the rank side assembles from them: its rows, bit for bit
    env = json.loads(restore_shards_env(survivor.protector, JOB, 7, 3))
    assert sorted(env["shards"]) == ["0", "1"]


def test_a_data_parallel_resize_reads_a_surviving_replica_when_the_preferred_one_is_lost(
        cluster) -> None:
    nodes = cluster(4)  # n0..n2 ran old ranks 0..2; n3 is a fresh node
    for i, node in enumerate(nodes[:3]):
        node.save_state(i, 7, {"w": torch.full((64,), 3.0), "rng": torch.tensor([i]),
                               "step": 7})
    layout = _layout(nodes[:3])
    _protect_all(nodes[:3], layout, 7)
    nodes[0].close()
    nodes[1].close()
    two_lost = checkpoint_pb2.RestorePlan(step=7, attempt=1, world_size=3, layout=layout,
                                          lost=[0, 1], need_ranks=[0, 1, 2], replicated=True)
    # 3 -> 1 onto n2: new rank 0 prefers old rank 0 (lost, not decodable); n2 holds old rank 2
    got = materialise(nodes[2].protector, JOB, two_lost, lambda *a: None, new_ranks=[0],
                      world_size=1)
    assert got.sources == {2: "local"} and got.not_needed == (0, 1)
    # 3 -> 2 onto n2 and the fresh n3: n3 holds nothing, so it fetches the one replica whose
    # node survived (old rank 2 from n2), neither the lost ones nor a decode
    adopted: list[tuple[int, ...]] = []
    got = materialise(nodes[3].protector, JOB, two_lost, lambda *a: adopted.append(a),
                      new_ranks=[1], world_size=2)
    assert got.sources == {2: "peer"} and got.not_needed == (0, 1)
    assert [a[0] for a in adopted] == [2]
    assert (bytes(_record(nodes[3], 2, 7).buffer.numpy())
            == bytes(_record(nodes[2], 2, 7).buffer.numpy()))
    # the rank side picks the same replica from what this node now holds
    from hpt.ckpt.sources import RestoreTarget, ShardRef, ShardSetSource
    source = ShardSetSource(7, 3, str(nodes[3].dir), {2: ShardRef(
        nodes[3].keeper.prefix(JOB, 2), blobs.find_generation(ShmSink(
            nodes[3].keeper.prefix(JOB, 2), directory=str(nodes[3].dir)), 7))})
    state = source.load(7, RestoreTarget(rank=1, world_size=2))
    assert state["rng"].tolist() == [2] and state["w"].eq(3.0).all()
    # at the same world size a rank reads its own old rank where it is at hand...
    assert source.load(7, RestoreTarget(rank=2, world_size=3))["rng"].tolist() == [2]
    # ...and when no step was recoverable rank for rank (the controller's any_replica), a new
    # rank on a fresh node in a lost one's place reads the surviving replica the agent fetched
    n3 = nodes[3]
    for f in n3.dir.glob(f"*{JOB}*"):  # (a fresh agent: nothing of the old attempt here)
        f.unlink()
    same = checkpoint_pb2.RestorePlan(step=7, attempt=1, world_size=3, layout=layout,
                                      lost=[0, 1], need_ranks=[0, 2], replicated=True,
                                      any_replica=True)
    got = materialise(n3.protector, JOB, same, lambda *a: None, new_ranks=[0], world_size=3)
    assert got.sources == {2: "peer"} and got.not_needed == (0,)
    prefix = n3.keeper.prefix(JOB, 2)
    source = ShardSetSource(7, 3, str(n3.dir), {2: ShardRef(prefix, blobs.find_generation(
        ShmSink(prefix, directory=str(n3.dir)), 7))})
    state = source.load(7, RestoreTarget(rank=0, world_size=3))
    assert state["rng"].tolist() == [2] and state["w"].eq(3.0).all()


def test_mirror_two_nodes_restores_the_other_node(cluster) -> None:
    nodes = cluster(2)
    for i, node in enumerate(nodes):
        node.save(i, 3, seed=10 + i)
    layout = _layout(nodes)
    assert (layout.k, layout.m) == (1, 1)
    _protect_all(nodes, layout, 3)
    sources, original, rebuilt = _lose_and_rebuild(nodes, layout, 3, 1, nodes[0], [1])
    assert sources == {1: "decoded"}
    assert rebuilt == original


def test_flipped_byte_in_local_snapshot_is_caught_and_rebuilt_from_parity(cluster) -> None:
    nodes = cluster(3)
    for i, node in enumerate(nodes):
        node.save(i, 5, seed=20 + i)
    layout = _layout(nodes)
    _protect_all(nodes, layout, 5)
    snap = _record(nodes[1], 1, 5)
    original = bytes(snap.buffer.numpy())
    path = next(p for p in ShmSink(nodes[1].keeper.prefix(JOB, 1),
                                   directory=str(nodes[1].dir)).files() if p.suffix == ".buf")
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(raw)
    got = materialise(nodes[1].protector, JOB, _plan(layout, 5, [], [1]), lambda *a: None)
    assert got.sources == {1: "decoded"}
    assert bytes(_record(nodes[1], 1, 5).buffer.numpy()) == original


def _save_replica(node: Node, rank: int, step: int, weights: torch.Tensor) -> None:
    """Data-parallel state: the same weights on every rank, an RNG state of its own."""
    rng = torch.randint(0, 255, (5000,), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(100 + rank))
    node.save_state(rank, step, {"w": weights.clone(), "step": step, "rng": rng})


def _parity_bytes(nodes: list[Node]) -> int:
    return sum(p.bytes for n in nodes for p in n.protector.pieces())


def test_data_parallel_parity_covers_the_unique_bytes_and_rebuilds_bit_for_bit(cluster) -> None:
    nodes = cluster(3)
    weights = torch.randn(400_000, generator=torch.Generator().manual_seed(5))  # 1.6 MB
    for i, node in enumerate(nodes):
        _save_replica(node, i, 6, weights)
    state = _record(nodes[0], 0, 6).layout.total_bytes
    layout = _layout(nodes)
    _protect_all(nodes, layout, 6)
    # 2+1 parity of whole blobs would be state / 2 per node; the blocks every replica holds
    # byte for byte are left out of the blobs: the RNG's blocks and the header remain
    assert _parity_bytes(nodes) < 3 * state / 2 / 20
    sources, original, rebuilt = _lose_and_rebuild(nodes, layout, 6, 2, nodes[0], [0, 1, 2])
    assert sources == {0: "local", 1: "peer", 2: "decoded"}
    assert rebuilt == original  # its own RNG bytes included


def _count_sums(nodes: list[Node]) -> list[int]:
    """Wrap each node's ``open_piece``; the list counts the SUMS requests each served."""
    served = [0] * len(nodes)
    for i, node in enumerate(nodes):
        def counted(req, i=i, inner=node.protector.open_piece):  # type: ignore[no-untyped-def]
            served[i] += req.kind == checkpoint_pb2.PIECE_KIND_SUMS
            return inner(req)
        node.protector.open_piece = counted  # type: ignore[method-assign]
    return served


def test_sharded_state_is_coded_whole_and_its_replica_looked_for_once(cluster) -> None:
    nodes = cluster(3)
    weights = torch.randn(400_000, generator=torch.Generator().manual_seed(5))
    served = _count_sums(nodes)
    for i, node in enumerate(nodes):  # the same bytes, but declared a shard of a larger tensor
        node.save_state(i, 2, {"w": weights.clone()},
                        shards={"w": shard_dim0((1_200_000,), i, 3)})
    state = _record(nodes[0], 0, 2).layout.total_bytes
    _protect_all(nodes, _layout(nodes), 2)
    assert _parity_bytes(nodes) >= 3 * state / 2
    asked = sum(served)
    assert asked == 3 * 2  # each rank asked the two other nodes: both hold another layout
    for i, node in enumerate(nodes):
        node.save_state(i, 3, {"w": weights.clone()},
                        shards={"w": shard_dim0((1_200_000,), i, 3)})
    _round(nodes, 3)
    assert sum(served) == asked  # known for this attempt: not asked again


def test_an_hsdp_shard_is_compared_with_its_replica_a_group_away(cluster) -> None:
    # HSDP over 4 nodes: ranks 0 and 1 shard the model, ranks 2 and 3 replicate that sharding
    nodes = cluster(4)
    whole = torch.randn(800_000, generator=torch.Generator().manual_seed(6))
    for i, node in enumerate(nodes):
        shard = i % 2
        rng = torch.randint(0, 255, (5000,), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(200 + i))
        node.save_state(i, 4, {"w": whole[shard * 400_000:(shard + 1) * 400_000].clone(),
                               "rng": rng},
                        shards={"w": shard_dim0((800_000,), shard, 2)})
    state = _record(nodes[0], 0, 4).layout.total_bytes
    layout = _layout(nodes)
    assert (layout.k, layout.m) == (3, 1)
    _protect_all(nodes, layout, 4)
    # node 0 asked node 1 (the other shard: another layout), then node 2 (its replica)
    assert _parity_bytes(nodes) < 4 * state / 3 / 20
    sources, original, rebuilt = _lose_and_rebuild(nodes, layout, 4, 0, nodes[1], [0])
    assert sources == {0: "decoded"}
    assert rebuilt == original


def test_a_left_out_block_is_copied_only_from_a_replica_with_its_checksum(cluster) -> None:
    nodes = cluster(3)
    weights = torch.randn(400_000, generator=torch.Generator().manual_seed(5))
    _save_replica(nodes[0], 0, 6, weights)
    other = weights.clone()
    other[::1000] += 1.0  # rank 1 differs in every block: no replica of rank 2's blocks
    _save_replica(nodes[1], 1, 6, other)
    _save_replica(nodes[2], 2, 6, weights)
    layout = _layout(nodes)
    assert protect.Layout.from_proto(layout).references(2, 2)[0] == (0, 0)  # rank 0 first
    _protect_all(nodes, layout, 6)
    # node 1 rebuilds rank 2: its own rank 1 comes first but matches no block, rank 0 does
    sources, original, rebuilt = _lose_and_rebuild(nodes, layout, 6, 2, nodes[1], [2])
    assert sources == {2: "decoded"}
    assert rebuilt == original


def test_without_a_matching_replica_the_rebuild_fails_and_keeps_nothing(
        cluster, monkeypatch) -> None:
    nodes = cluster(3)
    weights = torch.randn(400_000, generator=torch.Generator().manual_seed(5))
    for i, node in enumerate(nodes):
        _save_replica(node, i, 6, weights)
    layout = _layout(nodes)
    _protect_all(nodes, layout, 6)
    nodes[2].close()
    # no surviving replica's blocks have the checksums rank 2's blob recorded for the blocks
    # it left out (as if they had changed since): nothing is copied on trust
    monkeypatch.setattr(materialise_mod, "block_checksums",
                        lambda buf, block: [0] * -(-buf.numel() // block))
    with pytest.raises(MaterialiseError, match="match no surviving replica"):
        materialise(nodes[1].protector, JOB, _plan(layout, 6, [2], [2]), lambda *a: None)
    assert blobs.find_generation(ShmSink(nodes[1].keeper.prefix(JOB, 2),
                                         directory=str(nodes[1].dir)), 6) is None


def test_thin_decision_is_kept_with_the_generation_and_swept_with_it(cluster) -> None:
    nodes = cluster(3)
    weights = torch.randn(400_000, generator=torch.Generator().manual_seed(5))
    for i, node in enumerate(nodes):
        _save_replica(node, i, 6, weights)
    layout = _layout(nodes)
    _protect_all(nodes, layout, 6)
    sink = ShmSink(nodes[0].keeper.prefix(JOB, 0), directory=str(nodes[0].dir))
    (kept,) = [p for p in sink.files() if p.suffix == ".thin"]
    first = kept.read_text()
    # the same segment served again (a rebuild's request) is the same bytes: no new decision
    decoded = protect.Layout.from_proto(layout)
    request = decoded.segment_request(JOB, 1, 6, 0, decoded.data_stripes(0)[0])
    a = nodes[0].protector.open_piece(request)
    b = nodes[0].protector.open_piece(request)
    n = a.header.piece_bytes
    assert a.header == b.header and bytes(a.read(0, n)) == bytes(b.read(0, n))
    assert kept.read_text() == first
    assert ShmSink.remove(sink.prefix, directory=str(nodes[0].dir)) >= 3
    assert not kept.exists()


def test_two_of_three_lost_is_not_decodable(cluster) -> None:
    nodes = cluster(3)
    for i, node in enumerate(nodes):
        node.save(i, 4, seed=30 + i)
    layout = _layout(nodes)
    _protect_all(nodes, layout, 4)
    nodes[1].close()
    nodes[2].close()
    with pytest.raises(MaterialiseError):
        materialise(nodes[0].protector, JOB, _plan(layout, 4, [1, 2], [1]), lambda *a: None)
    assert blobs.find_generation(ShmSink(nodes[0].keeper.prefix(JOB, 1),
                                         directory=str(nodes[0].dir)), 4) is None


def test_every_holder_protects_the_named_step_not_the_newest_it_sees(cluster) -> None:
    nodes = cluster(3)
    for step in (1, 2, 3):
        for i, node in enumerate(nodes):
            node.save(i, step, seed=step * 10 + i)
    layout = _layout(nodes)
    for node in nodes:
        node.protector.protect(JOB, 1, layout)
    entries = [(node, node.protector._jobs[JOB]) for node in nodes]
    # no round named yet: nobody picks a step on its own
    assert [n.protector.build(e, j) for n, e in entries for j in e.slots] == [None] * 3
    _round(nodes, 2)  # step 3 is newer, but the round is step 2
    assert {p.step for n in nodes for p in n.protector.pieces()} == {2}
    assert [n.built for n in nodes] == [1, 1, 1]  # each said so at once
    _round(nodes, 3)  # the next round; 2 stays valid in the other buffer
    assert sorted((p.stripe, p.step) for n in nodes for p in n.protector.pieces()) == [
        (0, 2), (0, 3), (1, 2), (1, 3), (2, 2), (2, 3)]
    for node, entry in entries:  # an older round named again (a stale ack) builds nothing
        node.protector.set_targets([(JOB, 1, 2)])
        assert [node.protector.build(entry, j) for j in entry.slots] == [None]
    for node, entry in entries:  # nor does a round of another attempt
        node.protector.set_targets([(JOB, 2, 4)])
        assert [node.protector.build(entry, j) for j in entry.slots] == [None]
    assert [n.built for n in nodes] == [2, 2, 2]  # nothing built, nothing reported


def test_wrong_token_is_refused(cluster) -> None:
    nodes = cluster(2)
    nodes[0].save(0, 1, seed=1)
    bad = PeerClient(PeerAuth(token="wrong"), retries=0)
    try:
        with pytest.raises(PieceUnavailable, match="UNAUTHENTICATED"):
            bad.fetch(nodes[0].address, _segment_request(1), timeout_s=5.0)
    finally:
        bad.close()


def _segment_request(step: int) -> checkpoint_pb2.FetchRequest:
    return checkpoint_pb2.FetchRequest(job_id=JOB, attempt=1, step=step,
                                       kind=checkpoint_pb2.PIECE_KIND_SEGMENT, ranks=[0], k=1,
                                       chunk_bytes=1024)


def test_transfer_cut_mid_chunk_is_resumed_and_never_half_valid(cluster) -> None:
    nodes = cluster(2)
    nodes[0].save(0, 9, seed=5, floats=8000)
    offsets: list[int] = []  # where each stream the server opened starts
    open_piece = nodes[0].protector.open_piece
    nodes[0].protector.open_piece = lambda req: (offsets.append(req.offset), open_piece(req))[1]
    sink = ShmSink(nodes[0].keeper.prefix(JOB, 0), directory=str(nodes[0].dir))
    # the first connection is reset (RST) after 12 KB, both directions counted: past the
    # first chunks, in the middle of one; the client must resume at its first unverified byte
    with TcpProxy(nodes[0].server.port) as proxy:
        proxy.reset_after(12_000, once=True)
        client = PeerClient(PeerAuth(token=TOKEN), retries=4, backoff_s=0.01)
        try:
            header, data = client.fetch(proxy.address, _segment_request(9), timeout_s=120.0)
        finally:
            client.close()
        assert proxy.num_resets == 1
    # the cut stream was followed by one starting at a chunk boundary (the bytes the client
    # had read before the RST; a loaded client may have read none: the kernel drops what is
    # unread when the reset arrives)
    assert offsets[0] == 0 and len(offsets) >= 2
    assert all(o < header.piece_bytes and o % 1024 == 0 for o in offsets[1:]), offsets
    whole = blobs.NodeBlob(str(nodes[0].dir), [(0, sink.prefix)], 9)
    expect = torch.empty(header.piece_bytes, dtype=torch.uint8)
    whole.read_into(0, expect)
    assert torch.equal(data, expect)


def test_broken_stream_resumes_at_the_first_unverified_byte(cluster) -> None:
    nodes = cluster(2)
    nodes[0].save(0, 9, seed=7, floats=8000)
    offsets: list[int] = []
    open_piece = nodes[0].protector.open_piece

    def breaking(req):  # type: ignore[no-untyped-def]
        offsets.append(req.offset)
        piece = open_piece(req)
        if len(offsets) == 1:  # the first stream dies after three chunks
            read = piece.read
            piece.read = lambda off, n: read(off, n) if off < 3072 else 1 // 0
        return piece

    nodes[0].protector.open_piece = breaking
    client = PeerClient(PeerAuth(token=TOKEN), retries=0, backoff_s=0.01)
    try:  # retries=0: only an attempt that verified nothing new counts as a failure
        header, data = client.fetch(nodes[0].address, _segment_request(9), timeout_s=120.0)
    finally:
        client.close()
    assert offsets == [0, 3072]
    whole = blobs.NodeBlob(str(nodes[0].dir), [(0, nodes[0].keeper.prefix(JOB, 0))], 9)
    expect = torch.empty(header.piece_bytes, dtype=torch.uint8)
    whole.read_into(0, expect)
    assert torch.equal(data, expect)


def test_a_streamed_piece_reaches_its_sink_once_per_byte_across_a_broken_stream(cluster) -> None:
    nodes = cluster(2)
    nodes[0].save(0, 9, seed=8, floats=8000)
    open_piece = nodes[0].protector.open_piece
    opened: list[int] = []

    def breaking(req):  # type: ignore[no-untyped-def]
        opened.append(req.offset)
        piece = open_piece(req)
        if len(opened) == 1:
            read = piece.read
            piece.read = lambda off, n: read(off, n) if off < 5120 else 1 // 0
        return piece

    nodes[0].protector.open_piece = breaking
    got: list[tuple[int, bytes]] = []
    client = PeerClient(PeerAuth(token=TOKEN), retries=0, backoff_s=0.01)
    try:
        header = client.stream(nodes[0].address, _segment_request(9),
                               lambda h, off, view: got.append((off, bytes(view))),
                               timeout_s=120.0)
    finally:
        client.close()
    assert opened == [0, 5120]
    assert [off for off, _ in got] == list(range(0, header.piece_bytes, 1024))
    whole = blobs.NodeBlob(str(nodes[0].dir), [(0, nodes[0].keeper.prefix(JOB, 0))], 9)
    expect = torch.empty(header.piece_bytes, dtype=torch.uint8)
    whole.read_into(0, expect)
    assert b"".join(b for _, b in got) == bytes(expect.numpy())


def test_silently_stalled_transfer_is_cancelled_not_waited_out(cluster) -> None:
    nodes = cluster(2)
    nodes[0].save(0, 9, seed=6)
    with TcpProxy(nodes[0].server.port) as proxy:
        proxy.blackhole()  # connection open, nothing moves, nothing closes
        client = PeerClient(PeerAuth(token=TOKEN), retries=1, backoff_s=0.01, stall_s=0.5)
        try:
            with pytest.raises(PieceUnavailable, match="stalled") as err:
                client.fetch(proxy.address, _segment_request(9), timeout_s=600.0)
        finally:
            client.close()
    # two attempts, each cancelled by the stall watchdog, never the 600 s deadline
    assert "after 2 attempt(s) without progress" in str(err.value)


def test_recovery_that_cannot_rebuild_keeps_the_step_and_reports_it(cluster) -> None:
    from hpt.agent.launcher import LaunchSpec
    from hpt.agent.recovery import Recovery
    from hpt.jobspec import JobSpec

    nodes = cluster(3)
    for i, node in enumerate(nodes):
        node.save(i, 4, seed=40 + i)
    layout = _layout(nodes)
    _protect_all(nodes, layout, 4)
    nodes[1].close()
    nodes[2].close()
    spec = LaunchSpec(job_id=JOB, attempt=2, job=JobSpec(command=("python",)), ranks=((1, 0),),
                      world_size=3, local_world_size=1, master_addr="127.0.0.1",
                      master_port=1, node_rank=0, num_nodes=1, restore_step=4)
    got = Recovery(nodes[0].protector, nodes[0].keeper).prepare(
        spec, _plan(layout, 4, [1, 2], [1]))
    # never a silent fallback on one node: the ranks keep the step (and fail to find it)
    assert got.restore_step == 4
    assert json.loads(got.restore_shards)["shards"] == {"0": {
        "prefix": nodes[0].keeper.prefix(JOB, 0), "generation": 0}}
    events = nodes[0].keeper.take_events()
    assert [(e.kind, e.step) for e in events] == [("restore_failed", 4)]


def test_recovery_at_the_same_world_size_lists_the_ranks_own_shard(cluster) -> None:
    from hpt.agent.launcher import LaunchSpec
    from hpt.agent.recovery import Recovery
    from hpt.jobspec import JobSpec

    nodes = cluster(3)
    for i, node in enumerate(nodes):
        node.save(i, 6, seed=50 + i)
    layout = _layout(nodes)
    _protect_all(nodes, layout, 6)
    spec = LaunchSpec(job_id=JOB, attempt=2, job=JobSpec(command=("python",)), ranks=((0, 0),),
                      world_size=3, local_world_size=1, master_addr="127.0.0.1",
                      master_port=1, node_rank=0, num_nodes=3, restore_step=6)
    got = Recovery(nodes[0].protector, nodes[0].keeper).prepare(
        spec, _plan(layout, 6, [], [0]))
    shards = json.loads(got.restore_shards)
    assert (shards["step"], shards["world_size"], sorted(shards["shards"])) == (6, 3, ["0"])
    assert not nodes[0].keeper.take_events()  # everything was local: nothing rebuilt


def test_a_release_does_not_wait_for_a_thin_decision_asking_a_slow_replica(
        cluster, monkeypatch) -> None:
    # an owner deciding which blocks to leave out asks a replica for its block checksums; on a
    # slow or dead link that takes until the fetch's deadline. A release of the job (the
    # agent's shutdown does one) must not queue behind it: it ran on the command thread, and
    # an agent outlasting its stop deadline was SIGKILLed with its snapshots left in memory
    import threading

    from hpt.agent import protect

    monkeypatch.setattr(protect, "_SUMS_TIMEOUT_S", 60.0)  # the ask never ends by itself here
    nodes = cluster(3)
    weights = torch.randn(400_000, generator=torch.Generator().manual_seed(5))
    for i, node in enumerate(nodes):
        _save_replica(node, i, 6, weights)
    asked, released = threading.Event(), threading.Event()
    for node in nodes:
        def slow(req, inner=node.protector.open_piece):  # type: ignore[no-untyped-def]
            if req.kind == checkpoint_pb2.PIECE_KIND_SUMS:
                asked.set()
                released.wait(30)  # answers once the releases are through
            return inner(req)
        node.protector.open_piece = slow  # type: ignore[method-assign]
    layout = _layout(nodes)
    errors: list[BaseException] = []

    def protect_round() -> None:
        try:
            _protect_all(nodes, layout, 6)
        except BaseException as exc:  # released under it: the round may fail, that is all
            errors.append(exc)

    rounds = threading.Thread(target=protect_round, daemon=True)
    rounds.start()
    assert asked.wait(30), "no thin decision asked a replica"
    done = []
    releases = [threading.Thread(target=lambda n=n: (n.protector.release(JOB), done.append(n)),
                                 daemon=True) for n in nodes]
    for t in releases:
        t.start()
    for t in releases:
        t.join(20)
    released.set()  # only now does the replica answer
    assert len(done) == 3, "a release waited for the decision's fetch"
    rounds.join(60)
    assert not rounds.is_alive()


def test_a_round_a_peer_has_not_reached_is_retried_and_logged_once(cluster, caplog) -> None:
    nodes = cluster(2)  # a mirror: n0 holds the parity of n1's rank 1, which never saves step 5
    nodes[0].save(0, 5, seed=1)
    layout = _layout(nodes)
    nodes[0].protector.protect(JOB, 1, layout)
    caplog.set_level(logging.DEBUG, logger="hpt.agent.protect")
    nodes[0].protector.set_targets([(JOB, 1, 5)])
    nodes[0].protector.start()

    def tries() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "not protected this round" in r.getMessage()]

    deadline = time.monotonic() + 30
    while len(tries()) < 4:  # the protector retries at every tick (and every rank commit)
        assert time.monotonic() < deadline, tries()
        nodes[0].protector.notify()
        threading.Event().wait(0.05)
    first, *again = tries()
    assert first.levelno == logging.INFO and "holds no snapshot of step 5" in first.getMessage()
    assert {r.levelno for r in again} == {logging.DEBUG}
    # the round moves on to a step that fails too: said once more at info
    nodes[0].save(0, 6, seed=2)
    nodes[0].protector.set_targets([(JOB, 1, 6)])
    while not [r for r in tries() if "step 6" in r.getMessage()]:
        assert time.monotonic() < deadline, tries()
        threading.Event().wait(0.05)
    assert [r.levelno for r in tries() if "step 6" in r.getMessage()][0] == logging.INFO
