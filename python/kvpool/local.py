"""``kvpool local``: a node in this process and a demo workload that shows prefix reuse."""

from __future__ import annotations

import logging
import os
import signal
import time

from kvpool.client import Client
from kvpool.config import ServerConfig, parse_size
from kvpool.keys import Namespace, block_keys
from kvpool.server import LocalServer

log = logging.getLogger(__name__)

# A block the size of one vLLM block of a small model: 16 tokens x 2 (K, V) x 8 layers x
# 4 heads x 128 dims x 2 bytes = 256 KiB.
_BLOCK_TOKENS = 16
_BLOCK_BYTES = 256 << 10


def run_local(
    *, serve_forever: bool = False, memory: str = "512MiB", prompt_tokens: int = 16384
) -> int:
    config = ServerConfig(port=0, memory=parse_size(memory, name="--memory"))
    with LocalServer(config) as node:
        print(f"kvpool local: node listening on {node.address} with {config.memory >> 20} MiB")
        with Client(node.address) as client:
            _demo(client, prompt_tokens)
        if serve_forever:
            print("serving until Ctrl-C ...", flush=True)
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    return 0


def _demo(client: Client, prompt_tokens: int) -> None:
    ns = Namespace(model="demo-model", dtype="bfloat16", block_tokens=_BLOCK_TOKENS)
    shared = list(range(1000, 1000 + prompt_tokens))
    t = time.perf_counter()
    keys_a = block_keys(shared + [7] * 64, ns)
    hash_ms = (time.perf_counter() - t) * 1e3
    print(f"engine A: {len(keys_a)} block keys for {len(shared) + 64} tokens in {hash_ms:.2f} ms")

    blocks = [os.urandom(_BLOCK_BYTES) for _ in range(min(len(keys_a), 64))]
    payload = [blocks[i % len(blocks)] for i in range(len(keys_a))]
    t = time.perf_counter()
    stored = 0
    for i in range(0, len(keys_a), 32):
        stored += client.put(keys_a[i : i + 32], payload[i : i + 32])
    put_s = time.perf_counter() - t
    mib = len(keys_a) * _BLOCK_BYTES / 2**20
    print(
        f"engine A: stored {stored} blocks ({mib:.0f} MiB) in {put_s * 1e3:.0f} ms "
        f"({mib / put_s:.0f} MiB/s)"
    )

    # Engine B sees the same prefix with a different suffix: every shared block is reusable.
    keys_b = block_keys(shared + [9] * 64, ns)
    hit = client.match_prefix(keys_b)
    print(
        f"engine B: {hit} of {len(keys_b)} blocks already in kvpool "
        f"({hit * _BLOCK_TOKENS} of {len(keys_b) * _BLOCK_TOKENS} tokens need no prefill)"
    )
    buffers = [bytearray(_BLOCK_BYTES) for _ in range(32)]
    t = time.perf_counter()
    loaded = 0
    for i in range(0, hit, 32):
        chunk = keys_b[i : min(hit, i + 32)]
        ok = client.get_into(chunk, buffers[: len(chunk)])
        loaded += sum(ok)
        for j, good in enumerate(ok):
            if good and bytes(buffers[j]) != payload[i + j]:
                raise SystemExit(f"block {i + j} came back with different bytes")
    get_s = time.perf_counter() - t
    mib = loaded * _BLOCK_BYTES / 2**20
    print(
        f"engine B: loaded {loaded} blocks ({mib:.0f} MiB) in {get_s * 1e3:.0f} ms "
        f"({mib / get_s:.0f} MiB/s), bytes verified"
    )
    stats = client.stats()
    print(
        "node: "
        + ", ".join(
            f"{k}={stats[k]}"
            for k in ("entries", "used_bytes", "capacity_bytes", "hits", "misses", "evictions")
        )
    )
