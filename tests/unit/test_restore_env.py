"""HPT_RESTORE_STEP and HPT_RESTORE_SHARDS: the agent's restore plan, read in one place."""

from __future__ import annotations

import json

import pytest

from hpt._restore_env import RestoreShard, restore_plan

GOOD = {"step": 12, "world_size": 4, "dir": "/dev/shm",
        "shards": {"0": {"prefix": "hpt-n0--job-r0", "generation": 2},
                   "3": {"prefix": "hpt-n0--job-r3", "generation": 0}}}


def test_the_plan_carries_step_world_and_each_old_ranks_prefix_and_generation() -> None:
    plan = restore_plan({"HPT_RESTORE_STEP": "12", "HPT_RESTORE_SHARDS": json.dumps(GOOD)})
    assert (plan.step, plan.world_size, plan.directory) == (12, 4, "/dev/shm")
    assert plan.shards == {0: RestoreShard("hpt-n0--job-r0", 2), 3: RestoreShard("hpt-n0--job-r3", 0)}
    assert restore_plan({}).step == 0 and restore_plan({"HPT_RESTORE_STEP": "5"}).step == 5


@pytest.mark.parametrize(("patch", "field"), [
    ({"step": 0}, "HPT_RESTORE_SHARDS.step"),
    ({"world_size": "4"}, "HPT_RESTORE_SHARDS.world_size"),
    ({"dir": ""}, "HPT_RESTORE_SHARDS.dir"),
    ({"shards": {"4": {"prefix": "p", "generation": 0}}}, r"shards\['4'\]"),
    ({"shards": {"1": {"prefix": "../etc", "generation": 0}}}, r"shards\['1'\].prefix"),
    ({"shards": {"1": {"prefix": "p", "generation": 64}}}, r"shards\['1'\].generation"),
])
def test_bad_fields_are_refused_by_name(patch: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        restore_plan({"HPT_RESTORE_SHARDS": json.dumps({**GOOD, **patch})})


def test_a_step_that_disagrees_with_the_shards_is_refused() -> None:
    with pytest.raises(ValueError, match="disagree"):
        restore_plan({"HPT_RESTORE_STEP": "11", "HPT_RESTORE_SHARDS": json.dumps(GOOD)})
    with pytest.raises(ValueError, match="HPT_RESTORE_STEP"):
        restore_plan({"HPT_RESTORE_STEP": "x"})
