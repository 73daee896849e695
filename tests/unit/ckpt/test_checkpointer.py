"""The Checkpointer end to end: deterministic resumption and RNG capture."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from hpt.ckpt import Checkpointer, MemorySink, ShmSink, SnapshotSink
from hpt.ckpt.layout import decode_meta, encode_meta, flatten, shard_dim0, unflatten
from hpt.ckpt.state import capture_rng, restore_rng

TOTAL_STEPS = 10


class Sampler:
    """A data sampler whose position and shuffle order must survive a restart; it shuffles
    with Python's global `random`, so that RNG matters too."""

    def __init__(self, n: int, batch: int) -> None:
        self.n, self.batch = n, batch
        self.epoch, self.pos = 0, 0
        self.order = list(range(n))
        random.shuffle(self.order)

    def next_batch(self) -> list[int]:
        if self.pos + self.batch > self.n:
            self.epoch, self.pos = self.epoch + 1, 0
            random.shuffle(self.order)
        out = self.order[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "order": tuple(self.order)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert isinstance(state["order"], tuple)  # tuples survive the JSON meta
        self.epoch, self.pos, self.order = state["epoch"], state["pos"], list(state["order"])


class Job:
    """Model (dropout + batch norm), optimizer, LR scheduler and sampler of a tiny regression."""

    def __init__(self, init_seed: int) -> None:
        torch.manual_seed(init_seed)
        random.seed(init_seed)
        np.random.seed(init_seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(8, 32),
            torch.nn.BatchNorm1d(32),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.3),
            torch.nn.Linear(32, 1),
        )
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.01)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=3, gamma=0.5)
        self.sampler = Sampler(n=40, batch=8)
        g = torch.Generator().manual_seed(1234)  # the data set is fixed
        self.x = torch.randn(40, 8, generator=g)
        self.y = torch.randn(40, 1, generator=g)

    def step(self) -> None:
        idx = self.sampler.next_batch()
        noise = torch.from_numpy(np.random.standard_normal((len(idx), 8)).astype(np.float32))
        x = self.x[idx] + 0.01 * noise
        self.opt.zero_grad()
        loss = torch.nn.functional.mse_loss(self.model(x), self.y[idx])
        loss.backward()
        self.opt.step()
        self.sched.step()

    def checkpointer(self, sink: SnapshotSink, every: int, **kwargs: Any) -> Checkpointer:
        return Checkpointer(
            self.model,
            self.opt,
            extra_state={"sampler": self.sampler, "sched": self.sched},
            sink=sink,
            every=every,
            **kwargs,
        )

    def digest(self) -> str:
        h = hashlib.sha256()
        for k, v in sorted(self.model.state_dict().items()):
            h.update(k.encode() + v.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        for i, s in sorted(self.opt.state_dict()["state"].items()):
            for k, v in sorted(s.items()):
                h.update(
                    f"{i}.{k}".encode()
                    + v.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                )
        return h.hexdigest()


def uninterrupted_digest() -> str:
    job = Job(init_seed=0)
    for _ in range(TOTAL_STEPS):
        job.step()
    return job.digest()


@pytest.fixture(params=["memory", "shm"])
def sink_factory(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Makes the sink a (re)started process would open: the same memory, a new object."""
    if request.param == "memory":
        shared = MemorySink()
        yield lambda: shared
        shared.close()
    else:
        prefix = request.getfixturevalue("shm_prefix")
        opened: list[ShmSink] = []

        def make() -> ShmSink:
            opened.append(ShmSink(prefix))
            return opened[-1]

        yield make
        for s in opened:
            s.close()
        ShmSink.remove(prefix)


@pytest.mark.parametrize(("every", "crash_after", "resume_at"), [(1, 7, 7), (3, 8, 6)])
def test_resumed_training_is_bitwise_identical_to_an_uninterrupted_run(
    sink_factory: Any, every: int, crash_after: int, resume_at: int
) -> None:
    expected = uninterrupted_digest()

    job = Job(init_seed=0)
    ckpt = job.checkpointer(sink_factory(), every)
    assert ckpt.restore() == 0
    for step in range(crash_after):
        job.step()
        ckpt.save(step + 1)
    ckpt.close()  # the rank dies here; its snapshots stay in the sink
    del job

    job = Job(init_seed=99)  # different weights, sampler order and RNG streams
    ckpt = job.checkpointer(sink_factory(), every)
    start = ckpt.restore()
    assert start == resume_at
    for step in range(start, TOTAL_STEPS):
        job.step()
        ckpt.save(step + 1)
    ckpt.close()
    assert job.digest() == expected


def test_restore_without_a_snapshot_returns_zero_and_changes_nothing() -> None:
    job = Job(init_seed=3)
    before = job.digest()
    with job.checkpointer(MemorySink(), every=1) as ckpt:
        assert ckpt.restore() == 0
    assert job.digest() == before


def test_save_honours_every() -> None:
    job = Job(init_seed=0)
    sink = MemorySink()
    with job.checkpointer(sink, every=4) as ckpt:
        saved = [ckpt.save(s) for s in range(1, 10)]
        ckpt.wait()
        assert saved == [s % 4 == 0 for s in range(1, 10)]
        ref = sink.latest()
        assert ref is not None and ref.step == 8


def test_the_cadence_the_sinks_owner_asks_for_applies_from_its_first_step() -> None:
    job = Job(init_seed=0)
    asked: list[tuple[int, int, int] | None] = [None]
    with job.checkpointer(MemorySink(), every=4, cadence=lambda: asked[0]) as ckpt:
        before = [s for s in range(1, 13) if ckpt.due(s)]
        asked[0] = (3, 10, 0)  # every 3rd step from step 10 on; its own every 4th before it
        after = [s for s in range(1, 19) if ckpt.due(s)]
        asked[0] = (3, 10, 5)  # and every 5th before it
        then = [s for s in range(1, 19) if ckpt.due(s)]
        saved = [s for s in range(1, 19) if ckpt.save(s)]
        ckpt.wait()
    assert before == [4, 8, 12]
    assert after == [4, 8, 12, 15, 18]
    assert then == saved == [5, 12, 15, 18]


def test_optimizer_state_is_keyed_by_parameter_name() -> None:
    job = Job(init_seed=0)
    job.step()
    sink = MemorySink()
    with job.checkpointer(sink, every=1) as ckpt:
        ckpt.save(1)
        ckpt.wait()
        ref = sink.latest()
        assert ref is not None
        fqns = {e.fqn for e in sink.read(ref).layout}
    assert {"model.0.weight", "optim.state.0.weight.exp_avg", "optim.state.4.bias.step"} <= fqns


def test_tied_weights_key_the_optimizer_state_by_their_first_name_and_restore() -> None:
    torch.manual_seed(0)
    embed = torch.nn.Embedding(6, 4)
    head = torch.nn.Linear(4, 6, bias=False)
    head.weight = embed.weight  # tied: one parameter, two state_dict names
    model = torch.nn.Sequential(embed, head)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)

    def step() -> None:
        model(torch.tensor([1, 2, 3])).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    sink = MemorySink()
    with Checkpointer(model, optimizer, sink=sink) as ckpt:
        ckpt.save(1)
        ckpt.wait()
        ref = sink.latest()
        assert ref is not None
        fqns = {e.fqn for e in sink.read(ref).layout}
        assert {"model.0.weight", "model.1.weight", "optim.state.0.weight.exp_avg"} <= fqns
        assert not any(f.startswith("optim.state.1.") for f in fqns)
        saved = model[0].weight.detach().clone()
        step()
        assert ckpt.restore() == 1
    assert torch.equal(model[0].weight, saved) and model[1].weight is model[0].weight


def test_rng_state_survives_a_json_meta_round_trip() -> None:
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    np.random.standard_normal()  # leave a cached gaussian in numpy's state
    layout, meta, tensors = flatten(capture_rng())
    meta = decode_meta(encode_meta(meta))  # what a sink stores is plain JSON
    tensors = [t.clone() for t in tensors]
    expected = (random.random(), np.random.standard_normal(), torch.rand(3))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    restore_rng(unflatten(layout, meta, tensors))
    got = (random.random(), np.random.standard_normal(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1]
    assert torch.equal(got[2], expected[2])


def test_ckpt_needs_only_torch_and_works_without_numpy() -> None:
    code = (
        "import sys\n"
        "sys.modules['numpy'] = None  # numpy unimportable\n"
        "import warnings; warnings.simplefilter('ignore')\n"
        "import torch\n"
        "from hpt.ckpt import Checkpointer\n"
        "with Checkpointer(torch.nn.Linear(2, 2)) as c:\n"
        "    c.save(1)\n"
        "    assert c.restore() == 1\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'grpc'\n"
        "       or m.startswith(('hpt.agent', 'hpt.controller', 'hpt._proto', 'hpt.monitor'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True)


def test_shards_mark_the_parameter_and_its_optimizer_state() -> None:
    full_rows, rank, world = 10, 1, 4
    info = shard_dim0((full_rows, 3), rank, world)
    model = torch.nn.Linear(3, info.local_shape[0])  # this rank's rows of a 10-row layer
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sink = MemorySink()
    with Checkpointer(model, opt, sink=sink, shards={"weight": info}) as ckpt:
        ckpt.save(1)
        ckpt.wait()
        ref = sink.latest()
        assert ref is not None
        layout = sink.read(ref).layout
    for fqn in ("model.weight", "optim.state.weight.exp_avg", "optim.state.weight.exp_avg_sq"):
        e = layout.entry(fqn)
        assert (e.global_shape, e.global_offset) == ((10, 3), (3, 0)), fqn
    assert layout.entry("model.bias").is_replicated
    assert layout.entry("optim.state.weight.step").is_replicated


def test_the_time_a_snapshot_holds_training_is_measured_up_to_the_next_optimizer_step() -> None:
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = Checkpointer(model, opt)
    try:
        assert ckpt.blocked_s is None  # nothing saved yet
        assert ckpt.save(1)
        assert ckpt.blocked_s is None  # the next step's wait for the copies is part of it
        model(torch.ones(2, 64)).sum().backward()
        opt.step()
        first = ckpt.blocked_s
        assert first is not None and first > 0
        opt.step()  # a step with no snapshot before it measures nothing new
        assert ckpt.blocked_s == first
    finally:
        ckpt.close()
    plain = Checkpointer(model)  # no optimizer: nothing waits later, the save is all of it
    try:
        assert plain.save(1) and plain.blocked_s is not None and plain.blocked_s > 0
    finally:
        plain.close()
