"""The Hugging Face Trainer resumed from hpt's snapshots, one process, no agent: real Trainer runs
in subprocesses writing their snapshots to shared-memory files (the agent's sink without an
agent), one of them dying abruptly (``os._exit``) after a step, the next restoring the chosen step
(``HPT_RESTORE_STEP``, as an agent sets it) through ``resume_from``.

Crashes at the epoch boundary (step 6 of 6 per epoch: no batch to skip, the Trainer puts the
RNG back as the second epoch begins) and, resumed from there, mid-epoch in the second (step 9:
the Trainer skips 3 batches, then loads the RNG); the final model and optimizer state must be
bitwise those of a clean run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the hpt[transformers] extra is not installed")

ROOT = Path(__file__).resolve().parents[3]
ARGS = ["--epochs", "2", "--batches", "6", "--step-time", "0"]

# Runs examples/hf_train.py; HPT_TEST_EXIT_AT makes the process die right after the snapshot of
# that step is complete, where the callback takes it (as the next step or epoch begins), as a
# crash would leave it (no teardown, nothing flushed).
DRIVER = """
import os, runpy, sys
import hpt.integrations.transformers as hf
exit_at = int(os.environ.get("HPT_TEST_EXIT_AT", "0"))
save_due = hf.HptCallback._save_due
def crashing(self):
    due = self._due
    save_due(self)
    if due and due == exit_at:
        self.checkpointer.wait()
        print(f"crash after step {exit_at}", flush=True)
        os._exit(9)
hf.HptCallback._save_due = crashing
resume_from = hf.resume_from
def reporting(trainer):
    where = resume_from(trainer)
    print(f"resumed at step {hf_callback(trainer).restored_step} from {where}", flush=True)
    return where
def hf_callback(trainer):
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, hf.HptCallback))
hf.resume_from = reporting
sys.argv = ["hf_train.py"] + sys.argv[1:]
runpy.run_path(sys.argv.pop(1), run_name="__main__")
"""


def run(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> str:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    scratch = tmp_path / "tmp"  # where resume_from makes its directory
    scratch.mkdir(exist_ok=True)
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(scratch), **(env or {})}
    done = subprocess.run(
        [sys.executable, str(driver), str(ROOT / "examples" / "hf_train.py"), *ARGS, *args],
        capture_output=True, text=True, timeout=600, env=full_env, cwd=tmp_path)
    return f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-3000:]}"


def final_sha(out: str) -> str:
    shas = re.findall(r"^final sha256 (\w+)$", out, re.M)
    assert len(shas) == 1, out
    return shas[0]


@pytest.mark.timeout(900)
def test_trainer_crashed_at_an_epoch_boundary_then_mid_epoch_resumes_bitwise(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    clean = final_sha(run(tmp_path, env={"HPT_SNAPSHOT_PREFIX": "hf-clean",
                                         "HPT_SNAPSHOT_DIR": str(shm)}))
    snap = {"HPT_SNAPSHOT_PREFIX": "hf-unit", "HPT_SNAPSHOT_DIR": str(shm)}

    out = run(tmp_path, env={**snap, "HPT_TEST_EXIT_AT": "6"})
    assert out.startswith("exit 9") and "resumed at step 0 from None" in out, out
    out = run(tmp_path, env={**snap, "HPT_RESTORE_STEP": "6", "HPT_TEST_EXIT_AT": "9"})
    assert out.startswith("exit 9") and "resumed at step 6 from " in out, out
    out = run(tmp_path, env={**snap, "HPT_RESTORE_STEP": "9"})
    assert out.startswith("exit 0") and "resumed at step 9 from " in out, out
    assert final_sha(out) == clean
    # every resume directory is gone once the Trainer read it
    assert not list((tmp_path / "tmp").glob("hpt-resume-*"))
