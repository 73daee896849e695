"""The persist cadence a running job gets from the failures it sees (controller/cadence.py), and
the reconciler applying it to the running attempt without restarting it."""

from __future__ import annotations

import dataclasses

import pytest

from hpt.controller import cadence, convert
from hpt.controller.config import ControllerConfig
from hpt.controller.metrics import ControllerMetrics
from hpt.controller.model import (
    Attempt,
    AttemptState,
    CadenceCommand,
    EventKind,
    Fault,
    FaultKind,
    Job,
    JobSpec,
    JobState,
    Node,
    Rank,
    RankReport,
    RankState,
)
from hpt.controller.reconcile import Reconciler
from hpt.controller.store.memory import MemoryStore
from hpt.monitor.goodput import DAY_S
from tests.unit.controller.test_execute import Link

HOUR = 3600.0


def _job(*, nodes: int = 4, per_node: int = 8, redundancy: str = "2+1", step_s: float = 2.0,
         steps: int = 100, snapshots: tuple[int, ...] = (96, 98, 100), persist_s: float = 0.0,
         faults: tuple[FaultKind, ...] = (), hours: float = 24.0, adapt: bool = True,
         persist_every: int = 10, replicated: bool = False, snapshot_bytes: int = 485_000_000,
         snapshot_every: int = 0, blocked_s: float = 0.0) -> tuple[Job, float]:
    """A running job whose first attempt started ``hours`` ago; one ended attempt per fault."""
    now = 1_000_000.0
    start = now - hours * HOUR
    names = [f"n{i}" for i in range(nodes)]

    def ranks() -> list[Rank]:
        return [Rank(rank=i, local_rank=i % per_node, node=names[i // per_node],
                     state=RankState.RUNNING, step=steps, step_at=now - 1.0,
                     snapshot_steps=snapshots, persist_s=persist_s,
                     snapshot_bytes=snapshot_bytes,
                     snapshot_replicated=replicated,
                     snapshot_blocked_s=blocked_s if i else 0.0)  # (one rank did not measure)
                for i in range(nodes * per_node)]

    attempts = []
    for n, kind in enumerate(faults, start=1):
        attempts.append(Attempt(number=n, nodes=names, master_addr="h", master_port=1,
                                world_size=nodes * per_node, ranks=[],
                                state=AttemptState.FAILED, started_at=start + n,
                                cause=Fault(kind=kind, attempt=n)))
    current = Attempt(number=len(faults) + 1, nodes=names, master_addr="h", master_port=1,
                      world_size=nodes * per_node, ranks=ranks(), state=AttemptState.RUNNING,
                      started_at=now - 1.0 - steps * step_s, redundancy=redundancy,
                      first_step_at=now - 1.0 - (steps - 1) * step_s)
    attempts.append(current)
    attempts[0].started_at = start
    spec = JobSpec(command=("python", "t.py"), nodes=nodes, procs_per_node=per_node,
                   persist_dir="/p", persist_every=persist_every, adapt_cadence=adapt,
                   snapshot_every=snapshot_every)
    return Job(id="j", spec=spec, state=JobState.RUNNING, attempts=attempts), now


def _est(**kw) -> cadence.Estimate:  # type: ignore[no-untyped-def]
    job, now = _job(**kw)
    est = cadence.estimate(job, now)
    assert est is not None
    return est


def test_the_posterior_starts_at_the_prior_and_follows_what_the_job_sees() -> None:
    prior = cadence.prior_per_day(16_384)
    assert sum(prior.values()) == pytest.approx(419 / 54)  # the Llama 3 mix at its own size
    none = dict.fromkeys(prior, 0)
    assert cadence.posterior_per_day(prior, none, 0.0) == pytest.approx(prior)
    # a day without failures lowers every rate; node losses raise that class only
    quiet = cadence.posterior_per_day(prior, none, DAY_S)
    assert quiet["memory"] < prior["memory"] and quiet["node_lost"] < prior["node_lost"]
    assert quiet["silent"] == prior["silent"]  # never observed: no evidence either way
    lossy = cadence.posterior_per_day(prior, {**none, "node_lost": 20}, DAY_S)
    assert lossy["node_lost"] > 2 * prior["node_lost"]
    assert lossy["memory"] == pytest.approx(quiet["memory"])
    # with much evidence the estimate is the observed rate
    long = cadence.posterior_per_day(prior, {**none, "node_lost": 5000}, 1000 * DAY_S)
    assert long["node_lost"] == pytest.approx(5.0, rel=0.01)


def test_faults_are_counted_by_class_from_the_attempts_they_ended() -> None:
    job, _ = _job(faults=(FaultKind.NODE_LOST, FaultKind.RANK_EXIT, FaultKind.HANG,
                          FaultKind.RANK_LOST))
    assert cadence.observed(job) == {"memory": 2, "node_lost": 2, "silent": 0}


def test_node_losses_shorten_the_interval_and_more_redundancy_lengthens_it() -> None:
    # a large unprotected job: every node loss needs disk
    big = {"nodes": 512, "redundancy": "", "hours": 12.0, "persist_s": 10.0}
    calm = _est(**big)
    lossy = _est(**big, faults=(FaultKind.NODE_LOST,) * 30)
    assert lossy.disk_per_day > 3 * calm.disk_per_day
    assert lossy.interval_s < calm.interval_s
    assert lossy.counts["node_lost"] == 30
    # the same losses with parity across nodes: a group rarely loses two within the window
    protected = _est(**{**big, "redundancy": "4+1"}, faults=(FaultKind.NODE_LOST,) * 30)
    assert protected.disk_per_day < lossy.disk_per_day / 10
    assert protected.interval_s > lossy.interval_s
    # data-parallel replicas on every node count as protection
    replicas = _est(**big, faults=(FaultKind.NODE_LOST,) * 30, replicated=True)
    assert replicas.redundancy == (1, 511) and replicas.disk_per_day < lossy.disk_per_day


def test_a_costlier_persist_is_made_less_often() -> None:
    big = {"nodes": 512, "redundancy": "", "faults": (FaultKind.NODE_LOST,) * 30}
    assert _est(**big, persist_s=60.0).interval_s > _est(**big, persist_s=2.0).interval_s


def test_the_interval_is_bounded_and_a_multiple_of_the_snapshot_cadence() -> None:
    # a small job with no faults: both optima are days away; snapshots 5 minutes apart at most,
    # persists an hour apart at most, a multiple of the snapshots
    small = _est(nodes=2, per_node=2, snapshots=(90, 95, 100), step_s=2.0)
    assert (small.snapshot_now, small.snapshot_every) == (5, 150)
    assert small.persist_every == 1800 and small.persist_every % small.snapshot_every == 0
    # the spec's snapshot cadence is the one in force, and stays when within 1.5x
    kept = _est(nodes=2, per_node=2, snapshots=(100,), step_s=2.0, snapshot_every=120)
    assert (kept.snapshot_now, kept.snapshot_every, kept.persist_every) == (120, 120, 1800)
    # never closer than 1.5 persists, even past the hour
    slow = _est(nodes=512, redundancy="", faults=(FaultKind.NODE_LOST,) * 300,
                persist_s=3000.0, snapshots=(99, 100), step_s=1.0)
    assert slow.interval_s >= 1.5 * 3000.0
    fast = _est(nodes=512, redundancy="", faults=(FaultKind.NODE_LOST,) * 3000, hours=1.0,
                persist_s=0.5, snapshots=(99, 100), step_s=1.0, snapshot_bytes=1000)
    assert fast.snapshot_every == 1  # a tiny state: snapshots cost nothing
    assert fast.persist_every < 60  # a few seconds' worth at thousands of losses an hour


def test_the_snapshot_cadence_follows_the_state_size_and_the_failures_memory_restores() -> None:
    # the plan's cluster: 2,048 nodes x 8, 3.88 GB a node, 2.57 s steps: Young/Daly on the
    # failures memory and peers restore puts snapshots some 18 steps apart
    big = {"nodes": 2048, "per_node": 8, "redundancy": "8+1", "step_s": 2.57,
           "snapshots": (99, 100), "hours": 1.0}
    plan = _est(**big)
    assert 14 <= plan.snapshot_every <= 22, plan.snapshot_every
    assert plan.snapshot_cost_s == pytest.approx(0.09, rel=0.01)
    # crashes of its own shorten it; a state 100x smaller makes snapshots 10x cheaper
    crashy = _est(**big, faults=(FaultKind.RANK_EXIT,) * 100)
    assert crashy.memory_per_day > 10 * plan.memory_per_day
    assert crashy.snapshot_every < plan.snapshot_every
    light = _est(**{**big, "snapshot_bytes": 4_850_000})
    assert light.snapshot_every < plan.snapshot_every / 5
    # a new cadence starts at one of its steps, past the ranks' newest + APPLY_AHEAD_S
    assert plan.snapshot_changed and plan.snapshot_from % plan.snapshot_every == 0
    assert plan.snapshot_from > 100 + cadence.APPLY_AHEAD_S / 2.57
    assert "snapshot every 1 -> " in plan.reason() and f"from step {plan.snapshot_from}" in (
        plan.reason())


def test_a_measured_blocking_time_replaces_the_size_scaled_default() -> None:
    big = {"nodes": 2048, "per_node": 8, "redundancy": "8+1", "step_s": 2.57,
           "snapshots": (99, 100), "hours": 1.0}
    scaled = _est(**big)
    assert scaled.blocked_s == 0 and "by its size)" in scaled.reason()
    # the ranks measured 0.5 s a snapshot (a slow host copy, say): the cost is that plus the
    # copies' share, and snapshots are taken further apart (Young/Daly: sqrt of the cost)
    slow = _est(**big, blocked_s=0.5)
    assert slow.blocked_s == 0.5
    assert slow.snapshot_cost_s == pytest.approx(0.5 + scaled.snapshot_cost_s - 0.015, rel=0.01)
    assert slow.snapshot_every > 2 * scaled.snapshot_every
    assert "500 ms blocking measured" in slow.reason()
    # measured at 1 ms (hpt's usual): cheaper than the 15 ms default, closer together
    quick = _est(**big, blocked_s=0.001)
    assert quick.snapshot_cost_s < scaled.snapshot_cost_s
    assert quick.snapshot_every <= scaled.snapshot_every


def test_the_operator_caps_how_far_apart_snapshots_are_set() -> None:
    from hpt.controller.config import ControllerConfig

    job, now = _job(nodes=2, per_node=2, snapshots=(90, 95, 100), step_s=2.0, blocked_s=0.003)
    capped = cadence.estimate(job, now, max_snapshot_s=60.0)
    default = cadence.estimate(job, now)
    assert capped is not None and default is not None
    assert (capped.snapshot_every, default.snapshot_every) == (30, 150)  # 60 s and 300 s
    assert cadence.retune(job, now, 60.0).snapshot_every == 30  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="max_snapshot_interval_s"):
        ControllerConfig(max_snapshot_interval_s=0.5)


def test_nothing_is_retuned_before_the_step_time_is_known_or_within_the_ratio() -> None:
    job, now = _job(steps=2, snapshots=(1, 2))  # two steps: not yet
    assert cadence.estimate(job, now) is None and cadence.retune(job, now) is None
    job, now = _job(snapshots=())  # no snapshot: the script has no hpt Checkpointer
    assert cadence.estimate(job, now) is None
    pinned = {"nodes": 2, "per_node": 2, "snapshots": (100,), "snapshot_every": 150}
    job, now = _job(**pinned, persist_every=1500)
    assert cadence.retune(job, now) is None  # 1800 recommended: within 1.5x of 1500
    job, now = _job(**pinned, persist_every=1000)
    est = cadence.retune(job, now)
    assert est is not None and est.persist_every == 1800 and not est.snapshot_changed
    assert "persist every 1000 -> 1800 steps" in est.reason()
    assert "snapshot every" not in est.reason()
    job, now = _job(nodes=2, per_node=2, adapt=False, persist_every=1)
    assert cadence.retune(job, now) is None  # the job did not ask for it
    job, now = _job(nodes=2, per_node=2, persist_every=1)
    job.state = JobState.RECOVERING
    assert cadence.retune(job, now) is None


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_the_reconciler_retunes_a_running_job_in_place_and_its_next_launch_carries_it() -> None:
    clock = _Clock()
    store = MemoryStore()
    rec = Reconciler(ControllerConfig(port=0), store, clock=clock)
    links = {name: Link() for name in ("n0", "n1")}
    for name, link in links.items():
        rec.register(Node(name=name, address="127.0.0.1", slots=4), link, [], 0)
    spec = JobSpec(command=("python", "t.py"), nodes=2, procs_per_node=2, persist_dir="/p",
                   persist_every=1, adapt_cadence=True)
    fixed = rec.submit(dataclasses.replace(spec, adapt_cadence=False, nodes=1))
    job_id = rec.submit(spec)
    rec.reconcile_once()
    for jid in (job_id, fixed):
        attempt = rec.jobs[jid].attempts[-1]
        first = clock.now
        for r in attempt.ranks:  # ten 1-second steps, a 4 GB snapshot every step, 0.2 s
            # persists: a small job with no faults, snapshots 300 steps apart (the most),
            # persists 3,600 (an hour)
            rec.heartbeat(r.node, [RankReport(job_id=jid, attempt=attempt.number, rank=Rank(
                rank=r.rank, local_rank=r.local_rank, node=r.node, pid=100 + r.rank,
                state=RankState.RUNNING, step=10, step_at=first + 9, first_step_at=first,
                snapshot_steps=(8, 9, 10), persisted_steps=(9, 10), persist_s=0.2,
                snapshot_bytes=4_000_000_000))], [], 0)
    clock.now += 10
    rec._next_cadence = 0.0  # the pass is due (it runs every _CADENCE_PERIOD_S)
    rec.reconcile_once()

    job = rec.jobs[job_id]
    assert job.persist_every == 3600 and job.spec.persist_every == 1  # the spec as submitted
    sent = [c for link in links.values() for c in link.sent if isinstance(c, CadenceCommand)]
    assert sorted(c.persist_every for c in sent) == [3600, 3600]  # both nodes of the attempt
    assert {c.attempt for c in sent} == {1} and all(c.job_id == job_id for c in sent)
    # the ranks switch together at a step past 10 + APPLY_AHEAD_S of 1 s steps
    assert {(c.snapshot_every, c.snapshot_from, c.snapshot_before) for c in sent} == {
        (300, 300, 0)}  # until then the script's own
    assert job.snapshot_every == 300 and job.spec.snapshot_every == 0
    assert job.current is not None and job.current.number == 1  # not restarted
    events = [e for e in rec.events.read(0) if e.kind == EventKind.CADENCE_CHANGED]
    assert [e.job_id for e in events] == [job_id]
    assert "persist every 1 -> 3600 steps" in events[0].message
    assert "snapshot every 1 -> 300 steps from step 300" in events[0].message
    assert rec.jobs[fixed].persist_every == 0  # a fixed cadence is left alone
    # the record keeps it, and a launch after a fault carries it as the spec's cadence
    back = convert.job_from_proto(convert.job_to_proto(job))
    assert (back.persist_every, back.snapshot_every) == (3600, 300)
    assert job.launch_spec.persist_every == 3600 and job.launch_spec.adapt_cadence
    launches = rec._launch_commands(job, job.current)
    assert {(c.spec.persist_every, c.spec.snapshot_every) for c in launches.values()} == {
        (3600, 300)}
    metrics = ControllerMetrics(rec)
    metrics.sync()
    text = metrics.metrics.render().decode()
    assert f'hpt_job_persist_every_steps{{hpt_job="{job_id}"}} 3600.0' in text
    assert f'hpt_job_persist_every_steps{{hpt_job="{fixed}"}} 1.0' in text
    # the next pass recommends the same: nothing more is sent
    for link in links.values():
        link.sent.clear()
    rec._next_cadence = 0.0
    rec.reconcile_once()
    assert not any(isinstance(c, CadenceCommand) for link in links.values() for c in link.sent)
