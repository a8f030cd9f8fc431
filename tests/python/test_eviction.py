"""Eviction on a small node: usage stays under the high-water mark, nothing read back is ever
wrong, and the policies keep what they promise (S3-FIFO: frequently read blocks survive scans)."""

from __future__ import annotations

import socket
import struct

import kvpool
import numpy as np
import pytest
from conftest import HEADER, OP_GET, OP_HELLO, ServerFactory, header, random_keys, wait_until

KiB = 1 << 10
MiB = 1 << 20
POLICIES = ["s3fifo", "lru"]


def check_usage(c: kvpool.Client) -> dict[str, int]:
    s = c.stats()
    assert s["used_bytes"] <= s["high_watermark_bytes"] <= s["capacity_bytes"], s
    assert s["reserved_blocks"] == 0, s
    return s


def write_and_verify(c: kvpool.Client, sizes: list[int], seed: int, batch: int = 32) -> int:
    """Writes blocks of `sizes` in batches, checking usage after each batch, then reads all
    back; returns how many survived. Every block read back must be the one written."""
    rng = np.random.default_rng(seed)
    keys = random_keys(len(sizes))
    blocks = [rng.bytes(s) for s in sizes]
    for i in range(0, len(keys), batch):
        stored = c.put(keys[i : i + batch], blocks[i : i + batch])
        assert stored == len(keys[i : i + batch]), "eviction should always make room"
        check_usage(c)
    got = c.get(keys)
    wrong = [i for i, g in enumerate(got) if g is not None and g != blocks[i]]
    assert not wrong, f"{len(wrong)} blocks read back with wrong bytes (first {wrong[0]})"
    survivors = sum(g is not None for g in got)
    # get_into agrees with get, block for block.
    bufs = [bytearray(s) for s in sizes]
    found = c.get_into(keys, bufs)
    assert found == [g is not None for g in got]
    assert all(bytes(b) == blocks[i] for i, b in enumerate(bufs) if found[i])
    assert c.exists(keys) == found
    return survivors


@pytest.mark.parametrize("policy", POLICIES)
def test_uniform_blocks_far_beyond_capacity(start_node: ServerFactory, policy: str) -> None:
    node = start_node(memory="16MiB", eviction=policy)
    with kvpool.Client(node.address) as c:
        assert c.stats()["eviction"] == policy
        n = 1000  # 1000 x 64 KiB = 62.5 MiB, ~4x the node
        survivors = write_and_verify(c, [64 * KiB] * n, seed=1)
        s = check_usage(c)
        assert s["evictions"] > 0
        assert s["stored"] == n
        assert s["entries"] == survivors
        assert s["evictions"] == n - survivors
        # The node is kept reasonably full: at least half the watermark is live data.
        assert survivors * 64 * KiB >= s["high_watermark_bytes"] // 2
        assert survivors < n


@pytest.mark.parametrize("policy", POLICIES)
def test_mixed_sizes_far_beyond_capacity(start_node: ServerFactory, policy: str) -> None:
    node = start_node(memory="16MiB", eviction=policy)
    rng = np.random.default_rng(2)
    sizes = [int(s) for s in rng.integers(1, 512 * KiB, size=300)]  # ~75 MiB
    with kvpool.Client(node.address) as c:
        survivors = write_and_verify(c, sizes, seed=3, batch=8)
        s = check_usage(c)
        assert s["evictions"] > 0
        assert 0 < survivors < len(sizes)


def _hot_and_scan(c: kvpool.Client, *, read_during_scan: bool) -> float:
    """A hot set of 24 x 64 KiB read a few times, then a scan of 3x the node's capacity;
    returns the fraction of the hot set still present (and byte-exact)."""
    rng = np.random.default_rng(4)
    hot_keys = random_keys(24)
    hot = [rng.bytes(64 * KiB) for _ in hot_keys]
    assert c.put(hot_keys, hot) == len(hot)
    for _ in range(3):
        assert c.get(hot_keys) == hot
    scan = [rng.bytes(64 * KiB) for _ in range(32)]
    for _ in range(24):  # 24 x 32 x 64 KiB = 48 MiB
        assert c.put(random_keys(32), scan) == 32
        check_usage(c)
        if read_during_scan:
            got = c.get(hot_keys)
            assert all(g is None or g == h for g, h in zip(got, hot, strict=True))
    got = c.get(hot_keys)
    assert all(g is None or g == h for g, h in zip(got, hot, strict=True))
    return sum(g is not None for g in got) / len(hot)


def test_s3fifo_keeps_a_hot_set_through_a_scan(start_node: ServerFactory) -> None:
    node = start_node(memory="16MiB", eviction="s3fifo")
    with kvpool.Client(node.address) as c:
        assert _hot_and_scan(c, read_during_scan=False) >= 0.9
        assert c.stats()["evictions"] > 0


def test_lru_evicts_a_hot_set_not_read_during_a_scan(start_node: ServerFactory) -> None:
    # The counterpart of the S3-FIFO test: shows --eviction really selects another policy.
    node = start_node(memory="16MiB", eviction="lru")
    with kvpool.Client(node.address) as c:
        assert _hot_and_scan(c, read_during_scan=False) <= 0.1


@pytest.mark.parametrize("policy", POLICIES)
def test_blocks_read_during_a_scan_survive(start_node: ServerFactory, policy: str) -> None:
    node = start_node(memory="16MiB", eviction=policy)
    with kvpool.Client(node.address) as c:
        assert _hot_and_scan(c, read_during_scan=True) >= 0.9


@pytest.mark.parametrize("policy", POLICIES)
def test_block_larger_than_the_node_is_refused(start_node: ServerFactory, policy: str) -> None:
    node = start_node(memory="16MiB", eviction=policy)
    with kvpool.Client(node.address) as c:
        keys = random_keys(8)
        blocks = [np.random.default_rng(i).bytes(256 * KiB) for i in range(8)]
        assert c.put(keys, blocks) == 8
        before = check_usage(c)

        huge = random_keys(3)
        # Larger than the pool, larger than the high-water mark, both in one batch with a
        # block that fits.
        over_capacity = b"x" * (20 * MiB)
        over_watermark = b"y" * (before["high_watermark_bytes"] + 4096)
        assert c.put(huge, [over_capacity, b"ok" * 100, over_watermark]) == 1
        assert c.exists(huge) == [False, True, False]

        after = check_usage(c)
        assert after["rejected"] - before["rejected"] == 2
        assert after["evictions"] == before["evictions"]  # refusing evicted nothing
        assert c.get(keys) == blocks
        more = random_keys(4)
        assert c.put(more, blocks[:4]) == 4
        assert c.get(more) == blocks[:4]


@pytest.mark.parametrize("policy", POLICIES)
def test_blocks_pinned_by_a_slow_reader_are_never_reused(
    start_node: ServerFactory, policy: str
) -> None:
    """A GET whose reply the reader has not drained pins its blocks: neither eviction under
    heavy write pressure nor DELETE may free or reuse their memory before the reply is sent."""
    node = start_node(memory="16MiB", eviction=policy)
    rng = np.random.default_rng(8)
    keys = random_keys(8)
    blocks = [rng.bytes(MiB) for _ in keys]
    with kvpool.Client(node.address) as c:
        assert c.put(keys, blocks) == 8
        slow = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)  # a small window
        host, port = node.address.rsplit(":", 1)
        slow.connect((host, int(port)))
        slow.settimeout(10)
        try:
            slow.sendall(header(OP_HELLO, body_bytes=8) + struct.pack("<II", 1, 1))
            assert len(slow.recv(56, socket.MSG_WAITALL)) == 56
            slow.sendall(header(OP_GET, count=8, body_bytes=8 * 16) + b"".join(keys))
            wait_until(lambda: c.stats()["pinned_blocks"] > 0, what="the GET to pin its blocks")
            pinned = c.stats()["pinned_blocks"]
            # Deleting pinned blocks hides them at once; their memory stays with the reader.
            assert c.delete(keys) == 8
            assert c.exists(keys) == [False] * 8
            # 48 MiB of new blocks: everything unpinned is evicted, several times over.
            for _ in range(24):
                batch = [rng.bytes(64 * KiB) for _ in range(32)]
                assert c.put(random_keys(32), batch) == 32
                check_usage(c)
            s = c.stats()
            assert s["evictions"] > 0
            assert s["pinned_blocks"] == pinned  # the reader still holds them
            # Now drain the reply: every byte is the block as it was written.
            raw = slow.recv(HEADER.size, socket.MSG_WAITALL)
            fields = HEADER.unpack(raw)
            assert fields[2] == 0 and fields[5] == 8
            body = bytearray()
            while len(body) < fields[7]:
                chunk = slow.recv(fields[7] - len(body))
                assert chunk
                body += chunk
        finally:
            slow.close()
        lengths = struct.unpack("<8Q", body[:64])
        assert lengths == (MiB,) * 8
        data = bytes(body[64:])
        for i in range(8):
            assert data[i * MiB : (i + 1) * MiB] == blocks[i], f"block {i} was overwritten"
        after = wait_until(lambda: (s := c.stats())["pinned_blocks"] == 0 and s)
        assert c.get(keys) == [None] * 8
        assert after["used_bytes"] <= after["high_watermark_bytes"]
