"""Fixtures that run real ``kvpool server`` processes on free ports.

Every node is a subprocess of the installed ``kvpool`` entry point, started with ``--port 0``.
Readiness is the "kvpool server listening on HOST:PORT" line on its stderr (awaited with a
deadline, never a sleep); stopping is by PID: SIGTERM, then SIGKILL if it does not exit in time.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import kvpool
import kvpool.local
import pytest

# The wire protocol by hand (tests/python/wire.py), re-exported for the tests.
from wire import (  # noqa: F401
    HEADER,
    MAGIC,
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
    parse_exts,
)

START_TIMEOUT_S = 60.0  # generous: the first import of an editable install may rebuild the core
STOP_TIMEOUT_S = 10.0
_READY = re.compile(r"kvpool server listening on (\S+):(\d+)")


def kvpool_command() -> list[str]:
    """The ``kvpool`` console script next to this interpreter (``python -m kvpool`` otherwise)."""
    exe = Path(sys.executable).with_name("kvpool")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "kvpool"]


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for kvpool subprocesses: no stray ``KVPOOL_*`` settings from the caller,
    and the editable install's rebuild check kept quiet so it cannot pollute stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVPOOL_")}
    env["SKBUILD_EDITABLE_VERBOSE"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_kvpool(
    args: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Runs ``kvpool ARGS`` to completion and returns its result (text stdout/stderr)."""
    return subprocess.run(
        [*kvpool_command(), *args],
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


class ServerProcess:
    """One ``kvpool server`` subprocess. Its output is drained by threads (so logging can never
    block the node) and kept for assertions."""

    def __init__(self, args: Sequence[str], *, env: Mapping[str, str] | None = None) -> None:
        self.args = list(args)
        self.host: str | None = None
        self.port: int | None = None
        self._cond = threading.Condition()
        self._stderr: list[str] = []
        self._stdout: list[str] = []
        self._stderr_closed = False
        self.proc = subprocess.Popen(
            [*kvpool_command(), "server", *self.args],
            env=child_env(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,  # a Ctrl-C at the terminal reaches pytest, not the nodes
        )
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stderr, True), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stdout, False), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pump(self, stream: Any, is_stderr: bool) -> None:
        for line in stream:
            with self._cond:
                (self._stderr if is_stderr else self._stdout).append(line)
                m = _READY.search(line) if is_stderr and self.port is None else None
                if m:
                    self.host, self.port = m.group(1), int(m.group(2))
                    self._cond.notify_all()
        with self._cond:
            if is_stderr:
                self._stderr_closed = True
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> str:
        assert self.port is not None, "node is not ready"
        return f"{self.host}:{self.port}"

    @property
    def stderr(self) -> str:
        with self._cond:
            return "".join(self._stderr)

    @property
    def stdout(self) -> str:
        with self._cond:
            return "".join(self._stdout)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> ServerProcess:
        with self._cond:
            self._cond.wait_for(lambda: self.port is not None or self._stderr_closed, timeout)
            ready = self.port is not None
        if not ready:
            self.kill()
            raise RuntimeError(
                f"kvpool server {self.args} did not become ready within {timeout} s "
                f"(exit code {self.proc.returncode}); stderr:\n{self.stderr}"
            )
        return self

    def running(self) -> bool:
        return self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        """Sends ``sig`` and waits for the exit code; SIGKILLs and fails if the node hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(
                    f"kvpool server (pid {self.pid}) ignored {signal.Signals(sig).name} for "
                    f"{timeout} s; killed. stderr:\n{self.stderr}"
                ) from None
        self._join()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._join()

    def _join(self) -> None:
        for t in self._threads:
            t.join(5.0)


ServerFactory = Callable[..., ServerProcess]


def _server_args(memory: str, eviction: str | None, extra: Sequence[str], port: int) -> list[str]:
    args = ["--port", str(port), "--memory", memory, "--log-level", "info"]
    if eviction is not None:
        args += ["--eviction", eviction]
    return [*args, *extra]


@pytest.fixture(scope="session")
def shared_node() -> Iterator[ServerProcess]:
    """One node for the whole session (256 MiB, defaults otherwise). Tests that use it pick
    random keys, so they never see each other's blocks."""
    node = ServerProcess(_server_args("256MiB", None, [], 0)).wait_ready()
    yield node
    rc = node.stop()
    assert rc == 0, f"shared node exited with {rc}; stderr:\n{node.stderr}"


@pytest.fixture
def start_node() -> Iterator[ServerFactory]:
    """Factory for nodes of a test's own: ``start_node(memory="16MiB", eviction="lru",
    extra=[...], env={...}, port=0)``. Nodes still running at the end of the test are stopped
    with SIGTERM and must exit with code 0."""
    nodes: list[ServerProcess] = []

    def start(
        *,
        memory: str = "64MiB",
        eviction: str | None = None,
        extra: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        port: int = 0,
        wait: bool = True,
    ) -> ServerProcess:
        node = ServerProcess(_server_args(memory, eviction, extra, port), env=env)
        nodes.append(node)
        return node.wait_ready() if wait else node

    yield start
    failures = []
    for node in nodes:
        if node.running():
            rc = node.stop()
            if rc != 0:
                failures.append(f"node {node.args} exited with {rc}:\n{node.stderr}")
        else:
            node.kill()  # reap it and its output threads
    assert not failures, "\n".join(failures)


@pytest.fixture
def client(shared_node: ServerProcess) -> Iterator[kvpool.Client]:
    with kvpool.Client(shared_node.address) as c:
        yield c


# ---------------------------------------------------------------------------------------------
# Helpers shared by the test modules.


def random_keys(n: int) -> list[bytes]:
    return [os.urandom(16) for _ in range(n)]


def wait_until(
    predicate: Callable[[], Any], *, timeout: float = 10.0, interval: float = 0.01, what: str = ""
) -> Any:
    """Polls ``predicate`` until it returns something truthy, failing after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


def assert_nothing_held(client: kvpool.Client) -> dict[str, Any]:
    """No reservation or pin is left behind (waits for the node to notice dead peers); returns
    the node's stats from then."""
    stats: dict[str, Any] = wait_until(
        lambda: (s := client.stats())["reserved_bytes"] == 0 and s["pinned_bytes"] == 0 and s,
        what="reservations and pins released",
    )
    return stats


# A client killed mid-call (test_transports.py): the node must let go of everything it held.

_CALL_LOOP = textwrap.dedent(
    """
    import os, sys, kvpool
    address, transport, op = sys.argv[1], sys.argv[2], sys.argv[3]
    c = kvpool.Client(address, transport=transport, timeout=60)
    assert c.transport == transport, c.transport
    size, n = 1 << 20, 32
    # Half the blocks in the arena (moved by the node on shm and rdma, inline on tcp), half in
    # ordinary memory (inline on the socket on every transport, so the node waits on this
    # process mid-frame: where a kill must leave nothing).
    staged = [c.staging_buffer(size) for _ in range(n // 2)]
    for b in staged:
        b[:] = os.urandom(size)
    plain = [bytearray(os.urandom(size)) for _ in range(n // 2)]
    bufs = [b for pair in zip(staged, plain) for b in pair]
    keys = [os.urandom(16) for _ in range(n)]
    assert c.put(keys, bufs) == n
    print("ready", flush=True)
    while True:
        if op == "put":
            fresh = [os.urandom(16) for _ in range(n)]  # new keys: every PUT reserves
            c.put(fresh, bufs)
            c.delete(fresh)  # the pool never fills, so nothing of the test's is ever evicted
        else:
            c.get_into(keys, bufs)
    """
)
_BUSY = {"put": "reserved_bytes", "get": "pinned_bytes"}


def kill_client_mid_call(
    address: str,
    observer: kvpool.Client,
    op: str,
    transport: str,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Kills a client process in the middle of a call and waits for the node to let go of it.

    A child (environment ``child_env(env)``) connects to the node at ``address`` over
    ``transport`` and loops ``op``: "put" (32 blocks of 1 MiB under fresh keys) or "get" (the 32
    it stored first). It is frozen (SIGSTOP) until ``observer`` sees the node holding
    reservations (put: waiting for inline payloads) or pins (get: blocked sending to it), with
    the child's connection open on ``transport``; then SIGKILLed, and always reaped. Returns the
    node's stats once no reservation or pin is left and the node has dropped the child's
    connections (those of ``transport`` are back to the count before the child: the observer's
    own, none on another transport)."""
    busy = _BUSY[op]
    before = observer.stats()["transports"][transport]["connections"]
    assert before == (1 if observer.transport == transport else 0), before
    with tempfile.TemporaryFile() as err:
        child = subprocess.Popen(
            [sys.executable, "-c", _CALL_LOOP, address, transport, op],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            env=child_env(env),
        )

        def child_stderr() -> str:
            err.seek(0)
            return err.read().decode(errors="replace")

        try:
            assert child.stdout is not None
            ready, _, _ = select.select([child.stdout], [], [], START_TIMEOUT_S)
            line = child.stdout.readline() if ready else b"(nothing)"
            assert line.strip() == b"ready", f"child said {line!r}; stderr:\n{child_stderr()}"
            # Freeze the child until it is caught mid-call; the kill lands while the node holds.
            for _ in range(2000):
                child.send_signal(signal.SIGSTOP)
                time.sleep(0.02)  # let the node reach the point where it waits on the child
                if observer.stats()[busy] > 0:
                    break
                child.send_signal(signal.SIGCONT)
                time.sleep(0.003)
            caught = observer.stats()
            assert caught[busy] > 0, f"never caught the child mid-{op}; stderr:\n{child_stderr()}"
            assert caught["transports"][transport]["connections"] > before, caught["transports"]
        finally:
            child.kill()
            child.wait()
            if child.stdout is not None:
                child.stdout.close()
    released = assert_nothing_held(observer)
    wait_until(
        lambda: observer.stats()["transports"][transport]["connections"] == before,
        what=f"the node to drop the dead client's {transport} connections",
    )
    return released


free_port = kvpool.local.free_port


class RawConnection:
    """A bare TCP connection to a node."""

    def __init__(self, address: str, timeout: float = 5.0) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes | None:
        """``n`` bytes, or None when the node closed (or reset) the connection first."""
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def read_frame(self) -> tuple[tuple[int, ...], bytes] | None:
        """(header fields, body) of the next reply, or None when the connection closed."""
        raw = self.recv_exact(HEADER.size)
        if raw is None:
            return None
        fields = HEADER.unpack(raw)
        body = self.recv_exact(fields[7]) if fields[7] else b""
        if body is None:
            return None
        return fields, body

    def hello(self) -> tuple[int, int, int, int]:
        """Handshake; returns the node's (version, max_batch_keys, max_frame_bytes,
        max_block_bytes)."""
        self.send(header(OP_HELLO, body_bytes=8) + struct.pack("<II", 1, 1))
        frame = self.read_frame()
        assert frame is not None, "node closed the connection on HELLO"
        fields, body = frame
        assert fields[0] == MAGIC and fields[1] == OP_HELLO and fields[2] == 0, fields
        return struct.unpack("<IIQQ", body)

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True when the node closes the connection within ``timeout`` s (any data it still
        sends is drained first)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Redis: real ``redis-server`` processes on free ports (cluster metadata tests).

REDIS_START_TIMEOUT_S = 10.0


class RedisProcess:
    """One ``redis-server`` on 127.0.0.1 (no persistence, so a restart comes back empty), also
    listening on the unix socket ``unix_socket``. Readiness is a PING answered within a
    deadline; it is stopped by PID. ``restart()`` brings up a fresh, empty server on the same
    port."""

    def __init__(self, port: int = 0, *, extra: Sequence[str] = ()) -> None:
        import tempfile

        self.extra = list(extra)
        self._dir = tempfile.mkdtemp(prefix="kvpool-redis-")
        self.unix_socket = os.path.join(self._dir, "redis.sock")
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> str:
        try:
            return Path(self._dir, "redis.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> RedisProcess:
        assert self.proc is None or self.proc.poll() is not None, "redis-server already running"
        # --dir keeps any stray file away from the working tree (kvpool.local.redis_argv: no
        # persistence, so a restart always starts empty).
        argv = kvpool.local.redis_argv(
            self.port,
            extra=[
                "--dir", self._dir,
                "--unixsocket", self.unix_socket,
                "--unixsocketperm", "700",
                "--logfile", os.path.join(self._dir, "redis.log"),
                "--daemonize", "no",
                *self.extra,
            ],
        )  # fmt: skip
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
        )
        try:
            kvpool.local.wait_for_redis(self.port, self.proc, REDIS_START_TIMEOUT_S)
        except kvpool.KVPoolError as e:
            self.kill()
            raise RuntimeError(f"{e}:\n{self.log}") from None
        return self

    def client(self, **kwargs: Any) -> Any:
        """A redis-py client of this server (TCP)."""
        import redis

        kwargs.setdefault("socket_timeout", 5.0)
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the data is gone; the port is free again once this returns."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM (SIGKILL after STOP_TIMEOUT_S)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> RedisProcess:
        """Kills the server (if running) and starts a fresh, empty one on the same port."""
        self.kill()
        return self.start()

    def cleanup(self) -> None:
        import shutil

        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    """One redis-server for the session. Tests that use it pick their own cluster names (see
    ``cluster_name``), so they never see each other's keys."""
    server = RedisProcess()
    yield server
    server.cleanup()


RedisFactory = Callable[..., RedisProcess]


@pytest.fixture
def start_redis() -> Iterator[RedisFactory]:
    """Factory for redis-servers of a test's own (``start_redis(port=0, extra=[...])``, extra
    being more redis-server arguments), e.g. to kill and restart; all are stopped at the end of
    the test."""
    servers: list[RedisProcess] = []

    def start(port: int = 0, extra: Sequence[str] = ()) -> RedisProcess:
        server = RedisProcess(port, extra=extra)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.cleanup()


def cluster_name(prefix: str = "t") -> str:
    """A cluster name no other test uses."""
    return f"{prefix}{os.urandom(6).hex()}"


@pytest.fixture
def start_cluster_node(start_node: ServerFactory) -> ServerFactory:
    """Factory for ``kvpool server`` nodes that join a cluster:
    ``start_cluster_node(redis_url, cluster, memory="64MiB", lease_ttl=1.0, port=0, extra=[...],
    env={...})``.
    Same teardown as ``start_node`` (nodes still running are SIGTERMed and must exit 0)."""

    def start(
        redis_url: str,
        cluster: str,
        *,
        memory: str = "64MiB",
        lease_ttl: float = 1.0,
        port: int = 0,
        eviction: str | None = None,
        extra: Sequence[str] = (),
        wait: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> ServerProcess:
        args = ["--redis", redis_url, "--cluster", cluster, "--lease-ttl", str(lease_ttl)]
        return start_node(
            memory=memory, eviction=eviction, port=port, wait=wait, extra=[*args, *extra], env=env
        )

    return start
