"""A completed protection round is named to the attempt's nodes at once (``ProtectCommand``),
not with each node's next heartbeat ack, and the intake's cached targets follow it."""

from __future__ import annotations

import pytest

from hpt.controller import reconcile
from hpt.controller.config import ControllerConfig
from hpt.controller.model import JobSpec, Node, ProtectCommand, Rank, RankReport, RankState
from hpt.controller.reconcile import Reconciler
from hpt.controller.store.memory import MemoryStore
from tests.unit.controller.test_execute import Link

NODES = ("n0", "n1", "n2")


def _pushed(link: Link) -> list[ProtectCommand]:
    return [c for c in link.sent if isinstance(c, ProtectCommand)]


def _protected_job() -> tuple[Reconciler, dict[str, Link], str]:
    rec = Reconciler(ControllerConfig(port=0), MemoryStore())
    links = {name: Link() for name in NODES}
    for i, name in enumerate(NODES):
        rec.register(Node(name=name, address="127.0.0.1", slots=1,
                          peer_address=f"127.0.0.1:{7000 + i}"), links[name], [], 0)
    job_id = rec.submit(JobSpec(command=("python", "x.py"), nodes=3, procs_per_node=1,
                                redundancy="2+1"))
    rec.reconcile_once()  # placed and launched
    return rec, links, job_id


def _report(rec: Reconciler, job_id: str, steps: tuple[int, ...]) -> None:
    attempt = rec.jobs[job_id].attempts[-1]
    for r in attempt.ranks:
        rec.heartbeat(r.node, [RankReport(job_id=job_id, attempt=attempt.number, rank=Rank(
            rank=r.rank, local_rank=0, node=r.node, pid=100 + r.rank, state=RankState.RUNNING,
            step=max(steps), step_at=1.0, snapshot_steps=steps))], [], 0)
    rec.reconcile_once()


def _all_hold(rec: Reconciler, job_id: str, step: int) -> None:
    """Every parity holder reports its piece of ``step`` (the round is done)."""
    attempt = rec.jobs[job_id].attempts[-1]
    plan = rec._stripes_of(rec.jobs[job_id], attempt)
    assert plan is not None
    held: dict[str, list[tuple[str, int, int, int, int]]] = {n: [] for n in NODES}
    for stripe, (_, parity) in enumerate(plan.stripes):
        for holder in parity:
            held[plan.nodes[holder].node].append((job_id, attempt.number, stripe, step, 64))
    rec.held_pieces(list(held.items()))  # one batch of heartbeats
    rec.reconcile_once()


def test_a_completed_round_names_the_next_to_every_node_of_the_attempt_at_once() -> None:
    rec, links, job_id = _protected_job()
    _report(rec, job_id, (4, 5))
    assert [t[2] for t in rec.protect_targets()] == [5]  # the round of step 5
    _report(rec, job_id, (5, 6))  # the ranks moved on while it was built
    version = rec.rounds_version
    _all_hold(rec, job_id, 5)
    assert rec.jobs[job_id].attempts[-1].protected_steps == (5,)
    for name in NODES:  # each node told the next round, and that 5 is protected (kept pinned)
        assert [c.targets for c in _pushed(links[name])] == [((job_id, 1, 6, 5),)]
    assert rec.rounds_version == version + 1  # the intake takes the pushed targets
    assert [t[:4] for t in rec.rounds_pushed] == [(job_id, 1, 6, 5)]


def test_nothing_is_pushed_while_a_round_is_in_progress() -> None:
    rec, links, job_id = _protected_job()
    _report(rec, job_id, (4, 5))
    rec.protect_targets()
    attempt = rec.jobs[job_id].attempts[-1]
    rec.held_pieces([("n0", [(job_id, attempt.number, 0, 5, 64)])])  # one holder of three
    rec.reconcile_once()
    assert all(not _pushed(link) for link in links.values())


def test_an_attempt_is_pushed_to_at_most_once_per_its_share_of_time_then_later(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reconcile, "_PUSH_S_PER_NODE", 3600.0)
    rec, links, job_id = _protected_job()
    _report(rec, job_id, (4, 5))
    rec.protect_targets()
    _report(rec, job_id, (5, 6))
    _all_hold(rec, job_id, 5)
    rec.protect_targets()
    _report(rec, job_id, (6, 7))
    _all_hold(rec, job_id, 6)  # the next round completed within the window
    assert rec.jobs[job_id].attempts[-1].protected_steps[-1] == 6
    assert [len(_pushed(link)) for link in links.values()] == [1, 1, 1]
    monkeypatch.setattr(reconcile, "_PUSH_S_PER_NODE", 0.0)
    monkeypatch.setattr(reconcile, "MIN_ROUND_S", 0.0)
    rec.reconcile_once()  # the round that completed too soon is pushed by a later pass
    assert [len(_pushed(link)) for link in links.values()] == [2, 2, 2]


def test_pieces_are_judged_once_per_attempt_per_batch_with_its_layout_built_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    rec, _, job_id = _protected_job()
    _report(rec, job_id, (4, 5))
    rec.protect_targets()
    built = []
    plan_of = rec._plan_of
    monkeypatch.setattr(rec, "_plan_of", lambda job, attempt: built.append(1) or plan_of(
        job, attempt))
    judged = []
    protected_steps = reconcile.elastic.protected_steps
    monkeypatch.setattr(reconcile.elastic, "protected_steps",
                        lambda plan, held: judged.append(1) or protected_steps(plan, held))
    _all_hold(rec, job_id, 5)  # three nodes' reports in one batch
    assert rec.jobs[job_id].attempts[-1].protected_steps == (5,)
    assert (len(built), len(judged)) == (1, 1)
    _report(rec, job_id, (5, 6))
    _all_hold(rec, job_id, 6)
    assert (len(built), len(judged)) == (1, 2)  # the layout is the attempt's: built once
