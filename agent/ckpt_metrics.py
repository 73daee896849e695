"""The agent's checkpoint metrics: snapshot copies, persistence, restores of its ranks.

Fed by what already reaches the agent: a rank's ``SnapshotCommitted`` message (bytes, and
``copy_s``, the time from the start of the save to the commit), its ``restored`` event
(``seconds``, ``nbytes``, ``source``) and the persister's result (seconds from copy-out to the
manifest, bytes written). The messages' fields were checked when they were decoded
(:mod:`hpt._rank_protocol`); an event naming a source outside ``RESTORE_SOURCES`` sets nothing.
"""

from __future__ import annotations

from typing import Any

from hpt._rank_protocol import RankEvent, RankEventKind, RankMessage, SnapshotCommitted
from hpt.monitor.metrics import RESTORE_SOURCES


class CheckpointMetrics:
    def __init__(self, metrics: Any) -> None:
        self._m = metrics

    def on_rank_message(self, msg: RankMessage) -> None:
        if isinstance(msg, SnapshotCommitted):
            if msg.nbytes:
                self._m.inc("hpt_snapshot_bytes_total", msg.nbytes)
            if msg.copy_s is not None:
                self._m.observe("hpt_snapshot_seconds", msg.copy_s)
        elif isinstance(msg, RankEvent) and msg.kind is RankEventKind.RESTORED:
            if msg.source not in RESTORE_SOURCES:
                return
            if msg.seconds is not None:
                self._m.observe("hpt_restore_seconds", msg.seconds, source=msg.source)
            if msg.nbytes:
                self._m.inc("hpt_restore_bytes_total", msg.nbytes, source=msg.source)

    def persisted(self, seconds: float, nbytes: int) -> None:
        self._m.observe("hpt_persist_seconds", seconds)
        if nbytes:
            self._m.inc("hpt_persist_bytes_total", nbytes)
