"""The Grafana dashboards are valid, query only metrics we export, and every query parses."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import hpt.monitor
from hpt.monitor.metrics import METRICS, MetricType

DASHBOARD_DIR = Path(hpt.monitor.__file__).parent / "dashboards"
DASHBOARDS = sorted(DASHBOARD_DIR.glob("*.json"))
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")

# Series name -> label names a query may use on it.
SERIES: dict[str, set[str]] = {}
for _d in METRICS:
    for _s in _d.series_names:
        SERIES[_s] = set(_d.labels) | ({"le"} if _s.endswith("_bucket") else set())
METRIC_TOKEN = re.compile(r"\bhpt_[a-z0-9_]+\b")
SELECTOR = re.compile(r"\b(hpt_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
GRAFANA_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)(?::\w+)?\]\]")
RANGE_VARS = {"__rate_interval", "__interval", "__range"}


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def all_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out += p.get("panels", [])  # collapsed rows hold their panels
    return out


def exprs(dash: dict[str, Any]) -> list[tuple[int, str, str]]:
    return [
        (p["id"], t["refId"], t["expr"])
        for p in all_panels(dash)
        for t in p.get("targets", [])
        if "expr" in t
    ]


def concrete(expr: str) -> str:
    """Replace Grafana variables with values Prometheus accepts."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return "5m" if name in RANGE_VARS else "x"

    return GRAFANA_VAR.sub(sub, expr)


def promtool_check_rules(
    tmp_path: Path, rules: list[dict[str, str]]
) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    path = tmp_path / "rules.yml"
    # JSON is YAML: no yaml dependency needed.
    path.write_text(json.dumps({"groups": [{"name": "dashboards", "rules": rules}]}, indent=1))
    return subprocess.run(
        [PROMTOOL, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_both_dashboards_exist():
    assert {p.name for p in DASHBOARDS} == {"cluster.json", "job.json"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_is_grafana_json_with_unique_panel_ids_and_a_datasource_variable(path):
    dash = load(path)
    assert 36 <= dash["schemaVersion"] <= 41
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in all_panels(dash)]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for p in all_panels(dash):
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_metric_and_label_a_panel_queries_is_exported(path):
    for panel_id, ref, expr in exprs(load(path)):
        where = f"{path.name} panel {panel_id}{ref}: {expr}"
        names = METRIC_TOKEN.findall(expr)
        assert names, f"no hpt metric in {where}"
        for name in names:
            assert name in SERIES, f"{name} is not exported by hpt.monitor.metrics ({where})"
        for name, matchers in SELECTOR.findall(expr):
            for label in MATCHER.findall(matchers):
                assert label in SERIES[name], f"{name} has no label {label!r} ({where})"
        usable = set().union(*(SERIES[n] for n in names))
        for group in GROUPING.findall(expr):
            for label in filter(None, (x.strip() for x in group.split(","))):
                assert label in usable, f"grouping by unknown label {label!r} ({where})"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_variable_queries_use_exported_metrics_and_labels(path):
    for v in load(path)["templating"]["list"]:
        if v["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((hpt_[a-z0-9_]+),\s*(\w+)\)", v["definition"])
        assert m, v["definition"]
        assert m.group(2) in SERIES[m.group(1)]


def test_histograms_are_queried_through_their_series_not_their_bare_name():
    histograms = {d.name for d in METRICS if d.type is MetricType.HISTOGRAM}
    for path in DASHBOARDS:
        for _, _, expr in exprs(load(path)):
            assert not histograms & set(METRIC_TOKEN.findall(expr)), expr


@needs_promtool
@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_panel_expression_parses_as_a_recording_rule(path, tmp_path):
    uid = re.sub(r"\W", "_", load(path)["uid"])
    rules = []
    for panel_id, ref, expr in exprs(load(path)):
        text = concrete(expr)
        assert "$" not in text and "[[" not in text, text
        rules.append({"record": f"hpt:dashboard_{uid}_panel{panel_id}_{ref}", "expr": text})
    result = promtool_check_rules(tmp_path, rules)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


@needs_promtool
def test_promtool_check_rules_does_reject_a_broken_expression(tmp_path):
    # Guards the test above against a promtool that accepts anything.
    result = promtool_check_rules(tmp_path, [{"record": "hpt:x", "expr": "sum(rate(hpt_x[5m]"}])
    assert result.returncode != 0


def test_grafana_variables_are_made_concrete():
    assert concrete('rate(hpt_a{rank=~"$rank",op=~"${op:regex}"}[$__rate_interval])') == (
        'rate(hpt_a{rank=~"x",op=~"x"}[5m])'
    )
