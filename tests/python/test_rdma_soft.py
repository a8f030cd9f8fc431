"""The RDMA transport end to end on the software verbs provider (KVPOOL_RDMA_PROVIDER=soft): real
``kvpool server`` processes, the node posting READs and WRITEs into the client's registered arena,
RDMA, shared-memory and TCP clients on one node, and clients killed mid-call."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import kvpool
import numpy as np
import pytest
from conftest import ServerFactory, ServerProcess, child_env, random_keys, wait_until

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
    with pytest.raises(kvpool.KVPoolError, match="KVPOOL_RDMA_PROVIDER=soft"):
        kvpool.Client(rdma.address, transport="rdma")


_RDMA_LOOP = textwrap.dedent(
    """
    import os, sys, kvpool
    address, op = sys.argv[1], sys.argv[2]
    c = kvpool.Client(address, transport="rdma", timeout=60)
    size, n = 1 << 20, 32
    staged = [c.staging_buffer(size) for _ in range(n // 2)]
    for b in staged:
        b[:] = os.urandom(size)
    plain = [bytearray(os.urandom(size)) for _ in range(n // 2)]
    bufs = [b for pair in zip(staged, plain) for b in pair]
    keys = [os.urandom(16) for _ in range(n)]
    c.put(keys, bufs)
    print("ready", flush=True)
    while True:
        if op == "put":
            c.put([os.urandom(16) for _ in range(n)], bufs)
        else:
            c.get_into(keys, bufs)
    """
)


@pytest.mark.parametrize("op", ["put", "get"])
def test_client_killed_mid_rdma_call_leaves_nothing_held(
    start_node: ServerFactory, op: str
) -> None:
    node = start_node(memory="256MiB", env=SOFT)
    with kvpool.Client(node.address, transport="tcp") as observer:
        keep = random_keys(4)
        blocks = [os.urandom(100 * KiB) for _ in keep]
        assert observer.put(keep, blocks) == 4
        child = subprocess.Popen(
            [sys.executable, "-c", _RDMA_LOOP, node.address, op],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(SOFT),
        )
        busy = "reserved_bytes" if op == "put" else "pinned_bytes"
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == b"ready", child.communicate()[1]
            for _ in range(2000):  # freeze the child mid-call (the node waits on its socket)
                child.send_signal(signal.SIGSTOP)
                time.sleep(0.02)
                if observer.stats()[busy] > 0:
                    break
                child.send_signal(signal.SIGCONT)
                time.sleep(0.003)
            assert observer.stats()[busy] > 0, f"never caught the child mid-{op}"
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        wait_until(
            lambda: (s := observer.stats())["reserved_bytes"] == 0 and s["pinned_bytes"] == 0,
            what="reservations and pins released",
        )
        wait_until(
            lambda: observer.stats()["transports"]["rdma"]["connections"] == 0,
            what="the dead client's RDMA connections dropped",
        )
        assert observer.get(keep) == blocks


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
