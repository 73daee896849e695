"""Protection rounds (hpt.controller.rounds): the controller names the one step every parity
holder of an attempt protects, and keeps it until that step is protected."""

from __future__ import annotations

from hpt.controller.model import Attempt, AttemptState, Job, JobSpec, JobState, Rank
from hpt.controller.rounds import ProtectionRounds, next_target


def test_first_round_is_the_newest_step_complete_on_every_rank() -> None:
    assert next_target(None, {4, 6}, set()) == 6
    assert next_target(None, set(), set()) is None


def test_a_round_in_progress_keeps_its_step_while_newer_steps_complete() -> None:
    assert next_target(6, {6, 8, 10}, set()) == 6


def test_a_finished_round_moves_to_the_newest_skipping_the_ones_between() -> None:
    assert next_target(6, {6, 8, 10}, {6}) == 10
    assert next_target(10, {10}, {6, 10}) == 10  # nothing newer: the round stays done


def test_a_round_whose_step_left_memory_is_abandoned_for_the_newest() -> None:
    assert next_target(6, {8, 10}, set()) == 10
    assert next_target(6, set(), set()) is None


def _job(job_id: str, nodes: list[str], steps: tuple[int, ...], *, redundancy: str = "2+1",
         state: AttemptState = AttemptState.RUNNING) -> Job:
    ranks = [Rank(rank=i, local_rank=0, node=n, snapshot_steps=steps) for i, n in enumerate(nodes)]
    attempt = Attempt(number=2, nodes=list(nodes), master_addr="127.0.0.1", master_port=1,
                      world_size=len(ranks), ranks=ranks, state=state, redundancy=redundancy)
    return Job(id=job_id, spec=JobSpec(command=["python"], nodes=len(nodes)),
               state=JobState.RUNNING, attempts=[attempt])


def test_every_node_of_the_attempt_is_told_the_same_step_until_it_is_protected() -> None:
    rounds = ProtectionRounds()
    job = _job("j", ["a", "b", "c"], (4, 5))
    assert rounds.targets([job], "a") == [("j", 2, 5)]
    for rank in job.attempts[0].ranks:  # step 6 completes on every rank meanwhile
        rank.snapshot_steps = (5, 6)
    assert rounds.targets([job], "b") == [("j", 2, 5)]  # same round for the other holders
    job.attempts[0].protected_steps = (5,)
    assert rounds.targets([job], "c") == [("j", 2, 6)]
    assert rounds.targets([job], "a") == [("j", 2, 6)]
    assert rounds.targets([job], "z") == []  # not a node of the attempt


def test_unprotected_stopping_or_finished_attempts_have_no_round() -> None:
    rounds = ProtectionRounds()
    jobs = [_job("off", ["a", "b"], (3,), redundancy=""),
            _job("stop", ["a", "b"], (3,), state=AttemptState.STOPPING),
            _job("done", ["a", "b"], (3,))]
    jobs[2].state = JobState.SUCCEEDED
    assert rounds.targets(jobs, "a") == []


def test_a_new_attempt_starts_its_own_round() -> None:
    rounds = ProtectionRounds()
    job = _job("j", ["a", "b"], (7,))
    assert rounds.targets([job], "a") == [("j", 2, 7)]
    job.attempts[0].number = 3  # the next attempt (after a resize) saved only step 4 so far
    for rank in job.attempts[0].ranks:
        rank.snapshot_steps = (4,)
    assert rounds.targets([job], "a") == [("j", 3, 4)]
