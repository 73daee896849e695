"""Decisions of snapshot protection and elastic restarts (hpt.controller.elastic)."""

from __future__ import annotations

import pytest

from hpt.controller.elastic import (
    choose_restore,
    decide_grow,
    even_split,
    need_ranks,
    order_nodes,
    parse_redundancy,
    protected_steps,
    protection_plan,
    surviving_ranks,
)
from hpt.controller.model import Attempt, Job, JobSpec, Rank


def _attempt(nodes: list[str], steps: dict[str, tuple[int, ...]], first_step_at: float = 1.0,
             ppn: int = 1, replicated: bool = False) -> Attempt:
    ranks = [Rank(rank=i * ppn + j, local_rank=j, node=n, snapshot_steps=steps.get(n, ()),
                  snapshot_replicated=replicated)
             for i, n in enumerate(nodes) for j in range(ppn)]
    return Attempt(number=1, nodes=list(nodes), master_addr="127.0.0.1", master_port=1,
                   world_size=len(ranks), ranks=ranks, first_step_at=first_step_at)


def _plan(nodes: list[str], redundancy: str = ""):  # type: ignore[no-untyped-def]
    plan = protection_plan(redundancy, nodes, {n: [i] for i, n in enumerate(nodes)},
                           {n: f"{n}:1" for n in nodes})
    assert plan is not None
    return plan


def test_three_nodes_default_is_2_plus_1_with_rotating_parity() -> None:
    plan = _plan(["a", "b", "c"])
    assert (plan.k, plan.m, plan.label) == (2, 1, "2+1")
    assert plan.stripes == (((1, 2), (0,)), ((0, 2), (1,)), ((0, 1), (2,)))


def test_two_nodes_default_is_a_mirror() -> None:
    plan = _plan(["a", "b"])
    assert (plan.k, plan.m, plan.label) == (1, 1, "mirror")
    assert plan.stripes == (((1,), (0,)), ((0,), (1,)))


def test_six_nodes_with_2_plus_1_make_two_groups_of_three() -> None:
    plan = _plan([f"n{i}" for i in range(6)], "2+1")
    assert len(plan.stripes) == 6
    assert all(set(d) | set(p) <= {0, 1, 2} for d, p in plan.stripes[:3])
    assert all(set(d) | set(p) <= {3, 4, 5} for d, p in plan.stripes[3:])


def test_shrunk_below_k_plus_m_protects_the_survivors_with_k_nodes_minus_m() -> None:
    plan = protection_plan("3+1", ["a", "b", "c"], {}, {})
    assert plan is not None and (plan.k, plan.m) == (2, 1)


def test_one_node_or_off_is_unprotected() -> None:
    assert protection_plan("", ["a"], {}, {}) is None
    assert protection_plan("off", ["a", "b", "c"], {}, {}) is None


@pytest.mark.parametrize("text, message", [
    ("2-1", "redundancy ('2-1') must be K+M"),
    ("0+1", "needs k >= 1 and m >= 1"),
    ("3+1", "needs k + m <= nodes (3)"),
])
def test_bad_redundancy_is_refused_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("+", r"\+")):
        parse_redundancy(text, 3)
    with pytest.raises(ValueError, match="redundancy"):
        JobSpec(command=("python",), nodes=3, redundancy=text)


def test_a_step_is_protected_only_when_every_holder_reports_it() -> None:
    plan = _plan(["a", "b", "c"])
    pieces = {"a": {(0, 5), (0, 6)}, "b": {(1, 5), (1, 6)}, "c": {(2, 5)}}
    assert protected_steps(plan, pieces) == {5}
    assert protected_steps(plan, {"a": {(0, 5)}, "b": {(1, 5)}}) == set()


def _held(steps: set[int], nodes=("a", "b", "c")) -> dict[str, set[tuple[int, int]]]:  # type: ignore[no-untyped-def]
    """Every holder of the 3-node layout holds its stripe's piece of ``steps``."""
    return {n: {(j, s) for s in steps} for j, n in enumerate(nodes)}


def test_restore_uses_memory_when_every_node_survived() -> None:
    prev = _attempt(["a", "b", "c"], {"a": (4, 5), "b": (4, 5), "c": (4, 5)})
    choice = choose_restore(prev, _plan(prev.nodes), _held({4}), {"a", "b", "c"})
    assert (choice.step, choice.lost) == (5, ())


def test_one_lost_node_restores_the_newest_protected_step_by_decoding() -> None:
    prev = _attempt(["a", "b", "c"], {"a": (4, 5, 6), "b": (4, 5, 6), "c": (4, 5, 6)})
    choice = choose_restore(prev, _plan(prev.nodes), _held({4, 5}), {"a", "c"})
    assert (choice.step, choice.lost) == (5, (1,))
    assert "parity 2+1" in choice.source


def test_two_lost_of_three_is_not_recoverable_and_says_why() -> None:
    prev = _attempt(["a", "b", "c"], {n: (4, 5) for n in "abc"})
    choice = choose_restore(prev, _plan(prev.nodes), _held({4, 5}), {"a"})
    assert choice.step == 0
    assert "lost: b, c" in choice.source and "fewer than k pieces" in choice.source


def test_a_survivor_missing_the_step_counts_as_lost_for_that_step() -> None:
    # c lost; b never committed 6: 6 would need two nodes rebuilt, so 5 wins
    prev = _attempt(["a", "b", "c"], {"a": (5, 6), "b": (5,), "c": (5, 6)})
    choice = choose_restore(prev, _plan(prev.nodes), _held({5, 6}), {"a", "b"})
    assert (choice.step, choice.lost) == (5, (2,))


def test_a_step_an_agent_failed_to_rebuild_is_never_chosen_again() -> None:
    prev = _attempt(["a", "b", "c"], {n: (4, 5) for n in "abc"})
    choice = choose_restore(prev, _plan(prev.nodes), _held({4, 5}), {"a", "c"}, exclude={5})
    assert choice.step == 4


def test_a_restarted_node_lost_its_memory_and_its_pieces_but_peers_still_decode() -> None:
    # b came back as a new agent process: alive, but without step 5 and without its piece
    prev = _attempt(["a", "b", "c"], {"a": (5,), "b": (), "c": (5,)})
    held = _held({5})
    held["b"] = set()
    choice = choose_restore(prev, _plan(prev.nodes), held, {"a", "b", "c"})
    assert (choice.step, choice.lost) == (5, (1,))


def test_a_step_whose_parity_was_overwritten_is_not_recoverable() -> None:
    prev = _attempt(["a", "b", "c"], {"a": (5, 6), "b": (5, 6), "c": (5, 6)})
    held = _held({6})  # every holder moved on to 6: nothing of 5 is left
    assert choose_restore(prev, _plan(prev.nodes), held, {"a", "c"}).step == 6
    held = _held({5})
    assert choose_restore(prev, _plan(prev.nodes), held, {"a", "c"}).step == 5


def test_a_data_parallel_shrink_reads_the_surviving_replicas_however_many_nodes_were_lost() -> None:
    prev = _attempt(["a", "b", "c"], {n: (4, 5) for n in "abc"}, replicated=True)
    # two of three lost: no stripe decodes, but one replica is left and the world shrinks
    choice = choose_restore(prev, _plan(prev.nodes), _held({4, 5}), {"c"}, world_size=1)
    assert (choice.step, choice.lost) == (5, (0, 1))
    assert "surviving replicas" in choice.source and "a, b not needed" in choice.source
    # unprotected too: the replicas are the protection
    assert choose_restore(prev, None, {}, {"a"}, world_size=1).step == 5
    # one lost, decodable: still no decode, the survivors' replicas serve
    choice = choose_restore(prev, _plan(prev.nodes), _held({4, 5}), {"a", "c"}, world_size=2)
    assert (choice.step, choice.lost) == (5, (1,)) and "surviving replicas" in choice.source


def test_replicas_do_not_stand_in_at_the_same_world_size_or_for_sharded_state() -> None:
    # same world size: each new rank resumes its own old rank bitwise, so b must be decoded
    prev = _attempt(["a", "b", "c"], {n: (4, 5) for n in "abc"}, replicated=True)
    choice = choose_restore(prev, _plan(prev.nodes), _held({4}), {"a", "c", "d"}, world_size=3)
    assert (choice.step, choice.lost) == (4, (1,)) and "parity 2+1" in choice.source
    # one rank of the job holds a shard: every lost node must be decodable
    prev.ranks[2].snapshot_replicated = False
    assert choose_restore(prev, _plan(prev.nodes), _held({4, 5}), {"c"}, world_size=1).step == 0
    # nothing survives: nothing to read
    prev = _attempt(["a", "b"], {n: (5,) for n in "ab"}, replicated=True)
    assert choose_restore(prev, None, {}, set(), world_size=1).step == 0


def test_at_the_same_world_size_a_replica_stands_in_only_when_no_step_is_exact() -> None:
    # a spare takes b's place: exact (b decoded from parity) wins, even for an older step
    prev = _attempt(["a", "b", "c"], {n: (4, 5) for n in "abc"}, replicated=True)
    choice = choose_restore(prev, _plan(prev.nodes), _held({4}), {"a", "c", "d"}, world_size=3)
    assert (choice.step, choice.any_replica) == (4, False)
    # b lost before the attempt's first protected step (or the job is unprotected): the
    # newest step a survivor holds, b's ranks reading a survivor's replica
    for plan, held in ((_plan(prev.nodes), {}), (None, {})):
        choice = choose_restore(prev, plan, held, {"a", "c", "d"}, world_size=3)
        assert (choice.step, choice.lost, choice.any_replica) == (5, (1,), True)
        assert "the ranks of b read a survivor's model and optimizer" in choice.source
    # two of three lost, one survivor: still its newest step
    choice = choose_restore(prev, _plan(prev.nodes), _held({4, 5}), {"c", "d", "e"},
                            world_size=3)
    assert (choice.step, choice.lost, choice.any_replica) == (5, (0, 1), True)
    # every node of the step lost, or a sharded rank: nothing stands in
    assert choose_restore(prev, None, {}, {"d", "e", "f"}, world_size=3).step == 0
    prev.ranks[0].snapshot_replicated = False
    assert choose_restore(prev, None, {}, {"a", "c", "d"}, world_size=3).step == 0
    # without the new world size (no resize known) nothing changes either
    prev.ranks[0].snapshot_replicated = True
    assert choose_restore(prev, None, {}, {"a", "c", "d"}).step == 0


def test_unprotected_job_losing_a_node_restarts_without_memory() -> None:
    prev = _attempt(["a", "b"], {"a": (5,), "b": (5,)})
    choice = choose_restore(prev, None, {}, {"a"})
    assert choice.step == 0 and "not protected" in choice.source


def test_survivors_keep_their_places_and_a_replacement_takes_the_lost_one() -> None:
    assert order_nodes(["a", "b", "c"], ["c", "a", "d"]) == ["a", "d", "c"]
    assert order_nodes(["a", "b", "c"], ["c", "a"]) == ["a", "c"]
    assert order_nodes(["a", "b"], ["b", "c", "a"]) == ["a", "b", "c"]


def test_same_world_size_needs_own_ranks_a_resize_needs_every_old_rank() -> None:
    prev = _attempt(["a", "b", "c"], {})
    assert need_ranks(prev, [1], 3) == [1]
    assert need_ranks(prev, [0], 2) == [0, 1, 2]


def test_a_resize_of_data_parallel_state_names_one_replica_per_new_rank() -> None:
    # 4 nodes x 2 ranks, c lost: the 3 survivors take new ranks 0..5
    prev = _attempt(["a", "b", "c", "d"], {}, ppn=2, replicated=True)
    alive = surviving_ranks(prev, [2])
    assert alive == [0, 1, 2, 3, 6, 7]
    # d now runs new ranks 4, 5: it holds its old 6, 7; preferred 4, 5 were on c (lost), so
    # one surviving replica each, spread by the new rank's number
    assert need_ranks(prev, [4, 5], 6, "d", alive) == sorted({6, 7, alive[4], alive[5]})
    # a keeps its ranks: it holds what it reads
    assert need_ranks(prev, [0, 1], 6, "a", alive) == [0, 1]
    # a fresh node (grow) holds nothing: the preferred ranks when they survived
    assert need_ranks(prev, [8, 9], 10, "e", alive) == [0]
    # sharded state: every old rank, as before
    assert need_ranks(prev, [4, 5], 6, "d", None) == list(range(8))
    # same world size, a replica standing in for the lost c (RestoreChoice.any_replica): a
    # survivor reads its own old ranks, c's replacement one surviving replica per new rank
    assert need_ranks(prev, [6, 7], 8, "d", alive) == [6, 7]
    assert need_ranks(prev, [4, 5], 8, "e", alive) == sorted({alive[4], alive[5]})
    assert need_ranks(prev, [4, 5], 8, "e") == [4, 5]  # exact: its own old ranks


def test_a_replicated_resize_share_is_a_few_nodes_not_the_whole_layout() -> None:
    from hpt.controller import convert
    from hpt.controller.model import RestoreCommand

    nodes = [f"n{i}" for i in range(300)]
    prev = _attempt(nodes, {}, ppn=2, replicated=True)
    plan = protection_plan("", nodes, {n: [2 * i, 2 * i + 1] for i, n in enumerate(nodes)},
                           {n: f"{n}:1" for n in nodes})
    alive = surviving_ranks(prev, [150])
    sizes = {}
    for replicas in (alive, None):
        need = need_ranks(prev, [300, 301], 598, "n150x", replicas)  # a replacement node
        cmd = RestoreCommand(step=5, attempt=1, world_size=600, layout=plan, lost=(150,),
                             need_ranks=tuple(need), replicated=replicas is not None)
        sizes[replicas is None] = len(convert.restore_to_proto(cmd, node="n150x")
                                      .SerializeToString())
    assert sizes[False] * 10 < sizes[True]


def test_a_sharded_resize_names_the_old_slices_the_new_ranks_overlap() -> None:
    # 4 nodes x 2 ranks of FSDP (torch.chunk of 1,000 and 4,096 rows), node c lost: 3 x 2
    prev = _attempt(["a", "b", "c", "d"], {}, ppn=2)
    for r in prev.ranks:
        r.snapshot_split = "chunk:1000,4096"
    split = even_split(prev)
    assert split is not None and split.splits == {"chunk"}
    # d takes new ranks 4, 5 of 6: rows 668..999 and 2732..4095, old ranks 5..7; it holds 6, 7
    assert need_ranks(prev, [4, 5], 6, "d", None, split) == [4, 5, 6, 7]
    # a keeps 0, 1 (rows 0..333): old 0..2, its own among them
    assert need_ranks(prev, [0, 1], 6, "a", None, split) == [0, 1, 2]
    # without a split every old rank, as before
    assert need_ranks(prev, [0, 1], 6, "a", None, None) == list(range(8))
    # one rank that reported none, or a split the others do not follow: no prediction
    prev.ranks[3].snapshot_split = ""
    assert even_split(prev) is None
    prev.ranks[3].snapshot_split = "floor:1000"
    assert even_split(prev) is None
    prev.ranks[3].snapshot_split = "chunk:12,x"  # does not read: logged, no prediction
    assert even_split(prev) is None
    prev.ranks[3].snapshot_split = "chunk+floor:12"  # fits both: the common one, all sizes
    merged = even_split(prev)
    assert merged is not None and merged.splits == {"chunk"} and merged.sizes == {12, 1000, 4096}


def test_a_sharded_resize_share_at_scale_is_a_few_nodes_and_quick() -> None:
    from hpt.controller import convert
    from hpt.controller.model import RestoreCommand

    nodes = [f"n{i}" for i in range(500)]
    prev = _attempt(nodes, {}, ppn=8)
    for r in prev.ranks:
        r.snapshot_split = "chunk:4096,11008,32000"
    plan = protection_plan("", nodes, {n: list(range(8 * i, 8 * i + 8))
                                       for i, n in enumerate(nodes)},
                           {n: f"{n}:1" for n in nodes})
    split = even_split(prev)
    sizes = {}
    for given in (split, None):
        need = need_ranks(prev, list(range(2000, 2008)), 3992, "n250", None, given)
        cmd = RestoreCommand(step=5, attempt=1, world_size=4000, layout=plan, lost=(250,),
                             need_ranks=tuple(need), replicated=False)
        sizes[given is None] = len(convert.restore_to_proto(cmd, node="n250")
                                   .SerializeToString())
    assert sizes[False] * 10 < sizes[True]


def test_grow_waits_for_the_hysteresis_and_a_complete_step() -> None:
    job = Job(id="j", spec=JobSpec(command=("python",), nodes=3, min_nodes=2))
    attempt = _attempt(["a", "b"], {})
    assert decide_grow(job, attempt, {"c": 100.0}, {7}, now=105.0, hysteresis_s=10) is None
    assert decide_grow(job, attempt, {"c": 100.0}, set(), now=120.0, hysteresis_s=10) is None
    reason = decide_grow(job, attempt, {"c": 100.0}, {7}, now=110.0, hysteresis_s=10)
    assert reason is not None and reason.startswith("grow 2 -> 3 nodes: c")
    full = _attempt(["a", "b", "c"], {})
    assert decide_grow(job, full, {"d": 0.0}, {7}, now=110.0, hysteresis_s=10) is None


def test_piece_book_keeps_each_nodes_newest_report_only() -> None:
    from hpt.controller.pieces import PieceBook

    book = PieceBook()
    assert book.update("a", [("j", 1, 0, 5, 100), ("j", 1, 0, 6, 100)]) == {("j", 1)}
    assert book.update("a", [("j", 1, 0, 5, 100), ("j", 1, 0, 6, 100)]) == set()
    assert book.update("b", [("j", 1, 1, 6, 50)]) == {("j", 1)}
    assert book.held(("j", 1)) == {"a": {(0, 5), (0, 6)}, "b": {(1, 6)}}
    assert book.parity_bytes(("j", 1), 6) == 150
    assert book.update("a", []) == {("j", 1)}
    assert book.held(("j", 1)) == {"b": {(1, 6)}}
    book.update("b", [("j", 2, 0, 9, 10), ("k", 1, 0, 3, 10)])  # attempt 1 reported by nobody
    assert book.held(("j", 1)) == {}
    book.forget("j")  # the job ended
    assert book.held(("j", 2)) == {} and book.held(("k", 1)) == {"b": {(0, 3)}}


def test_a_reported_split_round_trips_and_an_oversized_one_is_not_kept() -> None:
    from hpt.controller import convert

    rank = Rank(rank=3, local_rank=1, node="a", snapshot_split="chunk:4096,14336")
    back = convert.rank_from_proto(convert.rank_to_proto(rank))
    assert back.snapshot_split == "chunk:4096,14336"
    # an agent (buggy, or hostile) sending megabytes per rank does not get them stored in the
    # job record on every write: the rank counts as having reported no split
    huge = convert.rank_to_proto(rank)
    huge.snapshot_split = "chunk:" + "1," * 100_000
    assert convert.rank_from_proto(huge).snapshot_split == ""


def test_an_hsdp_resize_names_one_copy_of_each_new_slice_while_the_groups_divide_the_world(
        ) -> None:
    # 4 nodes x 2 ranks, one copy of the state per node sliced over its 2 ranks; c lost
    prev = _attempt(["a", "b", "c", "d"], {}, ppn=2)
    for r in prev.ranks:
        r.snapshot_split = "floor/2:30001"
    split = even_split(prev)
    # d runs new ranks 4, 5 of 6 and holds old 6, 7 (the same slices): old 4, 5 are its
    # preferred ones (their RNG and plain values, as a resize from disk reads), enough
    assert need_ranks(prev, [4, 5], 6, "d", None, split) == [4, 5]
    assert need_ranks(prev, [0, 1], 6, "a", None, split) == [0, 1]
    # 7 ranks: not a multiple of the group, the slices are not known: every old rank
    assert need_ranks(prev, [6], 7, "e", None, split) == list(range(8))
