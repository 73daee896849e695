"""A launch carries the share of its attempt's protection layout that one node needs: the
agent finds in it everything it finds in the whole layout for its own work, in O(group) bytes."""

from __future__ import annotations

import pytest

from hpt._proto import checkpoint_pb2
from hpt.agent import protect
from hpt.agent.protect import Layout
from hpt.controller import convert
from hpt.controller.elastic import protection_plan
from hpt.controller.model import JobSpec, LaunchCommand


def _plan(nodes: int, redundancy: str = "", per_node: int = 2):  # type: ignore[no-untyped-def]
    names = [f"n{i:04d}" for i in range(nodes)]
    return protection_plan(redundancy, names,
                           {n: range(i * per_node, (i + 1) * per_node) for i, n in enumerate(names)},
                           {n: f"127.0.0.1:{10000 + i}" for i, n in enumerate(names)})


def _share(plan, node: str) -> Layout:  # type: ignore[no-untyped-def]
    msg = checkpoint_pb2.ProtectionLayout.FromString(convert._LAYOUTS.share(plan, node))
    assert msg.num_nodes == len(plan.nodes)
    return Layout.from_proto(msg)


@pytest.mark.parametrize("nodes,redundancy", [(40, ""), (40, "4+2"), (5, ""), (2, "")])
def test_each_share_answers_what_its_node_asks_as_the_whole_layout_does(
        nodes: int, redundancy: str) -> None:
    plan = _plan(nodes, redundancy)
    whole = Layout.from_proto(convert.protection_to_proto(plan))
    for i, n in enumerate(plan.nodes):
        share = _share(plan, n.node)
        assert share.index_of(n.node) == i and share.num_nodes == whole.num_nodes
        # the stripes it holds parity for, and each data member's segment of them
        mine = {j: s for j, s in whole.stripes.items() if i in (*s[0], *s[1])}
        assert dict(share.stripes) == mine
        for j, (data, _parity) in mine.items():
            for member in data:
                assert share.data_stripes(member) == whole.data_stripes(member)
                assert share.segment_request("j", 1, 5, member, j) == \
                    whole.segment_request("j", 1, 5, member, j)
                assert share.nodes[member] == whole.nodes[member]
        # the replicas its ranks may be compared with
        for rank in n.ranks:
            assert share.references(i, rank) == whole.references(i, rank)
            for other, _ in share.references(i, rank):
                assert share.nodes[other] == whole.nodes[other]


def test_a_share_is_o_group_bytes_and_a_launch_carries_its_nodes_share() -> None:
    plan = _plan(2000)
    whole = len(convert._LAYOUTS.get(plan))
    shares = [len(convert._LAYOUTS.share(plan, plan.nodes[i].node)) for i in (0, 999, 1999)]
    assert max(shares) * 40 < whole, (shares, whole)  # 1-3 KB against 142 KB
    cmd = LaunchCommand(job_id="j", attempt=1, spec=JobSpec(command=("x",), nodes=2000),
                        ranks=((6, 0), (7, 1)), world_size=4000, local_world_size=2,
                        master_addr="h", master_port=1, node_rank=3, num_nodes=2000,
                        restore_step=0, protection=plan)
    sent = convert.launch_to_proto(cmd, node=plan.nodes[3].node)
    assert sent.protection.num_nodes == 2000 and len(sent.protection.nodes) < 30
    assert len(convert.launch_to_proto(cmd).protection.nodes) == 2000  # no node: the whole


def test_a_share_naming_an_index_out_of_range_twice_or_missing_is_refused() -> None:
    ok = dict(k=1, m=1, num_nodes=3)
    bad = [
        checkpoint_pb2.ProtectionLayout(**ok, nodes=[checkpoint_pb2.GroupNode(node="a", index=3)]),
        checkpoint_pb2.ProtectionLayout(**ok, nodes=[checkpoint_pb2.GroupNode(node="a", index=1),
                                                     checkpoint_pb2.GroupNode(node="b", index=1)]),
    ]
    for msg in bad:
        with pytest.raises(ValueError, match="protection.nodes"):
            Layout.from_proto(msg)
    missing = checkpoint_pb2.ProtectionLayout(
        **ok, nodes=[checkpoint_pb2.GroupNode(node="a", index=0)],
        stripes=[checkpoint_pb2.Stripe(data=[0], parity=[2], index=0)])
    with pytest.raises(ValueError, match=r"protection.stripes\[0\]"):
        Layout.from_proto(missing)


def test_the_share_holds_as_many_reference_nodes_as_the_agent_asks() -> None:
    assert convert.REFERENCE_NODES == protect._REFERENCE_NODES


@pytest.mark.parametrize("world_changes", [False, True])
def test_a_restore_share_answers_what_rebuilding_the_ranks_it_needs_asks(
        world_changes: bool) -> None:
    # a restore reads the old ranks its node needs from the nodes that ran them, or decodes
    # them (a lost node's, or a live one's that cannot serve): those nodes' stripes, their
    # members, and the replicas their thin blobs name are in its share
    plan = _plan(400, per_node=2)
    whole = Layout.from_proto(convert.protection_to_proto(plan))
    node = plan.nodes[200].node
    need = list(range(800)) if world_changes else [400, 401]
    msg = checkpoint_pb2.ProtectionLayout.FromString(
        convert._LAYOUTS.restore_share(plan, node, need))
    share = Layout.from_proto(msg)
    owners = share.owners()
    assert {r: owners[r] for r in need} == {r: whole.owners()[r] for r in need}
    for owner in sorted({owners[r] for r in need})[:4]:  # (a resize: the first few do)
        assert share.data_stripes(owner) == whole.data_stripes(owner)
        for j in share.data_stripes(owner):
            for member in share.stripes[j][1]:
                assert share.nodes[member] == whole.nodes[member]
            for member in share.stripes[j][0]:
                assert share.nodes[member] == whole.nodes[member]
                assert share.segment_request("j", 1, 5, member, j) == \
                    whole.segment_request("j", 1, 5, member, j)
        for rank in share.nodes[owner].ranks:
            assert share.references(owner, rank) == whole.references(owner, rank)
    full = len(convert._LAYOUTS.get(plan))
    assert (len(msg.SerializeToString()) * 10 < full) != world_changes  # a resize reads all
    assert len(convert.restore_to_proto(_restore(plan, need)).layout.nodes) == 400  # no node


def _restore(plan, need):  # type: ignore[no-untyped-def]
    from hpt.controller.model import RestoreCommand

    return RestoreCommand(step=5, attempt=1, world_size=800, layout=plan, lost=(200,),
                          need_ranks=tuple(need))


@pytest.mark.parametrize("shares", [True, False])
def test_an_agent_that_does_not_say_it_reads_shares_gets_the_whole_layout(shares: bool) -> None:
    import asyncio

    from hpt.controller.agent_stream import _Link

    plan = _plan(40)
    cmd = LaunchCommand(job_id="j", attempt=1, spec=JobSpec(command=("x",), nodes=40),
                        ranks=((6, 0), (7, 1)), world_size=80, local_world_size=2,
                        master_addr="h", master_port=1, node_rank=3, num_nodes=40,
                        restore_step=0, protection=plan)
    loop = asyncio.new_event_loop()
    try:
        link = _Link(plan.nodes[3].node, loop, layout_shares=shares)
        link.send(cmd)
        msg = loop.run_until_complete(asyncio.wait_for(link.queue.get(), 5))
    finally:
        loop.close()
    layout = msg.launch.protection
    assert (layout.num_nodes, len(layout.nodes) < 40) == ((40, True) if shares else (0, False))
