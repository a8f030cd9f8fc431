"""Writes the seed corpus of tests/fuzz/frame_fuzzer.cc: one file per input.

    python3 tests/fuzz/make_seeds.py OUT_DIR

The frames are those of the protocol tests (the byte layouts of tests/python/conftest.py's
``header``/``ext`` and the requests test_robustness.py and test_transports.py send by hand). Byte
0 of every input picks the fuzzer's mode (frame_fuzzer.cc ``kModes``): 0 raw bytes to the v2
node, 1 a v2 HELLO is sent first, 2 a v1 HELLO first, 3 raw bytes to the auth node, 4 the harness
authenticates first, 5 raw bytes to the v1-only node, 6 a v1 HELLO to it first, 7 a v2 HELLO
first and the bytes sent in pieces of ``1 + (byte0 >> 3)`` bytes. Keys named
``preload-*`` and ``*samehome`` are blocks the fuzzer preloads (frame_fuzzer.cc ``kPreloads``).
Standard library only, so it runs before any virtual environment exists.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from wire import (  # noqa: E402 - the protocol tests' frame layouts
    OP_AUTH,
    OP_DELETE,
    OP_EXISTS,
    OP_GET,
    OP_HELLO,
    OP_MATCH_PREFIX,
    OP_PUT,
    OP_STATS,
    ext,
    header,
)

FLAG_DESCRIBED = 2
INLINE = 0xFFFFFFFFFFFFFFFF
RAW, HELLO_V2, HELLO_V1, AUTH_RAW, AUTHED, V1_RAW, V1_HELLO, CHUNKED = range(8)


def chunked(piece: int) -> int:
    """The mode byte that sends the bytes in pieces of ``piece`` (1..32) bytes."""
    return CHUNKED | (piece - 1) << 3


PRELOADED = [b"preload-block-00", b"preload-block-01", b"AAAAAAAAsamehome", b"BBBBBBBBsamehome"]
K1, K2, K3 = (bytes([i]) * 16 for i in (0x11, 0x22, 0x33))


def frame(op: int, body: bytes = b"", *, count: int = 0, **fields: int) -> bytes:
    return header(op, count=count, body_bytes=len(body), **fields) + body


def hello(lo: int = 1, hi: int = 2, extensions: bytes = b"") -> bytes:
    return frame(OP_HELLO, struct.pack("<II", lo, hi) + extensions)


def put(blocks: list[tuple[bytes, bytes]]) -> bytes:
    table = b"".join(k + struct.pack("<Q", len(v)) for k, v in blocks)
    return frame(OP_PUT, table + b"".join(v for _, v in blocks), count=len(blocks))


def keys_frame(op: int, keys: list[bytes]) -> bytes:
    return frame(op, b"".join(keys), count=len(keys))


def seeds() -> dict[str, bytes]:
    nonce = ext(1, b"\x01" + b"N" * 16)
    block = bytes(range(256)) * 4
    s: dict[str, bytes] = {}

    def add(name: str, mode: int, data: bytes) -> None:
        s[name] = bytes([mode]) + data

    # HELLO variants, raw (the fuzzer sees the handshake itself).
    add("hello-v2", RAW, hello())
    add("hello-v1", RAW, hello(1, 1))
    add("hello-v2-only", RAW, hello(2, 2))
    add("hello-bad-version", RAW, hello(3, 4))
    add("hello-short-body", RAW, header(OP_HELLO, body_bytes=4) + b"\x01\0\0\0")
    add("hello-unknown-ext", RAW, hello(extensions=ext(99, b"future")))
    add("hello-offer-tcp", RAW, hello(extensions=ext(2, b"\x00")))
    add("hello-offer-shm", RAW, hello(extensions=ext(2, b"\x01" + struct.pack("<Q", 1 << 20))))
    add("hello-offer-rdma", RAW, hello(extensions=ext(2, b"\x02" + b"\0" * 64)))
    add("hello-ext-truncated", RAW, hello(extensions=struct.pack("<HHI", 2, 0, 50) + b"\x00"))
    add("hello-ext-reserved", RAW, hello(extensions=struct.pack("<HHI", 2, 1, 1) + b"\x00"))
    add("hello-auth-ext", RAW, hello(extensions=nonce))
    add("hello-twice", RAW, hello() + hello(1, 1))
    add("v1-hello-with-ext", V1_RAW, hello(extensions=ext(2, b"\x00")))
    add("v1-node-hello", V1_RAW, hello())
    # Ops after a valid HELLO (the harness sends it).
    add("put", HELLO_V2, put([(K1, block), (K2, b"")]))
    add("put-get", HELLO_V2, put([(K1, block)]) + keys_frame(OP_GET, [K1, K2]))
    add("put-dup-keys", HELLO_V2, put([(K3, b"x" * 100), (K3, b"y" * 200)]))
    add("put-preloaded", HELLO_V2, put([(PRELOADED[0], b"\xee" * 64)]))
    add("put-too-large", HELLO_V2, put([(K1, b"z" * 6001)]))
    add("put-zero-lengths", HELLO_V2, put([(bytes([i]) * 15 + b"\x01", b"") for i in range(64)]))
    add("get-preloaded", HELLO_V2, keys_frame(OP_GET, PRELOADED))
    add("get-missing", HELLO_V2, keys_frame(OP_GET, [K3]))
    add("exists", HELLO_V2, keys_frame(OP_EXISTS, PRELOADED + [K1]))
    add("match-prefix", HELLO_V2, keys_frame(OP_MATCH_PREFIX, PRELOADED + [K1]))
    add("delete-preloaded", HELLO_V2, keys_frame(OP_DELETE, PRELOADED[2:]))
    add(
        "delete-put-preloaded",
        HELLO_V2,
        keys_frame(OP_DELETE, PRELOADED[:1]) + put([(PRELOADED[0], b"fuzz")]),
    )
    add("stats", HELLO_V2, frame(OP_STATS))
    add("auth-unasked", HELLO_V2, frame(OP_AUTH, b"\0" * 32))
    add("pipelined", HELLO_V2, frame(OP_STATS, request_id=5) + keys_frame(OP_GET, [K1, K2]))
    add("put-truncated", HELLO_V2, header(OP_PUT, count=1, body_bytes=24 + 1000) + K1)
    add("get-truncated", HELLO_V2, header(OP_GET, count=2, body_bytes=32) + K1)
    add(
        "put-described-on-tcp",
        HELLO_V2,
        frame(OP_PUT, K1 + struct.pack("<QQ", 16, 0), count=1, flags=FLAG_DESCRIBED),
    )
    add(
        "put-described-inline",
        HELLO_V2,
        frame(OP_PUT, K1 + struct.pack("<QQ", 4, INLINE) + b"abcd", count=1, flags=FLAG_DESCRIBED),
    )
    add(
        "get-described",
        HELLO_V2,
        frame(OP_GET, K1 + struct.pack("<QQ", 0, 1024), count=1, flags=FLAG_DESCRIBED),
    )
    # The refusals of test_robustness.py's table.
    add("bad-magic", HELLO_V2, header(OP_GET, magic=0xDEADBEEF, count=1, body_bytes=16))
    add("unknown-op", HELLO_V2, header(99))
    add("frame-too-large", HELLO_V2, header(OP_GET, count=1, body_bytes=(64 << 10) + 16))
    add("batch-too-large", HELLO_V2, header(OP_GET, count=65, body_bytes=16 * 65))
    add("put-batch-too-large", HELLO_V2, header(OP_PUT, count=1 << 31, body_bytes=1024))
    add("flags-set", HELLO_V2, header(OP_STATS, flags=1))
    add("reserved-set", HELLO_V2, header(OP_STATS, reserved=5))
    add("status-set", HELLO_V2, header(OP_STATS, status=-1))
    add("get-before-hello", RAW, keys_frame(OP_GET, [K1]))
    add("put-body-below-table", HELLO_V2, header(OP_PUT, count=2, body_bytes=30))
    # v1 connections.
    add("v1-put-get", HELLO_V1, put([(K2, block[:100])]) + keys_frame(OP_GET, [K2]))
    add("v1-auth-op", HELLO_V1, frame(OP_AUTH, b"\0" * 32))
    add("v1-described", HELLO_V1, frame(OP_GET, K1 + b"\0" * 16, count=1, flags=FLAG_DESCRIBED))
    add("v1-node-put-get", V1_HELLO, put([(K1, b"v1")]) + keys_frame(OP_GET, [K1]))
    add("v1-node-rehello", V1_HELLO, hello(1, 1) + frame(OP_STATS))
    # The auth node.
    add("auth-no-token", AUTH_RAW, hello())
    add("auth-wrong-proof", AUTH_RAW, hello(2, 2, nonce) + frame(OP_AUTH, b"\0" * 32))
    add("auth-skipped", AUTH_RAW, hello(2, 2, nonce) + frame(OP_STATS))
    add("auth-bad-ext", AUTH_RAW, hello(2, 2, ext(1, b"\x02" + b"N" * 16)))
    add("authed-put-get", AUTHED, put([(K1, b"secret")]) + keys_frame(OP_GET, [K1]))
    add("authed-auth-twice", AUTHED, frame(OP_AUTH, b"\0" * 32))
    add("authed-stats", AUTHED, frame(OP_STATS))
    # In pieces: headers, tables and payloads arrive over several reads.
    add("chunked-put-get", chunked(1), put([(K1, block[:300])]) + keys_frame(OP_GET, [K1]))
    add("chunked-get-preloaded", chunked(7), keys_frame(OP_GET, PRELOADED))
    add("chunked-put-truncated", chunked(32), header(OP_PUT, count=2, body_bytes=48 + 99) + K1)
    # Deterministic noise.
    for i in range(4):
        add(f"noise-{i}", i, hashlib.sha256(bytes([i])).digest() * 3)
    return s


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name, data in seeds().items():
        (out / name).write_bytes(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
