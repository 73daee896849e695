"""What the agent does with a launch that restores: materialise, then tell the ranks where.

``Recovery.prepare`` runs on the command stream before the new attempt's ranks start. With a
``RestorePlan`` it puts every old snapshot this node's ranks need into shared memory
(materialise.py: local, a surviving peer, or decoded from parity, each verified) and sets
``HPT_RESTORE_SHARDS`` for the ranks. If that fails, falling back to disk on this node alone
would restore a step on some ranks and not on others. So the ranks keep ``HPT_RESTORE_STEP``
and fail to find it (a loud RestoreError, an ordinary fault), and a ``restore_failed`` event
tells the controller never to choose that step again for this job: the next attempt restores
an older step on every rank, or disk, or scratch.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from hpt._proto import checkpoint_pb2
from hpt.agent.launcher import LaunchSpec
from hpt.agent.materialise import MaterialiseError, materialise, restore_shards_env
from hpt.agent.peers import PieceUnavailable
from hpt.agent.protect import Protector
from hpt.agent.snapshots import SnapshotKeeper

log = logging.getLogger(__name__)


class Recovery:
    def __init__(self, protector: Protector, keeper: SnapshotKeeper) -> None:
        self._protector = protector
        self._keeper = keeper

    def prepare(self, spec: LaunchSpec, plan: checkpoint_pb2.RestorePlan | None) -> LaunchSpec:
        """``spec`` with ``restore_shards`` set (or ``restore_step`` cleared on failure)."""
        if spec.restore_step <= 0:
            return spec
        if plan is None or plan.step != spec.restore_step:
            # same node, same ranks: what this node holds is all the ranks need
            env = restore_shards_env(self._protector, spec.job_id, spec.restore_step,
                                     spec.world_size)
            return dataclasses.replace(spec, restore_shards=env)
        started = time.monotonic()
        try:
            done = materialise(
                self._protector, spec.job_id, plan,
                lambda rank, step, gen, nbytes: self._keeper.adopt(spec.job_id, rank, step, gen,
                                                                   nbytes),
                new_ranks=[rank for rank, _ in spec.ranks], world_size=spec.world_size)
        except (MaterialiseError, PieceUnavailable, ValueError, OSError) as exc:
            log.error("[%s/%d/%s/-] cannot put step %d in place: %s", spec.job_id,
                      spec.attempt, self._protector.node, plan.step, exc)
            self._keeper.event("restore_failed", spec.job_id, spec.attempt, -1,
                               f"{self._protector.node}: step {plan.step} not rebuilt ({exc}); "
                               "the controller picks another step for every rank",
                               step=plan.step)
            env = restore_shards_env(self._protector, spec.job_id, plan.step, plan.world_size)
            return dataclasses.replace(spec, restore_shards=env)
        rebuilt = {r: s for r, s in done.sources.items() if s != "local"}
        if rebuilt or done.not_needed:
            took = time.monotonic() - started
            text = ", ".join(f"rank {r} from {s}" for r, s in sorted(rebuilt.items()))
            said = f" of old {text} (verified)" if rebuilt else ""
            if done.not_needed:
                said += (f"; old rank(s) {', '.join(map(str, done.not_needed))} not needed "
                         f"({done.why})")
            log.info("[%s/%d/%s/-] step %d in place in %.3fs%s", spec.job_id, spec.attempt,
                     self._protector.node, plan.step, took, said)
            self._keeper.event("snapshot_rebuilt", spec.job_id, spec.attempt, -1,
                               f"{self._protector.node}: step {plan.step}{said} in {took:.3f}s")
        env = restore_shards_env(self._protector, spec.job_id, plan.step, plan.world_size)
        return dataclasses.replace(spec, restore_shards=env)
