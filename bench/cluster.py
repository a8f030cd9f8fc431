#!/usr/bin/env python3
"""Cluster benchmark: index lookups, aggregate GETs, index upkeep and failover, in one run.

Everything runs on 127.0.0.1 against one ``redis-server`` and real ``kvpool server --redis URL
--cluster NAME`` processes, driven through ``kvpool.cluster.Cluster``. Four phases, each a module
of ``cluster_phases/`` whose docstring says what it measures and how:

1. Lookup latency (``lookup``): ``Cluster.match_prefix`` over 64- and 1024-key prefixes on a
   3-node cluster against the loopback floor, and where the time of a 1024-key lookup goes.
2. Aggregate GET throughput (``throughput``): ``Cluster.get_into`` of 256 KiB blocks from 3 nodes
   and from 1 node, 1 and 4 client threads, with ``Client.get_into`` to one node as the limit.
3. Index upkeep (``upkeep``): Redis work, round trips and FCALLs per stored block, counted by
   Redis and by a relay between the nodes' agents and Redis (``_redis_relay``).
4. Failover (``failover``): kill -9 of one of 3 nodes under a ``get_into`` loop: client
   exceptions, latency and hit rate around the kill, time until ``Cluster.members()`` drops it.

Upkeep runs first, alone on Redis, so Redis's counters are its cluster's own; the other phases
share one 3-node and one 1-node cluster. A phase that fails is reported as such; the others
still run.

Usage:  python bench/cluster.py [--quick] [--lookups N] [--upkeep-blocks N] [--lease-ttl S]
Results: tables on stdout, progress on stderr, JSON in bench/results/cluster.json
(bench/results/cluster_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from _redis_relay import RoundTripRelay
from _util import ProcessSet, install_interrupt_handlers, log, run_main, run_meta, start_redis
from cluster_phases import failover, lookup, throughput, upkeep
from cluster_phases.common import (
    HOST,
    LOAD_NOTE,
    RESULTS,
    key_of,
    loadavg,
    make_plan,
    start_nodes,
)
from cluster_phases.throughput import Blocks

# --------------------------------------------------------------------------------------------
# Report


def print_report(report: dict[str, Any]) -> None:
    meta = report["meta"]
    print()
    print(f"kvpool cluster benchmark, loopback, {meta['cpus']} CPUs. NOTE: {LOAD_NOTE}.")
    print(f"loadavg at start {meta['loadavg_start']}, at end {meta['loadavg_end']}")
    sections = (
        ("lookup", lookup),
        ("throughput", throughput),
        ("upkeep", upkeep),
        ("failover", failover),
    )
    for name, phase in sections:  # tables 1 to 4 (upkeep runs first, but prints third)
        phase.print_report(report.get(name))
    print()


# --------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="small run (well under a minute)")
    p.add_argument("--lookups", type=int, help="timed lookups per variant (1000; quick 200)")
    p.add_argument("--threads", default="1,4", help="client threads for GETs (%(default)s)")
    p.add_argument("--batch", type=int, default=32, help="blocks per GET batch (%(default)s)")
    p.add_argument(
        "--upkeep-blocks", type=int, help="blocks written for phase 3 (20000; quick 5000)"
    )
    p.add_argument(
        "--upkeep-batch", type=int, default=64, help="put batch in phase 3 (%(default)s)"
    )
    p.add_argument("--lease-ttl", type=float, default=3.0, help="node lease TTL, s (%(default)s)")
    p.add_argument("--phases", default="upkeep,lookup,throughput,failover", help="%(default)s")
    p.add_argument("--json-out", help="default bench/results/cluster.json (cluster_quick.json)")
    return p


def run_phase(report: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    log(f"{name}: starting (loadavg {loadavg()})")
    t0 = time.perf_counter()
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - voids this phase only, the others still run
        log(f"{name}: FAILED: {type(e).__name__}: {e}")
        result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    result["loadavg"] = loadavg()
    result["duration_s"] = round(time.perf_counter() - t0, 1)
    report[name] = result
    log(f"{name}: done in {result['duration_s']}s")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = make_plan(args)
    phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = set(phases) - {"upkeep", "lookup", "throughput", "failover"}
    if unknown or not plan.threads or plan.batch < 1:
        raise SystemExit(f"bad --phases {sorted(unknown)} / --threads / --batch")
    install_interrupt_handlers()
    out = Path(args.json_out or RESULTS / ("cluster_quick.json" if args.quick else "cluster.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    nonce = os.urandom(4).hex()
    started = time.time()
    report: dict[str, Any] = {
        "meta": {
            **run_meta(("kvpool", "numpy", "redis", "hiredis"), ("redis-server",), plan),
            "loadavg_start": loadavg(),
            "load_note": LOAD_NOTE,
            "units": "GB/s with GB = 1e9 bytes; latency in ms",
        }
    }
    log(f"plan: {asdict(plan)}")
    relay: RoundTripRelay | None = None
    with ProcessSet() as procs:
        try:
            _, redis_port = start_redis(procs)
            url = f"redis://{HOST}:{redis_port}/0"

            if "upkeep" in phases:
                # Alone on Redis, so every delta is this cluster's; agents go through the relay.
                relay = up_relay = RoundTripRelay(redis_port)
                up_nodes = start_nodes(
                    procs,
                    f"upkeep-{nonce}",
                    3,
                    f"redis://{HOST}:{relay.port}/0",
                    plan.memory_upkeep,
                    plan.lease_ttl,
                )
                run_phase(
                    report,
                    "upkeep",
                    lambda: upkeep.run(url, redis_port, up_nodes, up_relay, plan, nonce),
                )
                for node in up_nodes:
                    node.service.stop()
                relay.close()
                relay = None

            rest = [p for p in phases if p != "upkeep"]
            if rest:
                three = start_nodes(procs, f"three-{nonce}", 3, url, plan.memory_3, plan.lease_ttl)
                one = start_nodes(procs, f"one-{nonce}", 1, url, plan.memory_1, plan.lease_ttl)
                data = Blocks(plan.working_set_blocks, plan.block_bytes)
                ws_keys = [key_of(f"{nonce}/ws", i) for i in range(data.count)]
                if "lookup" in phases:
                    run_phase(
                        report,
                        "lookup",
                        lambda: lookup.run(url, redis_port, three[0].cluster, plan, nonce),
                    )
                if "throughput" in phases or "failover" in phases:
                    run_phase(
                        report,
                        "throughput",
                        lambda: throughput.run(url, three, one, plan, nonce, data),
                    )
                if "failover" in phases:
                    run_phase(
                        report,
                        "failover",
                        lambda: failover.run(url, three, ws_keys, data, plan),
                    )
        finally:
            if relay is not None:
                relay.close()
    report["meta"]["loadavg_end"] = loadavg()
    report["meta"]["duration_s"] = round(time.time() - started, 1)
    out.write_text(json.dumps(report, indent=1, default=str))
    print_report(report)
    print(f"JSON: {out}  ({report['meta']['duration_s']:.0f}s)")
    failed = [k for k, v in report.items() if isinstance(v, dict) and "error" in v]
    failed += ["throughput cells"] if report.get("throughput", {}).get("failed_cells") else []
    fo = report.get("failover", {})
    return 1 if failed or fo.get("exceptions") else 0


if __name__ == "__main__":
    run_main(main)
