"""Phase 4 of bench/cluster.py: failover.

kill -9 of one of 3 nodes while a client thread loops on ``get_into``: exceptions the client saw
(must be 0), call latency before / during / after, hit rate, and the time until
``Cluster.members()`` drops the node (lease TTL + margin).
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import numpy as np
from _util import log

from .common import BenchError, Node, Plan, fmt, lat_dict, print_failed, wait_members, wait_until
from .throughput import Blocks


def run(url: str, nodes: list[Node], keys: list[bytes], data: Blocks, plan: Plan) -> dict[str, Any]:
    from kvpool.cluster import _EPOCH_POLL_SECONDS, Cluster

    name = nodes[0].cluster
    victim = nodes[1]
    observer = Cluster(url, cluster=name, timeout=5.0)
    loop = Cluster(url, cluster=name, timeout=5.0)
    batch = plan.batch
    dests = [np.empty(data.size, dtype=np.uint8) for _ in range(batch)]
    records: list[tuple[float, float, int]] = []  # (start, seconds, hits)
    errors: list[str] = []
    stop = threading.Event()

    def worker() -> None:
        i = 0
        while not stop.is_set():
            ks = [keys[(i * batch + j) % len(keys)] for j in range(batch)]
            t = time.perf_counter()
            hits = -1
            try:
                hits = sum(loop.get_into(ks, dests))
            except Exception as e:  # noqa: BLE001 - the number that must be 0
                errors.append(f"{type(e).__name__}: {e}")
            records.append((t, time.perf_counter() - t, hits))
            i += 1

    th = threading.Thread(target=worker, name="failover-client")
    try:
        wait_members(observer, len(nodes))
        if victim.node_id not in {m.node_id for m in observer.members()}:
            raise BenchError(f"{victim.node_id} is not a member before the kill")
        th.start()
        t_start = time.perf_counter()
        stop.wait(plan.failover_before_s)
        # Fresh lease expiry of the victim (kvpool_members also reaps, harmless before the kill).
        _, fresh = observer._registry.members()
        expiry_ms = next(m.lease_expiry_ms for m in fresh if m.node_id == victim.node_id)
        wall_kill = time.time()
        t_kill = time.perf_counter()
        victim.service.kill()
        log(f"failover: killed {victim.node_id} (pid {victim.service.pid}) with SIGKILL")
        wait_until(
            "Cluster.members() drops the killed node",
            lambda: victim.node_id not in {m.node_id for m in observer.members()},
            plan.lease_ttl * 3 + 10,
        )
        t_drop = time.perf_counter()
        log(f"failover: members() dropped it after {t_drop - t_kill:.2f}s")
        stop.wait(plan.failover_after_s)
    finally:
        stop.set()
        if th.is_alive():
            th.join(timeout=30)
        loop_view_dropped = victim.node_id not in {m.node_id for m in loop.members()}
        observer.close()
        loop.close()

    def window(rs: list[tuple[float, float, int]], seconds: float) -> dict[str, Any]:
        got = [r for r in rs if r[2] >= 0]
        return {
            **lat_dict([r[1] for r in rs]),
            "hit_rate": sum(r[2] for r in got) / (len(got) * batch) if got else math.nan,
            "seconds": seconds,
        }

    end = time.perf_counter()
    # A call in flight at the kill belongs to the failure window.
    before = window([r for r in records if r[0] + r[1] <= t_kill], t_kill - t_start)
    during = window([r for r in records if r[0] + r[1] > t_kill and r[0] < t_drop], t_drop - t_kill)
    after = window([r for r in records if r[0] >= t_drop], end - t_drop)
    for node in nodes:
        if node is not victim:
            node.service.check_alive()  # the survivors must not have gone down with it
    expired = expiry_ms / 1000.0 - wall_kill
    return {
        "nodes": len(nodes),
        "victim": victim.node_id,
        "lease_ttl_s": plan.lease_ttl,
        "heartbeat_interval_s": plan.lease_ttl / 3,
        "client_timeout_s": 5.0,
        "batch": batch,
        "block_bytes": data.size,
        "calls": len(records),
        "exceptions": len(errors),
        "first_exceptions": errors[:5],
        "lease_expired_after_kill_s": expired,
        "members_dropped_after_kill_s": t_drop - t_kill,
        # The lease ran from the victim's last heartbeat: drop = last heartbeat + TTL + margin.
        "margin_over_ttl_s": (t_drop - t_kill) - expired,
        "worst_case_after_kill_s": plan.lease_ttl + plan.lease_ttl / 3 + _EPOCH_POLL_SECONDS,
        "loop_client_view_dropped": loop_view_dropped,
        "max_latency_during_failure_ms": during["max_ms"],
        "before": before,
        "during": during,
        "after": after,
    }


# --------------------------------------------------------------------------------------------
# Report


def print_report(section: dict[str, Any] | None) -> None:
    print()
    print("4. Failover: kill -9 of 1 of 3 nodes under a get_into loop")
    if print_failed(section):
        return
    print(
        f"   client exceptions: {section['exceptions']} (must be 0) over {section['calls']} calls; "
        f"max call latency during the failure {section['max_latency_during_failure_ms']:.1f} ms "
        f"(client timeout {section['client_timeout_s']:.0f} s); loadavg {section.get('loadavg')}"
    )
    print(
        f"   Cluster.members() dropped the node {section['members_dropped_after_kill_s']:.2f}s "
        f"after the kill = its last heartbeat + TTL {section['lease_ttl_s']:g}s "
        f"{section['margin_over_ttl_s']:+.2f}s (lease expired "
        f"{section['lease_expired_after_kill_s']:.2f}s after the kill; bound after the kill: TTL + "
        f"heartbeat interval {section['heartbeat_interval_s']:g}s + epoch poll = "
        f"{section['worst_case_after_kill_s']:.1f}s); the looping client's view dropped it too: "
        f"{section['loop_client_view_dropped']}"
    )
    print(f"   {'window':<10}{'calls':>7}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'hit rate':>10}")
    for w in ("before", "during", "after"):
        s = section[w]
        print(
            f"   {w:<10}{s['count']:>7}{fmt(s['p50_ms']):>9}{fmt(s['p99_ms']):>9}"
            f"{fmt(s['max_ms']):>9}{fmt(s['hit_rate'], '.3f'):>10}"
        )
    if section["first_exceptions"]:
        print(f"   first exceptions: {section['first_exceptions']}")
