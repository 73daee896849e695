"""Contract tests for the Reed-Solomon codecs: one scenario, every implementation.

PyCodec (bytes.translate) is the reference; every other codec must produce the same bytes.
"""

from __future__ import annotations

import ctypes
import itertools
from collections.abc import Callable

import pytest
import torch

from hpt.ckpt.codec import (
    Codec,
    IsalCodec,
    PyCodec,
    TorchCodec,
    best_codec,
    encode_matrix,
    gf_inv,
    gf_mul,
    join,
    split,
)
from hpt.ckpt.errors import DecodeError


def _isal() -> IsalCodec:
    try:
        return IsalCodec()
    except OSError as exc:
        pytest.skip(f"ISA-L not loadable: {exc}")


CODECS: dict[str, Callable[[], Codec]] = {
    "python": PyCodec,
    "torch": TorchCodec,
    "torch-small-chunks": lambda: TorchCodec(chunk_bytes=333),  # exercises chunk edges
    "isal": _isal,
}
SHAPES = [(2, 1), (4, 2), (3, 2), (1, 3), (5, 4)]


@pytest.fixture(params=list(CODECS))
def codec(request: pytest.FixtureRequest) -> Codec:
    return CODECS[request.param]()


def _random_shards(k: int, n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen) for _ in range(k)]


def _reference_parity(data: list[torch.Tensor], m: int) -> list[torch.Tensor]:
    parity = [torch.empty_like(data[0]) for _ in range(m)]
    PyCodec().encode(data, parity)
    return parity


def run_codec_contract(codec: Codec, k: int, m: int, n: int, seed: int) -> None:
    data = _random_shards(k, n, seed)
    parity = [torch.full((n,), 0xAB, dtype=torch.uint8) for _ in range(m)]
    codec.encode(data, parity)
    expected = _reference_parity(data, m)
    for p, (got, want) in enumerate(zip(parity, expected, strict=True)):
        assert torch.equal(got, want), f"{codec.name}: parity {p} differs from the reference"
    stripe = data + parity
    for num_lost in range(1, m + 1):
        for lost in itertools.combinations(range(k + m), num_lost):
            shards = [None if i in lost else s.clone() for i, s in enumerate(stripe)]
            rebuilt = codec.decode(shards, k, m)
            assert len(rebuilt) == k + m
            for i, (got, want) in enumerate(zip(rebuilt, stripe, strict=True)):
                assert torch.equal(got, want), f"{codec.name}: lost {lost}, shard {i} wrong"
    for lost in itertools.islice(itertools.combinations(range(k + m), m + 1), 5):
        shards = [None if i in lost else s for i, s in enumerate(stripe)]
        with pytest.raises(DecodeError, match=f"only m={m} parity"):
            codec.decode(shards, k, m)


@pytest.mark.parametrize(("k", "m"), SHAPES)
@pytest.mark.parametrize("n", [1, 31, 1000, 4099])
def test_codec_contract_encodes_reference_bytes_and_recovers_every_erasure_pattern(
    codec: Codec, k: int, m: int, n: int
) -> None:
    run_codec_contract(codec, k, m, n, seed=k * 1000 + m * 100 + n)


def test_codec_contract_at_a_wide_stripe(codec: Codec) -> None:
    k, m, n = 10, 4, 257
    data = _random_shards(k, n, seed=7)
    parity = [torch.empty(n, dtype=torch.uint8) for _ in range(m)]
    codec.encode(data, parity)
    assert all(torch.equal(a, b) for a, b in zip(parity, _reference_parity(data, m), strict=True))
    lost = (0, 3, 9, 12)  # data and parity at once
    shards = [None if i in lost else s for i, s in enumerate(data + parity)]
    rebuilt = codec.decode(shards, k, m)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt, data + parity, strict=True))


def test_codec_accepts_buffer_protocol_objects_and_writes_into_given_outputs(codec: Codec) -> None:
    k, m, n = 3, 2, 333
    data = _random_shards(k, n, seed=11)
    expected = _reference_parity(data, m)
    raw = [bytes(ctypes.string_at(t.data_ptr(), n)) for t in data]  # read-only inputs
    parity_out = [bytearray(n) for _ in range(m)]
    codec.encode(raw, [memoryview(b) for b in parity_out])
    assert [bytes(p) for p in parity_out] == [
        bytes(ctypes.string_at(t.data_ptr(), n)) for t in expected
    ]
    out: list[bytearray | None] = [None] * (k + m)
    out[1], out[4] = bytearray(n), bytearray(n)
    shards = [raw[0], None, raw[2], parity_out[0], None]
    rebuilt = codec.decode(shards, k, m, out=out)
    assert bytes(out[1]) == raw[1]
    assert bytes(out[4]) == bytes(parity_out[1])
    assert rebuilt[1].data_ptr() == torch.frombuffer(out[1], dtype=torch.uint8).data_ptr()


def test_decode_rebuilds_only_the_named_shards(codec: Codec) -> None:
    k, m, n = 4, 2, 200
    data = _random_shards(k, n, seed=5)
    parity = _reference_parity(data, m)
    shards = [data[0], None, data[2], data[3], parity[0], None]  # a data and a parity lost
    out: list[torch.Tensor | None] = [None] * (k + m)
    out[1] = torch.zeros(n, dtype=torch.uint8)
    rebuilt = codec.decode(shards, k, m, out=out, rebuild=[1])
    assert torch.equal(out[1], data[1])
    assert rebuilt[5] is None  # the parity piece nobody asked for is not computed
    with pytest.raises(ValueError, match="must name missing shards only"):
        codec.decode(shards, k, m, rebuild=[0])


def test_codec_rejects_bad_shards(codec: Codec) -> None:
    data = _random_shards(2, 10, seed=1)
    with pytest.raises(ValueError, match=r"parity_out\[0\] has 9 bytes"):
        codec.encode(data, [torch.empty(9, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="must be uint8"):
        codec.encode([d.float() for d in data], [torch.empty(10, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="read-only"):
        codec.encode(data, [bytes(10)])
    with pytest.raises(ValueError, match="expected k \\+ m"):
        codec.decode([data[0], None], 2, 1)
    with pytest.raises(ValueError, match="must be <= 256"):
        codec.encode([data[0]] * 200, [torch.empty(10, dtype=torch.uint8)] * 57)


def test_decode_with_nothing_missing_returns_the_inputs(codec: Codec) -> None:
    stripe = _random_shards(3, 8, seed=3)
    assert all(a is not None for a in codec.decode(stripe, 2, 1))


def test_encode_matrix_is_isal_cauchy1_and_field_is_isal_field() -> None:
    isal = _isal()
    for k, m in [(1, 1), (2, 1), (4, 2), (10, 4), (12, 244)]:
        assert [v for row in encode_matrix(k, m) for v in row] == isal.cauchy_matrix(k, m)
    lib = isal._lib
    lib.gf_mul.restype = ctypes.c_ubyte
    lib.gf_mul.argtypes = [ctypes.c_ubyte, ctypes.c_ubyte]
    for a in range(256):
        for b in range(0, 256, 5):
            assert gf_mul(a, b) == lib.gf_mul(a, b)
    assert all(gf_mul(a, gf_inv(a)) == 1 for a in range(1, 256))


def test_best_codec_prefers_isal() -> None:
    _isal()
    assert best_codec().name == "isal"


@pytest.mark.parametrize("n", [0, 1, 5, 7, 8, 1001])
@pytest.mark.parametrize("k", [1, 3, 4])
def test_split_pads_the_tail_and_join_restores_the_buffer(n: int, k: int) -> None:
    buf = torch.arange(n, dtype=torch.int64).to(torch.uint8)
    shards = split(buf, k)
    size = -(-n // k)
    assert len(shards) == k and all(s.numel() == size for s in shards)
    assert torch.equal(torch.cat(shards)[n:], torch.zeros(size * k - n, dtype=torch.uint8))
    assert torch.equal(join(shards, n), buf)
    out = bytearray(n)
    join(shards, n, out=out)
    assert bytes(out) == bytes(buf.tolist())
    if n >= k and n % k == 0:  # full shards are views, not copies
        assert shards[0].data_ptr() == buf.data_ptr()


def test_split_encode_lose_decode_join_round_trip() -> None:
    codec = best_codec()
    payload = bytes(range(256)) * 41 + b"odd"
    k, m = 4, 2
    shards = split(payload, k)
    parity = [torch.empty_like(shards[0]) for _ in range(m)]
    codec.encode(shards, parity)
    stripe: list[torch.Tensor | None] = [*shards, *parity]
    stripe[0] = stripe[3] = None
    rebuilt = codec.decode(stripe, k, m)
    assert bytes(join(rebuilt[:k], len(payload)).tolist()) == payload


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_torch_codec_on_cuda_matches_reference() -> None:
    k, m, n = 4, 2, 1 << 20
    data = _random_shards(k, n, seed=5)
    parity = [torch.empty(n, dtype=torch.uint8, device="cuda") for _ in range(m)]
    TorchCodec().encode([d.cuda() for d in data], parity)
    reference = [torch.empty(n, dtype=torch.uint8) for _ in range(m)]
    _isal().encode(data, reference)
    assert all(torch.equal(p.cpu(), r) for p, r in zip(parity, reference, strict=True))
    stripe = [None, None, *[d.cuda() for d in data[2:]], *parity]
    rebuilt = TorchCodec().decode(stripe, k, m)
    assert torch.equal(rebuilt[0].cpu(), data[0]) and torch.equal(rebuilt[1].cpu(), data[1])
