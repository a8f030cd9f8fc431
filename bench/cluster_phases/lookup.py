"""Phase 1 of bench/cluster.py: index lookup latency.

``Cluster.match_prefix`` over fully present 64- and 1024-key prefixes on a 3-node cluster, with the
floor measured by the same client in the same loop (PING through redis-py, PING over a bare
socket) and the parts of a 1024-key lookup: the Registry's index read alone
(``lookup_with_epoch`` / ``locate``), a redis-py pipeline of one ``FCALL_RO kvpool_lookup`` per
partition (build / execute / parse timed apart), and Redis's own CPU time and command time per
lookup (INFO cpu / commandstats over a run of lookups of one kind). The target is judged on a
steady run (one prefix length, lookups back to back, as a scheduler issues them); the breakdown
comes from rounds that interleave every variant call by call, so load that comes and goes hits
all of them alike.
"""

from __future__ import annotations

import gc
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
from _redis_relay import command_calls, command_usec, counters_delta, redis_counters
from _util import log

from .common import (
    HOST,
    KIB,
    BenchError,
    Plan,
    fmt,
    key_of,
    lat_dict,
    loadavg,
    print_failed,
    put_all,
    wait_indexed,
    wait_members,
    wait_until,
)

LOOKUP_TARGET_P50_MS, LOOKUP_TARGET_P99_MS = 0.5, 2.0


def fcall_pipeline_lookup(redis_client: Any, ck: Any, keys: list[bytes]) -> tuple[float, ...]:
    """The pure-redis-py index read (one FCALL_RO kvpool_lookup per partition plus the epoch, in
    one pipeline), as kvpool.metadata.Registry does without the core's reader; returns the
    seconds spent building, executing and parsing, and the present-prefix length."""
    from kvpool.metadata import partition_of

    t0 = time.perf_counter()
    by_part: dict[int, list[int]] = {}
    for i, k in enumerate(keys):
        by_part.setdefault(partition_of(k), []).append(i)
    pipe = redis_client.pipeline(transaction=False)
    pipe.fcall_ro("kvpool_epoch", 1, ck.membership[0])
    parts = list(by_part.items())
    for p, idx in parts:
        pipe.fcall_ro("kvpool_lookup", 1, ck.loc(p), *(keys[i] for i in idx))
    t1 = time.perf_counter()
    replies = pipe.execute()
    t2 = time.perf_counter()
    out: list[list[str]] = [[] for _ in keys]
    for (_, idx), reply in zip(parts, replies[1:], strict=True):
        for i, v in zip(idx, reply, strict=True):
            if v:
                out[i] = (v.decode() if isinstance(v, bytes) else str(v)).split(",")
    n = next((i for i, h in enumerate(out) if not h), len(keys))
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2, float(n)


def run(url: str, redis_port: int, name: str, plan: Plan, nonce: str) -> dict[str, Any]:
    """Measures twice: with only the looked-up prefix in the index (small partitions; the
    library's sentinel field keeps them in hashtable encoding, so HMGET is no listpack scan) and
    after filler keys made every partition large (the shape of a real pool's index)."""
    import kvpool
    import redis
    from kvpool.cluster import Cluster
    from kvpool.metadata import INDEX_SENTINEL, NUM_PARTITIONS

    admin = redis.Redis(host=HOST, port=redis_port)
    c = Cluster(url, cluster=name, timeout=5.0)
    raw = socket.create_connection((HOST, redis_port), timeout=5)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        wait_members(c, 3)
        longest = max(plan.prefixes)
        ns = kvpool.Namespace(model=f"bench-cluster/{nonce}", block_tokens=16)
        keys = kvpool.block_keys(list(range(16 * longest)), ns)
        put_all(c, keys, [np.zeros(4 * KIB, dtype=np.uint8)] * len(keys), 256)
        lag = wait_indexed(c, keys)
        log(f"lookup: {longest} keys written and indexed ({lag * 1e3:.0f} ms after the last put)")
        reg = c._registry
        ck = reg.keys
        live = [m.entry for m in c.members()]
        prefixes = {n: keys[:n] for n in plan.prefixes}
        k_long = prefixes[longest]

        def raw_ping() -> None:
            raw.sendall(b"*1\r\n$4\r\nPING\r\n")
            got = b""
            while len(got) < 7:
                part = raw.recv(64)
                if not part:
                    raise BenchError("redis closed the raw connection")
                got += part
            if got != b"+PONG\r\n":
                raise BenchError(f"raw PING answered {got!r}")

        def check(n: int, want: int, what: str) -> None:
            if n != want:
                raise BenchError(f"{what} returned {n}, expected {want}")

        def index_shape() -> dict[str, Any]:
            pipe = admin.pipeline(transaction=False)
            for p in range(NUM_PARTITIONS):
                pipe.hlen(ck.loc(p))
                pipe.hexists(ck.loc(p), INDEX_SENTINEL)
                pipe.object("encoding", ck.loc(p))
            replies = pipe.execute()
            encodings = sorted(
                {(e.decode() if isinstance(e, bytes) else str(e)) for e in replies[2::3]}
            )
            keys = sum(
                int(n) - int(bool(s)) for n, s in zip(replies[::3], replies[1::3], strict=True)
            )
            return {"keys": keys, "encodings": encodings}

        def measure() -> dict[str, Any]:
            series: dict[str, list[float]] = {}

            def timed(label: str, fn: Callable[[], Any]) -> Any:
                t0 = time.perf_counter()
                out = fn()
                series.setdefault(label, []).append(time.perf_counter() - t0)
                return out

            def one_round() -> None:
                timed("PING redis-py (Cluster's client)", c._redis.ping)
                timed("PING bare socket", raw_ping)
                for n, ks in prefixes.items():
                    got = timed(f"Cluster.match_prefix {n}", partial(c.match_prefix, ks))
                    check(got, n, f"match_prefix({n})")
                _, holders = timed(
                    f"Registry.lookup_with_epoch {longest}", lambda: reg.lookup_with_epoch(k_long)
                )
                n_present = next((i for i, h in enumerate(holders) if not h), longest)
                check(n_present, longest, "lookup_with_epoch")
                _, where = timed(f"Registry.locate {longest}", lambda: reg.locate(k_long, live))
                check(next((i for i, j in enumerate(where) if j < 0), longest), longest, "locate")
                build, execute, parse, n_fc = fcall_pipeline_lookup(c._redis, ck, k_long)
                check(int(n_fc), longest, "FCALL_RO pipeline")
                fc = f"FCALL_RO pipeline {longest} (redis-py)"
                for part, v in (
                    ("total", build + execute + parse),
                    ("build", build),
                    ("execute", execute),
                    ("parse", parse),
                ):
                    series.setdefault(f"{fc}: {part}", []).append(v)

            # Steady: one kind of lookup back to back, as an engine's scheduler issues them; the
            # target is judged on this run. The interleaved rounds below put a 5 ms redis-py
            # pipeline between lookups and serve the breakdown.
            steady: dict[str, list[float]] = {}
            for n, ks in prefixes.items():
                for _ in range(plan.warmup_lookups):
                    c.match_prefix(ks)
                xs = steady.setdefault(f"Cluster.match_prefix {n}", [])
                for _ in range(plan.lookups):
                    t0 = time.perf_counter()
                    got = c.match_prefix(ks)
                    xs.append(time.perf_counter() - t0)
                    check(got, n, f"match_prefix({n})")
            for _ in range(plan.warmup_lookups):
                one_round()
            series.clear()
            t0 = time.perf_counter()
            for _ in range(plan.lookups):
                one_round()
            log(f"lookup: {plan.lookups} interleaved rounds in {time.perf_counter() - t0:.1f}s")

            # Redis's side of one call of each kind, over a run of that kind alone: CPU (INFO
            # cpu, socket I/O included) and top-level command time (commandstats).
            server: dict[str, Any] = {}
            kinds: dict[str, Callable[[], Any]] = {
                f"Cluster.match_prefix {longest}": lambda: c.match_prefix(k_long),
                f"FCALL_RO pipeline {longest} (redis-py)": lambda: fcall_pipeline_lookup(
                    c._redis, ck, k_long
                ),
                "PING redis-py": c._redis.ping,
            }
            for label, fn in kinds.items():
                a = redis_counters(admin)
                for _ in range(plan.server_lookups):
                    fn()
                d = counters_delta(a, redis_counters(admin))
                n = plan.server_lookups
                top = ("fcall_ro",) if command_calls(d, "fcall_ro") else ("hget", "hmget", "ping")
                server[label] = {
                    "redis_cpu_us": d["cpu_s"] * 1e6 / n,
                    "command_us": sum(command_usec(d, x) for x in top) / n,
                    "commands_per_call": {k: v["calls"] / n for k, v in d["commands"].items()},
                }
            out = {
                "index": index_shape(),
                "steady": {label: lat_dict(v) for label, v in steady.items()},
                "latency": {label: lat_dict(v) for label, v in series.items()},
                "server": server,
                "loadavg": loadavg(),
            }
            out["breakdown"] = lookup_breakdown(out, longest)
            return out

        states: dict[str, Any] = {}
        states["small index"] = measure()
        # Filler keys (tiny blocks) until every partition is well past the listpack limit.
        conf = admin.config_get("hash-max-listpack-entries")
        limit = int(conf.get("hash-max-listpack-entries") or 128)
        n_filler = max(plan.lookup_filler_keys, 2 * NUM_PARTITIONS * limit)
        filler = [key_of(f"{nonce}/filler", i) for i in range(n_filler)]
        put_all(c, filler, [np.zeros(256, dtype=np.uint8)] * len(filler), 512)
        wait_until(
            "filler indexed", lambda: index_shape()["keys"] >= longest + len(filler), 60, 0.02
        )
        log(f"lookup: {len(filler)} filler keys indexed; measuring again")
        states["large index"] = measure()
        return {
            "nodes": 3,
            "index_reader": "kvpool._core.RedisIndexReader (C++)"
            if reg._reader is not None
            else "redis-py pipeline",
            "lookups": plan.lookups,
            "warmup_lookups": plan.warmup_lookups,
            "states": states,
            "redis_hash_max_listpack_entries": limit,
            "filler_keys": n_filler,
            "target": {"p50_ms": LOOKUP_TARGET_P50_MS, "p99_ms": LOOKUP_TARGET_P99_MS},
            "gc_enabled": gc.isenabled(),
        }
    finally:
        raw.close()
        c.close()
        admin.close()


def lookup_breakdown(state: dict[str, Any], longest: int) -> dict[str, float]:
    p = {k: v["p50_ms"] for k, v in state["latency"].items()}
    mp = p[f"Cluster.match_prefix {longest}"]
    read_label = f"Registry.locate {longest}"
    read = p[read_label]
    server = state["server"][f"Cluster.match_prefix {longest}"]["redis_cpu_us"] / 1e3
    ping = p["PING bare socket"]
    fc = f"FCALL_RO pipeline {longest} (redis-py)"
    return {
        f"Cluster.match_prefix {longest} (total)": mp,
        f"  {read_label} (the index read it makes)": read,
        "  Cluster's Python around it (total - index read)": mp - read,
        "  Redis CPU per match_prefix (INFO cpu, run of its own)": server,
        "  loopback round trip floor (bare-socket PING)": ping,
        "  rest, approx.: client build/parse, transfer (read - CPU - floor)": read - server - ping,
        f"{fc}, the pure redis-py path (total)": p[f"{fc}: total"],
        "  build (group by partition, queue commands)": p[f"{fc}: build"],
        "  execute (pack, send, Redis, read, RESP parse)": p[f"{fc}: execute"],
        "  parse (split holder lists)": p[f"{fc}: parse"],
        "  Redis CPU per pipeline (INFO cpu, run of its own)": state["server"][fc]["redis_cpu_us"]
        / 1e3,
    }


# --------------------------------------------------------------------------------------------
# Report


def print_report(section: dict[str, Any] | None) -> None:
    print()
    print("1. Index lookup latency (3 nodes), ms")
    if print_failed(section):
        return
    print(
        f"   {section['lookups']} lookups per run after {section['warmup_lookups']} warm-up, per "
        f"index size; index read by {section['index_reader']}"
    )
    for state, st in section["states"].items():
        idx = st["index"]
        print()
        print(
            f"   [{state}: {idx['keys']} keys in the index, partitions "
            f"{'/'.join(idx['encodings'])}; loadavg {st['loadavg']}]"
        )
        print(f"   {'call':<50}{'p50':>9}{'p99':>9}{'mean':>9}{'max':>9}")
        for title, runs in (
            ("steady (each lookup back to back)", st["steady"]),
            ("interleaved rounds (every kind below, in turn)", st["latency"]),
        ):
            print(f"   {title}")
            for label, s in runs.items():
                print(
                    f"   {label:<50}{fmt(s['p50_ms'], '.3f'):>9}{fmt(s['p99_ms'], '.3f'):>9}"
                    f"{fmt(s['mean_ms'], '.3f'):>9}{fmt(s['max_ms'], '.3f'):>9}"
                )
        lens = [int(k.rsplit(" ", 1)[1]) for k in st["steady"]]
        longest = max(lens)
        mp = st["steady"][f"Cluster.match_prefix {longest}"]
        ok50 = mp["p50_ms"] <= LOOKUP_TARGET_P50_MS
        ok99 = mp["p99_ms"] <= LOOKUP_TARGET_P99_MS
        print(
            f"   target (steady) {longest}-key match_prefix p50 <= {LOOKUP_TARGET_P50_MS} ms: "
            f"{'MET' if ok50 else 'MISSED'} ({mp['p50_ms']:.3f}); p99 <= "
            f"{LOOKUP_TARGET_P99_MS} ms: {'MET' if ok99 else 'MISSED'} ({mp['p99_ms']:.3f})"
        )
        print("   Redis side per call (a run of that call alone):")
        for label, s in st["server"].items():
            cmds = ", ".join(f"{k} {v:g}" for k, v in s["commands_per_call"].items())
            print(
                f"     {label:<40} Redis CPU {s['redis_cpu_us']:7.1f} us, command time "
                f"{s['command_us']:7.1f} us  [{cmds}]"
            )
        print(f"   Where a {longest}-key lookup goes (p50s, ms):")
        for k, v in st["breakdown"].items():
            print(f"     {k:<66} {v:7.3f}")
