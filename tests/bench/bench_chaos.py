"""Recovery from every kind of fault, the runner's own included, one after another in one job:
the chaos soak (``tests/faults/chaos.py``) over several seeds, ending with one JSON line per
kind of fault (how many, the median and slowest seconds from injection to the job's next step,
and for the job's own faults the steps lost).

    python tests/bench/bench_chaos.py --seeds 1-4 --faults 12 [--shard]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.faults.chaos import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
