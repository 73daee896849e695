"""ShmSink: snapshots that outlive the process that wrote them (hpt.ckpt.sink)."""

from __future__ import annotations

import importlib.util
import json
import os
import selectors
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpt.ckpt import Checkpointer, ShmSink, SnapshotEngine
from hpt.ckpt.restore import materialize, verify_snapshot

WRITER = Path(__file__).with_name("_snapshot_writer.py")
DEADLINE_S = 60.0


def _load_writer():
    spec = importlib.util.spec_from_file_location("_snapshot_writer", WRITER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read_line(proc: subprocess.Popen[bytes], deadline_s: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(deadline_s):
            raise TimeoutError(f"writer printed nothing within {deadline_s} s")
    return proc.stdout.readline().decode().strip()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_snapshot_survives_a_rank_killed_in_the_middle_of_a_copy(shm_prefix: str) -> None:
    writer = _load_writer()
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), shm_prefix],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        line = _read_line(proc, DEADLINE_S)
        assert line == "BLOCKED", (line, proc.stderr.read().decode() if proc.poll() else "")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(DEADLINE_S) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(DEADLINE_S)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]

    # What the rank had after step STEPS - 1, recomputed here deterministically.
    model, opt = writer.make_job()
    for step in range(1, writer.STEPS):
        writer.train_step(model, opt, step)

    reader = ShmSink(shm_prefix)
    try:
        records = [p for p in reader.files() if p.name.endswith(".json")]
        assert len(records) == 1, "the half-written generation must have no commit record"
        ref = reader.latest()
        assert ref is not None and ref.step == writer.STEPS - 1
        snap = reader.read(ref)
        verify_snapshot(snap)
        state = materialize(snap.layout, snap.meta_json, snap.buffer)
        assert state["step"] == writer.STEPS - 1
        for k, v in model.state_dict().items():
            assert torch.equal(_bits(state["model"][k]), _bits(v)), k
        names = dict(enumerate(n for n, _ in model.named_parameters()))
        for i, per_param in opt.state_dict()["state"].items():
            for k, v in per_param.items():
                assert torch.equal(_bits(state["optim"]["state"][names[i]][k]), _bits(v))
    finally:
        reader.close(unlink=True)
    assert reader.files() == []


def test_commit_record_names_the_buffer_and_holds_layout_meta_and_checksums(
    shm_prefix: str,
) -> None:
    sink = ShmSink(shm_prefix)
    try:
        engine = SnapshotEngine(sink)
        engine.save(4, {"w": torch.arange(10.0), "lr": 0.5})
        engine.close()
        record_path = sink.record_path(0)
        record = json.loads(record_path.read_text())
        assert record["format"] == "hpt.snapshot-record.v2"
        assert (record["step"], record["generation"]) == (4, 0)
        assert record["buffer"].startswith(f"{shm_prefix}.g0.") and record["buffer"].endswith(
            ".buf"
        )
        assert (sink.directory / record["buffer"]).stat().st_size == record["total_bytes"]
        assert record["layout"]["entries"][0]["fqn"] == "w"
        assert record["meta"]["lr"] == 0.5
        assert record["checksum_algo"] == "hpt.wsum64.v1"
        start, length, value = record["checksums"][0]
        assert (start, length) == (0, record["total_bytes"]) and int(value, 16) >= 0
        assert not Path(str(record_path) + ".tmp").exists()
    finally:
        sink.close(unlink=True)
    assert sink.files() == []


def test_an_unreadable_commit_record_is_ignored_not_fatal(shm_prefix: str) -> None:
    sink = ShmSink(shm_prefix)
    try:
        engine = SnapshotEngine(sink)
        engine.save(1, {"w": torch.ones(4)})
        engine.save(2, {"w": torch.ones(4)})
        engine.close()
        sink.record_path(1).write_text('{"format": "hpt.snapshot-record.v1", "step": "two"')
        ref = sink.latest()
        assert ref is not None and ref.step == 1
    finally:
        sink.close(unlink=True)


def test_a_second_process_can_restore_from_the_files(shm_prefix: str) -> None:
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 4)
    with Checkpointer(model, sink=ShmSink(shm_prefix)) as ckpt:
        ckpt.save(3)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    code = (
        "import sys, torch\n"
        "from hpt.ckpt import Checkpointer, ShmSink\n"
        "m = torch.nn.Linear(4, 4)\n"
        "sink = ShmSink(sys.argv[1])\n"
        "print(Checkpointer(m, sink=sink).restore())\n"
        "torch.save(m.state_dict(), sys.argv[2])\n"
    )
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"{shm_prefix}.pt"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, shm_prefix, str(out)],
            capture_output=True,
            timeout=DEADLINE_S,
            check=True,
        )
        assert done.stdout.decode().strip() == "3"
        restored = torch.load(out, weights_only=True)
        for k, v in expected.items():
            assert torch.equal(_bits(restored[k]), _bits(v))
    finally:
        out.unlink(missing_ok=True)
        ShmSink.remove(shm_prefix)


@pytest.mark.parametrize("prefix", ["", "a/b", "../x", ".hidden", "x" * 300])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        ShmSink(prefix)


def test_pins_are_read_back_and_removed_with_the_prefix(shm_prefix: str) -> None:
    sink = ShmSink(shm_prefix)
    assert sink.pinned() == set()
    sink.pin([3, 1, 1])
    assert sink.pinned() == {1, 3}
    assert json.loads(sink.pins_path().read_text()) == [1, 3]
    sink.pins_path().write_text("not json")
    assert sink.pinned() == set()  # unreadable pins pin nothing
    assert ShmSink.remove(shm_prefix) == 1


def test_a_cadence_is_read_back_once_per_change_and_removed_with_the_prefix(
        shm_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    owner, writer = ShmSink(shm_prefix), ShmSink(shm_prefix)
    assert writer.cadence() is None  # none asked: the writer's own
    owner.set_cadence(18, from_step=300, before=7)
    assert writer.cadence() == (18, 300, 7)
    reads = []
    real = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: reads.append(self) or real(
        self, *a, **k))
    assert writer.cadence() == (18, 300, 7) and reads == []  # unchanged: a stat, no read
    owner.set_cadence(1)
    assert writer.cadence() == (1, 0, 0) and len(reads) == 1  # replaced: read again
    monkeypatch.undo()
    for bad in ("not json", '{"every": 0, "from": 0}', '{"every": 2}', "[2, 0]",
                '{"every": true, "from": 0}', '{"every": 2, "from": 0, "before": -1}'):
        tmp = owner.cadence_path().with_name("x.tmp")
        tmp.write_text(bad)
        os.replace(tmp, owner.cadence_path())
        assert writer.cadence() is None, bad  # unreadable: the writer's own cadence
    with pytest.raises(ValueError, match="every must be >= 1"):
        owner.set_cadence(0)
    owner.set_cadence(5)
    owner.clear_cadence()
    assert writer.cadence() is None
    owner.set_cadence(5)
    assert ShmSink.remove(shm_prefix) == 1 and writer.cadence() is None
