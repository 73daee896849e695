"""examples/hf_train.py with a rank that SIGKILLs itself right after a snapshot (attempt 1 only).

``hf_job.py --die-rank R --die-after-step S [hf_train.py arguments]``: rank R kills itself with
SIGKILL as soon as its snapshot of step S is complete, and every other rank's too, where the
callback takes it (as the next step or, after an epoch's last step, the next epoch begins): a
crash at an exact point of the loop, an epoch boundary included, which a kill from outside
cannot aim at.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import hpt.integrations.transformers as hf

SCRIPT = Path(__file__).resolve().parents[3] / "examples" / "hf_train.py"


def _every_rank_committed(step: int, timeout_s: float = 60.0) -> None:
    """Wait until every rank of the job has committed its snapshot of ``step`` (the local test
    cluster's agents share one /dev/shm): the crash then comes after a step every rank holds,
    not while another rank's copy of it is still in flight."""
    job, world = os.environ["HPT_JOB_ID"], int(os.environ["WORLD_SIZE"])
    deadline = time.monotonic() + timeout_s
    tick = threading.Event()
    while not all(_committed(job, rank, step) for rank in range(world)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"step {step} not committed on every rank within {timeout_s}s")
        tick.wait(0.02)


def _committed(job: str, rank: int, step: int) -> bool:
    for record in Path("/dev/shm").glob(f"hpt-*--*{job}-r{rank}.g*.json"):
        try:
            if json.loads(record.read_text()).get("step") == step:
                return True
        except (OSError, ValueError):
            continue
    return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--die-rank", type=int, default=-1)
    parser.add_argument("--die-after-step", type=int, default=-1)
    args, rest = parser.parse_known_args()
    first_attempt = os.environ.get("HPT_ATTEMPT", "1") == "1"
    if first_attempt and int(os.environ.get("RANK", "0")) == args.die_rank:
        save_due = hf.HptCallback._save_due

        def dying(self: Any) -> None:
            due = self._due
            save_due(self)
            if due == args.die_after_step:
                self.checkpointer.wait()
                _every_rank_committed(due)
                print(f"rank {args.die_rank} SIGKILLs itself after the snapshot of step {due}",
                      flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

        hf.HptCallback._save_due = dying  # type: ignore[method-assign]
    sys.argv = [str(SCRIPT), *rest]
    runpy.run_path(str(SCRIPT), run_name="__main__")


if __name__ == "__main__":
    main()
