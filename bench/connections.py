#!/usr/bin/env python3
"""Many connections on one node: what idle connections cost, and whether many active clients
get the throughput of a few.

One real ``kvpool server`` process with the default settings on 127.0.0.1:

- idle: ``--idle`` raw connections (TCP, HELLO answered on each) are opened and held; the node's
  resident memory (``/proc/<pid>/status`` VmRSS) before and after gives the memory per
  connection, and its thread count is read too;
- active: with the idle connections still open, ``--clients`` lists client counts (default 4 and
  256); each client is a thread with its own ``kvpool.Client(transport="tcp")`` (its own
  connection) reading batches of ``--batch`` blocks of ``--block`` bytes from a working set
  with ``get_into`` for ``--seconds``. The aggregate GB/s of each count is the median of
  ``--rounds`` rounds, the counts interleaved round by round; the ratio of each count to the
  first is the figure (target: 256 clients >= 0.9x of 4). Every round checks one block per
  client byte for byte.

Usage:  python bench/connections.py [--idle 10000] [--clients 4,256] [--seconds 3] [--rounds 3]
Results: a table on stdout, JSON in bench/results/connections.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import statistics
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

import kvpool
from _util import start_kvpool_node

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "connections.json"
HEADER = struct.Struct(
    "<IBBHQIiQ"
)  # docs/protocol.md: magic op flags reserved id count status body
MAGIC, OP_HELLO = 0x3150564B, 1


def log(msg: str) -> None:
    print(f"[connections {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def proc_status(pid: int) -> dict[str, int]:
    text = Path(f"/proc/{pid}/status").read_text()
    rss = re.search(r"VmRSS:\s+(\d+)", text)
    threads = re.search(r"Threads:\s+(\d+)", text)
    assert rss and threads
    return {"rss_bytes": int(rss.group(1)) * 1024, "threads": int(threads.group(1))}


def open_idle(address: str, n: int) -> list[socket.socket]:
    host, port = address.rsplit(":", 1)
    hello = HEADER.pack(MAGIC, OP_HELLO, 0, 0, 1, 0, 0, 8) + struct.pack("<II", 1, 1)
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=60)
        s.sendall(hello)
        socks.append(s)
    for s in socks:
        reply = s.recv(HEADER.size, socket.MSG_WAITALL)
        fields = HEADER.unpack(reply)
        if fields[2] != 0:
            raise RuntimeError("the node refused an idle connection's HELLO")
        s.recv(fields[7], socket.MSG_WAITALL)
    return socks


def active_round(
    address: str, clients: int, keys: list[bytes], blocks: list[bytes], args: argparse.Namespace
) -> float:
    """Aggregate GB/s of `clients` threads, each with its own connection, for args.seconds."""
    conns = [kvpool.Client(address, transport="tcp", timeout=60.0) for _ in range(clients)]
    moved = [0] * clients
    errors: list[str] = []
    start = threading.Barrier(clients + 1)
    stop = threading.Event()

    def run(i: int) -> None:
        c = conns[i]
        bufs = [bytearray(args.block) for _ in range(args.batch)]
        n = 0
        start.wait()
        while not stop.is_set():
            at = (i * 7 + n * args.batch) % (len(keys) - args.batch)
            batch = keys[at : at + args.batch]
            if not all(c.get_into(batch, bufs)):
                errors.append(f"client {i}: a block was missing")
                return
            moved[i] += args.batch * args.block
            n += 1
        if bytes(bufs[0]) != blocks[at]:
            errors.append(f"client {i}: wrong bytes for block {at}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(args.seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    for c in conns:
        c.close()
    if errors:
        raise RuntimeError("; ".join(errors[:3]))
    return sum(moved) / elapsed / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--idle", type=int, default=10_000, help="idle connections held (%(default)s)")
    p.add_argument("--clients", default="4,256", help="active client counts (%(default)s)")
    p.add_argument("--seconds", type=float, default=3.0, help="per round and count")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=8, help="blocks per get_into")
    p.add_argument("--block", type=int, default=256 << 10, help="bytes per block")
    p.add_argument("--json-out", default=str(DEFAULT_JSON))
    args = p.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this process holds them too
    node, address = start_kvpool_node(["--memory", "1GiB"])
    report: dict[str, Any] = {"idle": args.idle, "clients": counts, "gbps": {}}
    try:
        time.sleep(0.5)
        base = proc_status(node.pid)
        t0 = time.perf_counter()
        idle = open_idle(address, args.idle)
        opened_s = time.perf_counter() - t0
        time.sleep(0.5)
        held = proc_status(node.pid)
        per_conn = (held["rss_bytes"] - base["rss_bytes"]) / max(1, args.idle)
        report["idle_memory"] = {"before": base, "after": held, "bytes_per_connection": per_conn}
        report["idle_open_s"] = opened_s
        log(
            f"{args.idle} idle connections in {opened_s:.1f}s: RSS "
            f"{base['rss_bytes'] / 2**20:.1f} -> {held['rss_bytes'] / 2**20:.1f} MiB "
            f"({per_conn / 1024:.1f} KiB each), threads {held['threads']}"
        )
        keys = [os.urandom(16) for _ in range(512)]
        blocks = [os.urandom(args.block) for _ in keys]
        with kvpool.Client(address, transport="tcp", timeout=60.0) as c:
            if c.put(keys, blocks) != len(keys):
                raise RuntimeError("the working set did not fit")
        runs: dict[int, list[float]] = {n: [] for n in counts}
        for r in range(args.rounds):
            for n in counts:
                runs[n].append(active_round(address, n, keys, blocks, args))
                log(f"round {r + 1}: {n} clients {runs[n][-1]:.2f} GB/s")
        for n, v in runs.items():
            report["gbps"][str(n)] = {"median": statistics.median(v), "rounds": v}
        with kvpool.Client(address, transport="tcp") as c:
            report["node_stats"] = {
                k: c.stats()[k] for k in ("connections", "connections_rejected")
            }
        for s in idle:
            s.close()
    finally:
        node.stop()
    first = report["gbps"][str(counts[0])]["median"]
    print(
        f"one node, {args.idle} idle connections held; get_into of {args.batch} x "
        f"{args.block >> 10} KiB per call, {args.seconds:g} s per round, median of {args.rounds}"
    )
    print(f"{'active clients':>16}{'GB/s':>10}{'x ' + str(counts[0]):>10}")
    for n in counts:
        g = report["gbps"][str(n)]["median"]
        print(f"{n:>16}{g:>10.2f}{g / first:>10.2f}")
    mem = report["idle_memory"]
    print(f"idle connection memory: {mem['bytes_per_connection'] / 1024:.1f} KiB each (node RSS "
          f"{mem['before']['rss_bytes'] / 2**20:.1f} -> {mem['after']['rss_bytes'] / 2**20:.1f} "
          f"MiB, {mem['after']['threads']} threads)")  # fmt: skip
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
