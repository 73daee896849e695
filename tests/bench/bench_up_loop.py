"""``hptctl up --agents 2`` started and stopped in a loop (JSON lines on stdout).

    python tests/bench/bench_up_loop.py [--rounds 50]

Per round: start, wait for "agent(s) ready", Ctrl-C, every process reaped. Reports agents lost
(an agent that ended before ``up`` stopped it: the fork-handler crash, exit -6, lost one in 8
rounds on a loaded machine before agents were spawned without Python between fork and exec),
gRPC ``fork_posix`` lines printed, and the median round time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.integration.up_loop import one_round  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    lost = noise = not_ready = 0
    times = []
    load = os.getloadavg()[0]
    for i in range(args.rounds):
        started = time.monotonic()
        r = one_round()
        times.append(time.monotonic() - started)
        lost += len(r.lost_agents)
        noise += len(r.fork_noise)
        not_ready += 0 if r.ready else 1
        # one line per round: a run cut short still tells how far it got
        print(json.dumps({"round": i + 1, "round_s": round(times[-1], 3),
                          "agents_lost": len(r.lost_agents), "ready": r.ready}), flush=True)
    print(json.dumps({"bench": "up_start_stop_loop", "rounds": args.rounds, "agents_lost": lost,
                      "rounds_not_ready": not_ready, "fork_posix_lines": noise,
                      "median_round_s": round(statistics.median(times), 3),
                      "load1": load}), flush=True)


if __name__ == "__main__":
    main()
