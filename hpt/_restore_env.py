"""What the agent tells a rank about its restore, read from the environment in this one place.

- ``HPT_RESTORE_STEP``: the step the controller chose for this attempt (0 or unset: none).
- ``HPT_RESTORE_SHARDS``: compact JSON naming every old rank's snapshot of that step that lies
  in this node's shared memory as ShmSink files (the rank's own, one copied from a peer, or one
  decoded from parity), for a world of ``world_size`` old ranks::

      {"step": S, "world_size": OLD_WORLD, "dir": SHM_DIR,
       "shards": {"<old_rank>": {"prefix": PREFIX, "generation": G}, ...}}

Bad values raise ValueError naming the variable and the field: the agent wrote them, so a bad one
is a bug to surface, not a reason to train from scratch silently.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

STEP_ENV = "HPT_RESTORE_STEP"
SHARDS_ENV = "HPT_RESTORE_SHARDS"

_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,200}$")
_MAX_GENERATION = 63


@dataclass(frozen=True, slots=True)
class RestoreShard:
    prefix: str
    generation: int


@dataclass(frozen=True, slots=True)
class RestorePlan:
    step: int = 0
    """The chosen step; 0: the controller chose none (disk, then scratch)."""
    world_size: int = 0
    """World size of the attempt that wrote the shards; 0 when no shards are named."""
    directory: str = ""
    shards: Mapping[int, RestoreShard] = field(default_factory=dict)
    """Old rank -> its snapshot of `step` in `directory`."""


def _int(value: object, where: str, low: int, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (
        high is not None and value > high
    ):
        bound = f"in {low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{where} ({value!r}) must be an int {bound}")
    return value


def parse_shards(raw: str) -> RestorePlan:
    """Parse ``HPT_RESTORE_SHARDS``; raises ValueError naming the bad field."""
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{SHARDS_ENV} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{SHARDS_ENV} must be a JSON object")
    step = _int(doc.get("step"), f"{SHARDS_ENV}.step", 1)
    world = _int(doc.get("world_size"), f"{SHARDS_ENV}.world_size", 1)
    directory = doc.get("dir")
    if not isinstance(directory, str) or not directory:
        raise ValueError(f"{SHARDS_ENV}.dir ({directory!r}) must be a non-empty path")
    shards_doc = doc.get("shards")
    if not isinstance(shards_doc, dict):
        raise ValueError(f"{SHARDS_ENV}.shards must be an object")
    shards: dict[int, RestoreShard] = {}
    for key, value in shards_doc.items():
        where = f"{SHARDS_ENV}.shards[{key!r}]"
        if not key.isdigit() or int(key) >= world:
            raise ValueError(f"{where}: the key must be an old rank in 0..{world - 1}")
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be an object")
        prefix = value.get("prefix")
        if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
            raise ValueError(f"{where}.prefix ({prefix!r}) is not a snapshot prefix")
        generation = _int(value.get("generation"), f"{where}.generation", 0, _MAX_GENERATION)
        shards[int(key)] = RestoreShard(prefix, generation)
    return RestorePlan(step=step, world_size=world, directory=directory, shards=shards)


def restore_plan(env: Mapping[str, str] | None = None) -> RestorePlan:
    """The restore plan of this rank, from ``HPT_RESTORE_STEP`` and ``HPT_RESTORE_SHARDS``."""
    env = os.environ if env is None else env
    raw_step = env.get(STEP_ENV, "") or "0"
    try:
        step = int(raw_step)
    except ValueError:
        raise ValueError(f"{STEP_ENV} ({raw_step!r}) must be an int >= 0") from None
    _int(step, STEP_ENV, 0)
    raw_shards = env.get(SHARDS_ENV, "")
    if not raw_shards:
        return RestorePlan(step=step)
    plan = parse_shards(raw_shards)
    if step and step != plan.step:
        raise ValueError(f"{STEP_ENV} ({step}) and {SHARDS_ENV}.step ({plan.step}) disagree")
    return plan
