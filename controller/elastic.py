"""Snapshot protection and elastic restarts, as the controller decides them. Pure functions.

- ``parse_redundancy`` / ``protection_plan``: how an attempt's snapshots are protected. Its
  nodes are cut into groups of k + m (the last group takes the remainder; with fewer nodes than
  k + m after a shrink, one group of all of them with k = nodes - m); a group of s nodes has s
  stripes, stripe j's parity on nodes j .. j+m-1 of the group (rotating) and the other s - m
  nodes as its data members. Two nodes with m = 1 make a mirror (k = 1).
- ``protected_steps``: the steps whose every parity piece is reported verified by its holder.
- ``choose_restore``: the newest step of the previous attempt that is complete AND recoverable
  from the nodes still alive: every rank's snapshot is in a surviving node's memory, or the
  nodes that lost it are few enough for every stripe to decode (and the step is protected).
  Never a mix of steps: one step for every rank, or none (then disk, then scratch).
- ``decide_grow``: a job running below its node count grows back when a node has been free
  for the hysteresis and a snapshot is complete on every rank (every node is alive, so the
  grown attempt restores it from memory; protection is not needed for that, and requiring a
  protected step would stall growth whenever the holders' protected steps do not coincide).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hpt.jobspec import parse_redundancy
from hpt.splits import EvenSplit, common_split, preferred_rank

if TYPE_CHECKING:  # model imports this module: no import cycle at runtime
    from hpt.controller.model import Attempt, Job

log = logging.getLogger(__name__)

GROW_HYSTERESIS_S = 10.0
"""A node must stay free this long before a job grows onto it (no flapping)."""


@dataclass(frozen=True, slots=True)
class PlanNode:
    node: str
    peer_address: str
    ranks: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ProtectionPlan:
    """How one attempt's snapshots are protected (sent to its agents at launch)."""

    k: int
    m: int
    nodes: tuple[PlanNode, ...]
    stripes: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]  # (data, parity) node indices

    @property
    def label(self) -> str:
        return "mirror" if self.k == 1 and self.m == 1 else f"{self.k}+{self.m}"

    def recoverable(self, unavailable: set[int]) -> bool:
        """Every stripe misses at most as many pieces as it has parity."""
        return all(len(unavailable & {*data, *parity}) <= len(parity)
                   for data, parity in self.stripes)


@dataclass(frozen=True, slots=True)
class RestoreChoice:
    step: int
    """0: nothing in memory is usable (the ranks go to disk, else scratch)."""
    lost: tuple[int, ...]
    """Indices of the previous attempt's nodes whose memory is gone for ``step``."""
    source: str
    """One line for the event log: where the state comes from and why."""
    any_replica: bool = False
    """Same world size, data-parallel state, and no step recoverable rank for rank: the lost
    nodes' new ranks read a surviving replica (``need_ranks`` and the agents as after a
    resize), not their own old ranks' state."""


DEFAULT_MAX_K = 16
"""Data nodes per group when the job names no K (``hptctl plan``'s 16+1 for 16,384 GPUs)."""


def protection_plan(redundancy: str, nodes: list[str], ranks: Mapping[str, Iterable[int]],
                    peers: Mapping[str, str]) -> ProtectionPlan | None:
    """The layout of an attempt on ``nodes`` (in attempt order); None when unprotected."""
    # validated against the job's node count at submit; a shrunk attempt may have fewer
    km = parse_redundancy(redundancy, 256)
    if km is None or len(nodes) < 2:
        return None
    k, m = km
    # the default K: every node in one group up to DEFAULT_MAX_K + m nodes, then groups of
    # that size (a layout is O(group size x nodes), and Reed-Solomon over GF(2^8) stops at 256)
    size = k + m if k and k + m <= len(nodes) else min(len(nodes), DEFAULT_MAX_K + m)
    if size - m < 1:
        return None
    groups = [size] * (len(nodes) // size)
    groups[-1] += len(nodes) % size
    stripes = []
    base = 0
    for s in groups:
        for j in range(s):
            parity = tuple(base + (j + t) % s for t in range(m))
            data = tuple(base + x for x in range(s) if base + x not in parity)
            stripes.append((data, parity))
        base += s
    plan_nodes = tuple(PlanNode(n, peers.get(n, ""), tuple(sorted(ranks.get(n, ()))))
                       for n in nodes)
    return ProtectionPlan(k=groups[0] - m, m=m, nodes=plan_nodes, stripes=tuple(stripes))


def unprotected_plan(attempt: Attempt, peers: Mapping[str, str]) -> ProtectionPlan:
    """The node list of an attempt without stripes: restore may still copy from peers."""
    ranks: dict[str, list[int]] = {}
    for r in attempt.ranks:
        ranks.setdefault(r.node, []).append(r.rank)
    return ProtectionPlan(k=0, m=0, nodes=tuple(
        PlanNode(n, peers.get(n, ""), tuple(sorted(ranks.get(n, ())))) for n in attempt.nodes),
        stripes=())


def protected_steps(plan: ProtectionPlan, pieces: Mapping[str, set[tuple[int, int]]]) -> set[int]:
    """Steps for which every holder of every stripe reported its piece, verified.

    Args:
        pieces: node -> {(stripe, step)} it holds for this attempt (its newest report).
    """
    steps: set[int] | None = None
    for j, (_, parity) in enumerate(plan.stripes):
        for holder in parity:
            held = {step for stripe, step in pieces.get(plan.nodes[holder].node, ()) if stripe == j}
            steps = held if steps is None else steps & held
            if not steps:
                return set()
    return steps or set()


def replicated(attempt: Attempt) -> bool:
    """Every rank of ``attempt`` reported data-parallel state (no sharded tensor)."""
    return bool(attempt.ranks) and all(r.snapshot_replicated for r in attempt.ranks)


def choose_restore(previous: Attempt, plan: ProtectionPlan | None,
                   pieces: Mapping[str, set[tuple[int, int]]], alive: set[str],
                   exclude: set[int] | None = None, world_size: int = 0) -> RestoreChoice:
    """The newest step of ``previous`` every rank can restore, and from where.

    A node's data is available for a step when the node is alive and every rank of it still
    holds the step; a parity piece when its holder is alive and reports (stripe, step). The
    step is recoverable when every stripe has at least k available pieces. Steps in
    ``exclude`` (an agent failed to put them in place before) are never chosen.

    A resize (``world_size``, the new attempt's, differs from the previous one's) of a job
    whose every rank reported data-parallel state (no sharded tensor) needs no parity at all:
    any surviving replica serves any new rank (the agents read one they hold, else fetch one
    from a surviving node), so a step one surviving node holds is recoverable however many
    nodes were lost.

    At the same world size each new rank gets back its own old rank's state (RNG streams and
    all) when some step allows it. When none does (the job is unprotected, more nodes were
    lost than the code decodes, or a node was lost before the attempt's first protected step)
    a data-parallel job still restores the newest step one surviving node holds: the lost
    ranks read a surviving replica, as after a resize (``RestoreChoice.any_replica``), the
    model and optimizer exact, their RNG streams another rank's. Before, such a job went back
    to disk or to step 0 while every survivor held the whole model in memory.

    Args:
        pieces: node -> {(stripe, step)} of ``previous`` it holds now (its newest report).
    """
    data_parallel = bool(world_size) and replicated(previous)
    replicas = data_parallel and world_size != previous.world_size
    stand_in: RestoreChoice | None = None  # the newest step a surviving replica serves
    candidates = sorted({s for r in previous.ranks for s in r.snapshot_steps}
                        - (exclude or set()), reverse=True)
    gone = sorted(n for n in previous.nodes if n not in alive)
    best_reason = "no snapshot in memory"
    for step in candidates:
        unavailable = {i for i, node in enumerate(previous.nodes)
                       if node not in alive
                       or any(step not in r.snapshot_steps for r in previous.ranks_on(node))}
        if not unavailable:
            return RestoreChoice(step, (), f"step {step} from memory (every node holds it)")
        names = ", ".join(previous.nodes[i] for i in sorted(unavailable))
        if replicas and len(unavailable) < len(previous.nodes):
            return RestoreChoice(step, tuple(sorted(unavailable)),
                                 f"step {step}: from the surviving replicas (data-parallel "
                                 f"state, no sharded tensor); {names} not needed")
        if data_parallel and stand_in is None and len(unavailable) < len(previous.nodes):
            stand_in = RestoreChoice(
                step, tuple(sorted(unavailable)),
                f"step {step}: from the surviving replicas (data-parallel state, no sharded "
                f"tensor): no step is recoverable rank for rank, so the ranks of {names} read "
                "a survivor's model and optimizer, and its RNG streams", any_replica=True)
        if plan is None or not plan.stripes:
            best_reason = f"{names} lost step {step} and the job is not protected"
            continue
        short = []
        for j, (data, parity) in enumerate(plan.stripes):
            have = sum(1 for d in data if d not in unavailable) + sum(
                1 for h in parity if plan.nodes[h].node in alive
                and (j, step) in pieces.get(plan.nodes[h].node, ()))
            if have < len(data) and unavailable & set(data):
                short.append(j)
        if short:
            best_reason = (f"{len(unavailable)} node(s) ({names}) lost step {step}; fewer than "
                           f"k pieces of it survive in stripe(s) {short} ({plan.label})")
            continue
        return RestoreChoice(step, tuple(sorted(unavailable)),
                             f"step {step}: {names} rebuilt from peers "
                             f"({'replica' if plan.k == 1 else 'parity ' + plan.label})")
    if stand_in is not None:
        return stand_in
    lost = f" (lost: {', '.join(gone)})" if gone else ""
    return RestoreChoice(0, (), f"nothing recoverable in memory{lost}: {best_reason}")


def need_ranks(previous: Attempt, new_ranks: list[int], world_size: int, node: str = "",
               replicas: Sequence[int] | None = None,
               split: EvenSplit | None = None) -> list[int]:
    """Old ranks ``node``, whose new ranks are ``new_ranks``, must hold: its own rank numbers
    at the same world size. After a resize of data-parallel state (no sharded tensor: any old
    rank serves any new one; ``replicas``: the old ranks whose node survived, from
    :func:`surviving_ranks`) the agent reads one replica per new rank
    (``hpt.ckpt.sources.replica_rank``): the node's own old ranks, each new rank's preferred
    old rank (its own number, or 0) or, where that one's node was lost, one surviving rank
    spread by the new rank's number, as the agent would pick. That keeps the restore's share
    of the old layout to the nodes of those ranks: naming every old rank made each node's plan
    carry the whole layout, O(nodes^2) bytes a resize (175 KB a node at 2,000 nodes). A resize
    of sharded state (``replicas`` None) cut by an even split every rank reported (``split``,
    :func:`even_split`) needs each new rank's preferred old rank and the old ranks whose slices
    its slice overlaps (HSDP: the preferred one's copy of its slice, while the new world keeps
    the groups); the node's own old snapshots are read where they are, named or not. Cut some
    other way, a slice of any old shard: every old rank. At the same world size a node needs
    its new ranks' own old ranks, unless ``replicas`` is given
    (``RestoreChoice.any_replica``): then as after a resize of data-parallel state."""
    if previous.world_size == world_size and replicas is None:
        return sorted(new_ranks)
    needs = split.needs(previous.world_size, new_ranks, world_size) \
        if replicas is None and split is not None else None
    if needs is not None:
        return sorted(needs)
    if replicas is None:
        return list(range(previous.world_size))
    alive = set(replicas)
    need = {r.rank for r in previous.ranks_on(node)} if node else set()
    for new in new_ranks:
        pref = preferred_rank(new, previous.world_size)
        if pref in alive:
            need.add(pref)
        elif replicas:
            need.add(replicas[new % len(replicas)])
    return sorted(need)


def even_split(attempt: Attempt) -> EvenSplit | None:
    """The even split every rank of ``attempt`` reported its sharded tensors follow
    (``Rank.snapshot_split``; over all their sizes), or None: a rank reported none, or one the
    others do not share, or one that does not read."""
    try:
        return common_split(r.snapshot_split for r in attempt.ranks)
    except ValueError as exc:
        log.warning("attempt %d: %s", attempt.number, exc)
        return None


def surviving_ranks(previous: Attempt, lost: Iterable[int]) -> list[int]:
    """The ranks of ``previous`` whose node is not among ``lost`` (indices of its nodes)."""
    gone = {previous.nodes[i] for i in lost if 0 <= i < len(previous.nodes)}
    return [r.rank for r in previous.ranks if r.node not in gone]


def order_nodes(previous: list[str], chosen: list[str]) -> list[str]:
    """``chosen`` ordered so that every surviving node keeps its place (and its ranks):
    replacements take the places of the nodes they replace, extra nodes go last."""
    fresh = [n for n in chosen if n not in previous]
    out: list[str] = []
    for n in previous:
        if n in chosen:
            out.append(n)
        elif fresh:
            out.append(fresh.pop(0))
    return out + fresh


def decide_grow(job: Job, attempt: Attempt, free_nodes: Mapping[str, float],
                complete: set[int], now: float,
                hysteresis_s: float = GROW_HYSTERESIS_S) -> str | None:
    """A reason to stop ``attempt`` and relaunch on more nodes, or None.

    Args:
        free_nodes: node -> wall clock since when it has been ready with room for the job.
        complete: steps every rank of ``attempt`` holds in memory.
    """
    if len(attempt.nodes) >= job.spec.nodes or not complete or not attempt.first_step_at:
        return None
    settled = sorted(n for n, since in free_nodes.items()
                     if n not in job.excluded_nodes and now - since >= hysteresis_s)
    if not settled:
        return None
    newest = max(complete)
    wanted = min(len(settled), job.spec.nodes - len(attempt.nodes))
    return (f"grow {len(attempt.nodes)} -> {len(attempt.nodes) + wanted} nodes: "
            f"{', '.join(settled[:wanted])} free for >= {hysteresis_s:g}s; snapshot of step "
            f"{newest} complete on every rank")
