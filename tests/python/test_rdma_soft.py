"""The RDMA transport end to end on the software verbs provider (KVPOOL_RDMA_PROVIDER=soft): real
``kvpool server`` processes, the node posting READs and WRITEs into the client's registered arena,
RDMA, shared-memory and TCP clients on one node, and injected RDMA faults. (Clients killed
mid-call are tested for every transport, RDMA included, in test_transports.py.)"""

from __future__ import annotations

import os
import time

import kvpool
import numpy as np
import pytest
from conftest import (
    RedisProcess,
    ServerFactory,
    ServerProcess,
    cluster_name,
    random_keys,
    wait_until,
)

KiB = 1 << 10
MiB = 1 << 20
SOFT = {"KVPOOL_RDMA_PROVIDER": "soft"}


@pytest.fixture
def soft(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process (the client) uses the software provider too."""
    monkeypatch.setenv("KVPOOL_RDMA_PROVIDER", "soft")


@pytest.fixture
def rdma_node(start_node: ServerFactory) -> ServerProcess:
    return start_node(memory="192MiB", env={**SOFT, "KVPOOL_MAX_BLOCK_BYTES": str(3 * MiB)})


def test_exact_bytes_over_rdma(rdma_node: ServerProcess, soft: None) -> None:
    rng = np.random.default_rng(3)
    sizes = [0, 1, 4095, 4097, 3 * MiB] + [int(s) for s in rng.integers(0, 3 * MiB, size=20)]
    arena = kvpool.StagingArena(256 * MiB)
    with kvpool.Client(rdma_node.address, transport="rdma", arena=arena) as c:
        assert c.transport == "rdma"
        staged = [c.staging_buffer(n) for n in sizes]
        for b, n in zip(staged, sizes, strict=True):
            b[:] = rng.bytes(n)
        plain = [rng.bytes(n) for n in sizes]
        keys = random_keys(2 * len(sizes))
        blocks = [b for pair in zip(staged, plain, strict=True) for b in pair]
        assert c.put(keys, blocks) == len(keys)
        expected = [bytes(b) for b in blocks]
        assert c.get(keys) == expected
        outs = [c.staging_buffer(len(e)) for e in expected]
        assert c.get_into(keys, outs) == [True] * len(keys)
        assert [bytes(o) for o in outs] == expected
        t = c.stats()["transports"]["rdma"]
        assert t["copied_in"] == sum(sizes)  # the node READ the staged blocks from the arena
        assert t["copied_out"] == sum(len(e) for e in expected)  # and WROTE every block back
        assert c.stats()["reserved_bytes"] == 0 and c.stats()["pinned_bytes"] == 0


def test_rdma_shm_and_tcp_clients_on_one_node(rdma_node: ServerProcess, soft: None) -> None:
    clients = {t: kvpool.Client(rdma_node.address, transport=t) for t in ("rdma", "shm", "tcp")}
    try:
        assert {t: c.transport for t, c in clients.items()} == {t: t for t in clients}
        written = {}
        for t, c in clients.items():
            keys = random_keys(16)
            blocks = [os.urandom(64 * KiB) for _ in keys]
            assert c.put(keys, blocks) == 16
            written[t] = (keys, blocks)
        for c in clients.values():
            for keys, blocks in written.values():
                assert c.get(keys) == blocks
        stats = clients["tcp"].stats()["transports"]
        assert {t: stats[t]["connections"] >= 1 for t in clients} == dict.fromkeys(clients, True)
    finally:
        for c in clients.values():
            c.close()


def test_auto_prefers_shared_memory_on_the_same_host(rdma_node: ServerProcess, soft: None) -> None:
    with kvpool.Client(rdma_node.address) as c:
        assert c.transport == "shm"


def test_rdma_is_refused_clearly_where_it_cannot_work(
    start_node: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = start_node()  # no provider on the node: it says so and serves tcp and shm
    monkeypatch.setenv("KVPOOL_RDMA_PROVIDER", "soft")
    with pytest.raises(kvpool.KVPoolError, match="does not serve RDMA"):
        kvpool.Client(plain.address, transport="rdma")
    with kvpool.Client(plain.address) as c:
        assert c.transport == "shm"
    assert "rdma" not in kvpool.Client(plain.address, transport="tcp").stats()["transports"]
    rdma = start_node(env=SOFT)
    monkeypatch.delenv("KVPOOL_RDMA_PROVIDER")  # the client has no provider
    with pytest.raises(kvpool.KVPoolError, match="no RDMA devices.*KVPOOL_RDMA_PROVIDER=soft"):
        kvpool.Client(rdma.address, transport="rdma")


def test_failed_rdma_requests_fail_the_call_and_the_next_call_reconnects(
    start_node: ServerFactory, soft: None
) -> None:
    """The node's provider fails every 7th READ/WRITE: the frame it belongs to fails (its QP is
    in error, the connection closes, its reservations are aborted), the client reconnects (a
    pooled connection's failure is retried once on a fresh one, so most calls still succeed),
    and no read ever returns wrong bytes."""
    node = start_node(memory="128MiB", env={**SOFT, "KVPOOL_RDMA_SOFT_FAIL_EVERY": "7"})
    with kvpool.Client(node.address, transport="rdma", max_idle_connections=2) as c:
        written: dict[bytes, bytes] = {}
        failures = 0
        for _ in range(20):
            keys = random_keys(4)
            bufs = [c.staging_buffer(32 * KiB) for _ in keys]
            for b in bufs:
                b[:] = os.urandom(len(b))
            try:
                c.put(keys, bufs)
            except kvpool.KVPoolConnectionError as e:
                failures += 1
                assert "RDMA READ" in str(e) or "closed" in str(e), e
            written.update({k: bytes(b) for k, b in zip(keys, bufs, strict=True)})
        assert c.transport == "rdma"  # reconnected over RDMA after each failure
        with kvpool.Client(node.address, transport="tcp") as check:
            got = check.get(list(written))
            for k, g in zip(written, got, strict=True):
                assert g is None or g == written[k]
            s = check.stats()
            assert s["reserved_bytes"] == 0 and s["pinned_bytes"] == 0
            # Every injected fault cost its connection: far more RDMA connections than 2.
            assert s["transports"]["rdma"]["accepted"] >= 8, s["transports"]
            assert sum(g is not None for g in got) >= len(written) - 4 * failures
            for _ in range(10):
                outs = [c.staging_buffer(32 * KiB) for _ in range(4)]
                keys = [k for k, g in zip(written, got, strict=True) if g is not None][:4]
                try:
                    found = c.get_into(keys, outs[: len(keys)])
                except kvpool.KVPoolConnectionError:
                    continue
                for k, o, f in zip(keys, outs, found, strict=False):
                    assert f and bytes(o) == written[k]


def test_qp_errors_in_a_cluster_are_misses_and_failed_puts_never_wrong_bytes(
    redis_server: RedisProcess, start_cluster_node: ServerFactory, soft: None
) -> None:
    """Through kvpool.Cluster: the node's provider fails every 9th READ/WRITE. A call whose QP
    went to the error state (and whose one retry failed too) reads as misses or unstored keys,
    never as an exception; put's count matches what the node holds; the next calls reconnect
    over RDMA; nothing stays reserved or pinned."""
    name = cluster_name()
    node = start_cluster_node(
        redis_server.url,
        name,
        memory="128MiB",
        env={**SOFT, "KVPOOL_RDMA_SOFT_FAIL_EVERY": "9"},
    )
    with kvpool.Cluster(redis_server.url, name, transport="rdma", timeout=5.0) as cluster:
        wait_until(lambda: len(cluster.members()) == 1, what="the node joined")
        written: dict[bytes, bytes] = {}
        stored = 0
        seen: set[str] = set()
        for _ in range(30):
            keys = random_keys(4)
            bufs = [cluster.staging_buffer(16 * KiB) for _ in keys]
            for b in bufs:
                b[:] = os.urandom(len(b))
            stored += cluster.put(keys, bufs)  # never raises: a failed node is unstored keys
            written.update({k: bytes(b) for k, b in zip(keys, bufs, strict=True)})
            seen.update(cluster.transports().values())  # empty while the node is suspect
            time.sleep(0.05)  # past a failed node's suspicion window now and then
        assert seen == {"rdma"}  # reconnected over RDMA each time, never fell back to TCP
        with kvpool.Client(node.address, transport="tcp") as check:
            held = check.get(list(written))
            assert [h for h in held if h is not None] == [
                written[k] for k, h in zip(written, held, strict=True) if h is not None
            ]
            assert sum(h is not None for h in held) == stored  # put told the truth
            s = check.stats()
            assert s["reserved_bytes"] == 0 and s["pinned_bytes"] == 0
            faults = s["transports"]["rdma"]["accepted"] - 1
            assert faults >= 5, s["transports"]  # ~120 WRs at one in 9: the faults happened
        hits = misses = 0
        for _ in range(20):
            keys = list(written)[:8]
            for k, got in zip(keys, cluster.get(keys), strict=True):
                assert got is None or got == written[k]
                hits += got is not None
                misses += got is None
            time.sleep(0.05)
        assert hits > misses  # faults cost some reads, reconnecting brought the rest back
