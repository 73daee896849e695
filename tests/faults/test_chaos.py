"""Fault after fault in one job's life: every kind of fault the runner handles, in a seeded
order (``tests/faults/chaos.py``; ``HPT_CHAOS_SEED`` picks another order)."""

from __future__ import annotations

import os

import pytest

from tests.faults import chaos
from tests.faults.control_plane import PersistentRedis

pytestmark = pytest.mark.timeout(900)


def test_plan_has_every_kind_once_then_random_ones_in_a_seeded_order():
    assert sorted(chaos.plan(3, len(chaos.KINDS))) == sorted(chaos.KINDS)
    assert chaos.plan(3, 10) == chaos.plan(3, 10)
    assert len(chaos.plan(3, 10)) == 10 and set(chaos.plan(3, 10)) == set(chaos.KINDS)
    assert len(set(chaos.plan(3, 2))) == 2
    assert {tuple(chaos.plan(s, 6)) for s in range(5)} != {tuple(chaos.plan(0, 6))}


def test_every_fault_in_turn_restarts_only_for_the_jobs_own_and_ends_bitwise_equal(tmp_path):
    seed = int(os.environ.get("HPT_CHAOS_SEED", "1"))
    store = PersistentRedis(tmp_path).start()
    try:
        cluster = chaos.start_cluster(tmp_path, store)
        try:
            lines: list[str] = []
            summary = chaos.soak(cluster, store, seed, len(chaos.KINDS), log=lines.append)
            print("\n".join(lines))
            print(summary)
        except BaseException:
            print(cluster.logs())
            print("faults recovered from before this one:", *lines, sep="\n")
            raise
        finally:
            cluster.close()
    finally:
        store.close()
    # kill_rank, kill_agent, partition_agent
    assert summary["digest_equal"] and summary["attempts"] == 4
    assert summary["steps_lost_max"]["kill_rank"] <= chaos.MAX_STEPS_LOST
