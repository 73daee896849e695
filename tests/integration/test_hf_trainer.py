"""The Hugging Face Trainer under hpt on a real 2 nodes x 1 rank cluster (gloo, CPU).

Two jobs of examples/hf_train.py (2 epochs of 12 steps, evaluation after each) on the shared
cluster (its agents judge hangs by the default 5 s minimum deadline):

- the clean run doubles as the hang check: its first evaluation takes more than 3x the hang
  deadline (8 batches of 2 s against 5 s) and must raise no finding;
- the faulted run crashes twice: rank 1 SIGKILLs itself right after the snapshot of step 12,
  the first epoch's last (the next attempt has no batch to skip and resumes as the second epoch
  begins), then the test SIGKILLs rank 0 of the second attempt, on the other node, mid-epoch.
  Each restart resumes from the agents' memory, and the final SHA-256 of model and optimizer
  state is the clean run's.
"""

from __future__ import annotations

import os
import re
import signal

import pytest

pytest.importorskip("transformers", reason="the hpt[transformers] extra is not installed")

from tests.integration.cluster import BIN, ROOT, state_name  # noqa: E402

SCRIPT = str(ROOT / "examples" / "hf_train.py")
BATCHES = 12
TRAIN = ["--epochs", "2", "--batches", str(BATCHES), "--step-time", "0.15"]
# a rank late into one collective on a loaded machine is reported (collective_missing, like
# stragglers: report-only); what the long evaluation must never raise is a hang or a fault
BAD_KINDS = ("hang", "fault", "stacks")


def final_sha(cluster, job_id: str) -> str:
    text = [line.text for line in cluster.client.logs(job_id, rank=0)]
    shas = [t.split()[-1] for t in text if t.startswith("final sha256 ")]
    assert len(shas) == 1, "\n".join(text[-30:])
    return shas[0]


def restored_step(cluster, job_id: str, attempt: int) -> int:
    """The step attempt ``attempt`` restored, checked to come from the agents' memory on every
    rank (the digest alone would match a restart from scratch too: the run is deterministic)."""
    events = cluster.events(job_id)
    launched = [e.message for e in events if e.kind == "attempt_launched"]
    step = int(re.search(r"restores step (\d+) from memory", launched[attempt - 1]).group(1))
    restored = [e for e in events if e.kind == "restored" and e.attempt == attempt]
    assert {e.rank for e in restored} == {0, 1}
    assert {e.message for e in restored} == {f"restored step {step} from shm"}, restored
    return step


_CLEAN_SHA: dict[str, str] = {}


@pytest.fixture
def cluster(shared_cluster):  # type: ignore[no-untyped-def]
    return shared_cluster


@pytest.fixture
def clean_sha(cluster) -> str:
    if "sha" in _CLEAN_SHA:
        return _CLEAN_SHA["sha"]
    job_id = cluster.submit("python", SCRIPT, *TRAIN, "--eval-batches", "8",
                            "--eval-batch-time", "2", procs=1)
    job = cluster.wait_terminal(job_id, timeout_s=240)
    assert state_name(job.state) == "SUCCEEDED", (job.reason, cluster.logs())
    # stragglers are report-only and come and go with the machine's load
    bad = [e for e in cluster.events(job_id) if e.kind in BAD_KINDS]
    assert not bad, "\n".join(f"{e.kind} rank {e.rank} {e.node}: {e.message}"
                               for e in cluster.events(job_id))
    assert len(job.attempts) == 1
    _CLEAN_SHA["sha"] = final_sha(cluster, job_id)
    return _CLEAN_SHA["sha"]


@pytest.mark.timeout(600)
def test_long_evaluation_is_no_hang_and_crashes_at_and_within_an_epoch_resume_bitwise(
        cluster, clean_sha):
    job_id = cluster.submit("python", str(BIN / "hf_job.py"), "--die-rank", "1",
                            "--die-after-step", str(BATCHES), *TRAIN, procs=1)
    # the second attempt resumes at the epoch boundary; kill a rank on the other node mid-epoch
    job = cluster.wait_step(job_id, attempt=2, step=BATCHES + 2, timeout_s=240)
    assert restored_step(cluster, job_id, 2) == BATCHES
    os.kill(job.attempts[1].ranks[0].pid, signal.SIGKILL)
    job = cluster.wait_terminal(job_id, timeout_s=240)
    assert state_name(job.state) == "SUCCEEDED", job.reason
    assert len(job.attempts) == 3
    # the snapshot of step s is taken as step s+1 starts: a step before the kill, in epoch 2
    assert BATCHES + 1 <= restored_step(cluster, job_id, 3) < 2 * BATCHES
    skipped = [e.message for e in cluster.events(job_id) if e.kind == "checkpoint_skipped"]
    assert not skipped, skipped
    assert final_sha(cluster, job_id) == clean_sha
