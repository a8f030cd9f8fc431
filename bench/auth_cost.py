#!/usr/bin/env python3
"""What data-plane authentication costs: two real ``kvpool server`` processes on this host, one
with an auth token and one without, measured in the same run, interleaved round by round.

- Handshake: a new ``kvpool.Client`` (TCP dial, HELLO, and with a token the AUTH round trip and
  two HMAC-SHA256 proofs on each side) plus its first call, over TCP and over shared memory;
  median and p90 per connection.
- Data path: GET and PUT of 32 x 256 KiB blocks over one warm connection; median GB/s. Auth is
  checked once per connection, so the target is "within noise" (< 2%).

Usage:  python bench/auth_cost.py [--connections N] [--rounds N] [--json-out PATH]
Results: a table on stdout, JSON in bench/results/auth_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import kvpool
from _util import Service, start_kvpool_node

TOKEN = "bench-" + os.urandom(16).hex()
BLOCK, BATCH = 256 << 10, 32
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "auth_cost.json"


def start_node(token: str | None) -> tuple[Service, str]:
    return start_kvpool_node(["--memory", "256MiB"], {"KVPOOL_AUTH_TOKEN": token} if token else {})


def handshake_ms(address: str, token: str, transport: str) -> float:
    t0 = time.perf_counter()
    with kvpool.Client(address, auth_token=token, transport=transport, max_idle_connections=0) as c:
        c.exists([b"k" * 16])
    return (time.perf_counter() - t0) * 1e3


def throughput(client: kvpool.Client, keys: list[bytes], bufs: list[memoryview], op: str) -> float:
    t0 = time.perf_counter()
    if op == "GET":
        client.get_into(keys, bufs)
    else:
        client.put([os.urandom(16) for _ in keys], bufs)
    return BLOCK * BATCH / (time.perf_counter() - t0) / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--connections", type=int, default=300, help="handshakes per cell")
    p.add_argument("--rounds", type=int, default=15, help="data-path rounds per cell")
    p.add_argument("--json-out", default=str(DEFAULT_JSON))
    args = p.parse_args()
    nodes = {"off": start_node(None), "on": start_node(TOKEN)}
    token = {"off": "", "on": TOKEN}
    report: dict[str, Any] = {"handshake_ms": {}, "gbps": {}}
    try:
        for transport in ("tcp", "shm"):
            samples: dict[str, list[float]] = {"off": [], "on": []}
            for _ in range(args.connections):  # interleaved: both see the same machine state
                for auth in ("off", "on"):
                    samples[auth].append(handshake_ms(nodes[auth][1], token[auth], transport))
            for auth, s in samples.items():
                s.sort()
                report["handshake_ms"][f"{transport}/{auth}"] = {
                    "p50": statistics.median(s),
                    "p90": s[int(0.9 * (len(s) - 1))],
                }
        clients = {
            a: kvpool.Client(nodes[a][1], auth_token=token[a], transport="shm") for a in nodes
        }
        staged = {}
        for a, c in clients.items():
            keys = [os.urandom(16) for _ in range(BATCH)]
            bufs = [c.staging_buffer(BLOCK) for _ in keys]
            for b in bufs:
                b[:] = os.urandom(BLOCK)
            c.put(keys, bufs)
            staged[a] = (keys, bufs)
        for op in ("GET", "PUT"):
            runs: dict[str, list[float]] = {"off": [], "on": []}
            for _ in range(args.rounds):
                for a in ("off", "on"):
                    runs[a].append(throughput(clients[a], *staged[a], op))
            for a, r in runs.items():
                report["gbps"][f"shm {op}/{a}"] = statistics.median(r)
        for c in clients.values():
            c.close()
    finally:
        for node, _ in nodes.values():
            node.stop()
    print(f"{'':<22}{'auth off':>12}{'auth on':>12}{'on/off':>8}")
    for transport in ("tcp", "shm"):
        off, on = (report["handshake_ms"][f"{transport}/{a}"] for a in ("off", "on"))
        for q in ("p50", "p90"):
            print(
                f"{transport + ' handshake ' + q + ' ms':<22}{off[q]:>12.3f}{on[q]:>12.3f}"
                f"{on[q] / off[q]:>8.2f}"
            )
    for op in ("GET", "PUT"):
        off, on = report["gbps"][f"shm {op}/off"], report["gbps"][f"shm {op}/on"]
        print(f"{'shm ' + op + ' GB/s (256 KiB)':<22}{off:>12.2f}{on:>12.2f}{on / off:>8.2f}")
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
