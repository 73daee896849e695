"""``hptctl plan``: the goodput model on the command line (the model's own tests are in
tests/unit/monitor/test_goodput.py)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from hpt.cli import main


def _run(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, ["plan", *args], catch_exceptions=False)


def test_plan_json_for_the_llama3_cluster_reaches_97_percent() -> None:
    result = _run("-o", "json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["gpus"] == 16_384 and out["nodes"] == 2_048
    assert out["ettr"] >= 0.97
    assert out["snapshot_every_steps"] >= 1 and out["persist_every_snapshots"] >= 1
    assert out["redundancy"]["m"] >= 1
    assert {c["name"] for c in out["classes"]} >= {"faulty_gpu", "gpu_hbm3_memory"}
    assert abs(sum(out["breakdown"].values()) - 1.0) < 1e-3


def test_plan_compares_with_torchrun_and_simulates() -> None:
    result = _run("--compare-torchrun", "30", "--simulate", "4", "--days", "20", "-o", "json")
    assert result.exit_code == 0, result.output
    hpt, torchrun = json.loads(result.output)
    assert (hpt["scenario"], torchrun["scenario"]) == ("hpt", "torchrun")
    assert torchrun["ettr"] < hpt["ettr"]
    assert abs(torchrun["persist_interval_s"] - 1800.0) < 2.57  # whole steps of 2.57 s
    for r in (hpt, torchrun):
        assert abs(r["simulated"]["ettr"] - r["ettr"]) < 0.02


def test_plan_reads_a_yaml_file_and_flags_override_it(tmp_path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("gpus: 1024\ncosts:\n  restart_s: 60\nfailures:\n  faulty_gpu: 1000\n")
    out = json.loads(_run("--inputs", str(path), "-o", "json").output)
    assert out["gpus"] == 1024
    faulty = next(c for c in out["classes"] if c["name"] == "faulty_gpu")
    assert faulty["restart_s"] == 60
    flagged = json.loads(_run("--inputs", str(path), "--gpus", "2048", "-o", "json").output)
    assert flagged["gpus"] == 2048


def test_plan_table_names_the_recommendations() -> None:
    result = _run("--redundancy", "8+2", "--snapshot-interval", "60")
    assert result.exit_code == 0, result.output
    assert "ETTR (model)" in result.output and "8+2" in result.output


def test_plan_bad_input_is_a_usage_error_naming_the_field(tmp_path) -> None:
    bad = _run("--redundancy", "8-2")
    assert bad.exit_code == 2 and "--redundancy" in bad.output
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"costs": {"restart_s": -5}}))
    result = _run("--inputs", str(path))
    assert result.exit_code == 2 and "costs.restart_s" in result.output
    assert _run("--gpus", "100").exit_code == 2  # 100 GPUs are not whole nodes of 8
