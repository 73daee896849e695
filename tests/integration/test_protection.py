"""A lost node costs one step: snapshots protected across agents (real processes, gloo, CPU).

The example job is data parallel and deterministic, so a run restored at the same world size
must end with the SHA-256 of a clean run. Agents hold each other's parity pieces (Reed-Solomon
k=2 m=1 over three nodes; a mirror over two); a node's snapshots lost with its agent are
rebuilt by the survivors before the next attempt's ranks start.

Every test shares one cluster of three agents (starting one costs more than most tests): a test
that kills an agent starts it again before it ends, and the one that loses two nodes runs last.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest

from hpt.ckpt import fmt
from tests.integration.cluster import (
    TERMINAL_STATES,
    TRAIN,
    LocalCluster,
    final_sha,
    restore_shape,
    state_name,
    wait_for,
)
from tests.integration.test_checkpoint import resumed_steps

pytestmark = pytest.mark.timeout(600)  # clusters of three agents; slow on a loaded machine

STEPS = 60
JOB = ["python", TRAIN, "--steps", str(STEPS), "--step-time", "0.05"]
SLOW_JOB = ["python", TRAIN, "--steps", str(STEPS), "--step-time", "0.15"]
"""JOB with slower steps (the same digest): it still runs when a loaded machine's protection
rounds first reach the step a test waits for."""
ENDLESS = ["python", TRAIN, "--steps", "100000", "--step-time", "0.05"]
"""A job the test cancels once it has seen what it checks."""
SHARDED = ["python", TRAIN, "--shard", "--steps", str(STEPS)]
"""The example with parameters and optimizer state sharded across the ranks (ZeRO-3)."""
HSDP = ["python", TRAIN, "--hsdp", "2", "--steps", str(STEPS), "--step-time", "0.15"]
"""Sharded across each node's two ranks, replicated across the nodes (HSDP)."""


def _first_resume(cluster: LocalCluster, job_id: str) -> int:
    return min(resumed_steps(cluster, job_id))


def _events(cluster: LocalCluster, job_id: str, kind: str) -> list[str]:
    return [e.message for e in cluster.events(job_id) if e.kind == kind]


def _running(check):  # type: ignore[no-untyped-def]
    """``check`` for ``wait_job`` that fails at once when the job ended (not at the deadline)."""
    def wrapped(job) -> bool:  # type: ignore[no-untyped-def]
        assert state_name(job.state) not in ("SUCCEEDED", "FAILED", "CANCELLED"), job.reason
        return bool(check(job))
    return wrapped


def _protected_at_least(step: int):  # type: ignore[no-untyped-def]
    def check(job) -> bool:  # type: ignore[no-untyped-def]
        return bool(job.attempts) and any(s >= step for s in job.attempts[-1].protected_steps)
    return _running(check)


def _records(node: str, job_id: str, rank: int) -> list[dict]:
    """The commit records of ``rank``'s snapshots that ``node`` holds in shared memory (the
    truth the heartbeats report a moment later)."""
    out = []
    for record in Path("/dev/shm").glob(f"hpt-{node}--*{job_id}-r{rank}.g*.json"):
        try:
            out.append(json.loads(record.read_text()))
        except (OSError, ValueError):
            continue
    return out


def _held_steps(node: str, job_id: str, rank: int) -> set[int]:
    return {rec["step"] for rec in _records(node, job_id, rank)}


def _snapshot_files(node: str, job_id: str, rank: int, step: int) -> tuple[dict, bytes] | None:
    """(commit record, buffer bytes) of ``rank``'s snapshot of ``step`` held by ``node``."""
    for rec in _records(node, job_id, rank):
        if rec.get("step") == step:
            return rec, (Path("/dev/shm") / rec["buffer"]).read_bytes()
    return None


def _start(cluster: LocalCluster) -> LocalCluster:
    """``LocalCluster.start`` with room for three agents' start-up on a loaded 2-core box."""
    try:
        cluster.start_controller()
        for i in range(cluster.num_agents):
            cluster.start_agent(f"node-{i}")
        cluster.wait_nodes_ready(cluster.num_agents, timeout_s=240)
    except BaseException:
        print(cluster.logs())
        cluster.close()
        raise
    return cluster


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """Three agents, two slots each (the HSDP job runs two ranks a node), and the clean run's
    digest of the 3-node job. A shrunk elastic job grows back once a node has been free for
    1 s."""
    cluster = _start(LocalCluster(tmp_path_factory.mktemp("three"), agents=3, slots=2,
                                  controller_args=("--grow-after", "1")))
    try:
        job_id = cluster.submit(*JOB, nodes=3, procs=1)
        job = cluster.wait_terminal(job_id, 300)
        assert state_name(job.state) == "SUCCEEDED", job.reason
        cluster.clean_sha = final_sha(cluster, job_id)  # type: ignore[attr-defined]
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def shared(three):  # type: ignore[no-untyped-def]
    """The shared cluster with its three agents up (a test before may have restarted one)."""
    restore_shape(three, ready_timeout_s=240)
    yield three
    # a test that failed half way leaves its job running: the next one needs every node
    for job in three.client.list():
        if job.state not in TERMINAL_STATES:
            three.client.cancel(job.id, grace_s=1.0)
            three.wait_terminal(job.id, 120)


def test_flipped_byte_in_a_snapshot_is_caught_and_rebuilt_from_parity(shared) -> None:
    cluster = shared
    # the ranks are frozen below until a round protects their newest step: no hang meanwhile
    job_id = cluster.submit(*SLOW_JOB, nodes=3, procs=1, redundancy="2+1", hang_timeout_s=120.0)
    job = cluster.wait_job(job_id, _protected_at_least(6), 90, "a protected step >= 6")
    hit = job.attempts[-1]  # (a loaded machine may have restarted the job already)
    ranks, victim = hit.ranks, None
    for r in ranks:
        os.kill(r.pid, signal.SIGSTOP)  # freeze: the newest common step stops moving
    try:
        # frozen ranks write nothing more: what each holds is read from shared memory itself
        # (a heartbeat that has not yet reported a newer step would otherwise name an older
        # one than the restore picks). The victim is a rank holding no step newer than every
        # rank's newest common one: a rank frozen while its copy of the next step was still in
        # flight finishes it once thawed, and had the victim committed that step already, the
        # restore would pick it and never read the damaged one.
        held = {r.rank: _held_steps(r.node, job_id, r.rank) for r in ranks}
        common = set.intersection(*held.values())
        assert common, {r: sorted(s) for r, s in held.items()}
        step = max(common)
        victim = min(ranks, key=lambda r: (max(held[r.rank]), r.rank))
        assert max(held[victim.rank]) == step, {r: sorted(s) for r, s in held.items()}
        cluster.wait_job(job_id, lambda j: step in j.attempts[hit.number - 1].protected_steps,
                         60, f"step {step} (the newest on every frozen rank) protected")
        found = _snapshot_files(victim.node, job_id, victim.rank, step)
        assert found is not None
        rec, data = found
        buf = Path("/dev/shm") / rec["buffer"]
        raw = bytearray(data)
        raw[len(raw) // 3] ^= 0x5A
        buf.write_bytes(bytes(raw))
        os.kill(victim.pid, signal.SIGKILL)
    finally:
        for r in ranks:
            if victim is None or r.pid != victim.pid:
                os.kill(r.pid, signal.SIGCONT)
    job = cluster.wait_terminal(job_id, 300)
    assert state_name(job.state) == "SUCCEEDED", job.reason
    rebuilt = _events(cluster, job_id, "snapshot_rebuilt")
    assert any(f"step {step} of old rank {victim.rank} from decoded" in m for m in rebuilt), (
        f"step {step}:\n" + "\n".join(f"{e.kind}: {e.message}" for e in cluster.events(job_id))
        + "\n" + cluster.logs())
    assert _first_resume(cluster, job_id) == step
    assert final_sha(cluster, job_id) == cluster.clean_sha


def _replace_lost_node(cluster: LocalCluster, job_id: str, first, victim: str) -> int:  # type: ignore[no-untyped-def]
    """Kill ``victim``'s agent with its ranks and memory, start a replacement (a fresh agent:
    empty memory; the job is not elastic, so it waits for it and runs at the same world
    size); the job must succeed restoring a step rebuilt from parity, which is returned."""
    cluster.kill_agent(victim)
    cluster.start_agent(victim)
    job = cluster.wait_terminal(job_id, 300)
    assert state_name(job.state) == "SUCCEEDED", job.reason
    second = job.attempts[first.number]
    assert second.nodes == first.nodes and second.world_size == first.world_size
    source = [e.message for e in cluster.events(job_id)
              if e.kind == "restore_source" and e.attempt == second.number]
    found = re.search(r"step (\d+): .* rebuilt from peers \(parity 2\+1\)", source[0])
    assert found, [(e.kind, e.message) for e in cluster.events(job_id)]
    return int(found.group(1))


def test_lost_node_is_rebuilt_from_parity_on_its_replacement_bitwise_identical(shared) -> None:
    cluster = shared
    job_id = cluster.submit(*SLOW_JOB, nodes=3, procs=1, redundancy="2+1")
    job = cluster.wait_job(job_id, _protected_at_least(8), 90, "a protected step >= 8")
    first = job.attempts[-1]
    assert first.redundancy == "2+1"
    # data-parallel state: the blocks every replica holds are left out of the coded blobs, so
    # parity is well under the (1 + m/k) of unique state (state / 2 in all, for 2+1)
    state = sum(r.snapshot_bytes for r in first.ranks)
    assert 0 < first.parity_bytes < state / 4, (first.parity_bytes, state)
    step = _replace_lost_node(cluster, job_id, first, first.ranks[1].node)
    assert step >= 8
    rebuilt = _events(cluster, job_id, "snapshot_rebuilt")
    assert any(f"step {step} of old rank 1 from decoded" in m for m in rebuilt), rebuilt
    assert _first_resume(cluster, job_id) == step
    assert final_sha(cluster, job_id) == cluster.clean_sha


def test_an_hsdp_node_lost_is_rebuilt_from_its_thin_blob_and_the_replicas_bitwise(shared) -> None:
    # each node holds the whole state, sliced over its two ranks: a slice's replicas are on the
    # other nodes, so the coded blobs leave their blocks out and the replacement node gets them
    # back from a replica, checked against the lost rank's checksums
    cluster = shared
    clean = cluster.submit(*HSDP, nodes=3, procs=2, redundancy="2+1")
    job = cluster.wait_terminal(clean, 300)
    assert state_name(job.state) == "SUCCEEDED", job.reason
    want = final_sha(cluster, clean)
    job_id = cluster.submit(*HSDP, nodes=3, procs=2, redundancy="2+1")
    job = cluster.wait_job(job_id, _protected_at_least(8), 90, "a protected step >= 8")
    first = job.attempts[-1]
    state = sum(r.snapshot_bytes for r in first.ranks)
    assert 0 < first.parity_bytes < state / 4, (first.parity_bytes, state)
    lost = sorted(r.rank for r in first.ranks if r.node == first.nodes[1])
    assert len(lost) == 2
    step = _replace_lost_node(cluster, job_id, first, first.nodes[1])
    rebuilt = _events(cluster, job_id, "snapshot_rebuilt")
    for rank in lost:  # "step 9 of old rank 2 from decoded, rank 3 from decoded (verified)"
        assert any(re.search(rf"step {step} of old .*\brank {rank} from decoded", m)
                   for m in rebuilt), rebuilt
    assert _first_resume(cluster, job_id) == step
    assert final_sha(cluster, job_id) == want


def test_a_sharded_job_losing_a_node_decodes_and_reshards_it_as_a_resize_from_disk_does(
        shared, tmp_path) -> None:
    cluster = shared
    job_id = cluster.submit(*SHARDED, "--step-time", "0.15", nodes=3, procs=1, min_nodes=2,
                            redundancy="2+1")
    job = cluster.wait_job(job_id, _protected_at_least(6), 90, "a protected step >= 6")
    first = job.attempts[-1]
    # its slice is on no other node: only parity has it
    shrunk, source, step, rebuilt = _shrunk_to(cluster, job_id, first, first.ranks[1].node, 2)
    assert re.search(r"step (\d+): .* rebuilt from peers \(parity 2\+1\)", source), source
    # new rank 0 holds old slice 0 and the first half of old slice 1, new rank 1 the rest:
    # both survivors decode old rank 1, and neither fetches the other survivor's slice: the
    # ranks reported the even split their shards follow, so the controller's plan for each
    # survivor names its own old rank and old rank 1 only (no "not needed" for the agent to
    # skip)
    assert len([m for m in rebuilt if f"step {step} " in m and "rank 1 from decoded" in m]) == 2
    assert not [m for m in rebuilt if "from peer" in m or "not needed" in m], rebuilt
    resumed = {int(m.group(1)) for line in cluster.client.logs(job_id)
               if line.attempt == shrunk
               and (m := re.match(r"rank \d+ resumed at step (\d+)", line.text))}
    assert resumed == {step}, resumed
    # the reference: the same job to that step on 3 nodes, persisted there, then on 2 nodes
    # from that checkpoint (cut into 2 slices from disk): the same state, bit for bit
    assert _resized_from_disk(cluster, tmp_path, [*SHARDED[:-2]], step, procs=1) \
        == final_sha(cluster, job_id)


def test_an_hsdp_shrink_reads_one_copy_of_each_slice_and_matches_a_resize_from_disk(
        shared, tmp_path) -> None:
    # 3 nodes x 2 ranks, one copy of the state per node sliced over its two ranks; node 1 lost:
    # the 2 survivors run 4 ranks in groups of 2. The ranks reported "floor/2": each
    # survivor's plan names its own old ranks and its new ranks' preferred ones, no more
    cluster = shared
    job_id = cluster.submit(*HSDP, nodes=3, procs=2, min_nodes=2, redundancy="2+1")
    job = cluster.wait_job(job_id, _protected_at_least(6), 90, "a protected step >= 6")
    first = job.attempts[-1]
    assert all("floor/2" in r.snapshot_split.split(":")[0].split("+") for r in first.ranks), [
        r.snapshot_split for r in first.ranks]
    # (and what a snapshot holds each rank's training thread, as the ranks measured it)
    assert all(r.snapshot_blocked_s > 0 for r in first.ranks), first.ranks
    _, _, step, rebuilt = _shrunk_to(cluster, job_id, first, first.nodes[1], 4)
    # the node of old ranks 4, 5 runs new ranks 2, 3: it reads their preferred old ranks 2, 3
    # (the lost node's, decoded) beside its own; the other survivor keeps 0, 1, all local
    assert [m for m in rebuilt if re.search(r"rank 2 from decoded, rank 3 from decoded", m)], \
        rebuilt
    assert not [m for m in rebuilt if "rank 0 from" in m or "rank 1 from" in m
                or "not needed" in m], rebuilt
    assert _first_resume(cluster, job_id) == step
    # the reference: the same job to that step on 3 nodes, persisted, then on 2 from disk
    assert _resized_from_disk(cluster, tmp_path, [*HSDP[:-4]], step, procs=2) \
        == final_sha(cluster, job_id)


def test_a_sharded_job_grows_back_onto_a_fresh_node_that_fetches_only_what_it_reads(
        shared) -> None:
    # 3 -> 2 (a node lost, decoded from parity) -> 3 (it returns, its memory swept): the
    # returning node holds nothing to predict from, so what it fetches is what the plan
    # names. It runs new rank 2 of 3, whose slice of the flat vector lies in old rank 1's of
    # the world of 2, and prefers old rank 0 (plain values): both, from their peers. (At 2
    # old ranks that is every one; the plans' narrowing at scale is in test_elastic.)
    cluster = shared
    job_id = cluster.submit("python", TRAIN, "--shard", "--steps", "100000", "--step-time",
                            "0.05", nodes=3, procs=1, min_nodes=2, redundancy="2+1")
    job = cluster.wait_job(job_id, _protected_at_least(6), 90, "a protected step >= 6")
    first = job.attempts[-1]
    victim = first.ranks[1].node
    cluster.kill_agent(victim)
    job = cluster.wait_job(job_id, _running(lambda j: any(
        a.world_size == 2 and a.first_step_at > 0 for a in j.attempts[first.number:])),
                           180, "shrunk attempt stepping")
    cluster.start_agent(victim)
    job = cluster.wait_job(job_id, _running(lambda j: any(
        a.world_size == 3 for a in j.attempts[first.number:])), 240, "grown attempt")
    grown = next(a for a in job.attempts[first.number:] if a.world_size == 3)
    assert grown.nodes[2] == victim and grown.restore_step > 0, grown
    step = grown.restore_step
    said = wait_for(lambda: [m for m in _events(cluster, job_id, "snapshot_rebuilt")
                             if m.startswith(f"{victim}: step {step} of old ")], 60,
                    f"{victim} saying what it fetched")
    assert re.match(rf"{victim}: step {step} of old rank 0 from peer, rank 1 from peer "
                    r"\(verified\)", said[0]), said
    assert "not needed" not in said[0], said
    # the grown world restores that step from memory, resharded 2 -> 3 (a slice left out of
    # the plan would send every rank on to disk, here scratch)
    cluster.wait_job(job_id, _running(lambda j: j.attempts[grown.number - 1].first_step_at > 0
                                      or j.attempts[-1].number > grown.number),
                     240, "grown attempt stepping")
    resumed = wait_for(lambda: {int(m.group(1)) for line in cluster.client.logs(job_id)
                                if line.attempt == grown.number
                                and (m := re.match(r"rank \d+ resumed at step (\d+)",
                                                   line.text))} or None, 60, "grown resumed")
    assert resumed == {step}, resumed
    cluster.client.cancel(job_id, grace_s=1.0)
    cluster.wait_terminal(job_id)


def _shrunk_to(cluster: LocalCluster, job_id: str, first, victim: str,  # type: ignore[no-untyped-def]
               world: int) -> tuple[int, str, int, list[str]]:
    """Kill ``victim``'s agent and let the job finish on the survivors: the number of the
    attempt of ``world`` ranks, its restore source, the step it restored, and its
    snapshot_rebuilt events."""
    cluster.kill_agent(victim)
    job = cluster.wait_terminal(job_id, 300)
    assert state_name(job.state) == "SUCCEEDED", job.reason
    shrunk = next(a for a in job.attempts[first.number:] if a.world_size == world)
    source = [e.message for e in cluster.events(job_id)
              if e.kind == "restore_source" and e.attempt == shrunk.number]
    found = re.search(r"step (\d+): ", source[0])
    assert found, source
    rebuilt = [e.message for e in cluster.events(job_id)
               if e.kind == "snapshot_rebuilt" and e.attempt == shrunk.number]
    return shrunk.number, source[0], int(found.group(1)), rebuilt


def _resized_from_disk(cluster: LocalCluster, tmp_path: Path, argv: list[str], step: int,
                       procs: int) -> str:
    """The final digest of ``argv`` (the job without --steps and --step-time) run to ``step``
    on 3 nodes, persisted there, then from that checkpoint on 2 nodes (resharded from disk):
    what a resize at ``step`` must give, bit for bit."""
    persist = tmp_path / "reference"
    restore_shape(cluster, ready_timeout_s=240)  # the killed agent back: three nodes again

    def published() -> set[int]:
        return ({s for p in persist.iterdir() if (s := fmt.parse_step_dir(p.name)) is not None
                 and (p / fmt.MANIFEST_NAME).is_file()} if persist.is_dir() else set())

    ref = cluster.submit(*argv, "--steps", str(step + 10), "--step-time", "0.15", nodes=3,
                         procs=procs, persist_dir=str(persist), persist_every=step)
    done = cluster.wait_terminal(ref, 300)
    assert state_name(done.state) == "SUCCEEDED", done.reason
    assert step in published(), sorted(published())
    for newer in published() - {step}:  # (2 x step may be within its steps too)
        shutil.rmtree(persist / fmt.step_dir_name(newer))
    ref = cluster.submit(*argv, "--steps", str(STEPS), "--step-time", "0", nodes=2,
                         procs=procs, persist_dir=str(persist), persist_every=10 * STEPS)
    assert state_name(cluster.wait_terminal(ref, 300).state) == "SUCCEEDED"
    assert resumed_steps(cluster, ref) == {step}
    return final_sha(cluster, ref)


def test_shrink_of_a_data_parallel_job_reads_the_survivors_replicas_then_grows_back(
        shared) -> None:
    cluster = shared
    job_id = cluster.submit(*ENDLESS, nodes=3, procs=1, min_nodes=2)
    job = cluster.wait_job(job_id, _protected_at_least(6), 90, "a protected step >= 6")
    first = job.attempts[-1]
    victim = first.ranks[2].node
    # the ranks run on: the survivors keep the newest protected step pinned in memory
    cluster.kill_agent(victim)  # its snapshot files stay in /dev/shm: nobody swept them yet
    job = cluster.wait_job(job_id, _running(lambda j: len(j.attempts) > first.number
                                            and j.attempts[first.number].first_step_at > 0),
                           180, "shrunk attempt stepping")
    second = job.attempts[first.number]
    assert second.world_size == 2 and victim not in second.nodes
    source = [e.message for e in cluster.events(job_id)
              if e.kind == "restore_source" and e.attempt == second.number]
    # (a survivor whose last report did not list the step yet is named with the lost node)
    found = re.search(r"step (\d+): from the surviving replicas .*; ((?:node-\d, )*node-\d) "
                      r"not needed", source[0])
    assert found and victim in found.group(2).split(", "), source
    step = int(found.group(1))
    assert step >= 6
    # the example is data parallel (no sharded tensor): each new rank reads its own old
    # rank's snapshot, a replica of the model and optimizer, so nothing of the lost node is
    # fetched or decoded before the shrunk world starts
    for r in second.ranks:
        assert _snapshot_files(r.node, job_id, 2, step) is None, r.node
        wait_for(lambda r=r: [e for e in cluster.events(job_id)
                              if e.kind == "restored" and e.attempt == second.number
                              and e.rank == r.rank
                              and e.message == f"restored step {step} from shm"], 30,
                 f"new rank {r.rank} restored from its own old rank's snapshot")
        # (the controller's plan named each survivor its own old rank only: nothing to fetch)
        assert not [m for m in _events(cluster, job_id, "snapshot_rebuilt")
                    if m.startswith(f"{r.node}: step {step} of old rank")], r.node
    assert _first_resume(cluster, job_id) == step  # one step lost at most per round: this one
    history = [h.reason for h in job.history]
    assert any("resize 3 -> 2 nodes" in r for r in history), history
    # the node comes back: once it has been free for 1 s and a snapshot is complete, grow
    cluster.start_agent(victim)
    job = cluster.wait_job(job_id, _running(lambda j: any(a.world_size == 3
                                                          for a in j.attempts[second.number:])),
                           240, "grown attempt")
    grown = next(a for a in job.attempts[second.number:] if a.world_size == 3)
    before = job.attempts[grown.number - 2]
    assert victim in grown.nodes and before.world_size == 2
    assert _events(cluster, job_id, "resize_requested")
    history = [h.reason for h in job.history]
    assert any(r.startswith("grow 2 -> 3 nodes") for r in history), history
    source = [e.message for e in cluster.events(job_id)
              if e.kind == "restore_source" and e.attempt == grown.number]
    # every node held the step in its last report, or one's report did not list it yet (it is
    # then named not needed): a replica either way
    found = re.search(r"step (\d+)(?: from memory|: from the surviving replicas)", source[0])
    assert found, [(e.kind, e.message) for e in cluster.events(job_id)]
    grown_step = int(found.group(1))
    # the returning node runs new rank 2, which prefers old rank 0 of the world of 2: that
    # replica comes from its peer, verified (old rank 1's when its node was named not needed);
    # the other is another replica, not named in its plan, not fetched
    said = wait_for(lambda: [m for m in _events(cluster, job_id, "snapshot_rebuilt")
                             if m.startswith(f"{victim}: step {grown_step} of old rank ")], 30,
                    f"{victim} saying which replica it fetched")
    fetched = re.match(rf"{victim}: step {grown_step} of old rank (\d) from peer", said[0])
    assert fetched, said
    old, other = int(fetched.group(1)), 1 - int(fetched.group(1))
    assert old == 0 or "not needed" in source[0], (said, source)
    assert f"rank {other} from" not in said[0], said
    got = wait_for(lambda: _snapshot_files(victim, job_id, old, grown_step), 60,
                   f"old rank {old} in place on {victim}")
    want = _snapshot_files(before.ranks[old].node, job_id, old, grown_step)
    assert want is None or got[1] == want[1]
    assert _snapshot_files(victim, job_id, other, grown_step) is None
    # the grown world restores that step (resharded from 2 to 3 ranks) and trains on
    cluster.wait_job(job_id, _running(lambda j: j.attempts[grown.number - 1].first_step_at > 0
                                      or j.attempts[-1].number > grown.number),
                     240, "grown attempt stepping")
    assert grown_step in resumed_steps(cluster, job_id)
    cluster.client.cancel(job_id, grace_s=1.0)
    cluster.wait_terminal(job_id)


def test_an_unprotected_data_parallel_job_moved_onto_a_spare_reads_a_survivors_replica(
        shared) -> None:
    cluster = shared
    # no parity, no mirror: nothing rebuilds the lost node's own ranks, yet the survivor holds
    # the whole model and optimizer; at the same world size (the spare takes the lost node's
    # place) its replica stands in rather than disk or step 0
    job_id = cluster.submit(*ENDLESS, nodes=2, procs=1, redundancy="off")

    def saved(job) -> bool:  # type: ignore[no-untyped-def]
        return bool(job.attempts) and len(job.attempts[-1].ranks) == 2 and all(
            max(r.snapshot_steps, default=0) >= 6 for r in job.attempts[-1].ranks)

    job = cluster.wait_job(job_id, _running(saved), 120, "a snapshot >= 6 on every rank")
    first = job.attempts[-1]
    victim, survivor = first.ranks[0].node, first.ranks[1].node
    cluster.kill_agent(victim)
    job = cluster.wait_job(job_id, _running(lambda j: len(j.attempts) > first.number
                                            and j.attempts[first.number].first_step_at > 0),
                           180, "the attempt on the spare stepping")
    second = job.attempts[first.number]
    spare = next(n for n in second.nodes if n != survivor)
    assert second.world_size == 2 and victim not in second.nodes and survivor in second.nodes
    source = [e.message for e in cluster.events(job_id)
              if e.kind == "restore_source" and e.attempt == second.number]
    found = re.match(rf"step (\d+): from the surviving replicas .*the ranks of {victim} read a "
                     r"survivor's model and optimizer", source[0])
    assert found, source
    step = int(found.group(1))
    assert step >= 6 and second.restore_step == step
    # the spare runs new rank 0, whose own old rank was lost: its plan named old rank 1 only,
    # fetched from the survivor, verified
    said = wait_for(lambda: [m for m in _events(cluster, job_id, "snapshot_rebuilt")
                             if m.startswith(f"{spare}: step {step} of old rank")], 30,
                    f"{spare} saying which replica it fetched")
    assert re.match(rf"{spare}: step {step} of old rank 1 from peer \(verified\) in ",
                    said[0]), said
    got = _snapshot_files(spare, job_id, 1, step)
    want = _snapshot_files(survivor, job_id, 1, step)
    assert got is not None and (want is None or got[1] == want[1])
    for rank in (0, 1):  # both ranks restored that step from memory: no disk, no step 0
        wait_for(lambda rank=rank: [e for e in cluster.events(job_id)
                                    if e.kind == "restored" and e.attempt == second.number
                                    and e.rank == rank
                                    and e.message == f"restored step {step} from peers"], 30,
                 f"new rank {rank} restored step {step}")
    cluster.wait_step(job_id, second.number, step + 3)
    cluster.client.cancel(job_id, grace_s=1.0)
    cluster.wait_terminal(job_id)
    cluster.start_agent(victim)


def test_losing_two_of_three_nodes_of_a_data_parallel_job_restores_the_last_replica(
        shared, tmp_path) -> None:
    cluster = shared  # the last test of the module: it leaves one agent of three
    persist = tmp_path / "persist"
    # parity 2+1 decodes one lost node of three, never two; the replicas need no decoding: a
    # data-parallel job shrunk onto the last node reads that node's own replica from memory
    # (the persisted checkpoint is older: it is the fallback, not the source)
    job_id = cluster.submit("python", TRAIN, "--steps", "100000", "--step-time", "0.2",
                            nodes=3, procs=1, min_nodes=1, persist_dir=str(persist),
                            persist_every=4)

    def ready(job) -> bool:  # type: ignore[no-untyped-def]
        attempt = job.attempts[-1] if job.attempts else None
        return (attempt is not None and len(attempt.nodes) == 3
                and all(r.persisted_steps for r in attempt.ranks))

    job = cluster.wait_job(job_id, _running(ready), 180, "a step persisted on every rank")
    hit = job.attempts[-1]
    survivor = hit.ranks[2].node  # old rank 2: the new rank 0 it runs prefers old rank 0, lost
    for rank in hit.ranks[:2]:
        cluster.kill_agent(rank.node)
    job = cluster.wait_job(job_id, _running(lambda j: len(j.attempts) > hit.number
                                            and j.attempts[hit.number].first_step_at > 0),
                           180, "the attempt on the survivor stepping")
    after = job.attempts[hit.number]  # the attempt right after the two nodes were lost
    assert after.nodes == [survivor] and after.world_size == 1
    source = [e.message for e in cluster.events(job_id)
              if e.kind == "restore_source" and e.attempt == after.number]
    found = re.match(r"step (\d+): from the surviving replicas", source[0])
    assert found and "not needed" in source[0], source
    step = int(found.group(1))
    assert after.restore_step == step
    rebuilt = [e.message for e in cluster.events(job_id)
               if e.kind == "snapshot_rebuilt" and e.attempt == after.number]
    # its plan named old rank 2 only, its own: nothing fetched, nothing decoded
    assert all("from decoded" not in m and "from peer" not in m for m in rebuilt), rebuilt
    # the one new rank read old rank 2's snapshot in shared memory: no disk, no older step
    wait_for(lambda: [e for e in cluster.events(job_id)
                      if e.kind == "restored" and e.attempt == after.number
                      and e.message == f"restored step {step} from peers"], 30,
             "new rank 0 restored the replica")
    assert step in resumed_steps(cluster, job_id)
    assert step >= max(hit.ranks[2].persisted_steps)
    cluster.client.cancel(job_id, grace_s=1.0)
    cluster.wait_terminal(job_id)
