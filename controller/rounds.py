"""Protection rounds: the controller names the one step every parity holder protects.

A lost node's state is decodable only if every stripe it is a data member of holds parity of
the SAME step. Holders that each chose "the newest step my data members hold" chose at
different moments and often disagreed, so a node loss fell back to disk. Now a round has a
target step, named here and sent to the attempt's agents with every heartbeat ack
(``HeartbeatAck.protect``); a holder builds exactly that step and never picks one itself
(``agent/protect.py``).

The target of an attempt is the newest step complete in memory on every rank (the ranks'
reports). It stays until the round is done (the step is protected: every holder of every
stripe reports it) and only then moves to the newest complete step, skipping the steps saved
meanwhile: a slow network costs freshness, never an unbounded queue. A round whose step left
the ranks' memory before it was done (overwritten by newer generations) can never finish: it is
abandoned for the newest complete step.
"""

from __future__ import annotations

from collections.abc import Iterable

from hpt.controller.catalog import complete_steps
from hpt.controller.model import AttemptState, Job

_LIVE = (AttemptState.LAUNCHING, AttemptState.RUNNING)


def next_target(current: int | None, complete: set[int], protected: set[int]) -> int | None:
    """The step a round builds now, given the current target (None: no round yet), the steps
    complete on every rank and the steps already protected."""
    if current is not None and current in complete and current not in protected:
        return current  # round in progress: every holder builds this one
    newest = max(complete, default=None)
    if newest is None or (current is not None and newest <= current):
        return current if current is not None and current in complete else None
    return newest


class ProtectionRounds:
    """The current target of each protected job's live attempt (memory only: a restarted
    controller starts a new round at the newest complete step, which holders accept)."""

    def __init__(self) -> None:
        self._target: dict[str, tuple[int, int]] = {}  # job id -> (attempt, step)

    def targets(self, jobs: Iterable[Job], node: str) -> list[tuple[str, int, int]]:
        """(job id, attempt, step) for every live protected attempt running on ``node``."""
        return [(j, a, s) for j, a, s, nodes in self.all_targets(jobs) if node in nodes]

    def all_targets(self, jobs: Iterable[Job]) -> list[tuple[str, int, int, frozenset[str]]]:
        """(job id, attempt, step, the attempt's nodes) of every live protected attempt.

        O(ranks) per protected job: the heartbeat intake calls it once per batch of
        heartbeats and picks each node's share, never once per heartbeat."""
        out = []
        for job in jobs:
            if job.state.is_terminal or not job.attempts:
                self._target.pop(job.id, None)
                continue
            attempt = job.attempts[-1]
            if not attempt.redundancy or attempt.state not in _LIVE:
                continue
            current = self._target.get(job.id)
            step = next_target(current[1] if current and current[0] == attempt.number else None,
                               set(complete_steps(attempt)), set(attempt.protected_steps))
            if step is None:
                continue
            self._target[job.id] = (attempt.number, step)
            out.append((job.id, attempt.number, step, frozenset(attempt.nodes)))
        return out
