"""Robustness against real nodes: racing writers, clients killed mid-write, malformed and stalled
frames from raw sockets, connection limits and node restarts."""

from __future__ import annotations

import hashlib
import random
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import kvpool
import pytest
from conftest import (
    MAGIC,
    OP_GET,
    OP_HELLO,
    OP_PUT,
    OP_STATS,
    RawConnection,
    ServerFactory,
    ServerProcess,
    child_env,
    header,
    random_keys,
    wait_until,
)

KiB = 1 << 10
MiB = 1 << 20


def payload(tag: str, size: int) -> bytes:
    """Deterministic bytes, reproducible in another process."""
    return hashlib.shake_128(tag.encode()).digest(size)


def put_table(entries: list[tuple[bytes, int]]) -> bytes:
    return b"".join(k + struct.pack("<Q", n) for k, n in entries)


# --- Racing writers ------------------------------------------------------------------------------


def test_concurrent_writers_of_the_same_keys_threads(shared_node: ServerProcess) -> None:
    writers, nkeys, rounds = 8, 40, 3
    clients = [kvpool.Client(shared_node.address) for _ in range(writers // 2)]
    shared = kvpool.Client(shared_node.address)  # the other half share one client
    try:
        before = shared.stats()
        for r in range(rounds):
            keys = random_keys(nkeys)
            barrier = threading.Barrier(writers)
            errors: list[BaseException] = []

            def write(
                w: int,
                r: int = r,
                keys: list[bytes] = keys,
                barrier: threading.Barrier = barrier,
                errors: list[BaseException] = errors,
            ) -> None:
                try:
                    c = clients[w] if w < len(clients) else shared
                    order = list(range(nkeys))
                    random.Random(w).shuffle(order)
                    # Writers disagree on the size too: a mix-up of copies would show.
                    blocks = [payload(f"{r}/{w}/{j}", 8 * KiB + 512 * w) for j in order]
                    barrier.wait()
                    assert c.put([keys[j] for j in order], blocks) == nkeys
                except BaseException as e:  # noqa: BLE001 - reported below
                    errors.append(e)

            threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, errors
            got = shared.get(keys)
            for j, g in enumerate(got):
                candidates = {payload(f"{r}/{w}/{j}", 8 * KiB + 512 * w) for w in range(writers)}
                assert g in candidates, f"key {j}: not byte-exact any writer's block"
        after = shared.stats()
        assert after["stored"] - before["stored"] == nkeys * rounds
        assert after["existing"] - before["existing"] == nkeys * rounds * (writers - 1)
        assert after["reserved_blocks"] == 0
    finally:
        for c in [*clients, shared]:
            c.close()


_WRITER = textwrap.dedent(
    """
    import hashlib, sys
    import kvpool
    address, writer, keys_hex = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
    keys = [bytes.fromhex(k) for k in keys_hex]
    blocks = [hashlib.shake_128(f"p/{writer}/{j}".encode()).digest(16384 + 1024 * writer)
              for j in range(len(keys))]
    c = kvpool.Client(address)
    print("ready", flush=True)
    sys.stdin.readline()  # the parent's "go"
    print(c.put(keys, blocks), flush=True)
    """
)


def test_concurrent_writers_of_the_same_keys_processes(shared_node: ServerProcess) -> None:
    writers, nkeys = 4, 64
    keys = random_keys(nkeys)
    with kvpool.Client(shared_node.address) as c:
        before = c.stats()
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _WRITER,
                    shared_node.address,
                    str(w),
                    ",".join(k.hex() for k in keys),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=child_env(),
            )
            for w in range(writers)
        ]
        try:
            for p in procs:
                assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            for p in procs:
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
            for p in procs:
                out, err = p.communicate(timeout=60)
                assert p.returncode == 0, err
                assert out.strip() == str(nkeys)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        got = c.get(keys)
        for j, g in enumerate(got):
            candidates = {
                hashlib.shake_128(f"p/{w}/{j}".encode()).digest(16384 + 1024 * w)
                for w in range(writers)
            }
            assert g in candidates, f"key {j} is not byte-exact any writer's block"
        after = c.stats()
        assert after["stored"] - before["stored"] == nkeys
        assert after["existing"] - before["existing"] == nkeys * (writers - 1)


def test_many_concurrent_clients(shared_node: ServerProcess) -> None:
    errors: list[BaseException] = []

    def run(t: int) -> None:
        try:
            with kvpool.Client(shared_node.address) as c:
                for i in range(10):
                    keys = random_keys(4)
                    blocks = [payload(f"mc/{t}/{i}/{j}", 4 * KiB + j) for j in range(4)]
                    assert c.put(keys, blocks) == 4
                    assert c.get(keys) == blocks
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


# --- Clients killed mid-write ---------------------------------------------------------------------

_STALLED_PUT = textwrap.dedent(
    """
    import socket, struct, sys
    host, port = sys.argv[1].rsplit(":", 1)
    keys = [bytes.fromhex(k) for k in sys.argv[2].split(",")]
    size = int(sys.argv[3])
    s = socket.create_connection((host, int(port)))
    H = struct.Struct("<IBBHQIiQ")
    s.sendall(H.pack(0x3150564B, 1, 0, 0, 1, 0, 0, 8) + struct.pack("<II", 1, 1))
    assert len(s.recv(56, socket.MSG_WAITALL)) == 56
    table = b"".join(k + struct.pack("<Q", size) for k in keys)
    s.sendall(H.pack(0x3150564B, 2, 0, 0, 2, len(keys), 0, len(table) + size * len(keys)))
    s.sendall(table + b"\\x5a" * (size * (len(keys) // 2) + size // 2))
    print("stalled", flush=True)
    sys.stdin.readline()  # never comes: the parent kills this process
    """
)


def test_client_killed_mid_put_raw(start_node: ServerFactory) -> None:
    """A writer killed in the middle of a PUT frame: nothing of it is visible, even while it
    is stalled, and its reservations are freed."""
    node = start_node(memory="64MiB")
    with kvpool.Client(node.address) as c:
        old_keys = random_keys(8)
        old = [payload(f"old/{i}", 100 * KiB) for i in range(8)]
        assert c.put(old_keys, old) == 8
        prior = c.stats()
        keys = random_keys(16)
        # One of the keys is already stored: the stalled frame must not touch it.
        keys[3] = old_keys[3]
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _STALLED_PUT,
                node.address,
                ",".join(k.hex() for k in keys),
                str(MiB),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "stalled"
            mid = wait_until(
                lambda: (s := c.stats())["reserved_blocks"] == 15 and s,
                what="the stalled frame's 15 reservations",
            )
            assert mid["used_bytes"] == prior["used_bytes"] + 15 * MiB
            assert c.exists(keys) == [k == old_keys[3] for k in keys]
            assert c.match_prefix(keys) == 0
            got = c.get(keys)
            assert got[3] == old[3]
            assert got[:3] + got[4:] == [None] * 15
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        after = wait_until(
            lambda: (s := c.stats())["reserved_blocks"] == 0 and s, what="reservations freed"
        )
        assert after["used_bytes"] == prior["used_bytes"]
        assert after["entries"] == prior["entries"]
        assert c.exists(keys) == [k == old_keys[3] for k in keys]
        assert c.get(old_keys) == old


_FLOODING_PUT = textwrap.dedent(
    """
    import hashlib, sys
    import kvpool
    c = kvpool.Client(sys.argv[1], timeout=30)
    size = int(sys.argv[2])
    for b in range(1000):
        keys = [hashlib.blake2b(f"flood/{b}/{i}".encode(), digest_size=16).digest()
                for i in range(16)]
        blocks = [hashlib.shake_128(f"flood/{b}/{i}".encode()).digest(size) for i in range(16)]
        c.put(keys, blocks)
    """
)


def test_client_process_killed_while_flooding_puts(start_node: ServerFactory) -> None:
    """A kvpool.Client process SIGKILLed while it streams large batches: every block that is
    visible is byte-exact, and no reservation or pool memory is leaked."""
    size = 512 * KiB
    node = start_node(memory="32MiB")
    with kvpool.Client(node.address) as c:
        child = subprocess.Popen(
            [sys.executable, "-c", _FLOODING_PUT, node.address, str(size)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=child_env(),
        )
        try:

            def mid_batch() -> bool:
                """In the middle of a batch, after at least two batches have committed."""
                assert child.poll() is None, child.communicate()[1]
                s = c.stats()
                return bool(s["stored"] >= 32 and s["reserved_blocks"] > 0)

            wait_until(mid_batch, timeout=60, interval=0.001, what="the child to be mid-batch")
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        after = wait_until(
            lambda: (s := c.stats())["reserved_blocks"] == 0 and s, what="reservations freed"
        )
        assert after["entries"] > 0
        assert after["used_bytes"] == after["entries"] * size  # nothing leaked
        assert after["used_bytes"] <= after["high_watermark_bytes"]
        batches = after["stored"] // 16 + 2
        keys = [
            hashlib.blake2b(f"flood/{b}/{i}".encode(), digest_size=16).digest()
            for b in range(batches)
            for i in range(16)
        ]
        got = c.get(keys)
        present = [(k, g) for k, g in zip(range(len(keys)), got, strict=True) if g is not None]
        assert len(present) == after["entries"]
        for idx, g in present:
            b, i = divmod(idx, 16)
            assert g == hashlib.shake_128(f"flood/{b}/{i}".encode()).digest(size), (b, i)


# --- Malformed frames -----------------------------------------------------------------------------

LIMIT_KEYS = 64
LIMIT_FRAME = 4 * MiB


@pytest.fixture(scope="module")
def victim() -> Iterator[tuple[ServerProcess, list[bytes], list[bytes]]]:
    """A node with small limits holding reference blocks that no bad frame may change."""
    node = ServerProcess(
        ["--port", "0", "--memory", "64MiB"],
        env={"KVPOOL_MAX_BATCH_KEYS": str(LIMIT_KEYS), "KVPOOL_MAX_FRAME_BYTES": "4MiB"},
    ).wait_ready()
    keys = random_keys(16)
    blocks = [payload(f"ref/{i}", 32 * KiB + i) for i in range(16)]
    with kvpool.Client(node.address) as c:
        assert c.put(keys, blocks) == 16
    yield node, keys, blocks
    rc = node.stop()
    assert rc == 0, node.stderr


class Bystander:
    """A client that keeps writing and reading (and checking) its own blocks in a thread."""

    def __init__(self, address: str) -> None:
        self.client = kvpool.Client(address, timeout=5)
        self.ops = 0
        self.errors: list[BaseException] = []
        # Held during each operation: a test takes it to see the node without our writes.
        self.quiet = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            try:
                keys = random_keys(4)
                blocks = [payload(f"by/{i}/{j}", 16 * KiB) for j in range(4)]
                with self.quiet:
                    assert self.client.put(keys, blocks) == 4
                    assert self.client.get(keys) == blocks
                    # Deleted again, so the node never evicts the reference blocks.
                    assert self.client.delete(keys) == 4
                self.ops += 1
            except BaseException as e:  # noqa: BLE001
                self.errors.append(e)
                return
            i += 1

    def wait_for_progress(self) -> None:
        start = self.ops
        wait_until(lambda: self.ops > start or self.errors, what="the bystander to progress")
        assert not self.errors, self.errors

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.client.close()
        assert not self.errors, self.errors


@pytest.fixture
def bystander(victim: tuple[ServerProcess, list[bytes], list[bytes]]) -> Iterator[Bystander]:
    b = Bystander(victim[0].address)
    b.wait_for_progress()
    yield b
    b.wait_for_progress()
    b.stop()


def _hello() -> bytes:
    return header(OP_HELLO, body_bytes=8) + struct.pack("<II", 1, 1)


K = bytes(range(16))
# (id, send HELLO first, bytes, expected error status)
BAD_FRAMES = [
    ("garbage", False, bytes(range(200, 232)), 401),
    ("bad-magic", True, header(OP_GET, magic=0xDEADBEEF, count=1, body_bytes=16), 401),
    ("bad-magic-before-hello", False, header(OP_HELLO, magic=MAGIC + 1, body_bytes=8), 401),
    ("unknown-op", True, header(99), 405),
    ("op-zero", True, header(0), 405),
    ("op-nine", True, header(9, count=1, body_bytes=16), 405),
    ("auth-on-a-v1-connection", True, header(8, body_bytes=32), 405),
    ("frame-too-large", True, header(OP_GET, count=1, body_bytes=LIMIT_FRAME + 16), 403),
    ("put-2^63-bytes", True, header(OP_PUT, count=1, body_bytes=1 << 63), 403),
    ("batch-too-large", True, header(OP_GET, count=LIMIT_KEYS + 1, body_bytes=16 * 65), 404),
    ("put-batch-too-large", True, header(OP_PUT, count=1 << 31, body_bytes=1024), 404),
    ("get-before-hello", False, header(OP_GET, count=1, body_bytes=16), 407),
    ("stats-before-hello", False, header(OP_STATS), 407),
    ("bad-version", False, header(OP_HELLO, body_bytes=8) + struct.pack("<II", 3, 4), 402),
    ("hello-short-body", False, header(OP_HELLO, body_bytes=4), 406),
    ("flags-set", True, header(OP_STATS, flags=1), 406),
    ("reserved-set", True, header(OP_STATS, reserved=5), 406),
    ("status-set", True, header(OP_STATS, status=-1), 406),
    ("stats-with-body", True, header(OP_STATS, body_bytes=4), 406),
    ("get-body-mismatch", True, header(OP_GET, count=2, body_bytes=16), 406),
    ("put-body-below-table", True, header(OP_PUT, count=2, body_bytes=30), 406),
]


def _table_frame(entries: list[tuple[bytes, int]], body_bytes: int) -> bytes:
    return header(OP_PUT, count=len(entries), body_bytes=body_bytes) + put_table(entries)


def _bad_put_frames(ref_key: bytes) -> list[tuple[str, bool, bytes, int]]:
    # Each names a stored key in its table: the error must leave that block as it was.
    return [
        ("put-table-mismatch", True, _table_frame([(ref_key, 100), (K, 100)], 48 + 150), 406),
        (
            "put-lengths-wrap",  # 2^64 - 50 + 100 wraps to 50
            True,
            _table_frame([(ref_key, (1 << 64) - 50), (K, 100)], 48 + 50),
            406,
        ),
        ("put-length-2^64-1", True, _table_frame([(ref_key, (1 << 64) - 1)], 24 + 10), 406),
        # Header only: the node answers before reading the table (unread bytes could turn the
        # close into a reset that discards the reply).
        ("put-before-hello", False, header(OP_PUT, count=1, body_bytes=28), 407),
    ]


def _expect_error_reply(conn: RawConnection, status: int) -> None:
    frame = conn.read_frame()
    assert frame is not None, "connection closed without an error reply"
    (magic, _op, flags, _res, _rid, _count, got_status, _body_bytes), body = frame
    assert magic == MAGIC
    assert flags == 1, "reply is not flagged as an error"
    assert got_status == status, (got_status, body)
    assert body, "error reply without a message"
    assert conn.closed_by_peer(), "node kept the connection open after a protocol error"


@pytest.mark.parametrize(
    ("hello_first", "data", "status"),
    [case[1:] for case in BAD_FRAMES],
    ids=[case[0] for case in BAD_FRAMES],
)
def test_bad_frame_gets_an_error_reply_and_harms_nothing(
    victim: tuple[ServerProcess, list[bytes], list[bytes]],
    bystander: Bystander,
    hello_first: bool,
    data: bytes,
    status: int,
) -> None:
    node, keys, blocks = victim
    before = bystander.client.stats()
    with RawConnection(node.address) as conn:
        if hello_first:
            conn.hello()
        conn.send(data)
        _expect_error_reply(conn, status)
    bystander.wait_for_progress()
    with kvpool.Client(node.address) as c, bystander.quiet:
        assert c.get(keys) == blocks
        after = wait_until(
            lambda: (s := c.stats())["protocol_errors"] > before["protocol_errors"] and s,
            what="the protocol error to be counted",
        )
        assert after["protocol_errors"] == before["protocol_errors"] + 1
        assert after["reserved_blocks"] == 0
        assert after["evictions"] == 0


@pytest.mark.parametrize("index", range(4), ids=[c[0] for c in _bad_put_frames(K)])
def test_bad_put_frame_leaves_stored_blocks(
    victim: tuple[ServerProcess, list[bytes], list[bytes]], bystander: Bystander, index: int
) -> None:
    node, keys, blocks = victim
    _, hello_first, data, status = _bad_put_frames(keys[0])[index]
    with RawConnection(node.address) as conn:
        if hello_first:
            conn.hello()
        conn.send(data)
        _expect_error_reply(conn, status)
    bystander.wait_for_progress()
    with kvpool.Client(node.address) as c, bystander.quiet:
        assert c.get(keys) == blocks
        assert c.exists([K]) == [False]
        assert c.stats()["reserved_blocks"] == 0


@pytest.mark.parametrize("cut", [10, 32, 32 + 24, 32 + 48 + 1000, 32 + 48 + 40_000])
def test_truncated_put_then_close(
    victim: tuple[ServerProcess, list[bytes], list[bytes]], bystander: Bystander, cut: int
) -> None:
    """A PUT cut off anywhere (in the header, the table or the payloads), then closed."""
    node, keys, blocks = victim
    new = random_keys(1)[0]
    size = 32 * KiB
    frame = (
        _table_frame([(new, size), (keys[1], size)], 48 + 2 * size)
        + b"\xee" * size
        + b"\xdd" * size
    )
    with RawConnection(node.address) as conn:
        conn.hello()
        conn.send(frame[:cut])
    with kvpool.Client(node.address) as c, bystander.quiet:
        wait_until(lambda: c.stats()["reserved_blocks"] == 0, what="reservations freed")
        assert c.exists([new]) == [False]
        assert c.get(keys) == blocks
    bystander.wait_for_progress()


def test_valid_frames_still_work_on_a_raw_connection(
    victim: tuple[ServerProcess, list[bytes], list[bytes]],
) -> None:
    """The raw helper speaks the protocol correctly (so the failures above are the node's)."""
    node, keys, blocks = victim
    with RawConnection(node.address) as conn:
        version, max_keys, max_frame, _ = conn.hello()
        assert (version, max_keys, max_frame) == (1, LIMIT_KEYS, LIMIT_FRAME)
        conn.send(header(OP_GET, count=2, body_bytes=32, request_id=77) + keys[0] + K)
        frame = conn.read_frame()
        assert frame is not None
        fields, body = frame
        assert fields[1] == OP_GET and fields[2] == 0 and fields[4] == 77 and fields[5] == 2
        lengths = struct.unpack("<QQ", body[:16])
        assert lengths == (len(blocks[0]), (1 << 64) - 1)
        assert body[16:] == blocks[0]


# --- Stalled writers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_node() -> Iterator[ServerProcess]:
    node = ServerProcess(
        ["--port", "0", "--memory", "32MiB"], env={"KVPOOL_IO_TIMEOUT": "1"}
    ).wait_ready()
    yield node
    rc = node.stop()
    assert rc == 0, node.stderr


@pytest.mark.parametrize("where", ["header", "payload"])
def test_slowloris_is_disconnected_after_io_timeout(slow_node: ServerProcess, where: str) -> None:
    with kvpool.Client(slow_node.address) as c, RawConnection(slow_node.address) as idle:
        idle.hello()  # an idle connection between frames is not a slow one
        prior = c.stats()
        keys = random_keys(2)
        with RawConnection(slow_node.address) as slow:
            slow.hello()
            frame = _table_frame([(keys[0], 256 * KiB), (keys[1], 256 * KiB)], 48 + 512 * KiB)
            frame += b"\x01" * (256 * KiB + 100)
            slow.send(frame[:20] if where == "header" else frame)
            stalled_at = time.monotonic()
            if where == "payload":
                wait_until(lambda: c.stats()["reserved_blocks"] == 2, what="2 reservations")
                assert c.exists(keys) == [False, False]
            # Other clients are served while the writer stalls.
            other = random_keys(1)
            t = time.monotonic()
            assert c.put(other, [b"fine"]) == 1 and c.get(other) == [b"fine"]
            assert time.monotonic() - t < 0.5
            assert slow.closed_by_peer(timeout=5.0), "stalled writer was never disconnected"
            waited = time.monotonic() - stalled_at
        assert 0.8 <= waited <= 4.0, waited
        after = wait_until(lambda: (s := c.stats())["reserved_blocks"] == 0 and s)
        assert c.exists(keys) == [False, False]
        assert after["used_bytes"] == prior["used_bytes"] + 4096  # just the b"fine" block
        # The idle connection outlived the stalled one and still works.
        idle.send(header(OP_STATS, request_id=5))
        frame = idle.read_frame()
        assert frame is not None and frame[0][2] == 0 and frame[0][4] == 5


def test_dripping_writer_is_disconnected_after_io_timeout(slow_node: ServerProcess) -> None:
    """A frame must complete within io_timeout even if bytes keep trickling in."""
    with RawConnection(slow_node.address) as slow:
        slow.hello()
        key = random_keys(1)[0]
        slow.send(_table_frame([(key, 64 * KiB)], 24 + 64 * KiB))
        started = time.monotonic()
        closed = threading.Event()
        pace = threading.Event()  # never set: its wait() paces the drip

        def drip() -> None:
            try:
                while not closed.is_set() and time.monotonic() - started < 6:
                    slow.send(b"\x02" * 16)
                    pace.wait(0.1)
            except OSError:
                pass

        t = threading.Thread(target=drip, daemon=True)
        t.start()
        try:
            assert slow.closed_by_peer(timeout=6.0)
        finally:
            closed.set()
            t.join()
        assert 0.8 <= time.monotonic() - started <= 4.0
    with kvpool.Client(slow_node.address) as c:
        wait_until(lambda: c.stats()["reserved_blocks"] == 0)
        assert c.exists([key]) == [False]


# --- Limits and restarts --------------------------------------------------------------------------


def test_connection_limit(start_node: ServerFactory) -> None:
    node = start_node(env={"KVPOOL_MAX_CONNECTIONS": "2"})
    a, b = RawConnection(node.address), RawConnection(node.address)
    a.hello()
    b.hello()
    started = time.monotonic()
    with pytest.raises(kvpool.KVPoolError):
        kvpool.Client(node.address, connect_timeout=2.0)
    assert time.monotonic() - started < 2.0
    a.close()
    # Once a slot frees up, new clients get in again.
    c = wait_until(lambda: _try_connect(node.address), what="a free connection slot")
    key = random_keys(1)
    assert c.put(key, [b"x"]) == 1
    c.close()
    b.close()


def _try_connect(address: str) -> kvpool.Client | None:
    try:
        return kvpool.Client(address, connect_timeout=1.0)
    except kvpool.KVPoolError:
        return None


def test_server_restart_on_the_same_port(start_node: ServerFactory) -> None:
    node = start_node(memory="32MiB")
    port = node.port
    client = kvpool.Client(node.address, timeout=2.0)
    keys = random_keys(8)
    blocks = [payload(f"restart/{i}", 20 * KiB) for i in range(8)]
    assert client.put(keys, blocks) == 8

    # Leave several idle pooled connections behind.
    def use() -> None:
        assert client.get(keys) == blocks

    threads = [threading.Thread(target=use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert node.stop() == 0
    started = time.monotonic()
    with pytest.raises(kvpool.KVPoolConnectionError):
        client.get(keys)
    assert time.monotonic() - started < 2.0

    node2 = start_node(memory="32MiB", port=port)
    assert node2.port == port
    # The same client object: the node came back empty, and every call works again (each
    # pooled connection is dead and must be replaced transparently).
    for _ in range(2):
        assert client.get(keys) == [None] * 8
    # Concurrent calls take the remaining dead pooled connections: each must recover too.
    errors: list[BaseException] = []

    def use_after_restart() -> None:
        try:
            assert client.get(keys) == [None] * 8
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=use_after_restart) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert client.exists(keys) == [False] * 8
    assert client.put(keys, blocks) == 8
    assert client.get(keys) == blocks
    s = client.stats()
    assert s["entries"] == 8 and s["stored"] == 8
    client.close()
