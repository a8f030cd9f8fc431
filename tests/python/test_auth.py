"""Data-plane authentication against real nodes: correct, missing, wrong and rotated tokens
through kvpool.Client (TCP, shared memory, RDMA on the software provider) and kvpool.Cluster,
the handshake spoken by hand (docs/protocol.md, "Authentication") to check that the token never
crosses the wire and that a captured handshake cannot be replayed, and the settings."""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from pathlib import Path

import kvpool
import pytest
from conftest import (
    OP_AUTH,
    OP_GET,
    OP_HELLO,
    OP_STATS,
    RawConnection,
    RedisProcess,
    ServerFactory,
    ServerProcess,
    cluster_name,
    ext,
    header,
    parse_exts,
    random_keys,
    wait_until,
)
from kvpool.config import ConnectorConfig, ServerConfig
from kvpool.errors import ConfigError

TOKEN = "s3cret-token-0123456789abcdef"
OLD = "old-token-fedcba9876543210"
EXT_AUTH, EXT_NODE_ID = 1, 4
UNAUTHORIZED = 408


@pytest.fixture
def auth_node(start_node: ServerFactory) -> ServerProcess:
    return start_node(env={"KVPOOL_AUTH_TOKEN": TOKEN, "KVPOOL_RDMA_PROVIDER": "soft"})


def refused(node: ServerProcess) -> int:
    with kvpool.Client(node.address, auth_token=TOKEN, transport="tcp") as c:
        return int(c.stats()["auth_refused"])


@pytest.mark.parametrize("transport", ["tcp", "shm", "rdma"])
def test_the_right_token_is_served_on_every_transport(
    auth_node: ServerProcess, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVPOOL_RDMA_PROVIDER", "soft")
    with kvpool.Client(auth_node.address, auth_token=TOKEN, transport=transport) as c:
        assert c.transport == transport
        keys = random_keys(8)
        blocks = [c.staging_buffer(4096) for _ in keys]
        for b in blocks:
            b[:] = os.urandom(4096)
        assert c.put(keys, blocks) == 8
        assert c.get(keys) == [bytes(b) for b in blocks]
        assert c.stats()["auth"] is True


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_missing_and_wrong_tokens_are_refused_naming_the_node(
    auth_node: ServerProcess, transport: str
) -> None:
    with kvpool.Client(auth_node.address, auth_token=TOKEN) as c:
        keys = random_keys(4)
        assert c.put(keys, [b"kept" * 100] * 4) == 4
    before = refused(auth_node)
    with pytest.raises(kvpool.UnauthorizedError, match=f"node {auth_node.address}.*requires"):
        kvpool.Client(auth_node.address, auth_token="", transport=transport)
    with pytest.raises(kvpool.UnauthorizedError, match=f"node {auth_node.address}.*wrong"):
        kvpool.Client(auth_node.address, auth_token="not-the-token-at-all", transport=transport)
    assert refused(auth_node) == before + 2
    with kvpool.Client(auth_node.address, auth_token=TOKEN) as c:
        assert c.get(keys) == [b"kept" * 100] * 4  # refusals touched nothing


def test_the_token_comes_from_the_environment(
    auth_node: ServerProcess, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KVPOOL_AUTH_TOKEN", TOKEN)
    with kvpool.Client(auth_node.address) as c:
        assert c.exists([b"x" * 16]) == [False]
    monkeypatch.delenv("KVPOOL_AUTH_TOKEN")
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    monkeypatch.setenv("KVPOOL_AUTH_TOKEN_FILE", str(f))
    with kvpool.Client(auth_node.address) as c:
        assert c.exists([b"x" * 16]) == [False]


def test_rotation_accepts_every_token_of_the_file(
    start_node: ServerFactory, tmp_path: Path
) -> None:
    f = tmp_path / "tokens"
    f.write_text(f"{TOKEN}\n{OLD}\n")
    node = start_node(extra=["--auth-token-file", str(f)])
    for token in (TOKEN, OLD):
        with kvpool.Client(node.address, auth_token=token) as c:
            assert c.put(random_keys(1), [b"v"]) == 1
    with pytest.raises(kvpool.UnauthorizedError, match="wrong"):
        kvpool.Client(node.address, auth_token="retired-token-0000000000")


def test_a_client_with_a_token_talks_to_a_node_without(shared_node: ServerProcess) -> None:
    with kvpool.Client(shared_node.address, auth_token=TOKEN) as c:
        assert c.stats()["auth"] is False


def test_a_cluster_proves_the_token_to_every_member(
    redis_server: RedisProcess, start_node: ServerFactory
) -> None:
    name = cluster_name()
    env = {"KVPOOL_AUTH_TOKEN": TOKEN}
    args = ["--redis", redis_server.url, "--cluster", name, "--lease-ttl", "1"]
    nodes = [start_node(extra=args, env=env) for _ in range(2)]
    with kvpool.Cluster(redis_server.url, name, auth_token=TOKEN) as cluster:
        wait_until(lambda: len(cluster.members()) == 2, what="both nodes joined")
        keys = random_keys(32)
        blocks = [os.urandom(1000) for _ in keys]
        assert cluster.put(keys, blocks) == 32
        # Reads go where the index says: the nodes' agents publish it after the commit.
        wait_until(lambda: cluster.get(keys) == blocks, what="every block read back")
    with kvpool.Cluster(redis_server.url, name, auth_token="wrong-token-0000000000") as bad:
        wait_until(lambda: len(bad.members()) == 2, what="the view")
        assert bad.put(random_keys(4), [b"v"] * 4) == 0  # refused nodes: nothing stored
        assert bad.get(keys) == [None] * 32  # and nothing read
    assert sum(refused(n) for n in nodes) >= 2


# -- the handshake by hand ---------------------------------------------------------------------


def proof(token: str, role: bytes, client_nonce: bytes, node_nonce: bytes, node_id: bytes) -> bytes:
    message = b"kvpool-auth-v1 " + role + client_nonce + node_nonce + node_id
    return hmac.new(token.encode(), message, hashlib.sha256).digest()


def raw_hello(raw: RawConnection, client_nonce: bytes | None) -> tuple[bytes, bytes]:
    """A v2 HELLO with the auth extension; returns the node's (nonce, node id)."""
    body = struct.pack("<II", 2, 2)
    if client_nonce is not None:
        body += ext(EXT_AUTH, b"\x01" + client_nonce)
    raw.send(header(OP_HELLO, body_bytes=len(body)) + body)
    frame = raw.read_frame()
    assert frame is not None
    fields, reply = frame
    if fields[2]:
        return b"", reply  # an error reply: its message
    exts = parse_exts(reply[24:])
    return exts[EXT_AUTH][1:], exts[EXT_NODE_ID]


def test_the_handshake_as_documented(auth_node: ServerProcess) -> None:
    cn = os.urandom(16)
    with RawConnection(auth_node.address) as raw:
        nn, node_id = raw_hello(raw, cn)
        assert len(nn) == 16 and len(node_id) == 16
        mine = proof(TOKEN, b"client", cn, nn, node_id)
        assert TOKEN.encode() not in mine
        raw.send(header(OP_AUTH, body_bytes=32, request_id=2) + mine)
        frame = raw.read_frame()
        assert frame is not None and frame[0][2] == 0, frame
        assert frame[1] == proof(TOKEN, b"node", cn, nn, node_id)  # the node proves it too
        raw.send(header(OP_STATS, request_id=3))
        frame = raw.read_frame()
        assert frame is not None and frame[0][2] == 0  # served once authenticated


def test_a_captured_handshake_cannot_be_replayed(auth_node: ServerProcess) -> None:
    cn = os.urandom(16)
    with RawConnection(auth_node.address) as raw:
        nn, node_id = raw_hello(raw, cn)
        captured = proof(TOKEN, b"client", cn, nn, node_id)
    with RawConnection(auth_node.address) as raw:
        nn2, _ = raw_hello(raw, cn)  # the same client nonce: the node's is fresh
        assert nn2 != nn
        raw.send(header(OP_AUTH, body_bytes=32, request_id=2) + captured)
        frame = raw.read_frame()
        assert frame is not None and frame[0][2] == 1 and frame[0][6] == UNAUTHORIZED
        assert raw.closed_by_peer()


@pytest.mark.parametrize("what", ["no auth extension", "GET before AUTH", "AUTH twice"])
def test_nothing_is_served_before_auth(auth_node: ServerProcess, what: str) -> None:
    cn = os.urandom(16)
    with RawConnection(auth_node.address) as raw:
        if what == "no auth extension":
            _, message = raw_hello(raw, None)
            assert b"requires a data-plane auth token" in message
        elif what == "GET before AUTH":
            raw_hello(raw, cn)
            raw.send(header(OP_GET, count=1, body_bytes=16, request_id=2) + b"k" * 16)
            frame = raw.read_frame()
            assert frame is not None and frame[0][6] == UNAUTHORIZED
            assert b"AUTH must follow HELLO" in frame[1]
        else:
            nn, node_id = raw_hello(raw, cn)
            good = proof(TOKEN, b"client", cn, nn, node_id)
            for request_id in (2, 3):
                raw.send(header(OP_AUTH, body_bytes=32, request_id=request_id) + good)
            assert raw.read_frame() is not None  # the first passes
            frame = raw.read_frame()
            assert frame is not None and frame[0][2] == 1 and b"twice" in frame[1]
        assert raw.closed_by_peer()


# -- settings ----------------------------------------------------------------------------------


def test_token_settings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "tokens"
    f.write_text(f"\n{TOKEN}\n{OLD}\n\n")
    assert ServerConfig(auth_token_file=str(f)).auth_tokens() == [TOKEN, OLD]
    assert ServerConfig(auth_token="a" * 20, auth_token_file=str(f)).auth_tokens() == [
        "a" * 20,
        TOKEN,
        OLD,
    ]
    assert ConnectorConfig.load(env={"KVPOOL_AUTH_TOKEN_FILE": str(f)}).token() == TOKEN
    with pytest.raises(ConfigError, match=r"auth_token_file = '/nonexistent/t' cannot be read"):
        ServerConfig(auth_token_file="/nonexistent/t").validate()
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="holds no token"):
        ServerConfig(auth_token_file=str(tmp_path / "empty")).validate()
    with caplog.at_level("WARNING", logger="kvpool.config"):
        short = ServerConfig(auth_token="short")
        short.validate()  # checks without warning: the place that uses the tokens warns
        assert caplog.text == ""
        assert short.auth_tokens() == ["short"]
    assert caplog.text.count("5 bytes long: use at least 16 random bytes") == 1


def test_a_short_token_is_warned_about_once(start_node: ServerFactory) -> None:
    node = start_node(env={"KVPOOL_AUTH_TOKEN": "short"})
    assert node.stderr.count("auth_token is 5 bytes long") == 1, node.stderr
    assert "auth=1 token(s)" in node.stderr


def test_a_node_that_cannot_prove_the_token_gets_nothing() -> None:
    """A listener that plays the handshake without the token (answers AUTH with random bytes):
    the client refuses it before sending a single block."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: list[int] = []

    def impostor() -> None:
        conn, _ = listener.accept()
        with conn:
            f = conn.makefile("rb")
            h = struct.unpack("<IBBHQIiQ", f.read(32))
            f.read(h[7])
            limits = struct.pack("<IIQQ", 2, 4096, 1 << 30, 256 << 20)
            body = (
                limits + ext(2, b"\x00") + ext(4, os.urandom(16)) + ext(1, b"\x01" + os.urandom(16))
            )
            conn.sendall(header(OP_HELLO, body_bytes=len(body), request_id=h[4]) + body)
            a = struct.unpack("<IBBHQIiQ", f.read(32))
            f.read(a[7])
            conn.sendall(header(OP_AUTH, body_bytes=32, request_id=a[4]) + os.urandom(32))
            seen.extend(b[0] for b in iter(lambda: f.read(1), b""))  # anything sent after

    t = threading.Thread(target=impostor, daemon=True)
    t.start()
    try:
        with pytest.raises(kvpool.UnauthorizedError, match="did not prove the auth token"):
            kvpool.Client(f"127.0.0.1:{port}", auth_token=TOKEN, transport="tcp")
    finally:
        t.join(10)
        listener.close()
    assert seen == []  # no request followed the failed proof
