"""The agent's checkpoint metrics are set from what its ranks and its persister report."""

from __future__ import annotations

from pathlib import Path

from hpt.agent.watch import AgentMonitoring

HELLO = {"job_id": "j", "attempt": 1, "rank": 0}


class NoRanks:
    def ranks(self) -> list:
        return []


def monitoring(tmp_path: Path) -> AgentMonitoring:
    return AgentMonitoring(node="n", launcher=NoRanks(), run_dir=tmp_path,  # type: ignore[arg-type]
                           on_change=lambda: None, health_check=False, metrics_port=0)


def test_snapshot_restore_and_persist_reports_set_their_metrics(tmp_path):
    mon = monitoring(tmp_path)
    mon.on_rank_message(HELLO, {"op": "snapshot", "step": 3, "generation": 0, "bytes": 4096,
                                "copy_s": 0.25})
    mon.on_rank_message(HELLO, {"op": "event", "kind": "restored", "message": "x",
                                "seconds": 1.5, "bytes": 4096, "source": "local"})
    mon.persisted(2.0, 8192)
    text = mon.metrics.render().decode()
    assert "hpt_snapshot_bytes_total 4096.0" in text
    assert "hpt_snapshot_seconds_count 1.0" in text and "hpt_snapshot_seconds_sum 0.25" in text
    assert 'hpt_restore_bytes_total{source="local"} 4096.0' in text
    assert 'hpt_restore_seconds_sum{source="local"} 1.5' in text
    assert "hpt_persist_bytes_total 8192.0" in text and "hpt_persist_seconds_sum 2.0" in text


def test_malformed_optional_numbers_are_ignored(tmp_path):
    mon = monitoring(tmp_path)
    mon.on_rank_message(HELLO, {"op": "snapshot", "step": 3, "generation": 0, "bytes": 10,
                                "copy_s": "slow"})
    mon.on_rank_message(HELLO, {"op": "event", "kind": "restored", "message": "x",
                                "seconds": -1, "source": "nowhere"})
    text = mon.metrics.render().decode()
    assert "hpt_snapshot_seconds_count 0.0" in text
    assert 'source="nowhere"' not in text
