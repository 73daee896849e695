"""hptctl for elastic, protected jobs: --nodes MIN:MAX, --redundancy, ckpt ls protection."""

from __future__ import annotations

from hpt import client as hc
from hpt._proto import common_pb2
from tests.unit.test_cli import _clean_env, _requests, _run, server  # noqa: F401  (fixtures)


def test_nodes_min_max_sends_min_nodes_and_max_nodes(server) -> None:  # noqa: F811
    addr, fake = server
    result = _run("submit", "--controller", addr, "-n", "2:3", "--redundancy", "2+1", "--",
                  "true")
    assert result.exit_code == 0, result.output
    spec = _requests(fake, "SubmitJob")[0].spec
    assert (spec.nodes, spec.min_nodes, spec.redundancy) == (3, 2, "2+1")


def test_plain_nodes_is_not_elastic(server) -> None:  # noqa: F811
    addr, fake = server
    assert _run("submit", "--controller", addr, "-n", "4", "--", "true").exit_code == 0
    spec = _requests(fake, "SubmitJob")[0].spec
    assert (spec.nodes, spec.min_nodes, spec.redundancy) == (4, 4, "")


def test_bad_node_range_is_a_usage_error_naming_nodes(server) -> None:  # noqa: F811
    addr, _ = server
    for bad in ("3:2", "a:b", "-1:2"):
        result = _run("submit", "--controller", addr, "-n", bad, "--", "true")
        assert result.exit_code == 2 and "--nodes" in result.output, (bad, result.output)


def test_ckpt_ls_marks_protected_steps_and_reports_memory_per_node() -> None:
    ranks = [common_pb2.RankStatus(rank=i, node=f"n{i}", snapshot_steps=[4, 5],
                                   snapshot_bytes=1000) for i in range(3)]
    attempt = common_pb2.Attempt(number=1, nodes=["n0", "n1", "n2"], ranks=ranks,
                                 protected_steps=[4], redundancy="2+1", parity_bytes=1500)
    job = common_pb2.Job(id="j", attempts=[attempt])
    rows = {d["step"]: d["state"] for d in hc.checkpoints_of(job)}
    assert rows == {5: "complete", 4: "complete, protected (2+1)"}
    p = hc.protection_of(job)
    assert (p["state_bytes_per_node"], p["parity_bytes_per_node"]) == (1000, 500)
    assert p["memory_ratio"] == 1.5 and p["expected_ratio"] == 1.5
    assert not p["replicated"]
    for replicas, said in ((2, False), (3, True)):  # every rank a replica, or it is not said
        for i, r in enumerate(job.attempts[0].ranks):
            r.snapshot_replicated = i < replicas
        assert hc.protection_of(job)["replicated"] is said


def test_ckpt_ls_says_what_a_resize_of_sharded_state_reads(server, monkeypatch) -> None:  # noqa: F811
    ranks = [common_pb2.RankStatus(rank=i, node=f"n{i}", snapshot_steps=[4],
                                   snapshot_bytes=1000, snapshot_split="chunk:16,5")
             for i in range(2)]
    job = common_pb2.Job(id="j", attempts=[common_pb2.Attempt(
        number=1, nodes=["n0", "n1"], ranks=ranks, redundancy="mirror")])
    assert hc.protection_of(job)["split"] == ["chunk"]
    job.attempts[0].ranks[1].snapshot_split = "chunk+floor:16"  # the common one, all sizes
    assert hc.protection_of(job)["split"] == ["chunk"]
    job.attempts[0].ranks[1].snapshot_split = "floor/2:16"
    assert hc.protection_of(job)["split"] is None  # none in common
    job.attempts[0].ranks[1].snapshot_split = "chunk:x"
    assert hc.protection_of(job)["split"] is None  # does not read: not known
    addr, _ = server
    said = {}
    for split, expect in ((["floor/2"], "one copy of each new rank's slice while 2 divides"),
                          (["chunk"], "only the old slices each new rank's slice overlaps"),
                          (None, "reads every old rank's snapshot")):
        p = dict(redundancy="mirror", state_bytes_per_node=1000, parity_bytes_per_node=1000,
                 memory_ratio=2.0, expected_ratio=2.0, protected_steps=[4], replicated=False,
                 split=split)
        monkeypatch.setattr(hc, "protection_of", lambda job, p=p: p)
        monkeypatch.setattr(hc, "checkpoints_of", lambda job: [dict(
            step=4, tier="memory", size_bytes=1000, state="complete, protected (mirror)")])
        result = _run("ckpt", "ls", "--controller", addr, "job-1")
        assert result.exit_code == 0, result.output
        said[expect] = expect in " ".join(result.output.split())
    assert all(said.values()), said
