"""Protection rounds (hpt.controller.rounds): the controller names the one step every parity
holder of an attempt protects, and keeps it until that step is protected."""

from __future__ import annotations

import math
import random
from dataclasses import replace

from hpt.controller.model import Attempt, AttemptState, Job, JobSpec, JobState, Rank
from hpt.controller.rounds import (
    AHEAD_WAIT_S,
    CALM_ROUNDS,
    ProtectionRounds,
    Target,
    next_target,
    survey,
)


def _next(current, complete, protected, reached=(0, 0), lead=0, cadence=1, now=100.0,  # type: ignore[no-untyped-def]
          floor=0):
    held = None if current is None else Target(current, lead, 100.0, seen=reached[0],
                                               floor=floor)
    target = next_target(held, lead, set(complete), set(protected), reached, now, cadence,
                         floor)
    return None if target is None else (target.step, target.lead)


def test_first_round_is_the_newest_step_complete_on_every_rank() -> None:
    assert _next(None, {4, 6}, set(), (6, 6)) == (6, 0)
    assert _next(None, set(), set(), (-1, -1)) is None  # no rank saved yet
    assert _next(None, set(), set(), (-1, 4)) is None


def test_ranks_that_share_no_step_in_the_reports_at_hand_get_a_step_ahead() -> None:
    # each node reported at another moment: rank 0 holds 13..15, rank 2 already 23..25
    assert _next(None, set(), set(), (15, 25)) == (35, 10)
    # after a round done at lead 0, the same
    assert _next(6, set(), {6}, (15, 25)) == (35, 10)


def test_a_done_round_whose_step_alone_stays_complete_gets_a_step_ahead() -> None:
    # a restarted controller starts at lead 0: its first round (101) is done, the agents pin
    # it, so every rank still holds it; the ranks went on out of phase and share no newer step
    assert _next(101, {85, 101}, {85, 101}, (110, 118)) == (126, 8)
    assert _next(101, {101}, {101}, (101, 104)) == (101, 0)  # a rank has not gone past it yet


def test_a_round_in_progress_keeps_its_step_while_newer_steps_complete() -> None:
    assert _next(6, {6, 8, 10}, set(), (10, 10)) == (6, 0)


def test_a_finished_round_moves_to_the_newest_skipping_the_ones_between() -> None:
    assert _next(6, {6, 8, 10}, {6}, (10, 10)) == (10, 0)
    assert _next(10, {10}, {6, 10}, (10, 10)) == (10, 0)  # nothing newer: the round stays done


def test_a_round_every_rank_went_past_without_keeping_its_step_names_steps_ahead() -> None:
    # step 6 was overwritten before the agents pinned it: the next target is ahead of the ranks
    # by as many steps as they made while step 6 was the target
    assert _next(6, {8, 10}, set(), (10, 11)) == (16, 5)
    assert _next(6, {7}, set(), (7, 7)) == (8, 1)
    assert _next(12, {10}, set(), (11, 12), lead=1) == (12, 1)  # a rank has yet to save it
    assert _next(12, {13}, set(), (13, 13), lead=1) == (15, 2)  # missed again: twice as far
    # done: the next, as far ahead (the floor the miss at lead 1 set)
    assert _next(17, {17}, {17}, (20, 20), lead=2, floor=2) == (22, 2)
    assert _next(12, {13}, set(), (13, 13), lead=1, floor=1) == (15, 2)
    # with a snapshot every 5 steps the target is one the ranks save
    assert _next(20, {25}, set(), (25, 25), lead=2, cadence=5) == (30, 4)
    assert _next(20, {25}, set(), (25, 25), lead=8, cadence=5) == (45, 16)


def test_a_lead_grown_by_a_paused_controller_comes_back_down_to_the_floor():
    # rounds 9 steps ahead worked (floor 9); the controller paused 4 s while the ranks ran 58
    # steps on, and judged the round named from the reports before its stall: the round is
    # named again as far ahead (not the 50 steps the ranks ran past it, nor twice the lead)
    stale = next_target(Target(101, 9, 100.0, seen=92, floor=9), 9, {149, 150}, set(),
                        (150, 151), 104.5, floor=9, learn=False)
    assert stale is not None and (stale.step, stale.lead, stale.floor) == (160, 9, 9)
    # a lead grown for good reason before the stall stays where it was, the floor too
    grown = next_target(Target(101, 30, 100.0, seen=92, floor=9), 30, {149, 150}, set(),
                        (150, 151), 104.5, floor=9, learn=False)
    assert grown is not None and (grown.step, grown.lead, grown.floor) == (181, 30, 9)
    # each round done ahead of the ranks halves the lead, down to the floor and no further
    leads = []
    current, reached = replace(stale, step=201, lead=80), 201
    for _ in range(5):
        nxt = next_target(current, current.lead, {reached}, {reached}, (reached, reached), 110.0,
                          floor=current.floor)
        assert nxt is not None and nxt.step == reached + nxt.lead and nxt.floor == 9
        leads.append(nxt.lead)
        current, reached = nxt, nxt.step
    assert leads == [40, 20, 10, 9, 9]
    # the floor itself comes down by a quarter every CALM_ROUNDS rounds done at it
    for _ in range(CALM_ROUNDS + 1):
        nxt = next_target(current, current.lead, {reached}, {reached}, (reached, reached), 110.0,
                          floor=current.floor)
        assert nxt is not None
        current, reached = nxt, nxt.step
    assert (current.lead, current.floor) == (7, 7)
    # a lead that is too short after all misses again: the floor is the doubled lead
    again = next_target(current, 7, {reached + 12}, set(), (reached + 12, reached + 12), 120.0,
                        floor=7)
    assert again is not None and (again.lead, again.floor) == (14, 14)
    done = next_target(again, 14, {again.step}, {again.step}, (again.step, again.step), 121.0,
                       floor=14)
    assert done is not None and (done.lead, done.calm) == (14, 1)


def test_a_step_ahead_the_ranks_do_not_reach_in_time_gives_way_to_the_newest_complete() -> None:
    # the ranks paused at 11 (or step slowly): after AHEAD_WAIT_S the newest complete step
    late = 100.0 + AHEAD_WAIT_S
    assert _next(12, {10, 11}, {10}, (11, 11), lead=1, now=late - 1) == (12, 1)
    assert _next(12, {10, 11}, {10}, (11, 11), lead=1, now=late) == (11, 1)
    assert _next(12, {10, 11}, {10, 11}, (11, 11), lead=1, now=late) == (12, 1)  # nothing new


def test_a_step_far_ahead_is_kept_while_the_ranks_move_towards_it() -> None:
    # fast steps after two missed rounds: 80 steps ahead take longer than AHEAD_WAIT_S to
    # reach; giving the target up then would miss once more with the newest complete step
    named = Target(120, 80, 100.0, seen=40)
    now = 100.0 + 3 * AHEAD_WAIT_S
    moved = next_target(named, 80, {60, 61}, set(), (61, 62), now)
    assert moved is not None and (moved.step, moved.lead) == (120, 80)
    # the ranks stop short of it (paused): AHEAD_WAIT_S after their last move it gives way
    still = next_target(moved, 80, {60, 61}, set(), (61, 62), now + AHEAD_WAIT_S - 0.1)
    assert still is not None and still.step == 120
    late = next_target(moved, 80, {60, 61}, set(), (61, 62), now + AHEAD_WAIT_S)
    assert late is not None and late.step == 61


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
    assert rounds.targets([job], "a", 0.0) == [("j", 2, 5, -1)]
    for rank in job.attempts[0].ranks:  # step 6 completes on every rank meanwhile
        rank.snapshot_steps = (5, 6)
    assert rounds.targets([job], "b", 0.0) == [("j", 2, 5, -1)]  # same round for the other holders
    job.attempts[0].protected_steps = (5,)
    assert rounds.targets([job], "c", 0.0) == [("j", 2, 6, 5)]
    assert rounds.targets([job], "a", 0.0) == [("j", 2, 6, 5)]
    assert rounds.targets([job], "z", 0.0) == []  # not a node of the attempt


def test_unprotected_stopping_or_finished_attempts_have_no_round() -> None:
    rounds = ProtectionRounds()
    jobs = [_job("off", ["a", "b"], (3,), redundancy=""),
            _job("stop", ["a", "b"], (3,), state=AttemptState.STOPPING),
            _job("done", ["a", "b"], (3,))]
    jobs[2].state = JobState.SUCCEEDED
    assert rounds.targets(jobs, "a", 0.0) == []


def test_a_new_attempt_starts_its_own_round() -> None:
    rounds = ProtectionRounds()
    job = _job("j", ["a", "b"], (7,))
    assert rounds.targets([job], "a", 0.0) == [("j", 2, 7, -1)]
    job.attempts[0].number = 3  # the next attempt (after a resize) saved only step 4 so far
    for rank in job.attempts[0].ranks:
        rank.snapshot_steps = (4,)
    assert rounds.targets([job], "a", 0.0) == [("j", 3, 4, -1)]


def test_a_missed_round_makes_the_next_attempt_name_steps_ahead_too() -> None:
    rounds = ProtectionRounds()
    job = _job("j", ["a", "b"], (7,))
    assert rounds.targets([job], "a", 0.0) == [("j", 2, 7, -1)]
    for rank in job.attempts[0].ranks:  # both ranks went on to 9, step 7 was overwritten
        rank.snapshot_steps = (8, 9)
    assert rounds.targets([job], "a", 0.0) == [("j", 2, 11, -1)]
    job.attempts[0].number = 3
    assert rounds.targets([job], "b", 0.0) == [("j", 3, 11, -1)]  # the job's lead stays


def test_a_new_attempt_starts_at_the_floor_not_at_a_lead_grown_by_the_old_ones_misses() -> None:
    rounds = ProtectionRounds()
    job = _job("j", ["a", "b"], (100,))
    rounds._rounds["j"] = (1, Target(90, 40, 0.0, floor=6))  # attempt 1 ended 40 ahead
    assert rounds.targets([job], "a", 0.0) == [("j", 2, 106, -1)]  # 6 ahead of step 100


def test_one_pass_over_the_ranks_finds_common_steps_their_spread_and_the_cadence() -> None:
    # survey walks the distinct step tuples, not the ranks: it must say what the rank by rank
    # definitions say, on attempts of every shape (no rank, ranks that saved nothing, ...)
    rng = random.Random(7)
    shapes = [[], [()], [(5,)] * 3, [(2, 4, 6), (4, 6, 8)] * 2, [(9, 3, 6)] * 3,
              [(1, 2, 3), (), (1, 2, 3)]]
    shapes += [[tuple(rng.sample(range(12), rng.randint(0, 3))) for _ in range(rng.randint(0, 6))]
               for _ in range(500)]
    for steps in shapes:
        ranks = [Rank(rank=i, local_rank=0, node=f"n{i}", snapshot_steps=s)
                 for i, s in enumerate(steps)]
        attempt = Attempt(number=1, nodes=[r.node for r in ranks], master_addr="127.0.0.1",
                          master_port=1, world_size=len(ranks), ranks=ranks)
        newest = [max(s, default=-1) for s in steps] or [-1]
        gaps = [b - a for s in steps for a, b in zip(sorted(s), sorted(s)[1:], strict=False)]
        want = (set.intersection(*map(set, steps)) if steps else set(),
                (min(newest), max(newest)), math.gcd(*gaps) if gaps else 1)
        assert survey(attempt) == want, steps
