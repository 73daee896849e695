"""The asynchronous snapshot engine against every SnapshotSink (hpt.ckpt.engine).

Contract style: each scenario runs against MemorySink and ShmSink.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch

from hpt.ckpt import Checkpointer, MemorySink, ShmSink, SnapshotEngine, SnapshotError
from hpt.ckpt.checksum import RangeChecksum
from hpt.ckpt.layout import Layout
from hpt.ckpt.restore import materialize, verify_snapshot
from hpt.ckpt.sink import Snapshot, SnapshotRef, SnapshotSink

DEADLINE_S = 30.0


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bitwise(a: torch.Tensor, b: torch.Tensor, name: str = "") -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (
        f"{name}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
    )
    assert torch.equal(bits(a), bits(b)), f"{name}: bytes differ"


def assert_tree_bitwise(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert_bitwise(a, b, path)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for k in a:
            assert_tree_bitwise(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_tree_bitwise(x, y, f"{path}.{i}")
    else:
        assert type(a) is type(b) and a == b, path


def every_dtype_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g)
    nan_bits = torch.tensor([0x7FC00001, -0x00400001, 0x7F800000, -(2**31), 1], dtype=torch.int32)
    return {
        "f32": base.clone(),
        "bf16": base.to(torch.bfloat16),
        "f16": base.to(torch.float16),
        "f64": base.to(torch.float64) / 3,
        "i64": torch.randint(-(2**62), 2**62, (7,), generator=g),
        "i32": torch.randint(-(2**31), 2**31 - 1, (5,), dtype=torch.int32, generator=g),
        "i8": torch.randint(-128, 127, (9,), dtype=torch.int8, generator=g),
        "u8": torch.randint(0, 256, (13,), dtype=torch.uint8, generator=g),
        "bool": base > 0,
        "c64": torch.complex(base, -base),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "nan_payloads_and_negzero": nan_bits.view(torch.float32),
        "view_with_offset": base[2:5],
        "transposed": base.t(),
        "strided": base[:, ::3],
        "expanded": torch.arange(4.0).expand(3, 4),
        "bf16_transposed": base.to(torch.bfloat16).t(),
        "big": torch.randn(20_000, generator=g),  # 80 KB: cut into several 4 KiB tasks
        "big_noncontiguous": torch.randn(200, 100, generator=g).t(),  # copied whole
        "big_view": torch.randn(30_000, generator=g)[1001:25_001],
        "nested": [{"t": torch.arange(3)}, (torch.ones(2, dtype=torch.float16),)],
        "plain": {"lr": 0.1, "betas": (0.9, 0.99), 7: None},
    }


class RecordingSink:
    """Wraps a sink; records calls and checks the engine never writes over the newest complete
    snapshot."""

    def __init__(self, inner: SnapshotSink) -> None:
        self.inner = inner
        self.calls: list[tuple[str, int]] = []

    def _check_not_newest(self, generation: int) -> None:
        ref = self.inner.latest()
        assert ref is None or ref.generation != generation, "engine overwrites newest snapshot"

    def acquire(self, layout: Layout, generation: int) -> torch.Tensor:
        self._check_not_newest(generation)
        self.calls.append(("acquire", generation))
        return self.inner.acquire(layout, generation)

    def discard(self, generation: int) -> None:
        self._check_not_newest(generation)
        self.calls.append(("discard", generation))
        self.inner.discard(generation)

    def commit(
        self,
        step: int,
        generation: int,
        layout: Layout,
        meta_json: str,
        checksums: Sequence[RangeChecksum],
    ) -> None:
        self.calls.append(("commit", generation))
        self.inner.commit(step, generation, layout, meta_json, checksums)

    def latest(self) -> SnapshotRef | None:
        return self.inner.latest()

    def held(self) -> list[SnapshotRef]:
        return self.inner.held()

    def read(self, ref: SnapshotRef) -> Snapshot:
        return self.inner.read(ref)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(params=["memory", "shm"])
def sink(request: pytest.FixtureRequest) -> Iterator[SnapshotSink]:
    if request.param == "memory":
        s: Any = MemorySink()
        yield s
        s.close()
    else:
        s = ShmSink(request.getfixturevalue("shm_prefix"))
        yield s
        s.close(unlink=True)


def read_latest(sink: SnapshotSink) -> tuple[Snapshot, Any]:
    ref = sink.latest()
    assert ref is not None
    snap = sink.read(ref)
    verify_snapshot(snap)
    return snap, materialize(snap.layout, snap.meta_json, snap.buffer)


class Gate:
    """A before_copy hook that holds the copies of one step until released."""

    def __init__(self, step: int, *, task: int = 0) -> None:
        self.step, self.task = step, task
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, step: int, task: int) -> None:
        if step == self.step and task == self.task:
            self.started.set()
            if not self.release.wait(DEADLINE_S):
                raise TimeoutError("gate never released")


def test_round_trip_is_bitwise_for_every_dtype_view_and_stride(sink: SnapshotSink) -> None:
    state = every_dtype_state()
    engine = SnapshotEngine(sink, num_threads=3, chunk_bytes=4096)
    try:
        engine.save(5, state)
        engine.wait(DEADLINE_S)
        snap, back = read_latest(sink)
        assert snap.step == 5
        assert len(snap.checksums) > 10  # the big tensors were cut into several tasks
        assert_tree_bitwise(state, back)
        # a second save into the other generation, then a third reusing the first buffer
        state["f32"].add_(1)
        engine.save(6, state)
        engine.save(7, state)
        engine.wait(DEADLINE_S)
        snap, back = read_latest(sink)
        assert snap.step == 7
        assert_tree_bitwise(state, back)
    finally:
        engine.close()


def test_generations_alternate_buffers_are_reused_and_newest_is_never_overwritten(
    sink: SnapshotSink,
) -> None:
    rec = RecordingSink(sink)
    gate = Gate(step=3, task=1)
    engine = SnapshotEngine(rec, num_threads=2, chunk_bytes=1024, before_copy=gate)
    w = torch.zeros(2048)
    try:
        for step in (1, 2):
            w.fill_(step)
            engine.save(step, {"w": w})
            engine.wait(DEADLINE_S)
        w.fill_(3)
        engine.save(3, {"w": w})
        assert engine.pending
        assert gate.started.wait(DEADLINE_S)
        # While step 3 is half copied, the newest complete snapshot is step 2, intact.
        snap, back = read_latest(sink)
        assert snap.step == 2
        assert torch.equal(back["w"], torch.full((2048,), 2.0))
        gate.release.set()
        engine.wait(DEADLINE_S)
        assert not engine.pending
        for step in (4, 5, 6):
            w.fill_(step)
            engine.save(step, {"w": w})
        engine.wait(DEADLINE_S)
        snap, back = read_latest(sink)
        assert snap.step == 6 and torch.equal(back["w"], w)
    finally:
        engine.close()
    assert [c for c in rec.calls if c[0] == "acquire"] == [("acquire", 0), ("acquire", 1)]
    written = [g for name, g in rec.calls if name == "commit"]
    assert written == [0, 1, 0, 1, 0, 1]


def test_a_restarted_engine_does_not_overwrite_the_snapshot_it_finds(sink: SnapshotSink) -> None:
    first = SnapshotEngine(sink)
    first.save(10, {"w": torch.ones(8)})
    first.close()
    rec = RecordingSink(sink)  # asserts the newest generation is never discarded or acquired
    second = SnapshotEngine(rec)
    second.save(11, {"w": torch.full((8,), 2.0)})
    second.close()
    assert ("discard", 1) in rec.calls
    assert read_latest(sink)[0].step == 11


def test_pinned_generations_are_never_written_and_the_rotation_keeps_its_size(
    sink: SnapshotSink,
) -> None:
    pins: set[int] = set()
    engine = SnapshotEngine(sink, num_generations=3, pinned=lambda: set(pins))
    w = torch.zeros(64)

    def save(step: int) -> int:
        w.fill_(step)
        engine.save(step, {"w": w})
        engine.wait(DEADLINE_S)
        ref = sink.latest()
        assert ref is not None and ref.step == step
        return ref.generation

    try:
        written = [save(s) for s in (1, 2, 3)]
        assert written == [0, 1, 2]
        pins.update({0, 1})  # steps 1 and 2 pinned (a protection round reads them)
        written = [save(s) for s in range(4, 10)]
        assert not {0, 1} & set(written)  # two more buffers instead
        held = {ref.step for ref in sink.held()}
        assert {1, 2} <= held and {8, 9} <= held  # the pinned steps and the newest two
        pins.clear()
        pins.add(written[-1])  # the newest pinned too: nothing waits, nothing is skipped
        assert save(10) != written[-1]
        pins.update({0, 1, 2, 3, 4})  # more than MAX_PINNED: only the lowest two count
        save(11)
    finally:
        engine.close()


def test_a_restored_rank_overwrites_the_steps_its_predecessor_saved_beyond_the_restore(
    sink: SnapshotSink,
) -> None:
    first = SnapshotEngine(sink, num_generations=3)
    for step in (12, 13, 14):  # the predecessor got to 14; the job restores 12
        first.save(step, {"w": torch.full((8,), float(step))})
    first.close()
    second = SnapshotEngine(sink, num_generations=3)
    try:
        for step in (13, 14):
            second.save(step, {"w": torch.full((8,), -float(step))})
            second.wait(DEADLINE_S)
            steps = [ref.step for ref in sink.held()]
            assert len(steps) == len(set(steps)) == 3, steps  # one snapshot per step
            assert 12 in steps  # the restored one stays until it is the oldest
    finally:
        second.close()
    for ref in sink.held():  # every snapshot of 13 and 14 is the new run's
        assert torch.equal(sink.read(ref).buffer.view(torch.float32)[:1],
                           torch.tensor([float(ref.step) * (1 if ref.step == 12 else -1)]))


def test_layout_change_acquires_new_buffers_and_stays_correct(sink: SnapshotSink) -> None:
    engine = SnapshotEngine(sink)
    try:
        engine.save(1, {"w": torch.ones(4)})
        engine.save(2, {"w": torch.ones(4), "exp_avg": torch.full((4,), 0.5)})
        engine.wait(DEADLINE_S)
        _, back = read_latest(sink)
        assert torch.equal(back["exp_avg"], torch.full((4,), 0.5))
        engine.save(3, {"w": torch.ones(4), "exp_avg": torch.full((4,), 0.25)})
        engine.wait(DEADLINE_S)
        snap, back = read_latest(sink)
        assert snap.step == 3 and torch.equal(back["exp_avg"], torch.full((4,), 0.25))
    finally:
        engine.close()


def test_worker_error_is_latched_raised_once_and_nothing_is_committed(sink: SnapshotSink) -> None:
    def fail_step_2(step: int, task: int) -> None:
        if step == 2:
            raise RuntimeError("copy exploded")

    engine = SnapshotEngine(sink, before_copy=fail_step_2)
    try:
        engine.save(1, {"w": torch.ones(4)})
        engine.save(2, {"w": torch.full((4,), 2.0)})  # launches; the failure comes later
        with pytest.raises(SnapshotError, match="step 2") as info:
            engine.wait(DEADLINE_S)
        assert isinstance(info.value.__cause__, RuntimeError)
        snap, back = read_latest(sink)
        assert snap.step == 1 and torch.equal(back["w"], torch.ones(4))
        engine.wait(DEADLINE_S)  # raised once; the engine is usable again
        engine.save(2, {"w": torch.full((4,), 2.0)})  # hook fails step 2 again ...
        with pytest.raises(SnapshotError):
            engine.save(3, {"w": torch.full((4,), 3.0)})  # ... reported by the next save
        engine.save(3, {"w": torch.full((4,), 3.0)})
        engine.wait(DEADLINE_S)
        assert read_latest(sink)[0].step == 3
    finally:
        engine.close()


def test_commit_failure_is_latched_too() -> None:
    class FailingCommit(MemorySink):
        def commit(self, *args: Any, **kwargs: Any) -> None:
            raise OSError("agent gone")

    sink = FailingCommit()
    engine = SnapshotEngine(sink)
    engine.save(1, {"w": torch.ones(4)})
    with pytest.raises(SnapshotError, match="agent gone"):
        engine.wait(DEADLINE_S)
    engine.close()
    assert sink.latest() is None


def test_a_buffer_the_sink_cannot_give_fails_that_snapshot_only() -> None:
    class FullSink(MemorySink):
        full = True

        def acquire(self, layout: Layout, generation: int) -> torch.Tensor:
            if self.full:
                raise OSError("no space left for the buffer")
            return super().acquire(layout, generation)

    sink = FullSink()
    engine = SnapshotEngine(sink)
    try:
        engine.save(1, {"w": torch.ones(4)})  # the buffer is acquired after save returns
        engine.wait_copied(DEADLINE_S)  # never hangs on a launch that failed
        with pytest.raises(SnapshotError, match="step 1.*no space left"):
            engine.wait(DEADLINE_S)
        assert sink.latest() is None
        sink.full = False
        engine.save(2, {"w": torch.full((4,), 2.0)})
        engine.wait(DEADLINE_S)
        ref = sink.latest()
        assert ref is not None and ref.step == 2
        snap = sink.read(ref)
        restored = materialize(snap.layout, snap.meta_json, snap.buffer)
        assert torch.equal(restored["w"], torch.full((4,), 2.0))
    finally:
        engine.close()


def test_wait_gives_up_at_its_deadline_naming_the_seconds() -> None:
    gate = Gate(step=1)
    engine = SnapshotEngine(MemorySink(), before_copy=gate)
    try:
        engine.save(1, {"w": torch.ones(4)})
        with pytest.raises(TimeoutError, match="0.01 s"):
            engine.wait(0.01)
        with pytest.raises(TimeoutError, match="0.01 s"):
            engine.wait_copied(0.01)
        assert engine.pending
    finally:
        gate.release.set()
        engine.close()


def test_save_returns_before_the_copy_and_optimizer_step_waits_for_it() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sink = MemorySink()
    ckpt = Checkpointer(model, opt, sink=sink)
    gate = Gate(step=1)
    ckpt.engine.close()
    ckpt.engine = SnapshotEngine(sink, before_copy=gate)

    def backward() -> None:
        opt.zero_grad()
        model(torch.ones(4, 32)).square().sum().backward()

    try:
        backward()
        opt.step()
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        ckpt.save(1)
        assert ckpt.pending  # save returned, the copy has not run
        assert gate.started.wait(DEADLINE_S)
        backward()  # forward/backward overlap the copy
        stepped = threading.Event()
        stepper = threading.Thread(target=lambda: (opt.step(), stepped.set()))
        stepper.start()
        try:
            assert not stepped.wait(0.2), "optimizer.step ran while the copy was in flight"
            assert torch.equal(model.weight, expected["weight"])
        finally:
            gate.release.set()
            stepper.join(DEADLINE_S)
        assert not stepper.is_alive() and stepped.is_set()
        assert not torch.equal(model.weight, expected["weight"])  # the step did happen
        ckpt.wait()
        _, back = read_latest(sink)
        assert_tree_bitwise(expected, back["model"])
    finally:
        ckpt.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors_round_trip_bitwise_through_the_side_stream(sink: SnapshotSink) -> None:
    cpu_state = every_dtype_state()
    state = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in cpu_state.items()}
    engine = SnapshotEngine(sink, num_threads=2, chunk_bytes=4096)
    try:
        for step in (1, 2, 3):  # the first save zeroes fresh buffers; later ones reuse them
            expected = {**cpu_state, "f32": state["f32"].cpu()}
            engine.save(step, state)
            engine.wait_copied()
            state["f32"].add_(1)  # ordered after the copy on the current stream
            engine.wait(DEADLINE_S)
            snap, back = read_latest(sink)
            assert snap.step == step
            for k, v in expected.items():
                if isinstance(v, torch.Tensor):
                    assert_bitwise(v, back[k], k)
    finally:
        engine.close()
