"""Phase 2 of bench/cluster.py: aggregate GET throughput.

``Cluster.get_into`` of 256 KiB blocks in batches of 32, 1 and 4 client threads (each with its own
``Cluster``; plus 4 threads sharing one), against 3 nodes and against 1 node (separate clusters),
and ``Client.get_into`` straight to the single node (no index lookup, no fan-out) as the limit.
Median of rounds; every call must find every block and the last batch of each thread and round
is compared byte for byte.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from _util import LatencyStats, log, median

from .common import (
    KIB,
    BenchError,
    Node,
    Plan,
    key_of,
    print_failed,
    put_all,
    wait_indexed,
    wait_members,
)


class Blocks:
    """Working-set contents (one random arena) and per-thread destination slots."""

    def __init__(self, count: int, size: int) -> None:
        rng = np.random.default_rng(0x6B7670)
        self.size = size
        self.count = count
        self.arena = np.frombuffer(rng.bytes(count * size), dtype=np.uint8)

    def block(self, i: int) -> np.ndarray:
        return self.arena[i * self.size : (i + 1) * self.size]


@dataclass
class Cell:
    target: str
    threads: int
    shared_client: bool
    gbps: float
    rounds_gbps: list[float]
    batch: int
    block_bytes: int
    batches_per_round: int
    latency: LatencyStats
    verified_blocks: int


def _get_round(
    conns: list[Any],
    threads: int,
    nb: int,
    starts: list[int],
    slots: list[Any],
    keys: list[bytes],
    batch: int,
) -> tuple[float, list[float]]:
    """One round: every thread reads ``nb`` batches; returns the wall time and call latencies."""
    n_ws = len(keys)
    barrier = threading.Barrier(threads)
    spans: list[tuple[float, float]] = [(0.0, 0.0)] * threads
    lats: list[list[float]] = [[] for _ in range(threads)]
    errors: list[str] = []

    def worker(t: int) -> None:
        conn = conns[t % len(conns)]
        try:
            barrier.wait()
            t0 = time.perf_counter()
            for b in range(nb):
                ks = [keys[(starts[t] + b * batch + i) % n_ws] for i in range(batch)]
                c0 = time.perf_counter()
                found = conn.get_into(ks, slots[t][b % 2])
                lats[t].append(time.perf_counter() - c0)
                if not all(found):
                    raise BenchError(f"{sum(not f for f in found)}/{batch} misses in one call")
            spans[t] = (t0, time.perf_counter())
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            errors.append(f"{type(e).__name__}: {e}")
            barrier.abort()

    ths = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    if errors:
        raise BenchError(errors[0])
    wall = max(e for _, e in spans) - min(s for s, _ in spans)
    return wall, [x for v in lats for x in v]


def run_cell(
    target: str,
    make_conn: Callable[[], Any],
    threads: int,
    shared: bool,
    keys: list[bytes],
    data: Blocks,
    plan: Plan,
) -> Cell:
    batch, size = plan.batch, data.size
    nb = max(1, math.ceil(plan.round_batches / threads))
    conns = [make_conn()] if shared else [make_conn() for _ in range(threads)]
    # Two destination slots of one batch per thread; the last batch's slot is zeroed before each
    # round and compared after it, so bytes from an earlier round cannot pass.
    slots = [
        [[np.full(size, 0x5A, dtype=np.uint8) for _ in range(batch)] for _ in range(2)]
        for _ in range(threads)
    ]
    n_ws = len(keys)
    rounds: list[float] = []
    lat: list[float] = []
    verified = 0
    try:
        for r in range(plan.rounds + 1):  # round 0 warms up
            starts = [t * n_ws // threads + r * batch * 7 for t in range(threads)]
            for t in range(threads):
                for buf in slots[t][(nb - 1) % 2]:
                    buf.fill(0)
            try:
                wall, lats = _get_round(conns, threads, nb, starts, slots, keys, batch)
            except BenchError as e:
                raise BenchError(f"{target} x{threads}: {e}") from None
            for t in range(threads):
                for i, got in enumerate(slots[t][(nb - 1) % 2]):
                    w = (starts[t] + (nb - 1) * batch + i) % n_ws
                    if not np.array_equal(got, data.block(w)):
                        raise BenchError(f"{target} x{threads}: block {w} differs")
                    verified += 1
            if r > 0:
                rounds.append(threads * nb * batch * size / wall / 1e9)
                lat.extend(lats)
    finally:
        for conn in conns:
            conn.close()
    return Cell(
        target=target,
        threads=threads,
        shared_client=shared,
        gbps=median(rounds),
        rounds_gbps=[round(x, 3) for x in rounds],
        batch=batch,
        block_bytes=size,
        batches_per_round=threads * nb,
        latency=LatencyStats.of(lat),
        verified_blocks=verified,
    )


def run(
    url: str, three: list[Node], one: list[Node], plan: Plan, nonce: str, data: Blocks
) -> dict[str, Any]:
    import kvpool
    from kvpool.cluster import Cluster

    keys = [key_of(f"{nonce}/ws", i) for i in range(data.count)]
    blocks = [data.block(i) for i in range(data.count)]
    for nodes in (three, one):
        name = nodes[0].cluster
        with Cluster(url, cluster=name, timeout=10.0) as c:
            wait_members(c, len(nodes))
            put_all(c, keys, blocks, plan.batch)
            lag = wait_indexed(c, keys)
        log(
            f"throughput: {data.count} x {data.size // KIB} KiB written to {name!r} "
            f"({lag * 1e3:.0f} ms index lag after the last put)"
        )
    targets: list[tuple[str, Callable[[], Any], bool]] = [
        (f"Cluster, {len(three)} nodes", lambda: Cluster(url, cluster=three[0].cluster), True),
        (f"Cluster, {len(one)} node", lambda: Cluster(url, cluster=one[0].cluster), True),
        ("Client direct, 1 node", lambda: kvpool.Client(one[0].address, timeout=10.0), False),
    ]
    cells: list[Cell] = []
    failed: list[dict[str, Any]] = []
    for label, make, can_share in targets:
        for threads in plan.threads:
            modes = [False] + ([True] if can_share and threads > 1 else [])
            for shared in modes:
                t0 = time.perf_counter()
                try:
                    cell = run_cell(label, make, threads, shared, keys, data, plan)
                except BenchError as e:  # a wrong answer voids this cell, not the phase
                    failed.append(
                        {
                            "target": label,
                            "threads": threads,
                            "shared_client": shared,
                            "error": str(e),
                        }
                    )
                    log(f"throughput: {label} x{threads}{' shared' if shared else ''}: FAILED: {e}")
                    continue
                cells.append(cell)
                log(
                    f"throughput: {label} x{threads}{' shared' if shared else ''}: "
                    f"{cell.gbps:.2f} GB/s ({time.perf_counter() - t0:.1f}s)"
                )
    by = {(c.target, c.threads, c.shared_client): c for c in cells}
    ratios: dict[str, float] = {}
    for threads in plan.threads:
        for shared in (False, True):
            a = by.get((targets[0][0], threads, shared))
            b = by.get((targets[1][0], threads, shared))
            d = by.get((targets[2][0], threads, False))
            tag = f"x{threads}{' shared' if shared else ''}"
            if a and b:
                ratios[f"3 nodes / 1 node {tag}"] = a.gbps / b.gbps
            if b and d:
                ratios[f"Cluster 1 node / Client direct {tag}"] = b.gbps / d.gbps
    return {
        "block_bytes": data.size,
        "batch": plan.batch,
        "working_set_blocks": data.count,
        "rounds": plan.rounds,
        "cells": [asdict(c) for c in cells],
        "failed_cells": failed,
        "ratios": ratios,
        "note": "each thread has its own Cluster / Client unless 'shared'; a Cluster call "
        "looks the keys up in Redis, then reads from all holders in parallel",
    }


# --------------------------------------------------------------------------------------------
# Report


def print_report(section: dict[str, Any] | None) -> None:
    print()
    print("2. Aggregate GET throughput, get_into, GB/s (1e9 B/s), median of rounds")
    if print_failed(section):
        return
    print(
        f"   {section['block_bytes'] // KIB} KiB blocks, batches of {section['batch']}, working "
        f"set {section['working_set_blocks']} blocks, {section['rounds']} rounds; loadavg "
        f"{section.get('loadavg')}"
    )
    print(f"   {'target':<28}{'threads':<12}{'GB/s':>8}{'p50 ms':>9}{'p99 ms':>9}  rounds")
    for cell in section["cells"]:
        th = f"x{cell['threads']}{' shared' if cell['shared_client'] else ''}"
        lat = cell["latency"]
        print(
            f"   {cell['target']:<28}{th:<12}{cell['gbps']:>8.2f}{lat['p50_ms']:>9.2f}"
            f"{lat['p99_ms']:>9.2f}  {cell['rounds_gbps']}"
        )
    for cell in section.get("failed_cells", []):
        th = f"x{cell['threads']}{' shared' if cell['shared_client'] else ''}"
        print(f"   {cell['target']:<28}{th:<12}  FAILED: {cell['error']}")
    for k, v in section["ratios"].items():
        print(f"   ratio {k:<44} {v:.2f}x")
