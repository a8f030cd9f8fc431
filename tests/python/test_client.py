"""kvpool.Client against real ``kvpool server`` processes: byte-exact round trips, batch splitting,
key-query semantics, counters and the errors every call can raise."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import kvpool
import numpy as np
import pytest
import torch
from conftest import (
    HEADER,
    OP_HELLO,
    RawConnection,
    ServerFactory,
    ServerProcess,
    free_port,
    random_keys,
)

KiB = 1 << 10
MiB = 1 << 20


def random_blocks(n: int, size: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.bytes(size) for _ in range(n)]


# --- Round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "count"),
    [(1, 500), (4097, 400), (4 * KiB, 3000), (64 * KiB, 400), (300 * KiB, 100)],
    ids=["1B", "4097B", "4KiB", "64KiB", "300KiB"],
)
def test_round_trip_get_and_get_into(client: kvpool.Client, size: int, count: int) -> None:
    keys = random_keys(count)
    blocks = random_blocks(count, size, seed=size)
    assert client.put(keys, blocks) == count

    got = client.get(keys)
    assert len(got) == count
    bad = [i for i, (g, b) in enumerate(zip(got, blocks, strict=True)) if g != b]
    assert not bad, f"{len(bad)} blocks came back different, first at {bad[0]}"

    buffers = [bytearray(size) for _ in range(count)]
    assert client.get_into(keys, buffers) == [True] * count
    assert all(bytes(buf) == b for buf, b in zip(buffers, blocks, strict=True))

    # Reversed order, with absent keys interleaved: each answer belongs to its own key.
    missing = random_keys(count)
    mixed = [k for pair in zip(reversed(keys), missing, strict=True) for k in pair]
    got = client.get(mixed)
    assert got[0::2] == blocks[::-1]
    assert got[1::2] == [None] * count
    # Leave the session node as it was (the other tests share it).
    assert client.delete(keys + missing) == count


def test_round_trip_mixed_sizes_in_one_batch(client: kvpool.Client) -> None:
    rng = np.random.default_rng(99)
    sizes = [int(s) for s in rng.integers(1, 300 * KiB, size=600)]
    sizes[:6] = [1, 2, 4095, 4096, 4097, 65536]
    keys = random_keys(len(sizes))
    blocks = [rng.bytes(s) for s in sizes]
    assert client.put(keys, blocks) == len(blocks)
    assert client.get(keys) == blocks
    buffers = [np.empty(s, dtype=np.uint8) for s in sizes]
    assert all(client.get_into(keys, buffers))
    assert all(buf.tobytes() == b for buf, b in zip(buffers, blocks, strict=True))
    assert client.delete(keys) == len(keys)


def test_put_accepts_any_buffer(client: kvpool.Client) -> None:
    payload = os.urandom(8 * KiB)
    arr = np.frombuffer(payload, dtype=np.float32).reshape(32, 64)
    sources = [payload, bytearray(payload), memoryview(payload), arr, memoryview(payload)[KiB:]]
    keys = random_keys(len(sources))
    assert client.put(keys, sources) == len(sources)
    got = client.get(keys)
    assert got[:4] == [payload] * 4
    assert got[4] == payload[KiB:]


def test_numpy_round_trip(client: kvpool.Client) -> None:
    rng = np.random.default_rng(5)
    arrays = [
        rng.standard_normal((64, 256)).astype(np.float32),
        rng.integers(-(2**31), 2**31, size=(16, 1024), dtype=np.int32),
        rng.standard_normal((8, 2, 16, 64)).astype(np.float16),
    ]
    keys = random_keys(len(arrays))
    assert client.put(keys, arrays) == len(arrays)
    assert client.get(keys) == [a.tobytes() for a in arrays]
    outs = [np.empty_like(a) for a in arrays]
    assert client.get_into(keys, outs) == [True] * len(arrays)
    for a, o in zip(arrays, outs, strict=True):
        assert a.view(np.uint8).tobytes() == o.view(np.uint8).tobytes()


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int8], ids=str
)
def test_torch_round_trip(client: kvpool.Client, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    shape = (2, 16, 8, 64)  # (K/V, tokens, heads, head_dim)
    if dtype.is_floating_point:
        tensors = [torch.randn(shape, generator=g).to(dtype) for _ in range(16)]
    else:
        tensors = [torch.randint(-128, 128, shape, generator=g, dtype=dtype) for _ in range(16)]
    keys = random_keys(len(tensors))
    assert client.put(keys, tensors) == len(tensors)
    raw = [t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors]
    assert client.get(keys) == raw
    outs = [torch.full(shape, 7, dtype=dtype) for _ in tensors]
    assert client.get_into(keys, outs) == [True] * len(tensors)
    for t, o in zip(tensors, outs, strict=True):
        # Bit-exact, NaNs included: compare the raw bytes.
        assert torch.equal(t.view(torch.uint8), o.view(torch.uint8))


def test_tensor_views_and_bad_tensors(client: kvpool.Client) -> None:
    base = torch.randn(64, 64, dtype=torch.bfloat16)
    key = random_keys(1)
    # A contiguous slice is a view whose bytes start at an offset of the storage.
    assert client.put(key, [base[16:32]]) == 1
    out = torch.zeros(16, 64, dtype=torch.bfloat16)
    assert client.get_into(key, [out]) == [True]
    assert torch.equal(out.view(torch.int16), base[16:32].view(torch.int16))
    with pytest.raises(kvpool.InvalidArgumentError):
        client.put(random_keys(1), [base.t()])  # not contiguous
    with pytest.raises(kvpool.InvalidArgumentError):
        client.get_into(key, [torch.zeros(64, 16, dtype=torch.bfloat16).t()])


def test_get_into_size_mismatch_is_a_miss_and_leaves_the_buffer(client: kvpool.Client) -> None:
    keys = random_keys(5)
    blocks = random_blocks(4, 10_000, seed=11)
    assert client.put(keys[:4], blocks) == 4
    sentinel = 0xAB
    buffers = [
        bytearray(10_000),  # right size
        bytearray([sentinel]) * 9_999,  # one byte short
        bytearray(10_000),  # right size, after a dropped block
        bytearray([sentinel]) * 10_001,  # one byte long
        bytearray([sentinel]) * 10_000,  # absent key
    ]
    assert client.get_into(keys, buffers) == [True, False, True, False, False]
    assert bytes(buffers[0]) == blocks[0]
    assert bytes(buffers[2]) == blocks[2]
    for i in (1, 3, 4):
        assert set(buffers[i]) == {sentinel}, f"buffer {i} was written to"
    # The connection is still in step after dropping payloads.
    assert client.get(keys[:4]) == blocks


def test_get_into_rejects_read_only_buffers(client: kvpool.Client) -> None:
    key = random_keys(1)
    client.put(key, [b"x" * 100])
    with pytest.raises(kvpool.InvalidArgumentError, match="block 0"):
        client.get_into(key, [b"y" * 100])


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda c: c.put([], []), 0),
        (lambda c: c.get([]), []),
        (lambda c: c.get_into([], []), []),
        (lambda c: c.exists([]), []),
        (lambda c: c.match_prefix([]), 0),
        (lambda c: c.delete([]), 0),
    ],
    ids=["put", "get", "get_into", "exists", "match_prefix", "delete"],
)
def test_empty_batch(shared_node: ServerProcess, call, expected: object) -> None:  # type: ignore[no-untyped-def]
    """An empty batch answers at once (short timeout: a hang fails fast)."""
    with kvpool.Client(shared_node.address, timeout=1.0) as c:
        assert call(c) == expected
        key = random_keys(1)
        assert c.put(key, [b"after"]) == 1 and c.get(key) == [b"after"]


def test_empty_block(shared_node: ServerProcess) -> None:
    """A zero-length block is either stored (and reads back empty) or refused with a clear error,
    promptly; the connection and node keep working."""
    with kvpool.Client(shared_node.address, timeout=2.0) as c:
        keys = random_keys(3)
        started = time.monotonic()
        try:
            stored = c.put(keys, [b"a", b"", b"c"])
        except kvpool.InvalidArgumentError:
            stored = None
        assert time.monotonic() - started < 1.5
        if stored is not None:
            assert stored == 3
            assert c.get(keys) == [b"a", b"", b"c"]
        blocks = random_blocks(4, 1000, seed=1)
        other = random_keys(4)
        assert c.put(other, blocks) == 4
        assert c.get(other) == blocks


# --- Key queries ---------------------------------------------------------------------------------


def test_exists_match_prefix_delete(client: kvpool.Client) -> None:
    keys = random_keys(10)
    blocks = random_blocks(10, 3000, seed=2)
    present = [0, 1, 2, 3, 4, 5, 8]
    assert client.put([keys[i] for i in present], [blocks[i] for i in present]) == len(present)

    assert client.exists(keys) == [i in present for i in range(10)]
    assert client.match_prefix(keys) == 6
    assert client.match_prefix(keys[:3]) == 3
    assert client.match_prefix(keys[6:]) == 0
    assert client.match_prefix(keys[8:9]) == 1
    assert client.match_prefix([keys[9], *keys]) == 0

    assert client.delete([keys[2], keys[9], keys[2]]) == 1  # absent and repeated keys count 0
    assert client.exists(keys[:4]) == [True, True, False, True]
    assert client.get(keys[:4]) == [blocks[0], blocks[1], None, blocks[3]]
    assert client.match_prefix(keys) == 2
    assert client.delete([keys[2]]) == 0

    # A deleted key can be written again, with other bytes.
    assert client.put([keys[2]], [b"new"]) == 1
    assert client.get([keys[2]]) == [b"new"]
    assert client.match_prefix(keys) == 6
    assert client.delete(keys) == len(present)
    assert client.exists(keys) == [False] * 10


def test_put_of_existing_key_keeps_the_first_bytes(client: kvpool.Client) -> None:
    key = random_keys(1)
    first, second, other_size = b"A" * 4096, b"B" * 4096, b"C" * 10_000
    before = client.stats()
    assert client.put(key, [first]) == 1
    assert client.put(key, [second]) == 1  # success: the node holds the key
    assert client.put(key, [other_size]) == 1
    assert client.get(key) == [first]
    buf = bytearray(4096)
    assert client.get_into(key, [buf]) == [True] and bytes(buf) == first
    after = client.stats()
    assert after["stored"] - before["stored"] == 1
    assert after["existing"] - before["existing"] == 2
    assert after["entries"] - before["entries"] == 1

    # The same key twice in one batch: one copy, byte-exact.
    dup = random_keys(1)
    assert client.put(dup * 2, [first, second]) == 2
    assert client.get(dup) in ([first], [second])


# --- Batches larger than the node's limits ------------------------------------------------------


def _check_split_batches(address: str, n: int, size: int) -> None:
    keys = random_keys(n)
    blocks = random_blocks(n, size, seed=n)
    with kvpool.Client(address) as c:
        assert c.put(keys, blocks) == n
        assert c.get(keys) == blocks
        buffers = [bytearray(size) for _ in range(n)]
        assert c.get_into(keys, buffers) == [True] * n
        assert [bytes(b) for b in buffers] == blocks
        absent = random_keys(n)
        assert c.exists(keys + absent) == [True] * n + [False] * n
        assert c.match_prefix(keys) == n
        assert c.match_prefix(keys + absent) == n
        # Prefix ends exactly at, just before and just after a frame boundary, and early.
        for cut in (1, 6, 7, 8, 13, 14, 15, 50):
            probe = keys[:cut] + absent[:1] + keys[cut:]
            assert c.match_prefix(probe) == cut, cut
        assert c.delete(keys[: n // 2] + absent) == n // 2
        assert c.exists(keys) == [False] * (n // 2) + [True] * (n - n // 2)
        assert c.get(keys)[n // 2 :] == blocks[n // 2 :]


def test_batches_larger_than_max_batch_keys_from_env(start_node: ServerFactory) -> None:
    node = start_node(env={"KVPOOL_MAX_BATCH_KEYS": "7"})
    with RawConnection(node.address) as raw:
        assert raw.hello()[1] == 7  # the node really runs with the small limit
    _check_split_batches(node.address, n=100, size=3000)


def test_batches_larger_than_frame_limit_from_toml(
    start_node: ServerFactory, tmp_path: Path
) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[server]\nmax_batch_keys = 7\nmax_frame_bytes = "64KiB"\n')
    node = start_node(extra=["--config", str(config)])
    with RawConnection(node.address) as raw:
        _, max_keys, max_frame, _ = raw.hello()
    assert (max_keys, max_frame) == (7, 64 * KiB)
    # 20 KiB blocks: the frame limit (3 per frame), not the key limit, splits these.
    _check_split_batches(node.address, n=60, size=20 * KiB)


# --- Counters -------------------------------------------------------------------------------------


def test_stats_counters_move(start_node: ServerFactory) -> None:
    node = start_node(memory="64MiB")
    with kvpool.Client(node.address) as c:
        s0 = c.stats()
        assert s0["capacity_bytes"] == 64 * MiB
        assert s0["high_watermark_bytes"] == int(0.95 * 64 * MiB)
        assert s0["eviction"] == "s3fifo"
        for name in ("used_bytes", "entries", "hits", "misses", "stored", "evictions"):
            assert s0[name] == 0, name
        keys = random_keys(10)
        blocks = random_blocks(10, 5000, seed=4)
        assert c.put(keys, blocks) == 10
        s1 = c.stats()
        assert s1["stored"] == 10 and s1["entries"] == 10
        assert s1["bytes_in"] == 50_000
        assert 50_000 <= s1["used_bytes"] <= 10 * 8192  # rounded up to 4 KiB granules at most
        assert s1["reserved_blocks"] == 0

        c.get(keys + random_keys(5))
        s2 = c.stats()
        assert s2["hits"] == 10 and s2["misses"] == 5
        assert s2["bytes_out"] == 50_000
        assert s2["pinned_blocks"] == 0

        assert c.delete(keys[:3]) == 3
        s3 = c.stats()
        assert s3["deletes"] == 3 and s3["entries"] == 7
        assert s3["used_bytes"] == s1["used_bytes"] * 7 // 10
        assert s3["protocol_errors"] == 0
        assert s3["connections"] >= 1


# --- Errors ---------------------------------------------------------------------------------------

BAD_KEYS = [b"x" * 15, b"x" * 17, b"", "k" * 16, 12345]


@pytest.mark.parametrize("bad", BAD_KEYS, ids=["15B", "17B", "empty", "str", "int"])
@pytest.mark.parametrize(
    "call",
    [
        lambda c, k: c.put(k, [b"a"] * len(k)),
        lambda c, k: c.get(k),
        lambda c, k: c.get_into(k, [bytearray(1) for _ in k]),
        lambda c, k: c.exists(k),
        lambda c, k: c.match_prefix(k),
        lambda c, k: c.delete(k),
    ],
    ids=["put", "get", "get_into", "exists", "match_prefix", "delete"],
)
def test_bad_key_names_its_index(client: kvpool.Client, call, bad: object) -> None:  # type: ignore[no-untyped-def]
    keys = [*random_keys(2), bad]
    with pytest.raises(kvpool.InvalidArgumentError, match=r"key 2\b"):
        call(client, keys)


def test_length_mismatch(client: kvpool.Client) -> None:
    with pytest.raises(kvpool.InvalidArgumentError):
        client.put(random_keys(2), [b"a"])
    with pytest.raises(kvpool.InvalidArgumentError):
        client.get_into(random_keys(1), [bytearray(1), bytearray(1)])


@pytest.mark.parametrize(
    "address",
    [
        "",
        "localhost",
        "127.0.0.1",
        "127.0.0.1:",
        ":7070",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:-1",
        "127.0.0.1:http",
        "127.0.0.1:70 70",
    ],
)
def test_malformed_address(address: str) -> None:
    with pytest.raises(kvpool.InvalidArgumentError):
        kvpool.Client(address)


@pytest.mark.parametrize("kwargs", [{"timeout": 0}, {"timeout": -1}, {"connect_timeout": 0}])
def test_bad_timeouts(shared_node: ServerProcess, kwargs: dict[str, float]) -> None:
    with pytest.raises(kvpool.InvalidArgumentError):
        kvpool.Client(shared_node.address, **kwargs)


def test_refused_address_raises_connection_error() -> None:
    started = time.monotonic()
    with pytest.raises(kvpool.KVPoolConnectionError):
        kvpool.Client(f"127.0.0.1:{free_port()}", connect_timeout=1.0)
    assert time.monotonic() - started < 1.0


@pytest.fixture
def silent_listener() -> Iterator[socket.socket]:
    """A port that completes TCP handshakes (kernel backlog) but never answers."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield s
    s.close()


def test_silent_peer_fails_within_connect_timeout(silent_listener: socket.socket) -> None:
    port = silent_listener.getsockname()[1]
    started = time.monotonic()
    with pytest.raises((kvpool.KVPoolConnectionError, kvpool.KVPoolTimeoutError)):
        kvpool.Client(f"127.0.0.1:{port}", connect_timeout=0.5, timeout=30)
    assert 0.4 < time.monotonic() - started < 2.0


@pytest.fixture
def mute_node() -> Iterator[str]:
    """A fake node that completes HELLO, then reads requests and never answers them."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop = threading.Event()
    conns: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conns.append(conn)
            hdr = conn.recv(HEADER.size + 8, socket.MSG_WAITALL)
            fields = HEADER.unpack(hdr[: HEADER.size])
            reply = HEADER.pack(fields[0], OP_HELLO, 0, 0, fields[4], 0, 0, 24)
            conn.sendall(reply + struct.pack("<IIQQ", 1, 4096, 1 << 30, 256 << 20))
            threading.Thread(target=lambda c=conn: _drain(c), daemon=True).start()

    def _drain(conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    listener.close()
    for c in conns:
        c.close()


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.get(random_keys(3)),
        lambda c: c.put(random_keys(1), [b"x" * 100]),
        lambda c: c.exists(random_keys(3)),
        lambda c: c.match_prefix(random_keys(3)),
        lambda c: c.delete(random_keys(3)),
        lambda c: c.stats(),
    ],
    ids=["get", "put", "exists", "match_prefix", "delete", "stats"],
)
def test_every_call_has_a_deadline(mute_node: str, call) -> None:  # type: ignore[no-untyped-def]
    with kvpool.Client(mute_node, timeout=0.3) as c:
        started = time.monotonic()
        with pytest.raises(kvpool.KVPoolTimeoutError):
            call(c)
        assert time.monotonic() - started < 1.5


def test_closed_client_raises(shared_node: ServerProcess) -> None:
    c = kvpool.Client(shared_node.address)
    key = random_keys(1)
    assert c.put(key, [b"v"]) == 1
    c.close()
    c.close()  # idempotent
    for call in (
        lambda: c.get(key),
        lambda: c.get_into(key, [bytearray(1)]),
        lambda: c.put(key, [b"v"]),
        lambda: c.exists(key),
        lambda: c.match_prefix(key),
        lambda: c.delete(key),
        lambda: c.stats(),
    ):
        with pytest.raises(kvpool.KVPoolConnectionError):
            call()
    with kvpool.Client(shared_node.address) as c2:
        assert c2.get(key) == [b"v"]
    with pytest.raises(kvpool.KVPoolConnectionError):
        c2.get(key)


def test_block_over_max_block_bytes_is_refused(start_node: ServerFactory) -> None:
    node = start_node(env={"KVPOOL_MAX_BLOCK_BYTES": "64KiB"})
    with kvpool.Client(node.address) as c:
        keys = random_keys(3)
        with pytest.raises(kvpool.TooLargeError, match="block 1"):
            c.put(keys, [b"a" * 100, b"b" * (64 * KiB + 1), b"c"])
        assert c.exists(keys) == [False] * 3
        assert c.put(keys[:1], [b"a" * 64 * KiB]) == 1  # the limit itself is allowed
        assert c.get(keys[:1]) == [b"a" * 64 * KiB]


def test_error_codes_mirror_the_core() -> None:
    """``kvpool.ErrorCode`` is the core's ``ErrorCode``: every code the core names exists in
    Python with the same value and name, and no Python code is unknown to the core."""
    from kvpool import _core

    core = {
        v: _core.error_code_name(v) for v in range(1000) if _core.error_code_name(v) != "Unknown"
    }
    python = {int(c): c.name.replace("_", "").lower() for c in kvpool.ErrorCode}
    assert {v: n.lower() for v, n in core.items()} == python
