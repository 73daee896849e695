"""Hand-encoded PieceChunk frames (hpt.agent.chunks) are the protobuf wire format: either side
may use the generated class instead."""

from __future__ import annotations

import zlib

import pytest
import torch

from hpt._proto import checkpoint_pb2
from hpt.agent import chunks


def test_a_data_frame_parses_as_the_generated_message_with_its_crc() -> None:
    src = torch.randint(0, 256, (5000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    view = chunks.shm_view(src.data_ptr() + 7, 3000)
    frame = chunks.encode_data(2**40 + 3, view)
    msg = checkpoint_pb2.PieceChunk.FromString(frame)
    assert msg.offset == 2**40 + 3 and msg.data == bytes(src[7:3007].tolist())
    assert msg.crc32 == zlib.crc32(msg.data) and not msg.last and not msg.HasField("header")


def test_generated_messages_decode_without_copying_the_payload() -> None:
    data = bytes(range(256)) * 9
    frame = checkpoint_pb2.PieceChunk(offset=77, data=data, crc32=zlib.crc32(data)).SerializeToString()
    got = chunks.decode(frame)
    assert (got.offset, got.crc32, got.last, got.header) == (77, zlib.crc32(data), False, None)
    assert frame[got.start:got.start + got.length] == data
    head = checkpoint_pb2.PieceHeader(piece_bytes=123, blob_bytes=100, parity_index=1,
                                      members=[checkpoint_pb2.MemberBlob(node_index=2, blob_bytes=9)])
    got = chunks.decode(checkpoint_pb2.PieceChunk(header=head, offset=5).SerializeToString())
    assert got.header == head and got.offset == 5 and got.length == 0
    assert chunks.decode(checkpoint_pb2.PieceChunk(offset=9, last=True).SerializeToString()).last


def test_unknown_fields_are_skipped() -> None:
    frame = (b"\x30\x05"              # field 6, varint
             + b"\x39" + b"\0" * 8    # field 7, fixed64
             + b"\x42\x02ab"          # field 8, bytes
             + chunks.encode_data(4, b"xyz"))
    got = chunks.decode(frame)
    assert got.offset == 4 and frame[got.start:got.start + got.length] == b"xyz"


@pytest.mark.parametrize("frame", [
    b"\x10",                          # varint cut short
    b"\x1a\x05ab",                    # payload longer than the frame
    b"\x10" + b"\xff" * 11,           # varint too long
    b"\x0b",                          # wire type 3 (groups) is not used
    b"\x0a\x02\xff\xff",              # header that is not a PieceHeader
])
def test_malformed_frames_are_refused(frame: bytes) -> None:
    with pytest.raises(chunks.FrameError):
        chunks.decode(frame)


def test_copy_into_takes_bytes_and_views() -> None:
    out = torch.zeros(8, dtype=torch.uint8)
    chunks.copy_into(out.data_ptr(), b"abcd")
    src = torch.arange(10, 14, dtype=torch.uint8)
    chunks.copy_into(out.data_ptr() + 4, chunks.shm_view(src.data_ptr(), 4))
    assert out.tolist() == [97, 98, 99, 100, 10, 11, 12, 13]
