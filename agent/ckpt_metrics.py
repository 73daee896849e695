"""The agent's checkpoint metrics: snapshot copies, persistence, restores of its ranks.

Fed by what already reaches the agent: a rank's ``snapshot`` message (bytes, and ``copy_s``,
the time from the start of the save to the commit), its ``restored`` event (``seconds``,
``bytes``, ``source``) and the persister's result (seconds from copy-out to the manifest, bytes
written). Malformed optional numbers are ignored: metrics never refuse a rank's message.
"""

from __future__ import annotations

import math
from typing import Any

from hpt.monitor.metrics import RESTORE_SOURCES


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


def _bytes(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class CheckpointMetrics:
    def __init__(self, metrics: Any) -> None:
        self._m = metrics

    def on_rank_message(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "snapshot":
            nbytes, copy_s = _bytes(msg.get("bytes")), _seconds(msg.get("copy_s"))
            if nbytes:
                self._m.inc("hpt_snapshot_bytes_total", nbytes)
            if copy_s is not None:
                self._m.observe("hpt_snapshot_seconds", copy_s)
        elif op == "event" and msg.get("kind") == "restored":
            source = msg.get("source")
            if source not in RESTORE_SOURCES:
                return
            seconds, nbytes = _seconds(msg.get("seconds")), _bytes(msg.get("bytes"))
            if seconds is not None:
                self._m.observe("hpt_restore_seconds", seconds, source=source)
            if nbytes:
                self._m.inc("hpt_restore_bytes_total", nbytes, source=source)

    def persisted(self, seconds: float, nbytes: int) -> None:
        self._m.observe("hpt_persist_seconds", seconds)
        if nbytes:
            self._m.inc("hpt_persist_bytes_total", nbytes)
