#!/usr/bin/env python3
"""Cluster benchmark: index lookups, aggregate GETs, index upkeep and failover, in one run.

Everything runs on 127.0.0.1 against one ``redis-server`` and real ``kvpool server --redis URL
--cluster NAME`` processes, driven through ``kvpool.cluster.Cluster``:

1. Lookup latency. ``Cluster.match_prefix`` over fully present 64- and 1024-key prefixes on a
   3-node cluster, with the floor measured by the same client in the same loop (PING through
   redis-py, PING over a bare socket) and the parts of a 1024-key lookup: the Registry's index
   read alone (``lookup_with_epoch`` / ``locate``), a redis-py pipeline of one ``FCALL_RO
   kvpool_lookup`` per partition (build / execute / parse timed apart), and Redis's own CPU time
   and command time per lookup (INFO cpu / commandstats over a run of lookups of one kind).
   The target is judged on a steady run (one prefix length, lookups back to back, as a
   scheduler issues them); the breakdown comes from rounds that interleave every variant call
   by call, so load that comes and goes hits all of them alike.
2. Aggregate GET throughput. ``Cluster.get_into`` of 256 KiB blocks in batches of 32, 1 and 4
   client threads (each with its own ``Cluster``; plus 4 threads sharing one), against 3 nodes and
   against 1 node (separate clusters), and ``Client.get_into`` straight to the single node (no
   index lookup, no fan-out) as the limit. Median of rounds; every call must find every block and
   the last batch of each thread and round is compared byte for byte.
3. Index upkeep. One client writes N blocks of 4 KiB to a fresh 3-node cluster; after the index
   holds all N (sum of HLEN over the partitions less their sentinel field, then
   ``match_prefix == N``), the deltas of Redis
   ``INFO commandstats`` / ``total_commands_processed`` / CPU give the Redis work per block. The
   nodes' agents reach Redis through a relay in this process that counts round trips (a request
   burst after a reply is one round trip, so a pipeline counts once) and FCALLs per function, per
   node. Only this cluster exists during this phase, so the deltas are its own.
4. Failover. kill -9 of one of 3 nodes while a client thread loops on ``get_into``: exceptions
   the client saw (must be 0), call latency before / during / after, hit rate, and the time until
   ``Cluster.members()`` drops the node (lease TTL + margin).

Usage:  python bench/cluster.py [--quick] [--lookups N] [--upkeep-blocks N] [--lease-ttl S]
Results: tables on stdout, progress on stderr, JSON in bench/results/cluster.json
(bench/results/cluster_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import re
import selectors
import shutil
import socket
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from _util import (
    LatencyStats,
    ProcessSet,
    Service,
    ServiceError,
    free_port,
    install_interrupt_handlers,
    log,
    median,
    percentile,
    run_main,
    run_meta,
)

HOST = "127.0.0.1"
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
KIB, MIB = 1 << 10, 1 << 20
LOOKUP_TARGET_P50_MS, LOOKUP_TARGET_P99_MS = 0.5, 2.0
UPKEEP_TARGET_RTT_PER_64 = 1.0
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


def start_redis(procs: ProcessSet) -> tuple[Service, int]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise ServiceError("redis-server not on PATH (apt-get install redis-server)")
    port = free_port()
    argv = [exe, "--port", str(port), "--save", "", "--appendonly", "no", "--bind", HOST]
    service = procs.start("redis-server", argv)
    service.wait_for_line(r"Ready to accept connections", timeout=30)
    log(f"redis-server pid {service.pid} on {HOST}:{port}")
    return service, port


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
# Round-trip counting relay (agents -> Redis)

_NODE_ID = re.compile(rb"\$13\r\n(n[0-9a-f]{12})\r\n")
_FUNCTIONS = (
    "kvpool_publish",
    "kvpool_heartbeat",
    "kvpool_fence",
    "kvpool_join",
    "kvpool_leave",
    "kvpool_members",
    "kvpool_version",
    "kvpool_epoch",
)
_FCALL = b"$5\r\nFCALL\r\n"
_FCALL_RO = b"$8\r\nFCALL_RO\r\n"


@dataclass
class _Relay:
    client: socket.socket
    upstream: socket.socket
    label: str = "?"
    pending: bytearray = field(default_factory=bytearray)
    last_rx: float = 0.0
    replied: bool = True  # a reply came back since the last forwarded burst (or none was sent)
    closed: bool = False
    counts: Counter[str] = field(default_factory=Counter)


class RoundTripRelay:
    """A TCP relay between the nodes' cluster agents and Redis that counts round trips.

    Requests are held until their sender has been quiet for ``coalesce_s``, so a pipeline written
    in several send calls is forwarded, and counted, as one burst; a burst is a round trip when a
    reply came back since the previous one (a redis-py connection never writes again before it
    read every reply). A pipeline whose own send calls were more than ``coalesce_s`` apart would
    count twice, so the count is an upper bound (the FCALL count / partitions is the lower one).
    FCALLs are counted per function name; a connection is labelled by the first node id
    (``n`` + 12 hex digits, the default id) it carries. No MONITOR involved.
    """

    def __init__(self, upstream_port: int, coalesce_s: float = 0.002) -> None:
        self.upstream_port = upstream_port
        self.coalesce_s = coalesce_s
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((HOST, 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._relays: list[_Relay] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="rtt-relay", daemon=True)
        self._thread.start()

    def snapshot(self) -> dict[str, Counter[str]]:
        """Counters per label (node id), summed over that label's connections."""
        out: dict[str, Counter[str]] = {}
        with self._lock:
            for r in self._relays:
                c = out.setdefault(r.label, Counter())
                c.update(r.counts)
                c["connections"] += 1
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for r in self._relays:
            self._close(r)
        self._sel.close()
        self._listener.close()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                due = [r.last_rx + self.coalesce_s - now for r in self._relays if r.pending]
                timeout = max(0.0, min(due)) if due else 0.1
                for key, _ in self._sel.select(timeout):
                    if key.data is None:
                        self._accept()
                    else:
                        relay, from_client = key.data
                        self._readable(relay, from_client)
                now = time.monotonic()
                for r in list(self._relays):
                    if r.pending and not r.closed and now - r.last_rx >= self.coalesce_s:
                        self._flush(r)
        except Exception as e:  # noqa: BLE001 - reported with the results
            self.error = f"{type(e).__name__}: {e}"
            log(f"round-trip relay failed: {self.error}")

    def _accept(self) -> None:
        client, _ = self._listener.accept()
        upstream = socket.create_connection((HOST, self.upstream_port), timeout=5)
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(10)
        relay = _Relay(client, upstream)
        with self._lock:
            self._relays.append(relay)
        self._sel.register(client, selectors.EVENT_READ, (relay, True))
        self._sel.register(upstream, selectors.EVENT_READ, (relay, False))

    def _readable(self, r: _Relay, from_client: bool) -> None:
        if r.closed:
            return
        try:
            data = (r.client if from_client else r.upstream).recv(1 << 20)
        except OSError:
            data = b""
        if not data:
            self._close(r)
            return
        if from_client:
            r.pending += data
            r.last_rx = time.monotonic()
            return
        with self._lock:
            r.replied = True
            r.counts["bytes_down"] += len(data)
        try:
            r.client.sendall(data)
        except OSError:
            self._close(r)

    def _flush(self, r: _Relay) -> None:
        burst = bytes(r.pending)
        r.pending.clear()
        with self._lock:
            c = r.counts
            if r.replied:
                c["round_trips"] += 1
                if b"kvpool_publish" in burst:
                    c["publish_round_trips"] += 1
            r.replied = False
            c["bursts"] += 1
            c["bytes_up"] += len(burst)
            c["fcall"] += burst.count(_FCALL)
            c["fcall_ro"] += burst.count(_FCALL_RO)
            for name in _FUNCTIONS:
                n = burst.count(f"${len(name)}\r\n{name}\r\n".encode())
                if n:
                    c[name] += n
            if r.label == "?":
                m = _NODE_ID.search(burst)
                if m is not None:
                    r.label = m.group(1).decode()
        try:
            r.upstream.sendall(burst)
        except OSError:
            self._close(r)

    def _close(self, r: _Relay) -> None:
        if r.closed:
            return
        r.closed = True
        for s in (r.client, r.upstream):
            try:
                self._sel.unregister(s)
            except (KeyError, ValueError):
                pass
            s.close()


# --------------------------------------------------------------------------------------------
# Redis-side counters


def redis_counters(r: Any) -> dict[str, Any]:
    stats = r.info("stats")
    cpu = r.info("cpu")
    cmd = r.info("commandstats")
    return {
        "total_commands_processed": int(stats["total_commands_processed"]),
        "total_net_input_bytes": int(stats["total_net_input_bytes"]),
        "cpu_s": float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
        "commands": {
            k.removeprefix("cmdstat_"): {"calls": int(v["calls"]), "usec": int(v["usec"])}
            for k, v in cmd.items()
        },
    }


def counters_delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    cmds: dict[str, dict[str, int]] = {}
    for name, v in b["commands"].items():
        old = a["commands"].get(name, {"calls": 0, "usec": 0})
        d = {"calls": v["calls"] - old["calls"], "usec": v["usec"] - old["usec"]}
        if d["calls"]:
            cmds[name] = d
    # Our own INFO calls (3 per snapshot) are not the system's work.
    info_calls = cmds.pop("info", {"calls": 0})["calls"]
    return {
        "total_commands_processed": b["total_commands_processed"]
        - a["total_commands_processed"]
        - info_calls,
        "net_input_bytes": b["total_net_input_bytes"] - a["total_net_input_bytes"],
        "cpu_s": b["cpu_s"] - a["cpu_s"],
        "commands": dict(sorted(cmds.items(), key=lambda kv: -kv[1]["calls"])),
    }


def _calls(delta: dict[str, Any], name: str) -> int:
    return int(delta["commands"].get(name, {}).get("calls", 0))


def _usec(delta: dict[str, Any], name: str) -> int:
    return int(delta["commands"].get(name, {}).get("usec", 0))


# --------------------------------------------------------------------------------------------
# Helpers


def key_of(tag: str, i: int) -> bytes:
    return hashlib.blake2b(f"{tag}/{i}".encode(), digest_size=16).digest()


def chunks(items: Sequence[Any], n: int) -> list[Sequence[Any]]:
    return [items[i : i + n] for i in range(0, len(items), n)]


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


# --------------------------------------------------------------------------------------------
# 1. Lookup latency


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


def bench_lookup(url: str, redis_port: int, name: str, plan: Plan, nonce: str) -> dict[str, Any]:
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
        reader = getattr(reg, "_reader", None)
        has_locate = hasattr(reg, "locate")
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
                if has_locate:
                    _, where = timed(f"Registry.locate {longest}", lambda: reg.locate(k_long, live))
                    check(
                        next((i for i, j in enumerate(where) if j < 0), longest), longest, "locate"
                    )
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
                top = ("fcall_ro",) if _calls(d, "fcall_ro") else ("hget", "hmget", "ping")
                server[label] = {
                    "redis_cpu_us": d["cpu_s"] * 1e6 / n,
                    "command_us": sum(_usec(d, x) for x in top) / n,
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
            if reader is not None
            else "redis-py pipeline",
            "locate_available": has_locate,
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


# --------------------------------------------------------------------------------------------
# 2. Aggregate GET throughput


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


def bench_throughput(
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
# 3. Index upkeep


def bench_upkeep(
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
        fcalls_redis = _calls(d, "fcall")
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
                "hset": _calls(d, "hset") / n,
                "hget": _calls(d, "hget") / n,
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
# 4. Failover


def bench_failover(
    url: str, nodes: list[Node], keys: list[bytes], data: Blocks, plan: Plan
) -> dict[str, Any]:
    import kvpool.cluster
    from kvpool.cluster import Cluster

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
    epoch_poll = float(getattr(kvpool.cluster, "_EPOCH_POLL_SECONDS", 0.2))
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
        "worst_case_after_kill_s": plan.lease_ttl + plan.lease_ttl / 3 + epoch_poll,
        "loop_client_view_dropped": loop_view_dropped,
        "max_latency_during_failure_ms": during["max_ms"],
        "before": before,
        "during": during,
        "after": after,
    }


# --------------------------------------------------------------------------------------------
# Report


def _f(x: Any, fmt: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def print_report(report: dict[str, Any]) -> None:
    meta = report["meta"]
    print()
    print(f"kvpool cluster benchmark, loopback, {meta['cpus']} CPUs. NOTE: {LOAD_NOTE}.")
    print(f"loadavg at start {meta['loadavg_start']}, at end {meta['loadavg_end']}")

    lk = report.get("lookup")
    print()
    print("1. Index lookup latency (3 nodes), ms")
    if not lk or "error" in lk:
        print(f"   FAILED: {lk.get('error') if lk else 'not run'}")
    else:
        print(
            f"   {lk['lookups']} lookups per run after {lk['warmup_lookups']} warm-up, per "
            f"index size; index read by {lk['index_reader']}"
        )
        for state, st in lk["states"].items():
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
                        f"   {label:<50}{_f(s['p50_ms'], '.3f'):>9}{_f(s['p99_ms'], '.3f'):>9}"
                        f"{_f(s['mean_ms'], '.3f'):>9}{_f(s['max_ms'], '.3f'):>9}"
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

    tp = report.get("throughput")
    print()
    print("2. Aggregate GET throughput, get_into, GB/s (1e9 B/s), median of rounds")
    if not tp or "error" in tp:
        print(f"   FAILED: {tp.get('error') if tp else 'not run'}")
    else:
        print(
            f"   {tp['block_bytes'] // KIB} KiB blocks, batches of {tp['batch']}, working set "
            f"{tp['working_set_blocks']} blocks, {tp['rounds']} rounds; loadavg {tp.get('loadavg')}"
        )
        print(f"   {'target':<28}{'threads':<12}{'GB/s':>8}{'p50 ms':>9}{'p99 ms':>9}  rounds")
        for cell in tp["cells"]:
            th = f"x{cell['threads']}{' shared' if cell['shared_client'] else ''}"
            lat = cell["latency"]
            print(
                f"   {cell['target']:<28}{th:<12}{cell['gbps']:>8.2f}{lat['p50_ms']:>9.2f}"
                f"{lat['p99_ms']:>9.2f}  {cell['rounds_gbps']}"
            )
        for cell in tp.get("failed_cells", []):
            th = f"x{cell['threads']}{' shared' if cell['shared_client'] else ''}"
            print(f"   {cell['target']:<28}{th:<12}  FAILED: {cell['error']}")
        for k, v in tp["ratios"].items():
            print(f"   ratio {k:<44} {v:.2f}x")

    up = report.get("upkeep")
    print()
    print("3. Index upkeep: Redis work per stored block")
    if not up or "error" in up:
        print(f"   FAILED: {up.get('error') if up else 'not run'}")
    else:
        rl = up["relay"]
        pb = up["redis_per_block"]
        print(
            f"   {up['blocks']} blocks x {up['block_bytes'] // KIB} KiB, put batches of "
            f"{up['put_batch']}, {up['nodes']} nodes: put {up['put_seconds']:.2f}s, index "
            f"complete {up['index_lag_s'] * 1e3:.0f} ms after the last put; evictions "
            f"{up['evictions']}; loadavg {up.get('loadavg')}"
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
            f"{up['redis_fcall_per_64_blocks_per_node']:.3f} (commandstats)"
        )
        print(
            f"   {'node':<16}{'blocks':>8}{'pub RTTs':>10}{'pub FCALLs':>12}{'heartbeats':>12}"
            f"{'RTT/64 blk':>12}{'FCALL/64 blk':>14}{'RTT lower bd/64':>17}"
        )
        for nid, s in rl["per_node"].items():
            print(
                f"   {nid:<16}{s['blocks']:>8}{s['publish_round_trips']:>10}"
                f"{s['publish_fcalls']:>12}{s['heartbeat_fcalls']:>12}"
                f"{_f(s['publish_round_trips_per_64_blocks'], '.3f'):>12}"
                f"{_f(s['publish_fcalls_per_64_blocks'], '.3f'):>14}"
                f"{_f(s['round_trip_lower_bound_per_64_blocks'], '.3f'):>17}"
            )
        rtt = rl["publish_round_trips_per_64_blocks_per_node"]
        print(
            f"   publish round trips per 64 blocks per node (relay count, upper bound): "
            f"{rtt:.3f} -> target <= {up['target_round_trips_per_64_blocks_per_node']}: "
            f"{'MET' if rtt <= up['target_round_trips_per_64_blocks_per_node'] else 'MISSED'}"
        )
        cc = up["fcall_crosscheck"]
        print(
            f"   cross-check FCALLs: Redis commandstats {cc['redis_commandstats_fcall']}, "
            f"relay {cc['relay_fcall']}"
        )
        top = list(up["redis"]["commands"].items())[:8]
        print("   commandstats delta: " + ", ".join(f"{k} {v['calls']}" for k, v in top))

    fo = report.get("failover")
    print()
    print("4. Failover: kill -9 of 1 of 3 nodes under a get_into loop")
    if not fo or "error" in fo:
        print(f"   FAILED: {fo.get('error') if fo else 'not run'}")
    else:
        print(
            f"   client exceptions: {fo['exceptions']} (must be 0) over {fo['calls']} calls; "
            f"max call latency during the failure {fo['max_latency_during_failure_ms']:.1f} ms "
            f"(client timeout {fo['client_timeout_s']:.0f} s); loadavg {fo.get('loadavg')}"
        )
        print(
            f"   Cluster.members() dropped the node {fo['members_dropped_after_kill_s']:.2f}s "
            f"after the kill = its last heartbeat + TTL {fo['lease_ttl_s']:g}s "
            f"{fo['margin_over_ttl_s']:+.2f}s (lease expired "
            f"{fo['lease_expired_after_kill_s']:.2f}s after the kill; bound after the kill: TTL + "
            f"heartbeat interval {fo['heartbeat_interval_s']:g}s + epoch poll = "
            f"{fo['worst_case_after_kill_s']:.1f}s); the looping client's view dropped it too: "
            f"{fo['loop_client_view_dropped']}"
        )
        print(
            f"   {'window':<10}{'calls':>7}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'hit rate':>10}"
        )
        for w in ("before", "during", "after"):
            s = fo[w]
            print(
                f"   {w:<10}{s['count']:>7}{_f(s['p50_ms']):>9}{_f(s['p99_ms']):>9}"
                f"{_f(s['max_ms']):>9}{_f(s['hit_rate'], '.3f'):>10}"
            )
        if fo["first_exceptions"]:
            print(f"   first exceptions: {fo['first_exceptions']}")
    print()


def lookup_breakdown(state: dict[str, Any], longest: int) -> dict[str, float]:
    p = {k: v["p50_ms"] for k, v in state["latency"].items()}
    mp = p[f"Cluster.match_prefix {longest}"]
    read_label = (
        f"Registry.locate {longest}"
        if f"Registry.locate {longest}" in p
        else f"Registry.lookup_with_epoch {longest}"
    )
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
                    lambda: bench_upkeep(url, redis_port, up_nodes, up_relay, plan, nonce),
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
                        lambda: bench_lookup(url, redis_port, three[0].cluster, plan, nonce),
                    )
                if "throughput" in phases or "failover" in phases:
                    run_phase(
                        report,
                        "throughput",
                        lambda: bench_throughput(url, three, one, plan, nonce, data),
                    )
                if "failover" in phases:
                    run_phase(
                        report,
                        "failover",
                        lambda: bench_failover(url, three, ws_keys, data, plan),
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
