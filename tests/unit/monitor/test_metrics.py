"""Metric definitions follow the naming rules, and what export.py renders passes promtool."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request

import pytest

from hpt.monitor.export import Metrics
from hpt.monitor.metrics import METRICS, MetricDef, MetricType

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")

REQUIRED = {
    "hpt_jobs",
    "hpt_nodes",
    "hpt_attempts_total",
    "hpt_faults_total",
    "hpt_fault_detection_seconds",
    "hpt_recovery_seconds",
    "hpt_steps_lost_total",
    "hpt_step_seconds",
    "hpt_straggler_score",
    "hpt_collective_seconds",
    "hpt_snapshot_seconds",
    "hpt_snapshot_bytes_total",
    "hpt_persist_seconds",
    "hpt_persist_bytes_total",
    "hpt_goodput_seconds_total",
    "hpt_agent_heartbeats_total",
}


def touch_every_metric(m: Metrics) -> None:
    for d in METRICS:
        labels = {k: d.label_values[k][0] if k in d.label_values else "0" for k in d.labels}
        if d.type is MetricType.COUNTER:
            m.inc(d.name, 3, **labels)
        elif d.type is MetricType.GAUGE:
            m.set(d.name, 1.25, **labels)
        else:
            m.observe(d.name, 0.2, **labels)


def promtool_check_metrics(text: bytes) -> subprocess.CompletedProcess[bytes]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, timeout=60, check=False
    )


def test_the_required_metrics_are_defined():
    assert {d.name for d in METRICS} >= REQUIRED


@pytest.mark.parametrize("d", METRICS, ids=lambda d: d.name)
def test_metric_names_and_labels_follow_the_rules(d: MetricDef):
    assert re.fullmatch(r"hpt_[a-z0-9_]+", d.name)
    assert d.name.endswith("_total") == (d.type is MetricType.COUNTER)
    assert not re.search(r"_(milli|micro|nano)?(seconds|bytes)_(seconds|bytes)", d.name)
    assert not re.search(r"(millis|micros|ms|kb|mb|gb|minutes|hours)(_|$)", d.name)
    assert {"job", "instance", "job_id"}.isdisjoint(d.labels)
    assert d.help.strip()
    if d.type is MetricType.HISTOGRAM:
        assert d.name.endswith("_seconds") or d.name.endswith("_bytes")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "jobs"}, "name ('jobs') must be snake_case starting with 'hpt_'"),
        ({"name": "hpt_things"}, "must end in '_total' if and only if it is a counter"),
        ({"name": "hpt_x_total", "type": MetricType.GAUGE}, "if and only if it is a counter"),
        ({"labels": ("job",)}, "label of hpt_things_total ('job') must not be one of"),
        ({"labels": ("instance",)}, "('instance') must not be one of"),
        ({"name": "hpt_x_bucket"}, "must not end in one of"),
        (
            {"name": "hpt_x_seconds", "type": MetricType.HISTOGRAM, "buckets": (2.0, 1.0)},
            "must be positive and ascending",
        ),
    ],
)
def test_definitions_breaking_the_rules_are_refused(kwargs, message):
    fields = {"name": "hpt_things_total", "type": MetricType.COUNTER, "help": "h", **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        MetricDef(**fields)


@needs_promtool
def test_rendered_output_with_every_metric_touched_passes_promtool_check_metrics():
    m = Metrics()
    touch_every_metric(m)
    text = m.render()
    for d in METRICS:
        for series in d.series_names:
            assert f"\n{series}".encode() in text or text.startswith(series.encode())
    result = promtool_check_metrics(text)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


@needs_promtool
def test_promtool_check_metrics_does_reject_a_badly_named_metric():
    # Guards the test above against a promtool that accepts anything.
    bad = b"# HELP foo_bytes x\n# TYPE foo_bytes counter\nfoo_bytes 1\n"
    assert promtool_check_metrics(bad).returncode != 0


def test_facade_refuses_unknown_metric_names():
    with pytest.raises(ValueError, match="'hpt_nope_total' is not defined"):
        Metrics().inc("hpt_nope_total")


@pytest.mark.parametrize(
    "labels", [{}, {"kind": "hang", "node": "n1"}, {"knd": "hang"}], ids=["none", "extra", "typo"]
)
def test_facade_refuses_label_names_that_are_not_exactly_the_defined_ones(labels):
    with pytest.raises(ValueError, match=r"labels of hpt_faults_total .* must be exactly"):
        Metrics().inc("hpt_faults_total", **labels)


def test_facade_refuses_label_values_outside_a_closed_set():
    with pytest.raises(ValueError, match=r"label category of hpt_goodput_seconds_total \('idle'\)"):
        Metrics().inc("hpt_goodput_seconds_total", 1.0, category="idle")


@pytest.mark.parametrize(
    ("verb", "name", "labels"),
    [
        ("set", "hpt_attempts_total", {}),
        ("observe", "hpt_jobs", {"state": "running"}),
        ("inc", "hpt_recovery_seconds", {"kind": "hang"}),
    ],
)
def test_facade_refuses_a_verb_that_does_not_fit_the_metric_type(verb, name, labels):
    with pytest.raises(ValueError, match=f"{verb}\\(\\) does not apply"):
        getattr(Metrics(), verb)(name, 1.0, **labels)


def test_counters_refuse_negative_increments():
    with pytest.raises(ValueError):
        Metrics().inc("hpt_steps_lost_total", -1)


def test_updates_show_in_the_rendered_output():
    m = Metrics()
    m.set("hpt_jobs", 3, state="running")
    m.inc("hpt_faults_total", kind="rank_exit")
    m.inc("hpt_faults_total", 2, kind="rank_exit")
    m.observe("hpt_recovery_seconds", 7.0, kind="rank_exit")
    m.set("hpt_straggler_score", 1.3, rank=5)
    text = m.render().decode()
    assert 'hpt_jobs{state="running"} 3.0' in text
    assert 'hpt_faults_total{kind="rank_exit"} 3.0' in text
    assert 'hpt_recovery_seconds_bucket{kind="rank_exit",le="10.0"} 1.0' in text
    assert 'hpt_straggler_score{rank="5"} 1.3' in text


def test_remove_and_clear_drop_labelled_series():
    m = Metrics()
    m.set("hpt_step_seconds", 0.5, rank=0)
    m.set("hpt_step_seconds", 0.6, rank=1)
    m.remove("hpt_step_seconds", rank=1)
    m.remove("hpt_step_seconds", rank=9)  # absent: ignored
    text = m.render().decode()
    assert 'hpt_step_seconds{rank="0"}' in text and 'rank="1"' not in text
    m.clear("hpt_step_seconds")
    assert "hpt_step_seconds{" not in m.render().decode()


def test_two_registries_are_independent():
    a, b = Metrics(), Metrics()
    a.inc("hpt_attempts_total")
    assert b"hpt_attempts_total 0.0" in b.render()


def test_serve_on_port_zero_answers_metrics_requests():
    m = Metrics()
    m.inc("hpt_attempts_total", 4)
    server, port = m.serve("127.0.0.1", 0)
    try:
        assert port > 0
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no env proxies
        with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            body = resp.read()
        assert resp.status == 200
        assert b"hpt_attempts_total 4.0" in body
    finally:
        server.shutdown()
        server.server_close()


def test_enum_label_values_are_exported_by_value_and_closed_sets_lower_cased():
    import enum

    class JobState(str, enum.Enum):  # noqa: UP042 (like controller.model.JobState)
        RUNNING = "RUNNING"

    m = Metrics()
    m.set("hpt_jobs", 2, state=JobState.RUNNING)
    m.inc("hpt_faults_total", kind=JobState.RUNNING)
    text = m.render().decode()
    assert 'hpt_jobs{state="running"} 2.0' in text
    assert 'hpt_faults_total{kind="RUNNING"} 1.0' in text
