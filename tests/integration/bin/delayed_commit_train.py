"""examples/train.py with one snapshot commit held back: the test double for an in-flight commit.

``FI_COMMIT_DELAY=RANK:STEP:SECONDS`` holds the commit of rank RANK's snapshot of step STEP for
SECONDS (its copies are done, the snapshot not yet complete) in the job's first attempt, so a
test can kill the rank while that snapshot is in flight. The hold lives in this test double, a
subclass of the agent sink, not in the production sink.
"""

from __future__ import annotations

import os
import runpy
import threading
from collections.abc import Sequence
from pathlib import Path

import hpt.checkpoint
from hpt.ckpt.checksum import RangeChecksum
from hpt.ckpt.layout import Layout

TRAIN = Path(__file__).resolve().parents[3] / "examples" / "train.py"


def _knob() -> tuple[int, int, float] | None:
    raw = os.environ.get("FI_COMMIT_DELAY", "")
    if not raw or os.environ.get("HPT_ATTEMPT", "1") != "1":
        return None
    rank, step, seconds = raw.split(":")
    return int(rank), int(step), float(seconds)


class DelayedCommitSink(hpt.checkpoint._AgentSink):
    def commit(self, step: int, generation: int, layout: Layout, meta_json: str,
               checksums: Sequence[RangeChecksum]) -> None:
        knob = _knob()
        if knob is not None and knob[:2] == (self._rank, step):
            threading.Event().wait(knob[2])  # the injected fault: a slow commit
        super().commit(step, generation, layout, meta_json, checksums)


hpt.checkpoint._AgentSink = DelayedCommitSink  # type: ignore[misc]
runpy.run_path(str(TRAIN), run_name="__main__")
