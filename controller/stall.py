"""Notice when the controller itself stalled, so it does not blame the nodes for it.

A controller paused by ``kill -STOP``, starved of CPU, swapped out or stuck behind a slow request
sees every agent "silent" when it resumes: the heartbeats were sent, but nobody read them. The
control loop measures the gap between two of its own passes on the monotonic clock; a gap longer
than ``max_gap_s`` is a stall, and for ``grace_s`` after it the loop re-observes heartbeats
(queued ones arrive within a heartbeat period) before it judges any node by silence.

Pure bookkeeping: ``observe(now)`` is called at the start of each pass with the monotonic time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StallDetector:
    max_gap_s: float
    """A gap between two passes longer than this is the controller's own stall."""
    grace_s: float
    """After a stall, how long nodes are not judged by heartbeat silence."""
    last_pass: float = 0.0
    judge_after: float = 0.0
    num_stalls: int = 0
    longest_gap_s: float = 0.0

    def observe(self, now: float) -> float:
        """Record a pass at monotonic ``now``; returns the stall length (0.0 when none)."""
        gap = now - self.last_pass if self.last_pass else 0.0
        self.last_pass = now
        if gap <= self.max_gap_s:
            return 0.0
        self.num_stalls += 1
        self.longest_gap_s = max(self.longest_gap_s, gap)
        self.judge_after = now + self.grace_s
        log.warning("the controller itself stalled for %.1fs (a pass is due every %.2fs at most): "
                    "re-observing heartbeats for %.1fs before judging any node", gap,
                    self.max_gap_s, self.grace_s)
        return gap

    def may_judge(self, now: float) -> bool:
        """False during the grace period after a stall."""
        return now >= self.judge_after
