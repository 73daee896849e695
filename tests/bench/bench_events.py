"""A loss storm's events into a real Redis: one store call per event vs one per batch.

    python tests/bench/bench_events.py [--events 100,600,2000] [--runs 5]

The controller emits an event per lost node (and per job transition) while it holds the
reconciler's lock; until they are in the store the lock is held. For each N this writes N
NODE_LOST events (the same bytes the controller writes) through ``RedisStore`` (a) one
``append_event`` round trip each, as the controller did, and (b) queued and written by
``EventLog.flush_pending`` (``append_events``: batches of up to 512). JSON lines: the median
wall time of each, their ratio, and one Redis PING round trip measured in the same run (the
floor of any store call).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from hpt.controller import convert  # noqa: E402
from hpt.controller.model import Event, EventKind  # noqa: E402
from hpt.controller.store.redis import RedisStore  # noqa: E402
from hpt.controller.streams import EventLog  # noqa: E402
from tests.redis_fixture import start_redis, stop_redis  # noqa: E402


def storm(n: int) -> list[Event]:
    return [Event(kind=EventKind.NODE_LOST, at=1.7e9 + i, node=f"node-{i:05d}",
                  message="no heartbeat for 2.5 s (node lease)") for i in range(n)]


def one_by_one(url: str, events: list[Event]) -> float:
    store = RedisStore(url, namespace=f"b{uuid.uuid4().hex}")
    try:
        data = [convert.event_to_bytes(e) for e in events]
        started = time.perf_counter()
        for item in data:
            store.append_event(item)
        return time.perf_counter() - started
    finally:
        store.close()


def batched(url: str, events: list[Event]) -> float:
    store = RedisStore(url, namespace=f"b{uuid.uuid4().hex}")
    try:
        log = EventLog(store)
        started = time.perf_counter()
        for e in events:
            log.emit(e)
        left = log.flush_pending()
        took = time.perf_counter() - started
        assert left == 0 and len(store.read_events(0, limit=len(events))) == len(events)
        return took
    finally:
        store.close()


def ping(url: str, runs: int = 200) -> float:
    store = RedisStore(url, namespace="ping")
    try:
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            store.redis.ping()
            times.append(time.perf_counter() - started)
        return statistics.median(times)
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", default="100,600,2000")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    import logging

    logging.disable(logging.INFO)  # emit logs every event at INFO: not what is measured
    with tempfile.TemporaryDirectory() as tmp:
        url, proc = start_redis(Path(tmp))
        try:
            print(json.dumps({"bench": "redis_ping_round_trip", "median_s": round(ping(url), 6)}))
            for n in (int(x) for x in args.events.split(",")):
                events = storm(n)
                single = statistics.median(one_by_one(url, events) for _ in range(args.runs))
                batch = statistics.median(batched(url, events) for _ in range(args.runs))
                print(json.dumps({"bench": "loss_storm_events_to_redis", "events": n,
                                  "one_call_each_s": round(single, 4),
                                  "batched_s": round(batch, 4),
                                  "ratio_batched_vs_each": round(batch / single, 3),
                                  "runs": args.runs}), flush=True)
        finally:
            stop_redis(proc)


if __name__ == "__main__":
    main()
