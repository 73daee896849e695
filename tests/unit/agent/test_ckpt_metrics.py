"""The agent's checkpoint metrics are set from what its ranks and its persister report."""

from __future__ import annotations

from pathlib import Path

from hpt._rank_protocol import (
    ErrorReason,
    Hello,
    RankEvent,
    RankEventKind,
    SnapshotCommitted,
)
from hpt.agent.watch import AgentMonitoring

HELLO = Hello(job_id="j", attempt=1, rank=0, pid=1)


class NoRanks:
    def ranks(self) -> list:
        return []


def monitoring(tmp_path: Path) -> AgentMonitoring:
    return AgentMonitoring(node="n", launcher=NoRanks(), run_dir=tmp_path,  # type: ignore[arg-type]
                           on_change=lambda: None, health_check=False, metrics_port=0)


def test_snapshot_restore_and_persist_reports_set_their_metrics(tmp_path):
    mon = monitoring(tmp_path)
    mon.on_rank_message(HELLO, SnapshotCommitted(step=3, generation=0, nbytes=4096, copy_s=0.25))
    mon.on_rank_message(HELLO, RankEvent(kind=RankEventKind.RESTORED, message="x", seconds=1.5,
                                         nbytes=4096, source="local"))
    mon.persisted(2.0, 8192)
    text = mon.metrics.render().decode()
    assert "hpt_snapshot_bytes_total 4096.0" in text
    assert "hpt_snapshot_seconds_count 1.0" in text and "hpt_snapshot_seconds_sum 0.25" in text
    assert 'hpt_restore_bytes_total{source="local"} 4096.0' in text
    assert 'hpt_restore_seconds_sum{source="local"} 1.5' in text
    assert "hpt_persist_bytes_total 8192.0" in text and "hpt_persist_seconds_sum 2.0" in text


def test_a_restore_from_a_source_outside_the_metric_labels_sets_nothing(tmp_path):
    mon = monitoring(tmp_path)
    mon.on_rank_message(HELLO, SnapshotCommitted(step=3, generation=0, nbytes=10))
    mon.on_rank_message(HELLO, RankEvent(kind=RankEventKind.RESTORED, message="x", seconds=1.0,
                                         source="nowhere"))
    text = mon.metrics.render().decode()
    assert "hpt_snapshot_bytes_total 10.0" in text
    assert "hpt_snapshot_seconds_count 0.0" in text  # no copy time given
    assert 'source="nowhere"' not in text


def test_rank_message_errors_are_counted_by_reason(tmp_path):
    mon = monitoring(tmp_path)
    mon.rank_message_error(ErrorReason.UNKNOWN_TYPE)
    mon.rank_message_error(ErrorReason.UNKNOWN_TYPE)
    mon.rank_message_error(ErrorReason.MALFORMED)
    text = mon.metrics.render().decode()
    assert 'hpt_rank_message_errors_total{reason="unknown_type"} 2.0' in text
    assert 'hpt_rank_message_errors_total{reason="malformed"} 1.0' in text
