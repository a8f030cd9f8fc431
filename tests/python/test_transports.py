"""Transports against real ``kvpool server`` processes: shared memory beside TCP on one node,
exact bytes over each, clients killed mid-call, peers that lie about their arena, node restarts,
peer credentials, and v1/v2 peers talking to each other."""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import kvpool
import numpy as np
import pytest
from conftest import (
    OP_GET,
    OP_HELLO,
    OP_PUT,
    RawConnection,
    ServerFactory,
    ServerProcess,
    assert_nothing_held,
    child_env,
    ext,
    header,
    kill_client_mid_call,
    parse_exts,
    random_keys,
)

KiB = 1 << 10
MiB = 1 << 20
FLAG_DESCRIBED = 2
EXT_TRANSPORT, EXT_SHM_ENDPOINT, EXT_NODE_ID = 2, 3, 4
SHM = 1
INLINE = (1 << 64) - 1


def sealed_memfd(nbytes: int, *, seal: bool = True) -> int:
    fd = os.memfd_create("kvpool-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, nbytes)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


class RawShm:
    """A hand-made shared-memory peer: a unix connection to the node with its own memfd arena,
    to send what kvpool.Client never would."""

    def __init__(
        self, path: str, arena_bytes: int = 4 * MiB, *, claim: int | None = None, seal: bool = True
    ) -> None:
        self.fd = sealed_memfd(arena_bytes, seal=seal)
        self.arena = mmap.mmap(self.fd, arena_bytes)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5.0)
        self.sock.connect(path)
        self.raw = RawConnection.__new__(RawConnection)
        self.raw.sock = self.sock
        self.claim = arena_bytes if claim is None else claim

    def hello(self) -> tuple[tuple[int, ...], bytes] | None:
        offer = ext(EXT_TRANSPORT, bytes([SHM]) + struct.pack("<Q", self.claim))
        body = struct.pack("<II", 2, 2) + offer
        frame = header(OP_HELLO, body_bytes=len(body)) + body
        socket.send_fds(self.sock, [frame], [self.fd])
        return self.raw.read_frame()

    def put_described(self, entries: list[tuple[bytes, int, int]], request_id: int = 2) -> None:
        table = b"".join(k + struct.pack("<QQ", n, addr) for k, n, addr in entries)
        self.sock.sendall(
            header(
                OP_PUT,
                count=len(entries),
                body_bytes=len(table),
                flags=FLAG_DESCRIBED,
                request_id=request_id,
            )
            + table
        )

    def get_described(self, entries: list[tuple[bytes, int, int]], request_id: int = 3) -> None:
        table = b"".join(k + struct.pack("<QQ", addr, n) for k, addr, n in entries)
        self.sock.sendall(
            header(
                OP_GET,
                count=len(entries),
                body_bytes=len(table),
                flags=FLAG_DESCRIBED,
                request_id=request_id,
            )
            + table
        )

    def close(self) -> None:
        self.sock.close()
        self.arena.close()
        os.close(self.fd)


@pytest.fixture
def shm_node(start_node: ServerFactory) -> ServerProcess:
    return start_node(memory="64MiB")


def shm_path(node: ServerProcess) -> str:
    with kvpool.Client(node.address, transport="tcp") as c:
        path = c.stats()["shm_socket"]
    assert path, "the node serves no shared-memory socket"
    return str(path)


# --- Choosing a transport --------------------------------------------------------------------


def test_auto_takes_shared_memory_on_the_same_host(shm_node: ServerProcess) -> None:
    with (
        kvpool.Client(shm_node.address) as auto,
        kvpool.Client(shm_node.address, transport="tcp") as tcp,
    ):
        assert auto.transport == "shm"
        assert tcp.transport == "tcp"
        stats = tcp.stats()
        assert stats["transports"]["shm"]["connections"] >= 1
        assert stats["transports"]["tcp"]["connections"] >= 1
        assert "shm" in repr(auto)


def test_forcing_shm_on_a_node_without_it_is_a_clear_error(start_node: ServerFactory) -> None:
    node = start_node(extra=["--transports", "tcp"])
    with pytest.raises(kvpool.KVPoolError, match="does not serve shared memory"):
        kvpool.Client(node.address, transport="shm")
    with kvpool.Client(node.address) as c:
        assert c.transport == "tcp"  # auto falls back
    with pytest.raises(kvpool.InvalidArgumentError, match="transport 'udp'"):
        kvpool.Client(node.address, transport="udp")


def test_auto_falls_back_to_tcp_when_the_socket_is_unreachable(
    start_node: ServerFactory, tmp_path: Path
) -> None:
    sock = tmp_path / "node.sock"
    node = start_node(extra=["--shm-socket", str(sock)])
    sock.unlink()  # the node still advertises it; connecting now fails
    with kvpool.Client(node.address) as c:
        assert c.transport == "tcp"
        keys = random_keys(4)
        assert c.put(keys, [b"x" * 100] * 4) == 4
        assert c.get(keys) == [b"x" * 100] * 4
    with pytest.raises(kvpool.KVPoolConnectionError, match=str(sock)):
        kvpool.Client(node.address, transport="shm")


_FALLBACK_LOG = textwrap.dedent(
    """
    import sys, threading, kvpool
    c = kvpool.Client(sys.argv[1], max_idle_connections=0)  # every call dials anew
    for _ in range(5):
        assert c.get([bytes(16)]) == [None]
    print(c.transport)
    """
)


def test_fallback_is_logged_once_with_the_reason(start_node: ServerFactory, tmp_path: Path) -> None:
    sock = tmp_path / "node.sock"
    node = start_node(extra=["--shm-socket", str(sock)])
    sock.unlink()
    out = subprocess.run(
        [sys.executable, "-c", _FALLBACK_LOG, node.address],
        capture_output=True, text=True, env=child_env(), timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "tcp"
    lines = [ln for ln in out.stderr.splitlines() if "unavailable, using tcp" in ln]
    assert len(lines) == 1, out.stderr
    assert str(sock) in lines[0]  # the reason names the socket


def test_a_socket_answering_as_another_node_gets_no_blocks(
    start_node: ServerFactory, tmp_path: Path
) -> None:
    """A listener at the advertised path that is not the node (another node, or anything else
    of this uid) is detected by the node id and not used."""
    sock = tmp_path / "node.sock"
    node = start_node(extra=["--shm-socket", str(sock)])
    sock.unlink()  # the node keeps its socket; a stranger now owns the path
    fake = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fake.bind(str(sock))
    fake.listen(8)
    stop = threading.Event()

    def serve() -> None:
        fake.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = fake.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                msg, fds, _, _ = socket.recv_fds(conn, 4096, 4)
                for fd in fds:
                    os.close(fd)
                request_id = struct.unpack_from("<Q", msg, 8)[0]
                limits = struct.pack("<IIQQ", 2, 4096, 1 << 30, 256 << 20)
                body = limits + ext(EXT_TRANSPORT, bytes([SHM])) + ext(EXT_NODE_ID, b"x" * 16)
                conn.sendall(header(OP_HELLO, body_bytes=len(body), request_id=request_id) + body)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with kvpool.Client(node.address) as c:
            assert c.transport == "tcp"
            keys = random_keys(2)
            assert c.put(keys, [b"y" * 10] * 2) == 2
            assert c.get(keys) == [b"y" * 10] * 2
        with pytest.raises(kvpool.KVPoolConnectionError, match="does not belong to node"):
            kvpool.Client(node.address, transport="shm")
    finally:
        stop.set()
        t.join()
        fake.close()


# --- Exact bytes --------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_exact_bytes_for_random_sizes_up_to_max_block_bytes(
    start_node: ServerFactory, transport: str
) -> None:
    max_block = 3 * MiB
    node = start_node(memory="192MiB", env={"KVPOOL_MAX_BLOCK_BYTES": str(max_block)})
    rng = np.random.default_rng(7)
    sizes = [0, 1, 4095, 4096, 4097, max_block - 1, max_block] + [
        int(s) for s in rng.integers(0, max_block + 1, size=25)
    ]
    arena = kvpool.StagingArena(256 * MiB)
    with kvpool.Client(node.address, transport=transport, arena=arena) as c:
        assert c.transport == transport
        # Blocks in the arena (zero-copy on shm) and in ordinary memory (inline), in one batch.
        arena_blocks = [c.staging_buffer(n) for n in sizes]
        for buf, n in zip(arena_blocks, sizes, strict=True):
            buf[:] = rng.bytes(n)
        plain_blocks = [rng.bytes(n) for n in sizes]
        keys = random_keys(2 * len(sizes))
        blocks = [m for pair in zip(arena_blocks, plain_blocks, strict=True) for m in pair]
        assert c.put(keys, blocks) == len(keys)
        expected = [bytes(b) for b in blocks]
        assert c.get(keys) == expected
        outs = [
            c.staging_buffer(len(b)) if i % 3 else bytearray(len(b)) for i, b in enumerate(expected)
        ]
        assert c.get_into(keys, outs) == [True] * len(keys)
        assert [bytes(o) for o in outs] == expected
        # On shm the arena blocks went by copy (node <-> arena), the others inline.
        t = c.stats()["transports"]
        arena_bytes = sum(sizes)
        if transport == "shm":
            assert t["shm"]["copied_in"] == arena_bytes
            assert t["shm"]["copied_out"] == sum(len(e) for i, e in enumerate(expected) if i % 3)
        else:
            assert t["tcp"]["copied_in"] == 0 and t["tcp"]["copied_out"] == 0
        # A size mismatch is a miss and leaves an arena buffer untouched, as on TCP.
        wrong = c.staging_buffer(5)
        wrong[:] = b"stays"
        assert c.get_into([keys[-1]], [wrong]) == [False]
        assert bytes(wrong) == b"stays"
        assert_nothing_held(c)


def test_tcp_and_shm_clients_mixed_on_one_node(shm_node: ServerProcess) -> None:
    with (
        kvpool.Client(shm_node.address) as shm,
        kvpool.Client(shm_node.address, transport="tcp") as tcp,
    ):
        before = tcp.stats()["transports"]
        keys_a, keys_b = random_keys(32), random_keys(32)
        blocks_a = [os.urandom(64 * KiB) for _ in keys_a]
        staged = shm.staging_buffer(32 * 64 * KiB)
        for i in range(32):
            staged[i * 64 * KiB : (i + 1) * 64 * KiB] = os.urandom(64 * KiB)
        blocks_b = [staged[i * 64 * KiB : (i + 1) * 64 * KiB] for i in range(32)]
        assert tcp.put(keys_a, blocks_a) == 32
        assert shm.put(keys_b, blocks_b) == 32
        assert shm.get(keys_a) == blocks_a
        assert tcp.get(keys_b) == [bytes(b) for b in blocks_b]
        after = tcp.stats()["transports"]
        moved = 32 * 64 * KiB
        assert after["shm"]["bytes_in"] - before["shm"]["bytes_in"] == moved
        assert after["tcp"]["bytes_in"] - before["tcp"]["bytes_in"] == moved
        assert after["shm"]["bytes_out"] - before["shm"]["bytes_out"] == moved
        assert after["tcp"]["bytes_out"] - before["tcp"]["bytes_out"] == moved


# --- Clients that die or lie -------------------------------------------------------------------

# The environment of the node, the killed child and this process, per transport: RDMA runs on
# the software verbs provider (see test_rdma_soft.py).
KILL_ENV: dict[str, dict[str, str]] = {
    "tcp": {},
    "shm": {},
    "rdma": {"KVPOOL_RDMA_PROVIDER": "soft"},
}


@pytest.mark.parametrize("op", ["put", "get"])
@pytest.mark.parametrize("transport", ["tcp", "shm", "rdma"])
def test_client_killed_mid_call_leaves_nothing_held(
    start_node: ServerFactory, monkeypatch: pytest.MonkeyPatch, transport: str, op: str
) -> None:
    """A client SIGKILLed while the node holds reservations (PUT) or pins (GET) for it: the node
    releases them all, drops its connections, keeps every earlier block intact and serves new
    clients of that transport."""
    env = KILL_ENV[transport]
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # for the client of this process that reconnects
    node = start_node(memory="256MiB", env=env)
    with kvpool.Client(node.address, transport="tcp") as observer:
        keep = random_keys(4)
        blocks = [os.urandom(100 * KiB) for _ in keep]
        assert observer.put(keep, blocks) == 4
        stats = kill_client_mid_call(node.address, observer, op, transport, env)
        assert stats["entries"] >= 4
        assert observer.get(keep) == blocks  # and the node keeps serving
        with kvpool.Client(node.address, transport=transport) as again:
            assert again.transport == transport
            assert again.get(keep) == blocks


def test_peer_naming_memory_outside_its_arena_is_cut_off(shm_node: ServerProcess) -> None:
    path = shm_path(shm_node)
    with kvpool.Client(shm_node.address, transport="tcp") as c:
        keep = random_keys(2)
        blocks = [b"a" * 5000, b"b" * 7000]
        assert c.put(keep, blocks) == 2
        before = c.stats()
        arena = 1 * MiB
        cases = [
            ("PUT past the end", "put", [(random_keys(1)[0], 4096, arena - 100)]),
            ("PUT offset overflows", "put", [(random_keys(1)[0], 4096, (1 << 64) - 2)]),
            (
                "PUT overlapping runs",
                "put",
                [(random_keys(1)[0], 8192, 0), (random_keys(1)[0], 4096, 4096)],
            ),
            ("GET past the end", "get", [(keep[0], arena, 1)]),
            ("GET overlapping runs", "get", [(keep[0], 0, 5000), (keep[1], 4096, 7000)]),
        ]
        for what, op, entries in cases:
            peer = RawShm(path, arena)
            try:
                frame = peer.hello()
                assert frame is not None and frame[0][2] == 0, what
                if op == "put":
                    peer.put_described(entries)
                else:
                    peer.get_described(entries)
                reply = peer.raw.read_frame()
                assert reply is not None, what
                fields, body = reply
                assert fields[2] & 1 and fields[6] == int(kvpool.ErrorCode.BAD_FRAME), (what, body)
                assert b"arena" in body or b"overlap" in body, (what, body)
                assert peer.raw.closed_by_peer(), what
            finally:
                peer.close()
        # A PUT table whose lengths disagree with its body: inline bytes announced, none sent.
        peer = RawShm(path, arena)
        try:
            assert peer.hello() is not None
            key = random_keys(1)[0]
            table = key + struct.pack("<QQ", 100, INLINE)
            peer.sock.sendall(
                header(OP_PUT, count=1, body_bytes=len(table), flags=FLAG_DESCRIBED) + table
            )
            reply = peer.raw.read_frame()
            assert reply is not None and reply[0][6] == int(kvpool.ErrorCode.BAD_FRAME)
        finally:
            peer.close()
        after = assert_nothing_held(c)
        assert after["entries"] == before["entries"] and after["stored"] == before["stored"]
        assert c.get(keep) == blocks


@pytest.mark.parametrize(
    ("what", "kwargs", "message"),
    [
        ("unsealed memfd", {"seal": False}, b"F_SEAL_SHRINK"),
        ("arena smaller than claimed", {"arena_bytes": MiB, "claim": 2 * MiB}, b"claims"),
        ("zero-byte arena", {"arena_bytes": MiB, "claim": 0}, b"0 bytes"),
    ],
)
def test_bad_arenas_are_refused_at_hello(
    shm_node: ServerProcess, what: str, kwargs: dict[str, int], message: bytes
) -> None:
    peer = RawShm(shm_path(shm_node), **kwargs)  # type: ignore[arg-type]
    try:
        frame = peer.hello()
        assert frame is not None, what
        fields, body = frame
        assert fields[2] & 1, what
        assert message in body, (what, body)
        assert peer.raw.closed_by_peer(), what
    finally:
        peer.close()


def test_shm_socket_requires_the_shm_offer(shm_node: ServerProcess) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5.0)
    sock.connect(shm_path(shm_node))
    raw = RawConnection.__new__(RawConnection)
    raw.sock = sock
    try:
        raw.send(header(OP_HELLO, body_bytes=8) + struct.pack("<II", 1, 2))
        frame = raw.read_frame()
        assert frame is not None and frame[0][2] & 1
        assert b"shm offer" in frame[1]
        assert raw.closed_by_peer()
    finally:
        sock.close()


def test_described_frames_are_refused_on_tcp(shm_node: ServerProcess) -> None:
    with RawConnection(shm_node.address) as raw:
        raw.send(header(OP_HELLO, body_bytes=8) + struct.pack("<II", 1, 2))
        frame = raw.read_frame()
        assert frame is not None and struct.unpack_from("<I", frame[1])[0] == 2
        # Even an all-inline described frame: the flag itself needs peer memory.
        table = random_keys(1)[0] + struct.pack("<QQ", 10, INLINE)
        raw.send(
            header(OP_PUT, count=1, body_bytes=len(table) + 10, flags=FLAG_DESCRIBED)
            + table
            + b"x" * 10
        )
        reply = raw.read_frame()
        assert reply is not None and reply[0][6] == int(kvpool.ErrorCode.BAD_FRAME)
        assert b"registered no peer memory" in reply[1]
        assert raw.closed_by_peer()


def test_offers_on_tcp_are_answered_with_tcp(shm_node: ServerProcess) -> None:
    with RawConnection(shm_node.address) as raw:
        for kind in (SHM, 2, 200):  # shm, rdma, a kind from the future
            offer = ext(EXT_TRANSPORT, bytes([kind]) + struct.pack("<Q", 4096))
            body = struct.pack("<II", 1, 2) + offer
            raw.send(header(OP_HELLO, body_bytes=len(body), request_id=kind) + body)
            frame = raw.read_frame()
            assert frame is not None and frame[0][2] == 0, frame
            assert parse_exts(frame[1][24:])[EXT_TRANSPORT] == b"\0"


def test_two_descriptors_at_hello_are_refused(shm_node: ServerProcess) -> None:
    peer = RawShm(shm_path(shm_node), MiB)
    extra = sealed_memfd(MiB)
    try:
        offer = ext(EXT_TRANSPORT, bytes([SHM]) + struct.pack("<Q", MiB))
        body = struct.pack("<II", 2, 2) + offer
        socket.send_fds(
            peer.sock, [header(OP_HELLO, body_bytes=len(body)) + body], [peer.fd, extra]
        )
        frame = peer.raw.read_frame()
        assert frame is not None and frame[0][2] & 1
        assert b"got 2 descriptors" in frame[1], frame[1]
    finally:
        os.close(extra)
        peer.close()


def test_an_arena_over_the_cap_is_refused(start_node: ServerFactory) -> None:
    node = start_node(env={"KVPOOL_SHM_MAX_ARENA_BYTES": "8MiB"})
    peer = RawShm(shm_path(node), 16 * MiB)
    try:
        frame = peer.hello()
        assert frame is not None and frame[0][2] & 1
        assert b"shm_max_arena_bytes is 8388608" in frame[1], frame[1]
    finally:
        peer.close()
    with pytest.raises(kvpool.KVPoolError, match="shm_max_arena_bytes"):
        kvpool.Client(node.address, transport="shm", arena=kvpool.StagingArena(16 * MiB))
    with kvpool.Client(node.address, arena=kvpool.StagingArena(16 * MiB)) as c:
        assert c.transport == "tcp"  # auto falls back
    with kvpool.Client(node.address, arena=kvpool.StagingArena(4 * MiB)) as c:
        assert c.transport == "shm"


def test_one_buffer_passed_twice_works_on_shm(shm_node: ServerProcess) -> None:
    with kvpool.Client(shm_node.address, transport="shm") as c:
        buf = c.staging_buffer(8 * KiB)
        buf[:] = os.urandom(len(buf))
        keys = random_keys(3)
        assert c.put(keys, [buf, buf, buf[: 4 * KiB]]) == 3  # overlapping runs: later ones inline
        assert c.get(keys) == [bytes(buf)] * 2 + [bytes(buf[: 4 * KiB])]
        out = c.staging_buffer(8 * KiB)
        assert c.get_into(keys[:2], [out, out]) == [True, True]
        assert bytes(out) == bytes(buf)


# --- Node restarts ------------------------------------------------------------------------------


def test_shm_clients_reconnect_after_a_node_restart(start_node: ServerFactory) -> None:
    node = start_node(memory="32MiB")
    port = node.port
    client = kvpool.Client(node.address, timeout=2.0)
    assert client.transport == "shm"
    keys = random_keys(8)
    blocks = [client.staging_buffer(20 * KiB) for _ in keys]
    for b in blocks:
        b[:] = os.urandom(len(b))
    assert client.put(keys, blocks) == 8
    assert node.stop() == 0
    with pytest.raises(kvpool.KVPoolConnectionError):
        client.get(keys)
    start_node(memory="32MiB", port=port)
    assert client.get(keys) == [None] * 8  # the node came back empty
    assert client.put(keys, blocks) == 8
    outs = [client.staging_buffer(20 * KiB) for _ in keys]
    assert client.get_into(keys, outs) == [True] * 8
    assert [bytes(o) for o in outs] == [bytes(b) for b in blocks]
    assert client.transport == "shm"
    client.close()


# --- Peer credentials ---------------------------------------------------------------------------


def as_uid(uid: int, fn: Callable[[], str]) -> str:
    """Runs ``fn`` in a forked child switched to ``uid`` (and gid) and returns what it returned.
    The child uses only modules this process has loaded (the interpreter's files may be
    unreadable to that uid)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.setgid(uid)
            os.setuid(uid)
            out = fn()
        except BaseException as e:  # noqa: BLE001
            out = f"child failed: {type(e).__name__}: {e}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    deadline = time.monotonic() + 60
    chunks = []
    with os.fdopen(r, "rb") as f:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([f], [], [], deadline - time.monotonic())
            chunk = f.read1(4096) if ready else b""
            if not chunk:
                break
            chunks.append(chunk)
    if time.monotonic() >= deadline:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
@pytest.mark.parametrize("allow", [False, True])
def test_peer_credentials_are_checked(start_node: ServerFactory, allow: bool) -> None:
    # Every directory on the way must be searchable by the other uid (pytest's tmp_path is not).
    shared = Path(tempfile.mkdtemp(prefix="kvpool-creds-", dir="/tmp"))
    shared.chmod(0o777)
    request_cleanup = shared  # removed below
    sock = shared / "node.sock"
    env = {"KVPOOL_SHM_ALLOW_UIDS": "65534"} if allow else None
    node = start_node(extra=["--shm-socket", str(sock)], env=env)
    os.chmod(sock, 0o777)

    def raw_hello() -> str:
        peer = RawShm(str(sock), MiB)
        frame = peer.hello()
        peer.close()
        if frame is None:
            return "closed"
        fields, body = frame
        return f"{fields[6]} {body.decode(errors='replace')}"

    def client_transport() -> str:
        with kvpool.Client(node.address) as c:
            return c.transport

    if allow:
        assert as_uid(65534, raw_hello).startswith("0 ")
        assert as_uid(65534, client_transport) == "shm"
    else:
        refused = as_uid(65534, raw_hello)
        assert refused.startswith(f"{int(kvpool.ErrorCode.UNAUTHORIZED)} "), refused
        assert "uid 65534" in refused
        assert as_uid(65534, client_transport) == "tcp"  # auto falls back
        assert client_transport() == "shm"  # the node's own uid is welcome
    node.stop()
    shutil.rmtree(request_cleanup)


# --- Protocol versions --------------------------------------------------------------------------


def test_v1_client_talks_to_a_v2_node(shm_node: ServerProcess) -> None:
    with RawConnection(shm_node.address) as raw:
        version, *_ = raw.hello()  # [1, 1], 8 bytes: a v1 client
        assert version == 1
        key, block = random_keys(1)[0], b"v1" * 1000
        raw.send(
            header(OP_PUT, count=1, body_bytes=24 + len(block))
            + key
            + struct.pack("<Q", len(block))
            + block
        )
        fields, body = raw.read_frame()  # type: ignore[misc]
        assert fields[2] == 0 and body == b"\0"
        raw.send(header(OP_GET, count=1, body_bytes=16, request_id=5) + key)
        fields, body = raw.read_frame()  # type: ignore[misc]
        assert body == struct.pack("<Q", len(block)) + block


def test_v2_hello_reply_carries_the_shm_endpoint(shm_node: ServerProcess) -> None:
    with RawConnection(shm_node.address) as raw:
        raw.send(header(OP_HELLO, body_bytes=8) + struct.pack("<II", 1, 2))
        fields, body = raw.read_frame()  # type: ignore[misc]
        assert struct.unpack_from("<I", body)[0] == 2
        exts = parse_exts(body[24:])
        assert exts[EXT_TRANSPORT] == b"\0"  # tcp
        assert len(exts[EXT_NODE_ID]) == 16
        host_len = struct.unpack_from("<H", exts[EXT_SHM_ENDPOINT])[0]
        host = exts[EXT_SHM_ENDPOINT][2 : 2 + host_len].decode()
        path = exts[EXT_SHM_ENDPOINT][2 + host_len :].decode()
        assert host == kvpool._core.host_id()
        assert path == shm_path(shm_node)


def test_v2_client_talks_to_a_v1_node(start_node: ServerFactory) -> None:
    node = start_node(env={"KVPOOL_PROTOCOL_VERSION": "1"})
    with RawConnection(node.address) as raw:
        raw.send(header(OP_HELLO, body_bytes=16) + struct.pack("<II", 1, 2) + b"\0" * 8)
        frame = raw.read_frame()
        assert frame is not None and frame[0][2] & 1  # a v1 node takes exactly 8 bytes
    with kvpool.Client(node.address) as c:
        assert c.transport == "tcp"
        keys = random_keys(16)
        blocks = [os.urandom(10 * KiB) for _ in keys]
        assert c.put(keys, blocks) == 16
        assert c.get(keys) == blocks
        outs = [c.staging_buffer(10 * KiB) for _ in keys]
        assert c.get_into(keys, outs) == [True] * 16
        assert [bytes(o) for o in outs] == blocks
    with pytest.raises(kvpool.KVPoolError, match="version 1"):
        kvpool.Client(node.address, transport="shm")
