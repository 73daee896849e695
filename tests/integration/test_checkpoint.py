"""North-star checks of the checkpoint path on real processes (2 nodes x 2 ranks, gloo, CPU).

The example job is deterministic (data position = step, dropout RNG restored), so a run that
recovers from a fault must end with the SHA-256 of model + optimizer state identical to a clean
run, and it must have resumed from a snapshot rather than from scratch.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
from pathlib import Path

import pytest

from hpt._proto import common_pb2 as pb
from hpt.ckpt import fmt
from tests.integration.cluster import TRAIN, LocalCluster, state_name, wait_for

# the first test to run also pays for the module's clean run and cluster (pytest-timeout
# counts fixture setup): 72 s of setup + 48 s of test at load 8 hit the 120 s default
pytestmark = pytest.mark.timeout(240)

STEPS = 24
JOB = ["python", TRAIN, "--steps", str(STEPS), "--step-time", "0.03"]
DELAYED_TRAIN = str(Path(__file__).parent / "bin" / "delayed_commit_train.py")


class _Marker:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.path, "w"))


def final_sha(cluster: LocalCluster, job_id: str) -> str:
    text = [line.text for line in cluster.client.logs(job_id, rank=0)]
    shas = [t.split()[-1] for t in text if t.startswith("final sha256 ")]
    assert len(shas) == 1, text
    return shas[0]


def resumed_steps(cluster: LocalCluster, job_id: str) -> set[int]:
    return {int(m.group(1)) for line in cluster.client.logs(job_id)
            if (m := re.match(r"rank \d+ resumed at step (\d+)", line.text))}


def published_steps(persist: Path) -> list[int]:
    """Steps of the global checkpoints under ``persist`` (one per step, for every rank)."""
    if not persist.is_dir():
        return []
    return sorted(s for p in persist.iterdir()
                  if (s := fmt.parse_step_dir(p.name)) is not None
                  and (p / fmt.MANIFEST_NAME).is_file())


_CLEAN_SHA: dict[str, str] = {}
"""The clean run's digest, made once per session on the shared cluster."""


@pytest.fixture
def clean_sha(shared_cluster) -> str:
    if "sha" not in _CLEAN_SHA:
        job_id = shared_cluster.submit(*JOB)
        job = shared_cluster.wait_terminal(job_id)
        assert state_name(job.state) == "SUCCEEDED", job.reason
        _CLEAN_SHA["sha"] = final_sha(shared_cluster, job_id)
    return _CLEAN_SHA["sha"]


def shm_files(job_id: str) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if job_id in n]


def test_rank_killed_midrun_resumes_from_memory_bitwise_identical(shared_cluster, clean_sha):
    cluster = shared_cluster
    job_id = cluster.submit(*JOB)
    job = cluster.wait_step(job_id, attempt=1, step=8)
    victim = job.attempts[0].ranks[1]
    os.kill(victim.pid, signal.SIGKILL)
    job = cluster.wait_terminal(job_id)
    assert state_name(job.state) == "SUCCEEDED", job.reason
    # the fault's record: one restart, its cause, the events in order
    assert len(job.attempts) == 2 and job.restarts == 1
    first = job.attempts[0]
    assert first.state == pb.ATTEMPT_STATE_FAILED
    assert first.cause.kind == "rank_exit" and first.cause.rank == 1
    assert first.cause.node == victim.node and "SIGKILL" in first.cause.message
    assert {r.state for r in first.ranks} <= {pb.RANK_STATE_FAILED, pb.RANK_STATE_STOPPED}
    assert job.attempts[1].first_step_at > first.cause.detected_at
    seen = [e.kind for e in cluster.events(job_id)]
    assert seen.index("fault") < seen.index("recovering") < seen.index("job_succeeded")
    assert seen.count("attempt_launched") == 2
    # the restart resumed from the agents' memory and lost nothing
    launched = [e.message for e in cluster.events(job_id) if e.kind == "attempt_launched"]
    step = int(re.search(r"restores step (\d+) from memory", launched[1]).group(1))
    assert step >= 8
    assert resumed_steps(cluster, job_id) == {step}
    assert final_sha(cluster, job_id) == clean_sha
    wait_for(lambda: not shm_files(job_id), 30, "snapshot memory released at job end")


def test_rank_killed_while_its_snapshot_is_in_flight_resumes_from_the_common_step(
    shared_cluster, clean_sha
):
    cluster = shared_cluster
    # rank 1's commit of step 10 is held for 4.5 s (under the 5 s hang deadline): the copy is
    # done, the snapshot not complete; the test kills rank 1 inside that window
    job = ["python", DELAYED_TRAIN, *JOB[2:]]
    job_id = cluster.submit(*job, env={"FI_COMMIT_DELAY": "1:10:4.5"})
    job = cluster.wait_step(job_id, attempt=1, step=10)
    held = {r.rank: set(r.snapshot_steps) for r in job.attempts[0].ranks}
    os.kill(job.attempts[0].ranks[1].pid, signal.SIGKILL)
    job = cluster.wait_terminal(job_id)
    assert state_name(job.state) == "SUCCEEDED", job.reason
    before = {r.rank: set(r.snapshot_steps) for r in job.attempts[0].ranks}
    assert 10 not in before[1], "rank 1's in-flight snapshot must not count as complete"
    launched = [e.message for e in cluster.events(job_id) if e.kind == "attempt_launched"]
    step = int(re.search(r"restores step (\d+) from memory", launched[1]).group(1))
    assert step == 9, (held, before)
    assert resumed_steps(cluster, job_id) == {9}
    assert final_sha(cluster, job_id) == clean_sha


@pytest.mark.timeout(300)
def test_whole_cluster_restart_restores_persisted_checkpoint_skipping_damaged_ones(
    shared_cluster, clean_sha, tmp_path
):
    persist = tmp_path / "ckpt"
    spec = dict(persist_dir=str(persist), persist_every=5)
    # JOB's steps, slower: checkpoints of steps 5, 10 and 15 are persisted before it ends
    job = ["python", TRAIN, "--steps", str(STEPS), "--step-time", "0.1"]
    (tmp_path / "a").mkdir()
    first = LocalCluster(tmp_path / "a")
    try:  # a cluster of its own (its agents' names are not the shared cluster's)
        first.start_controller()
        for name in ("gone-0", "gone-1"):
            first.start_agent(name)
        first.wait_nodes_ready(2, timeout_s=120)
        first.submit(*job, **spec)

        def published() -> list[int]:
            return published_steps(persist)

        wait_for(lambda: len(published()) >= 3, 120, "3 checkpoints persisted")
    finally:
        first.close()
    # the whole cluster is gone; damage the newest checkpoint (a data file only rank 1 reads)
    # and plant a pickle as the second newest's DCP .metadata, which hpt never reads
    steps = published()
    newest, second = steps[-1], steps[-2]
    data = persist / fmt.step_dir_name(newest) / "__1_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    marker = tmp_path / "unpickled-marker"
    (persist / fmt.step_dir_name(second) / ".metadata").write_bytes(
        pickle.dumps(_Marker(str(marker))))

    # another cluster (the shared one) runs the same job on the same persist_dir
    cluster = shared_cluster
    job_id = cluster.submit(*job, **spec)
    done = cluster.wait_terminal(job_id)
    assert state_name(done.state) == "SUCCEEDED", done.reason
    assert resumed_steps(cluster, job_id) == {second}
    assert final_sha(cluster, job_id) == clean_sha
    skipped = [e for e in cluster.events(job_id) if e.kind == "checkpoint_skipped"]
    assert {e.rank for e in skipped} == {0, 1, 2, 3}, [e.message for e in skipped]
    assert any(e.rank == 1 and f"disk: step {newest}: CorruptCheckpointError" in e.message
               for e in skipped), [e.message for e in skipped]
    assert not marker.exists(), "hpt unpickled DCP's .metadata"


def test_the_controller_retunes_a_running_jobs_cadences_without_restarting_it(
    shared_cluster, tmp_path
):
    # snapshots and persists every 7th step to start with (the spec's, over the script's every
    # step). A small job with no faults: Young/Daly puts snapshots hours apart at the blocking
    # the ranks measure, so the cap sets them (this cluster's controller: 5 s, 100 steps), and
    # persists an hour apart (the most)
    persist = tmp_path / "ckpt"
    steps = 600
    job_id = shared_cluster.submit("python", TRAIN, "--steps", str(steps), "--step-time", "0.05",
                                   persist_dir=str(persist), persist_every=7, snapshot_every=7,
                                   adapt_cadence=True)
    changed = wait_for(lambda: [e for e in shared_cluster.events(job_id)
                                if e.kind == "cadence_changed"], 120, "a cadence change")
    job = shared_cluster.job(job_id)
    text = changed[0].message
    snap = re.search(r"snapshot every 7 -> (\d+) steps from step (\d+)", text)
    persist_to = re.search(r"persist every 7 -> (\d+) steps", text)
    assert snap is not None and persist_to is not None, text
    every, start = int(snap.group(1)), int(snap.group(2))
    assert every >= 30 and start % every == 0 and int(persist_to.group(1)) % every == 0, text
    # past the change (the ranks' reported steps lag it), and past the persists already under
    # way then, the agents persist nothing more for the rest of the run
    after = min(r.step for r in job.attempts[-1].ranks) + 60
    assert max(after, start) + 20 <= steps, f"the change came too late to tell: {text}"
    shared_cluster.wait_step(job_id, attempt=1, step=after)
    settled = published_steps(persist)
    assert settled and all(s % 7 == 0 for s in settled), settled
    done = shared_cluster.wait_terminal(job_id)
    assert state_name(done.state) == "SUCCEEDED", done.reason
    assert len(done.attempts) == 1  # applied to the running attempt, not by a restart
    assert published_steps(persist) == settled  # not one of the last 60+ steps
    # every rank switched at the step named: every 7th before it, every `every`-th from it on
    for r in done.attempts[-1].ranks:
        held = sorted(r.snapshot_steps)
        assert any(s >= start for s in held), (held, text)
        assert all(s % (7 if s < start else every) == 0 for s in held), (held, text)
