"""PyTorch Lightning under hpt on a real 2 nodes x 1 rank cluster (gloo, CPU).

The shared cluster (its agents judge hangs by the default 5 s minimum deadline). The clean run
doubles as the hang check: its first validation takes more than 3x the hang deadline and must
raise no finding; the run whose rank 1 is SIGKILLed mid-epoch must resume from the agents'
memory at the exact batch and end with the same SHA-256 of model and optimizer state.
"""

from __future__ import annotations

import os
import re
import signal

import pytest

pytest.importorskip("pytorch_lightning", reason="the hpt[lightning] extra is not installed")

from tests.integration.cluster import ROOT, state_name  # noqa: E402

SCRIPT = str(ROOT / "examples" / "lightning_train.py")
JOB = ["python", SCRIPT, "--epochs", "2", "--batches", "12", "--step-time", "0.05"]
ONE_RANK_PER_NODE = {"procs": 1}


_CLEAN_SHA: dict[str, str] = {}


@pytest.fixture
def cluster(shared_cluster):  # type: ignore[no-untyped-def]
    return shared_cluster


def final_sha(cluster, job_id: str) -> str:
    """The digest rank 0 printed in the job's last attempt (and only there, only once)."""
    lines = list(cluster.client.logs(job_id, rank=0))
    last = max(line.attempt for line in lines)
    shas = [(line.attempt, line.text.split()[-1]) for line in lines
            if line.text.startswith("final sha256 ")]
    assert [a for a, _ in shas] == [last], "\n".join(f"{x.attempt}: {x.text}" for x in lines[-30:])
    return shas[0][1]


@pytest.fixture
def clean_sha(cluster) -> str:
    if "sha" in _CLEAN_SHA:
        return _CLEAN_SHA["sha"]
    # the first validation: 8 batches of 2 s, 16 s > 3 x the 5 s hang deadline
    job_id = cluster.submit(*JOB, "--val-batches", "8", "--val-batch-time", "2",
                            **ONE_RANK_PER_NODE)
    job = cluster.wait_terminal(job_id, timeout_s=240)
    assert state_name(job.state) == "SUCCEEDED", (job.reason, cluster.logs())
    # stragglers are report-only and come and go with the machine's load
    bad = [(e.kind, e.rank, e.message) for e in cluster.events(job_id)
           if e.kind in ("hang", "fault", "stacks")]  # a rank late into one collective: report-only
    assert not bad, "\n".join(f"{e.kind} rank {e.rank} {e.node}: {e.message}"
                               for e in cluster.events(job_id))
    assert len(job.attempts) == 1
    _CLEAN_SHA["sha"] = final_sha(cluster, job_id)
    return _CLEAN_SHA["sha"]


@pytest.mark.timeout(600)
def test_long_validation_is_no_hang_and_killed_rank_resumes_at_the_exact_batch(cluster, clean_sha):
    job_id = cluster.submit(*JOB, "--val-batches", "1", **ONE_RANK_PER_NODE)
    cluster.wait_step(job_id, attempt=1, step=7, timeout_s=180)
    # the premise: a snapshot every rank holds, as the controller knows it (on a loaded
    # machine the first commits can still be in flight at step 7)
    job = cluster.wait_job(job_id, lambda j: set.intersection(
        *(set(r.snapshot_steps) for r in j.attempts[0].ranks)), 60,
        "a step reported held by every rank")
    os.kill(job.attempts[0].ranks[1].pid, signal.SIGKILL)
    job = cluster.wait_terminal(job_id, timeout_s=240)
    assert state_name(job.state) == "SUCCEEDED", job.reason
    assert len(job.attempts) == 2
    launched = [e.message for e in cluster.events(job_id) if e.kind == "attempt_launched"]
    found = re.search(r"restores step (\d+) from memory", launched[1])
    held = [(a.number, [(r.rank, r.state, list(r.snapshot_steps)) for r in a.ranks])
            for a in job.attempts]
    assert found, "\n".join([f"{e.attempt} {e.kind}: {e.message}"
                             for e in cluster.events(job_id)] + [str(held)])
    step = int(found.group(1))
    # the snapshot of step s is taken as batch s+1 starts: a step before the kill, not scratch
    assert 1 <= step < 24, launched[1]
    events = cluster.events(job_id)
    restored = [e for e in events if e.kind == "restored" and e.attempt == 2]
    assert {e.rank for e in restored} == {0, 1}
    # every rank restored the controller's step from the agents' memory, none skipped a source
    # (the digest alone would match a restart from scratch too: the run is deterministic)
    assert {e.message for e in restored} == {f"restored step {step} from shm"}, restored
    skipped = [e.message for e in events if e.kind == "checkpoint_skipped"]
    assert not skipped, skipped
    assert final_sha(cluster, job_id) == clean_sha
