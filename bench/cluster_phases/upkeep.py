"""Phase 3 of bench/cluster.py: index upkeep.

One client writes N blocks of 4 KiB to a fresh 3-node cluster; after the index holds all N (sum
of HLEN over the partitions less their sentinel field, then ``match_prefix == N``), the deltas
of Redis ``INFO commandstats`` / ``total_commands_processed`` / CPU give the Redis work per
block. The nodes' agents reach Redis through a relay in this process that counts round trips (a
request burst after a reply is one round trip, so a pipeline counts once) and FCALLs per
function, per node. Only this cluster exists during this phase, so the deltas are its own.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from typing import Any

import numpy as np
from _redis_relay import RoundTripRelay, command_calls, counters_delta, redis_counters

from .common import (
    HOST,
    KIB,
    BenchError,
    Node,
    Plan,
    fmt,
    key_of,
    print_failed,
    put_all,
    wait_members,
    wait_until,
)

UPKEEP_TARGET_RTT_PER_64 = 1.0


def run(
    url: str, redis_port: int, nodes: list[Node], relay: RoundTripRelay, plan: Plan, nonce: str
) -> dict[str, Any]:
    import redis
    from kvpool.cluster import Cluster
    from kvpool.metadata import INDEX_SENTINEL, NUM_PARTITIONS

    name = nodes[0].cluster
    admin = redis.Redis(host=HOST, port=redis_port)
    c = Cluster(url, cluster=name, timeout=10.0)
    try:
        wait_members(c, len(nodes))
        n = plan.upkeep_blocks
        keys = [key_of(f"{nonce}/upkeep", i) for i in range(n)]
        block = np.frombuffer(os.urandom(plan.upkeep_block_bytes), dtype=np.uint8)
        loc_keys = [c._registry.keys.loc(p) for p in range(NUM_PARTITIONS)]

        def indexed() -> int:
            """Block keys in the index: HLEN less the partition's sentinel field."""
            pipe = admin.pipeline(transaction=False)
            for k in loc_keys:
                pipe.hlen(k)
                pipe.hexists(k, INDEX_SENTINEL)
            r = pipe.execute()
            return sum(int(x) - int(bool(s)) for x, s in zip(r[::2], r[1::2], strict=True))

        if indexed() != 0:
            raise BenchError("the upkeep cluster's index is not empty at the start")
        entries0 = {nid: st.get("entries", 0) for nid, st in c.stats()["nodes"].items()}
        r0, p0 = redis_counters(admin), relay.snapshot()
        t0 = time.perf_counter()
        put_all(c, keys, [block] * n, plan.upkeep_batch)
        t_put = time.perf_counter() - t0
        polls = 0

        def all_indexed() -> bool:
            nonlocal polls
            polls += 1
            return indexed() >= n

        lag = wait_until(f"index holds {n} keys", all_indexed, 60, 0.005)
        r1, p1 = redis_counters(admin), relay.snapshot()
        check = c.match_prefix(keys)
        if check != n:
            raise BenchError(f"match_prefix after upkeep returned {check}, expected {n}")
        stats = c.stats()
        entries1 = {nid: st.get("entries", 0) for nid, st in stats["nodes"].items()}
        evictions = stats["totals"].get("evictions", 0)
        d = counters_delta(r0, r1)
        d["commands"].pop("hlen", None)  # our polls
        d["commands"].pop("hexists", None)
        d["total_commands_processed"] -= polls * 2 * NUM_PARTITIONS
        per_node: dict[str, Any] = {}
        tot: Counter[str] = Counter()
        for nid in sorted(set(p1) | set(entries1)):
            if nid == "?":
                continue
            a, b = p0.get(nid, Counter()), p1.get(nid, Counter())
            delta = Counter({k: b[k] - a.get(k, 0) for k in b})
            blocks = entries1.get(nid, 0) - entries0.get(nid, 0)
            tot.update(delta)
            tot["blocks"] += blocks
            pub_fcalls = delta["kvpool_publish"]
            per_node[nid] = {
                "blocks": blocks,
                "publish_round_trips": delta["publish_round_trips"],
                "round_trips": delta["round_trips"],
                "publish_fcalls": pub_fcalls,
                "heartbeat_fcalls": delta["kvpool_heartbeat"],
                "fcalls": delta["fcall"],
                "bytes_up": delta["bytes_up"],
                "publish_round_trips_per_64_blocks": 64 * delta["publish_round_trips"] / blocks
                if blocks
                else math.nan,
                "publish_fcalls_per_64_blocks": 64 * pub_fcalls / blocks if blocks else math.nan,
                "round_trip_lower_bound_per_64_blocks": 64
                * math.ceil(pub_fcalls / NUM_PARTITIONS)
                / blocks
                if blocks
                else math.nan,
            }
        unlabelled = p1.get("?", Counter())
        fcalls_redis = command_calls(d, "fcall")
        heartbeats = tot["kvpool_heartbeat"]
        publish_fcalls_redis = fcalls_redis - heartbeats  # fcall = publishes + heartbeats here
        return {
            "nodes": len(nodes),
            "blocks": n,
            "block_bytes": plan.upkeep_block_bytes,
            "put_batch": plan.upkeep_batch,
            "put_seconds": t_put,
            "index_lag_s": lag,
            "evictions": evictions,
            "partitions": NUM_PARTITIONS,
            "redis": d,
            "redis_per_block": {
                "fcall": fcalls_redis / n,
                "publish_fcall": publish_fcalls_redis / n,
                "commands_total": d["total_commands_processed"] / n,
                "hset": command_calls(d, "hset") / n,
                "hget": command_calls(d, "hget") / n,
                "cpu_us": d["cpu_s"] * 1e6 / n,
                "net_input_bytes": d["net_input_bytes"] / n,
            },
            "redis_fcall_per_64_blocks_per_node": 64 * publish_fcalls_redis / n,
            "relay": {
                "per_node": per_node,
                "publish_round_trips": tot["publish_round_trips"],
                "publish_fcalls": tot["kvpool_publish"],
                "heartbeat_fcalls": heartbeats,
                "fcalls": tot["fcall"],
                "publish_round_trips_per_64_blocks_per_node": 64
                * tot["publish_round_trips"]
                / max(tot["blocks"], 1),
                "unlabelled_connections": unlabelled.get("connections", 0),
                "error": relay.error,
                "coalesce_ms": relay.coalesce_s * 1e3,
            },
            "fcall_crosscheck": {
                "redis_commandstats_fcall": fcalls_redis,
                "relay_fcall": tot["fcall"],
            },
            "target_round_trips_per_64_blocks_per_node": UPKEEP_TARGET_RTT_PER_64,
        }
    finally:
        c.close()
        admin.close()


# --------------------------------------------------------------------------------------------
# Report


def print_report(section: dict[str, Any] | None) -> None:
    print()
    print("3. Index upkeep: Redis work per stored block")
    if print_failed(section):
        return
    rl = section["relay"]
    pb = section["redis_per_block"]
    print(
        f"   {section['blocks']} blocks x {section['block_bytes'] // KIB} KiB, put batches of "
        f"{section['put_batch']}, {section['nodes']} nodes: put {section['put_seconds']:.2f}s, "
        f"index complete {section['index_lag_s'] * 1e3:.0f} ms after the last put; evictions "
        f"{section['evictions']}; loadavg {section.get('loadavg')}"
    )
    print(
        f"   Redis (INFO): FCALL {pb['fcall']:.4f}/block (kvpool_publish "
        f"{pb['publish_fcall']:.4f}), commands incl. inside functions "
        f"{pb['commands_total']:.2f}/block (HSET "
        f"{pb['hset']:.2f}, HGET {pb['hget']:.2f}), Redis CPU {pb['cpu_us']:.1f} us/block, "
        f"{pb['net_input_bytes']:.0f} B in/block"
    )
    print(
        f"   FCALL kvpool_publish per 64 blocks per node: "
        f"{section['redis_fcall_per_64_blocks_per_node']:.3f} (commandstats)"
    )
    print(
        f"   {'node':<16}{'blocks':>8}{'pub RTTs':>10}{'pub FCALLs':>12}{'heartbeats':>12}"
        f"{'RTT/64 blk':>12}{'FCALL/64 blk':>14}{'RTT lower bd/64':>17}"
    )
    for nid, s in rl["per_node"].items():
        print(
            f"   {nid:<16}{s['blocks']:>8}{s['publish_round_trips']:>10}"
            f"{s['publish_fcalls']:>12}{s['heartbeat_fcalls']:>12}"
            f"{fmt(s['publish_round_trips_per_64_blocks'], '.3f'):>12}"
            f"{fmt(s['publish_fcalls_per_64_blocks'], '.3f'):>14}"
            f"{fmt(s['round_trip_lower_bound_per_64_blocks'], '.3f'):>17}"
        )
    rtt = rl["publish_round_trips_per_64_blocks_per_node"]
    print(
        f"   publish round trips per 64 blocks per node (relay count, upper bound): "
        f"{rtt:.3f} -> target <= {section['target_round_trips_per_64_blocks_per_node']}: "
        f"{'MET' if rtt <= section['target_round_trips_per_64_blocks_per_node'] else 'MISSED'}"
    )
    cc = section["fcall_crosscheck"]
    print(
        f"   cross-check FCALLs: Redis commandstats {cc['redis_commandstats_fcall']}, "
        f"relay {cc['relay_fcall']}"
    )
    top = list(section["redis"]["commands"].items())[:8]
    print("   commandstats delta: " + ", ".join(f"{k} {v['calls']}" for k, v in top))
