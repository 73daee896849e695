"""Protection rounds: the controller names the one step every parity holder protects.

A lost node's state is decodable only if every stripe it is a data member of holds parity of
the SAME step. Holders that each chose "the newest step my data members hold" chose at
different moments and often disagreed, so a node loss fell back to disk. Now a round has a
target step, named here and sent to the attempt's agents with every heartbeat ack
(``HeartbeatAck.protect``); a holder builds exactly that step and never picks one itself
(``agent/protect.py``). The agents keep the target and the newest protected step in their
ranks' memory while the ranks save on (pins, ``agent/snapshots.py``).

The target stays until the round is done (the step is protected: every holder of every stripe
reports it; the report that completes it names the next round to every node of the attempt at
once, ``Reconciler._push_rounds``, rather than with each node's next heartbeat ack) and only then
moves on, skipping the steps saved meanwhile: a slow network costs
freshness, never an unbounded queue. The next target is the newest step complete in memory on
every rank. With fast steps that step may be overwritten before the ack naming it reaches the
agents (a report and an ack take up to two heartbeat periods, a generation lives a few steps):
the round can never finish. Such a round is abandoned once every rank has gone past its step,
and from then on the job's targets are named ``lead`` steps AHEAD of the ranks (at least the
steps the ranks made while the missed round was in flight, doubled after each miss): the
agents pin a future step the moment their ranks commit it. The same holds from the first
round when no step is complete on every rank in the reports at hand (each node's report is from
another moment, and ranks that keep three generations of 50 ms steps share none), and after a
round done at the newest complete step when none newer is (the protected step stays complete:
the agents pin it; a restarted controller, whose rounds start over at lead 0, named it and
then waited for a newer one for the rest of the attempt). A step ahead that
the ranks stop moving towards for ``AHEAD_WAIT_S`` (slow steps, a pause) gives way to the newest
complete step, which stays in memory long enough when the ranks move that slowly. A target far
ahead that the ranks keep moving towards is kept however long they take: giving it up for the
newest complete step after a fixed time missed again with fast steps, doubled the lead again,
and on a loaded machine never protected a step at all.

A miss after the first doubles the lead rather than naming as many steps ahead as the ranks went
meanwhile, and sets the job's floor (``Target.floor``) to the new lead; each round done ahead
of the ranks halves a lead above the floor, and a new attempt starts at the floor. A miss
judged in the grace after the controller's own stall (``stall.py``: the round was named from
reports made before it) says nothing about the network: the round is named again, as far
ahead as before, from the reports at hand, and the floor stays as it was. (Doubling the lead
there cost a 4 s controller pause 2.3 s without a protected step after it: one miss, then a
round 36 steps ahead.) A floor comes down too, by a quarter after every ``CALM_ROUNDS`` rounds
done at it: a miss a passing fault caused (an agent or a rank paused for a moment) otherwise
kept every later round of the job that far ahead; a floor that comes below what the network
needs misses once and doubles. Before, a controller paused or restarted while the ranks ran
on grew the lead to the steps they ran meanwhile (80 steps for 4 s paused, 1,024 after a few
misses in a row) and kept it there: every later round protected a step that far behind, and a
node lost then lost that many steps. (Setting the floor one step above the missed lead
instead made it creep up a step per miss, each miss a round lost.)
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass, replace

from hpt.controller.model import Attempt, AttemptState, Job

log = logging.getLogger(__name__)

_LIVE = (AttemptState.LAUNCHING, AttemptState.RUNNING)
MAX_LEAD = 1024
"""Steps ahead of the ranks a target is named at most."""
CALM_ROUNDS = 4
"""Rounds done at the floor after which it comes down by a quarter: a miss that a passing
fault caused (an agent or a rank paused) does not keep every later round that far ahead."""
AHEAD_WAIT_S = 2.0
"""How long a round waits for the ranks to move towards a step named ahead of them."""


@dataclass(frozen=True, slots=True)
class Target:
    """The round of one attempt now."""

    step: int
    lead: int = 0
    """0: targets are the newest complete step; else steps ahead of the ranks they are named."""
    named_at: float = 0.0
    """Monotonic time the step was named."""
    seen: int = -1
    """The lowest newest snapshot step over the ranks when they last moved towards ``step``."""
    moved_at: float = 0.0
    """Monotonic time of that move (0: when named)."""
    floor: int = 0
    """The fewest steps ahead the job's rounds are named: the lead its newest miss (not judged
    on reports from before a stall of the controller) set, less a quarter for every
    ``CALM_ROUNDS`` rounds done at it since (0: none)."""
    calm: int = 0
    """Rounds done at the floor since the last miss or the floor's last move."""


def next_target(current: Target | None, lead: int, complete: set[int], protected: set[int],
                reached: tuple[int, int], now: float, cadence: int = 1,
                floor: int = 0, learn: bool = True) -> Target | None:
    """The round now.

    Args:
        current: the attempt's current round (None: no round of this attempt yet).
        lead: the job's lead (0: name the newest complete step).
        floor: the job's floor (``Target.floor``).
        learn: a miss raises the floor (False right after the controller itself stalled: the
            reports at hand are from before, and the miss says nothing about the lead).
        complete: steps complete in memory on every rank.
        protected: steps already protected.
        reached: (lowest, highest) newest snapshot step over the ranks: every rank has saved
            the first, one has saved the second.
        now: monotonic clock.
        cadence: steps between two snapshots (a target ahead of the ranks is one they save).
    """
    newest = max(complete, default=None)
    calm = current.calm if current is not None else 0
    if current is not None and current.step not in protected:
        if current.step in complete:
            return current  # round in progress
        if current.step > reached[0]:  # a step a rank has yet to save
            if reached[0] > current.seen:  # the ranks move towards it: wait on
                return replace(current, seen=reached[0], moved_at=now)
            since = max(current.named_at, current.moved_at)
            if now - since < AHEAD_WAIT_S or newest is None or newest in protected:
                return current
            # the ranks are slow or paused
            return Target(newest, lead, now, reached[0], floor=floor, calm=calm)
        # every rank went past it and one lost it: name steps twice as far ahead as the last
        # lead, or the first time as far as the ranks went while this one was in flight (not
        # later: a controller paused or restarted meanwhile would make that every step the
        # ranks ran while it was gone)
        if learn:
            lead = floor = min(max(1, 2 * lead if lead else reached[1] - current.step),
                               MAX_LEAD)
            calm = 0
        else:  # judged in the grace after the controller's own stall: the round was named
            # from reports made before it, and says nothing of the lead the network needs
            lead = max(1, lead or floor)
    elif current is not None and current.lead:  # done ahead of the ranks: come back down
        if lead > max(1, floor):
            lead = max(1, floor, lead // 2)
        else:  # and, slowly, the floor a miss set
            calm += 1
            if calm >= CALM_ROUNDS and floor > 1:
                floor = lead = floor - max(1, floor // 4)
                calm = 0
    done = current.step if current is not None else -1
    if not lead and reached[0] > done and (newest is None or newest <= done):
        # every rank saved a step past the last round, yet none is held by all of them in the
        # reports at hand: they came from different moments (fast steps, heartbeats out of
        # phase) and a rank keeps a few generations (the protected step among them, pinned,
        # so "complete" still holds it); naming "the newest complete step" would wait for ever
        lead = min(max(1, reached[1] - reached[0]), MAX_LEAD)
    if lead:
        if reached[1] < 0:
            return None
        return Target(reached[1] + cadence * -(-lead // cadence), lead, now, reached[0],
                      floor=floor, calm=calm)
    if newest is None or (current is not None and newest <= current.step):
        return current if current is not None and current.step in complete else None
    return Target(newest, 0, now, reached[0], floor=floor, calm=calm)


_STEPS = operator.attrgetter("snapshot_steps")


def survey(attempt: Attempt) -> tuple[set[int], tuple[int, int], int]:
    """What rounds are named from, for every protected job each time (one pass, over the
    distinct step tuples the ranks hold): the steps every rank holds; the lowest and the
    highest of the ranks' newest steps ((-1, -1) without ranks); the cadence, the steps between
    two snapshots (``Checkpointer(every=)``), as the greatest common divisor of the gaps between
    the steps they hold (1 when unknown)."""
    # ranks that step together report the same few tuples: walk the distinct ones (collected
    # in C), not the ranks
    distinct = set(map(_STEPS, attempt.ranks))
    if not distinct:
        return set(), (-1, -1), 1
    common: set[int] | None = None
    newest = []
    cadence = 0
    for steps in distinct:
        newest.append(max(steps, default=-1))
        if common is None:
            common = set(steps)
        elif common:
            common.intersection_update(steps)
        if cadence != 1 and len(steps) > 1:  # 1 is as low as it goes
            ordered = sorted(steps)
            for a, b in zip(ordered, ordered[1:], strict=False):
                cadence = math.gcd(cadence, b - a)
    return common or set(), (min(newest), max(newest)), cadence or 1


class ProtectionRounds:
    """The current round of each protected job's live attempt (memory only: a restarted
    controller starts a new round at the newest complete step, which holders accept)."""

    def __init__(self) -> None:
        self._rounds: dict[str, tuple[int, Target]] = {}  # job id -> (attempt, round)

    def targets(self, jobs: Iterable[Job], node: str,
                now: float) -> list[tuple[str, int, int, int]]:
        """(job id, attempt, step, newest protected step or -1) for every live protected
        attempt running on ``node`` (``now``: monotonic clock)."""
        return [(j, a, s, p) for j, a, s, p, nodes in self.all_targets(jobs, now)
                if node in nodes]

    def all_targets(self, jobs: Iterable[Job], now: float,
                    learn: bool = True) -> list[tuple[str, int, int, int, frozenset[str]]]:
        """(job id, attempt, step, newest protected step or -1, the attempt's nodes) of every
        live protected attempt (``now``: monotonic clock; ``learn``: see ``next_target``).

        O(ranks) per protected job: the heartbeat intake calls it once per batch of
        heartbeats and picks each node's share, never once per heartbeat."""
        out = []
        for job in jobs:
            if job.state.is_terminal or not job.attempts:
                self._rounds.pop(job.id, None)
                continue
            attempt = job.attempts[-1]
            if not attempt.redundancy or attempt.state not in _LIVE:
                continue
            held = self._rounds.get(job.id)
            current = held[1] if held and held[0] == attempt.number else None
            lead = 0
            if held is not None:  # a new attempt starts at the floor, not at a lead a miss
                # of the old one grew (it has no protected step until its first round is done)
                lead = held[1].lead if current is not None else held[1].floor or held[1].lead
            protected = set(attempt.protected_steps)
            complete, reached, cadence = survey(attempt)
            target = next_target(current, lead, complete, protected, reached, now, cadence,
                                 held[1].floor if held else 0, learn)
            if target is None:
                continue
            if current is None or target.step != current.step:
                log.debug("job %s attempt %d: round at step %d (lead %d, floor %d; ranks at "
                          "%d-%d; protected %d)", job.id, attempt.number, target.step,
                          target.lead, target.floor, reached[0], reached[1],
                          max(protected, default=-1))
            self._rounds[job.id] = (attempt.number, target)
            out.append((job.id, attempt.number, target.step, max(protected, default=-1),
                        frozenset(attempt.nodes)))
        return out
