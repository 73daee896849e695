"""examples/hf_train.py with a rank that SIGKILLs itself right after a snapshot (attempt 1 only).

``hf_job.py --die-rank R --die-after-step S [hf_train.py arguments]``: rank R kills itself with
SIGKILL as soon as its snapshot of step S is complete, where the callback takes it (as the next
step or, after an epoch's last step, the next epoch begins): a crash at an exact point of the
loop, an epoch boundary included, which a kill from outside cannot aim at.
"""

from __future__ import annotations

import argparse
import os
import runpy
import signal
import sys
from pathlib import Path
from typing import Any

import hpt.integrations.transformers as hf

SCRIPT = Path(__file__).resolve().parents[3] / "examples" / "hf_train.py"


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
                print(f"rank {args.die_rank} SIGKILLs itself after the snapshot of step {due}",
                      flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

        hf.HptCallback._save_due = dying  # type: ignore[method-assign]
    sys.argv = [str(SCRIPT), *rest]
    runpy.run_path(str(SCRIPT), run_name="__main__")


if __name__ == "__main__":
    main()
