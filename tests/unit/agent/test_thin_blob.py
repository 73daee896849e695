"""Thin blobs: which bytes of a rank's buffer a blob keeps, and the header fields that say so."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from hpt.agent import blob as blobs
from hpt.ckpt.checksum import block_checksums, checksum
from hpt.ckpt.layout import Layout, TensorEntry


def test_block_checksums_equal_the_checksum_of_each_block() -> None:
    buf = torch.randint(0, 256, (3 * 8192 + 4096 + 64,), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(1))
    assert block_checksums(buf, 8192) == [checksum(buf[i:i + 8192])
                                          for i in range(0, buf.numel(), 8192)]
    with pytest.raises(ValueError, match="block"):
        block_checksums(buf, 1000)


def test_block_size_keeps_a_rank_to_at_most_1024_blocks() -> None:
    assert blobs.block_bytes(10_000) == blobs.THIN_MIN_BLOCK
    assert blobs.block_bytes(10 << 30) == 16 << 20
    for total in (1, 4 << 20, 5 << 20, 10 << 30):
        assert -(-total // blobs.block_bytes(total)) <= 1024


def test_runs_are_the_kept_ranges_and_the_last_block_may_be_short() -> None:
    thin = blobs.Thin(4096, ((0, 1), (2, 2), (3, 3)), ref=1)
    total = 4 * 4096 + 640  # five blocks, the last one short
    assert thin.runs(total) == [(4096, 8192), (4 * 4096, total)]
    assert thin.stored(total) == 4096 + 640
    assert blobs.Thin(4096, ((4, 9),), ref=0).runs(total) == [(0, 4 * 4096)]


def test_thin_against_leaves_out_only_blocks_whose_bytes_are_equal() -> None:
    gen = torch.Generator().manual_seed(2)
    mine = torch.randint(0, 256, (5 * 4096,), dtype=torch.uint8, generator=gen)
    other = mine.clone()
    other[4096 + 7] ^= 1  # block 1 differs
    thin = blobs.thin_against(mine, block_checksums(other, 4096), ref=3)
    assert thin is not None and [i for i, _ in thin.omit] == [0, 2, 3, 4] and thin.ref == 3
    assert blobs.thin_against(mine, block_checksums(other, 4096)[:4], ref=3) is None  # sizes


@pytest.mark.parametrize("field,value,error", [
    ("block", 1000, "block"),
    ("ref", -1, "ref"),
    ("omit", [[3, "00"], [1, "00"]], "ascending"),
    ("omit", [[99, "00"]], "ascending below"),
    ("omit", [[0, "zz"]], "invalid literal"),
])
def test_a_bad_thin_entry_is_refused_naming_its_field(field, value, error) -> None:
    entry = {"block": 4096, "ref": 0, "omit": [[0, "00"]], field: value}
    with pytest.raises(ValueError, match=error):
        blobs.Thin.from_json(entry, 5 * 4096, "ranks[0]")


def test_a_header_whose_stored_bytes_disagree_with_its_omit_list_is_refused() -> None:
    layout = json.loads(Layout((TensorEntry("w", "uint8", (8192,), 8192, 0, (8192,), (0,)),),
                               8192).to_json())
    entry = {"rank": 0, "offset": 4096, "bytes": 8192, "layout": layout, "meta_json": "{}",
             "checksums": [], "block": 4096, "ref": 1, "omit": [[0, "00"]], "stored": 8192}
    header = json.dumps({"step": 1, "ranks": [entry]}).encode()
    head = blobs.MAGIC + struct.pack("<Q", len(header)) + header
    with pytest.raises(blobs.BlobError, match=r"ranks\[0\].stored"):
        blobs.parse_header(head, 4096 + 8192)
    entry["stored"] = 4096
    header = json.dumps({"step": 1, "ranks": [entry]}).encode()
    head = blobs.MAGIC + struct.pack("<Q", len(header)) + header
    _, (part,) = blobs.parse_header(head, 4096 + 4096)
    assert part.stored == 4096 and part.spans() == [(4096, 4096, 8192)]
