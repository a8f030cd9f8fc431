"""Many connections with the defaults: a ``kvpool server`` started with a soft descriptor limit
of 1024 (a common default) raises it itself and holds 10,000 idle connections while an active
client is served exactly; and the limit logic on its own."""

from __future__ import annotations

import os
import resource
import socket
import struct

import kvpool
import pytest
from conftest import HEADER, OP_HELLO, ServerProcess, header, random_keys, wait_until
from kvpool.server import FD_RESERVE, ensure_fd_limit

IDLE = 10_000


def test_the_soft_limit_is_raised_up_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1000 + FD_RESERVE:
        pytest.skip(f"the hard descriptor limit here is {hard}")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        assert ensure_fd_limit(1000) == ""
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 1000 + FD_RESERVE
        assert ensure_fd_limit(10) == ""  # never lowered
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 1000 + FD_RESERVE
        if hard != resource.RLIM_INFINITY:
            why = ensure_fd_limit(hard)  # needs hard + reserve: more than may be had
            assert f"max_connections {hard} needs {hard + FD_RESERVE} open descriptors" in why
            assert f"hard limit (ulimit -Hn) is {hard}" in why
            assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_ten_thousand_idle_connections_with_the_default_settings() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * IDLE + 2 * FD_RESERVE  # the node's and this process's, on one host
    if hard != resource.RLIM_INFINITY and hard < IDLE + 2 * FD_RESERVE:
        pytest.skip(f"the hard descriptor limit here is {hard}, under {need}")
    # The node inherits a soft limit of 1024 and must raise it itself.
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        node = ServerProcess(["--port", "0", "--memory", "64MiB"])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    idle: list[socket.socket] = []
    try:
        node.wait_ready()
        host, port = node.address.rsplit(":", 1)
        hello = header(OP_HELLO, body_bytes=8) + struct.pack("<II", 1, 1)
        for _ in range(IDLE):
            s = socket.create_connection((host, int(port)), timeout=30)
            s.sendall(hello)
            idle.append(s)
        for s in idle:  # every one got its HELLO answered (none refused or closed)
            reply = s.recv(HEADER.size, socket.MSG_WAITALL)
            assert len(reply) == HEADER.size and HEADER.unpack(reply)[2] == 0
            s.recv(HEADER.unpack(reply)[7], socket.MSG_WAITALL)
        with kvpool.Client(node.address, transport="tcp") as c:
            keys = random_keys(64)
            blocks = [os.urandom(4096) for _ in keys]
            assert c.put(keys, blocks) == len(keys)
            assert c.get(keys) == blocks
            stats = c.stats()
        assert stats["connections"] == IDLE + 1
        assert stats["connections_rejected"] == 0
        assert "descriptors" not in node.stderr  # no limit warning
    finally:
        for s in idle:
            s.close()
        if node.running():
            wait_until(
                lambda: kvpool.Client(node.address, transport="tcp").stats()["connections"] <= 1,
                timeout=60,
                what="idle connections closed",
            )
            assert node.stop() == 0, node.stderr
        else:
            node.kill()
