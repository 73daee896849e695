"""The DDP reducer's all-reduces under the Hugging Face Trainer are collective records.

The Trainer wraps the model in DDP itself (through accelerate), after the script could reach it;
the callback registers hpt's communication hook on that wrapper. Two real Trainer processes over
gloo, no agent: each runs hpt's instrumentation with a sink of its own (what the rank monitor
installs under an agent) and prints the all-reduces it recorded. Without the hook the reducer
all-reduces from C++ and none of them is a record.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the hpt[transformers] extra is not installed")

from tests.integration.cluster import rendezvous  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
EPOCHS, BATCHES = 2, 3

DRIVER = """
import json, os, runpy, sys
from hpt import _instrument
records = []
_instrument.install("job", 1, int(os.environ["RANK"]), "node", records.extend)
sys.argv = ["hf_train.py"] + sys.argv[1:]
runpy.run_path(sys.argv.pop(1), run_name="__main__")
_instrument.uninstall(flush=True)
ours = [(r["seq"], r["nbytes"]) for r in records
        if r["type"] == "collective" and r["op"] == "all_reduce"]
print("all_reduces " + json.dumps(ours), flush=True)
"""


@pytest.mark.timeout(600)
def test_trainer_ddp_bucket_all_reduces_are_recorded_with_sequence_numbers(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    procs = []
    outs = []
    with rendezvous(2) as store_env:
        try:
            for rank in range(2):
                env = {**os.environ, **store_env, "RANK": str(rank), "WORLD_SIZE": "2",
                       "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
                       "PYTHONPATH": str(ROOT), "HPT_SNAPSHOT_DIR": str(tmp_path),
                       "HPT_SNAPSHOT_PREFIX": f"hf-ddp-{rank}", "TMPDIR": str(tmp_path)}
                env.pop("HPT_AGENT_SOCKET", None)
                procs.append(subprocess.Popen(
                    [sys.executable, str(driver), str(ROOT / "examples" / "hf_train.py"),
                     "--epochs", str(EPOCHS), "--batches", str(BATCHES), "--step-time", "0"],
                    env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    text=True))
            for p in procs:
                outs.append(p.communicate(timeout=300)[0])
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    per_rank = []
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
        found = re.findall(r"^all_reduces (.*)$", out, re.M)
        assert len(found) == 1, out[-4000:]
        per_rank.append([tuple(r) for r in json.loads(found[0])])
    # The first layer's weight gradient (32 x 16 float32) is reduced on its own once per
    # optimizer step on each rank (hpt's hook reduces gradient by gradient).
    steps = EPOCHS * BATCHES
    for records in per_rank:
        weight = [seq for seq, nbytes in records if nbytes == 32 * 16 * 4]
        assert len(weight) == steps, records
        # on the default group: numbered, in call order
        assert all(seq >= 0 for seq, _ in records), records
        assert [seq for seq, _ in records] == sorted(seq for seq, _ in records), records
    # the ranks called the same all-reduces in the same order: a rank missing from one is named
    assert per_rank[0] == per_rank[1]
