"""``PieceChunk`` frames of the peer service's Fetch stream, encoded and decoded without copies.

The Fetch stream carries snapshot bytes; through the generated protobuf classes each chunk's
payload was copied five times between the shared-memory source and the destination tensor
(read out of shm, into the message, serialised; parsed, read back out as ``bytes``), which
made a peer restore slower than reading the same bytes from disk. Here a data chunk is
written as the same protobuf wire bytes by hand (so either side may use the generated class
instead: the wire does not change)::

    0x10 varint(offset)  0x20 varint(crc32)  0x1a varint(len) <payload>

with the payload joined straight from the source buffer into the one ``bytes`` object gRPC
sends (one copy), and decoded as (offset, crc32, payload span) over the received ``bytes``,
so the receiver checks the CRC over a memoryview and copies the payload once, into its
destination. Header and trailer chunks are small and go through the generated class.
"""

from __future__ import annotations

import ctypes
import zlib
from dataclasses import dataclass

from hpt._proto import checkpoint_pb2

_HEADER, _OFFSET, _DATA, _CRC, _LAST = 1, 2, 3, 4, 5
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class FrameError(ValueError):
    """Bytes that are not a well-formed PieceChunk."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_data(offset: int, payload: memoryview | bytes) -> bytes:
    """The PieceChunk frame of ``payload`` at ``offset`` (CRC-32 over the payload)."""
    crc = zlib.crc32(payload)
    n = len(payload)
    head = b"".join((b"\x10", _varint(offset), b"\x20", _varint(crc), b"\x1a", _varint(n)))
    return b"".join((head, payload))


def shm_view(address: int, n: int) -> memoryview:
    """A read-only memoryview of ``n`` bytes at ``address`` (no copy; the caller keeps the
    memory alive while the view is used)."""
    return memoryview((ctypes.c_char * n).from_address(address)).cast("B")


@dataclass(slots=True)
class Chunk:
    """One decoded frame: the payload is ``frame[start:start + length]``."""

    header: checkpoint_pb2.PieceHeader | None = None
    offset: int = 0
    crc32: int = 0
    start: int = 0
    length: int = 0
    last: bool = False


def decode(frame: bytes) -> Chunk:
    """Parse a PieceChunk frame without copying its payload; unknown fields are skipped.

    Raises:
        FrameError: truncated or malformed wire bytes.
    """
    out = Chunk()
    pos, end = 0, len(frame)
    while pos < end:
        key, pos = _read_varint(frame, pos)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _read_varint(frame, pos)
            if field == _OFFSET:
                out.offset = value
            elif field == _CRC:
                out.crc32 = value & 0xFFFFFFFF
            elif field == _LAST:
                out.last = bool(value)
        elif wire == _LEN:
            length, pos = _read_varint(frame, pos)
            if pos + length > end:
                raise FrameError(f"field {field} runs past the frame ({pos + length} > {end})")
            if field == _DATA:
                out.start, out.length = pos, length
            elif field == _HEADER:
                try:
                    out.header = checkpoint_pb2.PieceHeader.FromString(frame[pos:pos + length])
                except Exception as exc:  # protobuf's DecodeError
                    raise FrameError(f"header: {exc}") from exc
            pos += length
        elif wire == _I64:
            pos += 8
        elif wire == _I32:
            pos += 4
        else:
            raise FrameError(f"field {field}: wire type {wire} not supported")
    if pos != end:
        raise FrameError("frame truncated")
    return out


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise FrameError("varint truncated or too long")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def copy_into(address: int, data: bytes | memoryview) -> None:
    """Copy ``data`` (bytes, or a writable view such as ``shm_view``'s) to ``address``."""
    n = len(data)
    if not n:
        return
    if isinstance(data, bytes):
        ctypes.memmove(address, data, n)
    else:
        ctypes.memmove(address, ctypes.addressof(ctypes.c_char.from_buffer(data)), n)
