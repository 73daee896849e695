"""torchrun compatibility and DDP visibility on a real cluster (2 nodes x 2 ranks, gloo, CPU).

- a script written for torchrun (``@record``, no hpt import) that raises: its error text reaches
  ``hptctl describe``; submitted with torchrun's ``--nnodes``/``--nproc-per-node`` spellings;
- a DDP job whose rank skips one backward: the collective detector names that rank from the
  reducer's bucket all-reduce (reported by ``hpt.integrations.ddp``);
- ``hptctl run -p 2 -- python train.py``: a throw-away local cluster, exit status of the job.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.cluster import ROOT, TRAIN, state_name, wait_for

BIN = Path(__file__).resolve().parent / "bin"


@pytest.fixture
def cluster(shared_cluster):
    """The session's shared 2 x 2 cluster (tests/conftest.py)."""
    return shared_cluster


def hptctl(cluster, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hpt.cli", *args, "--controller", cluster.address]
        if args[0] != "submit" else
        [sys.executable, "-m", "hpt.cli", "submit", "--controller", cluster.address, *args[1:]],
        capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, stdin=subprocess.DEVNULL,
    )


@pytest.mark.timeout(400)
def test_record_error_of_a_torchrun_script_reaches_describe(cluster):
    done = hptctl(cluster, "submit", "--nnodes", "1:2", "--nproc-per-node", "2",
                  "--max-restarts", "0", "--wait", "--", "python", str(BIN / "record_fail.py"))
    assert done.returncode == 1, done.stderr
    job_id = done.stdout.split()[0]
    job = cluster.job(job_id)
    assert (job.spec.nodes, job.spec.min_nodes, job.spec.procs_per_node) == (2, 1, 2)
    described = hptctl(cluster, "describe", job_id, "-o", "json")
    assert described.returncode == 0, described.stderr
    d = json.loads(described.stdout)
    assert d["state"] == "FAILED"
    text = json.dumps(d)
    assert "ValueError" in text and "learning rate 42.0 is not a learning rate" in text
    human = hptctl(cluster, "describe", job_id)
    assert "learning rate 42.0 is not a learning rate" in human.stdout, human.stdout


@pytest.mark.timeout(400)
def test_ddp_rank_skipping_a_backward_is_named_from_the_reducer_all_reduce(cluster):
    job_id = cluster.submit(
        "python", str(BIN / "ddp_job.py"), "--steps", "12", "--skip-rank", "2", "--skip-step", "5",
        stop_grace_s=1.0,
    )
    missing = wait_for(
        lambda: [e for e in cluster.events(job_id) if e.kind == "collective_missing"],
        240, "a collective_missing event",
    )
    assert {e.rank for e in missing} == {2}, [e.message for e in missing]
    assert missing[0].node == "node-1"
    assert "never entered all_reduce seq" in missing[0].message
    job = cluster.wait_terminal(job_id, timeout_s=240)
    assert state_name(job.state) == "SUCCEEDED", job.reason
    cause = job.attempts[0].cause
    assert cause.rank == 2, cause


@pytest.mark.timeout(400)
def test_hptctl_run_starts_a_local_cluster_and_exits_with_the_job_status(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "hpt.cli", "run", "-p", "2", "--", "python", TRAIN, "--steps", "6",
         "--step-time", "0"],
        capture_output=True, text=True, timeout=190, cwd=tmp_path, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert run.returncode == 0, run.stderr
    assert "[rank 0] final sha256" in run.stdout, run.stdout
    assert "SUCCEEDED" in run.stderr
    failed = subprocess.run(
        [sys.executable, "-m", "hpt.cli", "run", "-p", "2", "--max-restarts", "0", "--",
         "python", str(BIN / "record_fail.py")],
        capture_output=True, text=True, timeout=190, cwd=tmp_path, stdin=subprocess.DEVNULL,
    )
    # a failed run keeps its cluster directory for the user to read (by design): not for a test
    kept = re.search(r"cluster log: (\S+)/cluster\.log", failed.stderr)
    if kept:
        shutil.rmtree(kept.group(1), ignore_errors=True)
    assert failed.returncode == 1, failed.stderr
    assert "FAILED" in failed.stderr and "learning rate 42.0" in failed.stderr, failed.stderr
