"""What the cluster benchmark's phases share: the plan, starting nodes, waiting, keys, stats."""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _util import ProcessSet, Service, log, percentile

HOST = "127.0.0.1"
BENCH_DIR = Path(__file__).resolve().parents[1]
RESULTS = BENCH_DIR / "results"
KIB = 1 << 10
LOAD_NOTE = (
    "shared 2-core machine: other sessions may run builds/tests at the same time, so absolute "
    "figures carry that load (see loadavg per phase)"
)


class BenchError(RuntimeError):
    """A wrong answer (miss, corrupt block, exception) that voids a phase's numbers."""


# --------------------------------------------------------------------------------------------
# Plan


@dataclass(frozen=True)
class Plan:
    lookups: int  # timed lookups per variant
    lookup_filler_keys: int  # index keys added for the large-index measurement (at least
    # twice Redis's hash-max-listpack-entries per partition)
    warmup_lookups: int
    server_lookups: int  # per kind, for Redis CPU / command time
    prefixes: tuple[int, ...]
    block_bytes: int
    batch: int
    threads: tuple[int, ...]
    working_set_blocks: int
    round_batches: int  # batches per measured round, all threads together
    rounds: int
    upkeep_blocks: int
    upkeep_block_bytes: int
    upkeep_batch: int
    lease_ttl: float
    failover_before_s: float
    failover_after_s: float
    memory_3: str  # per node of the 3-node cluster
    memory_1: str  # the single node
    memory_upkeep: str


def make_plan(args: argparse.Namespace) -> Plan:
    quick = bool(args.quick)
    lookups = args.lookups if args.lookups is not None else (200 if quick else 1000)
    return Plan(
        lookups=lookups,
        lookup_filler_keys=0 if quick else 32768,
        warmup_lookups=max(20, lookups // 10),
        server_lookups=min(lookups, 300),
        prefixes=(64, 1024),
        block_bytes=256 * KIB,
        batch=args.batch,
        threads=tuple(int(x) for x in args.threads.split(",") if x.strip()),
        working_set_blocks=128 if quick else 512,
        round_batches=8 if quick else 48,
        rounds=2 if quick else 5,
        upkeep_blocks=args.upkeep_blocks
        if args.upkeep_blocks is not None
        else (5000 if quick else 20000),
        upkeep_block_bytes=4 * KIB,
        upkeep_batch=args.upkeep_batch,
        lease_ttl=args.lease_ttl,
        failover_before_s=1.0,
        failover_after_s=1.0 if quick else 2.0,
        memory_3="256MiB",
        memory_1="384MiB",
        memory_upkeep="192MiB",
    )


# --------------------------------------------------------------------------------------------
# Processes


@dataclass
class Node:
    cluster: str
    service: Service
    address: str
    node_id: str
    incarnation: int


def start_nodes(
    procs: ProcessSet, cluster: str, count: int, redis_url: str, memory: str, ttl: float
) -> list[Node]:
    """Starts ``count`` nodes at once, then waits for each to listen and to join."""
    argv = [sys.executable, "-m", "kvpool", "server", "--port", "0", "--memory", memory]
    argv += ["--log-level", "info", "--redis", redis_url, "--cluster", cluster]
    argv += ["--lease-ttl", str(ttl)]
    services = [procs.start(f"kvpool node {cluster}/{i}", argv) for i in range(count)]
    nodes = []
    for s in services:
        m = s.wait_for_line(r"listening on ([0-9.]+):(\d+)", timeout=180)
        j = s.wait_for_line(r"joined cluster \S+ as (\S+)@(\d+)", timeout=60)
        nodes.append(Node(cluster, s, f"{m.group(1)}:{m.group(2)}", j.group(1), int(j.group(2))))
    desc = ", ".join(f"{n.node_id}@{n.incarnation} {n.address} pid {n.service.pid}" for n in nodes)
    log(f"cluster {cluster!r}: {count} node(s) of {memory} joined: {desc}")
    return nodes


def wait_until(what: str, cond: Callable[[], bool], timeout: float, every: float = 0.01) -> float:
    """Polls ``cond`` until true; returns the seconds it took; BenchError after ``timeout``."""
    t0 = time.perf_counter()
    while not cond():
        if time.perf_counter() - t0 > timeout:
            raise BenchError(f"{what}: not reached within {timeout:.0f}s")
        time.sleep(every)
    return time.perf_counter() - t0


def wait_members(cluster: Any, count: int, timeout: float = 30.0) -> None:
    wait_until(f"{count} members", lambda: len(cluster.members()) == count, timeout, 0.05)


def wait_indexed(cluster: Any, keys: list[bytes], timeout: float = 60.0) -> float:
    return wait_until(
        f"index holds {len(keys)} keys", lambda: cluster.match_prefix(keys) == len(keys), timeout
    )


# --------------------------------------------------------------------------------------------
# Keys, data, statistics, report formatting


def key_of(tag: str, i: int) -> bytes:
    return hashlib.blake2b(f"{tag}/{i}".encode(), digest_size=16).digest()


def put_all(cluster: Any, keys: list[bytes], blocks: Sequence[Any], batch: int) -> None:
    for start in range(0, len(keys), batch):
        ks = keys[start : start + batch]
        held = cluster.put(ks, blocks[start : start + batch])
        if held != len(ks):
            raise BenchError(f"Cluster.put held {held} of {len(ks)} blocks")


def lat_dict(seconds: Sequence[float]) -> dict[str, float]:
    ms = [s * 1e3 for s in seconds]
    return {
        "count": len(ms),
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "mean_ms": sum(ms) / len(ms) if ms else math.nan,
        "max_ms": max(ms, default=math.nan),
    }


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def fmt(x: Any, spec: str = ".2f") -> str:
    """``x`` in ``spec``; "-" for None or NaN (a window without calls, a node without blocks)."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_failed(section: dict[str, Any] | None) -> bool:
    """Prints the FAILED line of a phase that raised or did not run; True if it printed one."""
    if section and "error" not in section:
        return False
    print(f"   FAILED: {section.get('error') if section else 'not run'}")
    return True
