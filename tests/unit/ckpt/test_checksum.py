"""The snapshot checksum (hpt.ckpt.checksum)."""

from __future__ import annotations

import pytest
import torch

from hpt.ckpt.checksum import ROW_WORDS, RangeChecksum, checksum, verify


def _random_bytes(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("n", [0, 8, 64, ROW_WORDS * 8, ROW_WORDS * 8 * 3 + 72])
def test_checksum_is_deterministic_and_covers_the_tail(n: int) -> None:
    buf = _random_bytes(n)
    assert checksum(buf) == checksum(buf.clone())
    assert 0 <= checksum(buf) < 2**64


def test_every_single_flipped_byte_changes_the_checksum() -> None:
    n = ROW_WORDS * 8 * 2 + 40  # two full rows and a tail
    buf = _random_bytes(n, seed=1)
    ref = checksum(buf)
    for pos in range(0, n, 7):
        for delta in (1, 128, 255):
            flipped = buf.clone()
            flipped[pos] ^= delta
            assert checksum(flipped) != ref, f"byte {pos} ^ {delta} went unnoticed"


def test_swapped_rows_and_zeroed_ranges_change_the_checksum() -> None:
    row = ROW_WORDS * 8
    buf = _random_bytes(row * 4, seed=2)
    swapped = buf.clone()
    swapped[:row], swapped[row : 2 * row] = buf[row : 2 * row].clone(), buf[:row].clone()
    assert checksum(swapped) != checksum(buf)
    torn = buf.clone()
    torn[row + 100 : 3 * row] = 0
    assert checksum(torn) != checksum(buf)


def test_verify_names_the_bad_ranges() -> None:
    buf = _random_bytes(4096, seed=3)
    sums = [RangeChecksum(s, 1024, checksum(buf[s : s + 1024])) for s in range(0, 4096, 1024)]
    assert verify(buf, sums) == []
    buf[2048 + 5] ^= 1
    assert verify(buf, sums) == [sums[2]]
    assert RangeChecksum.from_json(sums[0].to_json(), "x") == sums[0]


def test_checksum_rejects_lengths_that_are_not_whole_words() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        checksum(torch.zeros(12, dtype=torch.uint8))
