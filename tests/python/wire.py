"""The wire protocol (docs/protocol.md) by hand, to send what the client never would: frame
headers and HELLO extensions. Standard library only: tests/fuzz/make_seeds.py uses it before any
virtual environment exists; tests import it through conftest."""

from __future__ import annotations

import struct

MAGIC = 0x3150564B
HEADER = struct.Struct("<IBBHQIiQ")  # magic op flags reserved request_id count status body_bytes
OP_HELLO, OP_PUT, OP_GET, OP_EXISTS, OP_MATCH_PREFIX, OP_DELETE, OP_STATS, OP_AUTH = range(1, 9)
assert HEADER.size == 32


def ext(kind: int, value: bytes) -> bytes:
    """One v2 HELLO extension (u16 type, u16 zero, u32 length, value)."""
    return struct.pack("<HHI", kind, 0, len(value)) + value


def parse_exts(body: bytes) -> dict[int, bytes]:
    out, at = {}, 0
    while at < len(body):
        kind, _, n = struct.unpack_from("<HHI", body, at)
        out[kind] = body[at + 8 : at + 8 + n]
        at += 8 + n
    return out


def header(
    op: int,
    *,
    count: int = 0,
    body_bytes: int = 0,
    request_id: int = 1,
    magic: int = MAGIC,
    flags: int = 0,
    reserved: int = 0,
    status: int = 0,
) -> bytes:
    return HEADER.pack(magic, op, flags, reserved, request_id, count, status, body_bytes)
