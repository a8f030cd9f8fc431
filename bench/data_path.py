#!/usr/bin/env python3
"""End-to-end data-path benchmark: kvpool against the loopback link and its peers, in one run.

Measures, on 127.0.0.1 only:

- iperf3, one TCP stream over loopback: the link's limit, the denominator of every ratio;
- memcpy, one thread, cold buffers (numpy copies of the same blocks): the other physical limit;
- kvpool over TCP: a real ``kvpool server`` process; ``Client(transport="tcp")``, ``put`` and
  zero-copy ``get_into``;
- kvpool over shared memory (``kvpool-shm``): a second ``kvpool server`` process; one client
  thread with ``Client(transport="shm")``, PUT and GET from and into buffers of the client's
  staging arena (``staging_buffer``: the node does the one copy), and the same with ordinary
  numpy buffers (their bytes ride inline on the unix socket). Its rounds are interleaved with
  single-thread memcpy rounds of the same bytes between the same buffers, the denominator of
  its ratios (targets: >= 0.8x memcpy at 256 KiB and 2 MiB, GET and PUT);
- kvpool over RDMA (``kvpool-rdma``): the same rows, table and checks with
  ``Client(transport="rdma")`` on the software verbs provider (``KVPOOL_RDMA_PROVIDER=soft`` in
  the node and in this process; the node moves staging buffers with RDMA READ for PUT and WRITE
  for GET, which that provider does with process_vm_readv/writev; ordinary buffers ride inline
  on the TCP socket). It measures the transport's own overhead, not hardware: besides memcpy,
  each round is interleaved with a bare process_vm_writev (PUT) / process_vm_readv (GET) of the
  same bytes between this process and a peer process, the provider's own limit (targets:
  >= 0.6x memcpy at 256 KiB and 2 MiB, GET and PUT). A user with a real device runs
  ``bench/data_path.py --transport rdma --rdma-provider ibverbs [--rdma-devices mlx5_0
  --rdma-link-type IB|Ethernet --rdma-port 1]``: node and client on this host, bytes through the
  NIC (loopback), each staging row judged against the port's line rate read from
  ``/sys/class/infiniband/<dev>/ports/<port>/rate`` (target >= 0.8x at >= 256 KiB; in loopback
  the bytes cross the NIC's PCIe link in both directions, so a port faster than that link,
  e.g. 400G on PCIe Gen4 x16, is capped by PCIe; SDR..QDR rates are signalling rates, above
  the data rate);
- Redis 7 through redis-py + hiredis: pipelined SET / GET of the same blocks;
- Mooncake Store over TCP (when ``mooncake-transfer-engine-non-cuda`` imports): master, HTTP
  metadata server and a storage process, a client with registered buffers calling
  ``batch_put_from`` / ``batch_get_into``. Mooncake listens on all addresses whatever it is told,
  so that part runs in a child of this script inside a private network namespace
  (``unshare -n``, loopback only) and hands its results back as JSON.

Every cell (system, PUT/GET, block size, client threads) moves batches of ``--batch`` blocks:
one warm-up round, then ``--rounds`` measured rounds; throughput is the median round, latency
percentiles pool the batches of all measured rounds. PUTs write fresh keys every round (the
round's keys are deleted afterwards, untimed); GETs read a working set written beforehand. After
each round one block per thread is compared byte for byte, so a broken path cannot report a
fast number. Each client thread has its own connection (its own ``kvpool.Client`` / Redis
connection); Mooncake's threads share one store client, the way it is meant to be used.

The CPU time of each server process (kvpool nodes, redis-server) is read from /proc/<pid>/stat
(utime + stime, all threads) before and after every measured round and reported per GB moved.
The shared-memory and RDMA sections also check the node's transport counters: the staging rows'
bytes (every round) went through the arena (``copied_in`` / ``copied_out``, exactly), and no
other transport moved a byte.

What a build or a feature costs the data path is two runs compared (each row's ratio to the
physical limit measured beside it is what to compare, since the machine drifts between runs):
``--node-python VENV/bin/python`` runs every node from another build (e.g. the commit before a
change); ``--auth`` gives nodes and clients a data-plane token; ``--node-metrics SECONDS`` gives
every node a metrics port and scrapes /metrics that often throughout the run.

Usage:  python bench/data_path.py [--quick] [--sizes 64KiB,256KiB,2MiB] [--threads 1,4]
            [--systems kvpool,kvpool-shm,kvpool-rdma,redis,mooncake | --transport tcp|shm|rdma]
            [--shm-rounds 9] [--rdma-provider soft|ibverbs --rdma-devices LIST ...]
            [--node-python PATH] [--auth] [--node-metrics SECONDS]
Results: a table on stdout, progress on stderr, everything in bench/results/data_path.json.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from _util import (
    LatencyStats,
    ProcessSet,
    ServiceError,
    chunks,
    format_size,
    free_port,
    install_interrupt_handlers,
    log,
    median,
    run_main,
    run_meta,
    start_redis,
    wait_for_port,
)
from kvpool.errors import KVPoolError

HOST = "127.0.0.1"
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_JSON = BENCH_DIR / "results" / "data_path.json"
SYSTEMS = ("kvpool", "kvpool-shm", "kvpool-rdma", "redis", "mooncake")
TRANSPORT_SYSTEMS = {"tcp": "kvpool", "shm": "kvpool-shm", "rdma": "kvpool-rdma"}  # --transport
OPS = ("PUT", "GET")
SOURCE_BYTES = 256 << 20  # random block contents, larger than any cache
SOURCE_SEED = 0x6B7670
DEST_BYTES = 64 << 20  # per client thread: where GETs land
MOONCAKE_LOCAL_BUFFER = 512 << 20
MOONCAKE_NOISE = r"^([IWE]\d{4} |WARNING: Logging before InitGoogleLogging)"


class BenchError(RuntimeError):
    """A system answered wrongly (miss, short write, corrupt bytes): its numbers are void."""


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of process ``pid`` (live and exited), in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        # The command name (field 2) may hold spaces; the fields after it are numbers.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def host_steal_seconds() -> float:
    """CPU time the hypervisor gave to others while this machine's CPUs wanted to run (all CPUs,
    /proc/stat); 0 where the kernel does not count it."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = f.readline().split()
    return int(fields[8]) / CLOCK_TICKS if len(fields) > 8 else 0.0


# --------------------------------------------------------------------------------------------
# Plan and data


@dataclass(frozen=True)
class Plan:
    sizes: tuple[int, ...]
    threads: tuple[int, ...]
    batch: int
    rounds: int
    round_bytes: int  # moved per measured round (all threads together)
    min_batches: int  # per round, so large blocks still give latency samples
    working_set_bytes: int  # what GETs read from, per block size
    iperf_seconds: int
    kvpool_memory: str
    shm_rounds: int  # measured rounds of the shared-memory section (it is cheap; CPU ticks are not)
    mooncake_segment: int
    mooncake_warmup_bytes: int

    def batches_per_thread(self, size: int, threads: int) -> int:
        total = max(self.min_batches, math.ceil(self.round_bytes / (size * self.batch)))
        return max(1, math.ceil(total / threads))

    def working_set_blocks(self, size: int) -> int:
        return max(self.batch, self.working_set_bytes // size)


class Data:
    """Block contents (one random arena, read-only) and per-thread destination arenas."""

    def __init__(self, max_threads: int, max_batch_bytes: int) -> None:
        rng = np.random.default_rng(SOURCE_SEED)
        self.source = np.frombuffer(rng.bytes(SOURCE_BYTES), dtype=np.uint8)
        dest_bytes = max(DEST_BYTES, 2 * max_batch_bytes)
        self.dests = [np.empty(dest_bytes, dtype=np.uint8) for _ in range(max_threads)]
        for d in self.dests:
            d.fill(0x5A)  # fault every page in now, not inside a timed round

    def block(self, size: int, g: int) -> np.ndarray:
        """Contents of block number ``g`` (any integer) of ``size`` bytes."""
        slots = SOURCE_BYTES // size
        off = (g % slots) * size
        return self.source[off : off + size]

    def scratch(self, size: int) -> np.ndarray:
        """A zeroed buffer for untimed read-backs (inside a registered arena, for Mooncake)."""
        buf = self.dests[0][:size]
        buf.fill(0)
        return buf

    def dest_batch(
        self, thread: int, size: int, batch: int, b: int, *, final: bool = False
    ) -> list[np.ndarray]:
        """Destination buffers for batch ``b`` of a thread. Batches cycle through the thread's
        arena; a round's ``final`` batch (the one checked) has a slot of its own, so stale
        bytes from an earlier batch can never pass for its result."""
        arena = self.dests[thread]
        span = size * batch
        slots = arena.nbytes // span
        off = (slots - 1 if final else b % (slots - 1)) * span
        return [arena[off + i * size : off + (i + 1) * size] for i in range(batch)]


# --------------------------------------------------------------------------------------------
# Systems under test


class Conn(Protocol):
    """One client thread's handle on a system. ``prepare`` does everything that is not data
    movement (argument lists, pointers) outside the timed region."""

    def prepare(self, keys: list[Any], buffers: list[np.ndarray]) -> Any: ...

    def put(self, prepared: Any) -> None: ...

    def get(self, prepared: Any) -> Sequence[Any]:
        """Reads the batch; returns each block's bytes (the destination buffers when the
        system reads in place)."""
        ...

    def delete(self, keys: list[Any]) -> None: ...

    def close(self) -> None: ...


class System(Protocol):
    name: str
    note: str
    node_pid: int | None  # the server process whose CPU time is measured, when there is one

    def key(self, tag: str, i: int) -> Any: ...

    def connect(self) -> Conn: ...


def _check_all(what: str, results: Sequence[Any], ok: Callable[[Any], bool]) -> None:
    bad = [i for i, r in enumerate(results) if not ok(r)]
    if bad:
        raise BenchError(
            f"{what}: {len(bad)}/{len(results)} failed (first #{bad[0]}: {results[bad[0]]!r:.80})"
        )


class KVPoolConn:
    def __init__(self, address: str, transport: str) -> None:
        import kvpool

        self._client = kvpool.Client(address, timeout=60.0, transport=transport)
        self._client.stats()  # connects: ``transport`` tells the connection's kind from now on
        if self._client.transport != transport:
            raise BenchError(f"kvpool client asked for {transport}, got {self._client.transport}")

    def prepare(self, keys: list[Any], buffers: list[np.ndarray]) -> Any:
        return keys, buffers

    def put(self, prepared: Any) -> None:
        keys, blocks = prepared
        held = self._client.put(keys, blocks)
        if held != len(keys):
            raise BenchError(f"kvpool put held {held} of {len(keys)} blocks")

    def get(self, prepared: Any) -> Sequence[Any]:
        keys, dests = prepared
        _check_all("kvpool get_into", self._client.get_into(keys, dests), bool)
        return dests  # type: ignore[no-any-return]

    def delete(self, keys: list[Any]) -> None:
        self._client.delete(keys)

    def close(self) -> None:
        self._client.close()


def kvpool_key(tag: str, i: int) -> bytes:
    return hashlib.blake2b(f"{tag}/{i}".encode(), digest_size=16).digest()


class KVPoolSystem:
    name = "kvpool"
    note = (
        "kvpool server process; one kvpool.Client(transport='tcp') per thread (the node also "
        "serves shm, which 'auto' would pick); put() and get_into()"
    )

    def __init__(self, address: str, node_pid: int) -> None:
        self.address = address
        self.node_pid: int | None = node_pid

    def key(self, tag: str, i: int) -> Any:
        return kvpool_key(tag, i)

    def connect(self) -> Conn:
        return KVPoolConn(self.address, "tcp")


class RedisConn:
    def __init__(self, port: int) -> None:
        import redis

        self._r = redis.Redis(host=HOST, port=port, socket_timeout=60.0)

    def prepare(self, keys: list[Any], buffers: list[np.ndarray]) -> Any:
        # bytes made here, untimed: redis-py + hiredis would otherwise copy each view into a new
        # bytes object inside the timed call. This favours Redis; the ratios stay conservative.
        return keys, [b.tobytes() for b in buffers], buffers[0].nbytes

    def put(self, prepared: Any) -> None:
        keys, views, _ = prepared
        pipe = self._r.pipeline(transaction=False)
        for k, v in zip(keys, views, strict=True):
            pipe.set(k, v)
        _check_all("redis SET", pipe.execute(), lambda r: r is True)

    def get(self, prepared: Any) -> Sequence[Any]:
        keys, _, size = prepared
        pipe = self._r.pipeline(transaction=False)
        for k in keys:
            pipe.get(k)
        values: list[Any] = pipe.execute()
        _check_all("redis GET", values, lambda v: isinstance(v, bytes) and len(v) == size)
        return values

    def delete(self, keys: list[Any]) -> None:
        self._r.delete(*keys)

    def close(self) -> None:
        self._r.close()


class RedisSystem:
    name = "redis"
    note = (
        "redis-server 7, --save '' --appendonly no; redis-py + hiredis, one connection per "
        "thread, pipelined SET/GET; SET values are bytes objects made outside the timed region; "
        "GET returns bytes objects (no copy into destination buffers)"
    )

    def __init__(self, port: int, node_pid: int) -> None:
        self.port = port
        self.node_pid: int | None = node_pid

    def key(self, tag: str, i: int) -> Any:
        return f"{tag}/{i}".encode()

    def connect(self) -> Conn:
        return RedisConn(self.port)


class MooncakeConn:
    """Threads share the process's one store client (it is thread-safe)."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def prepare(self, keys: list[Any], buffers: list[np.ndarray]) -> Any:
        return keys, [b.ctypes.data for b in buffers], [b.nbytes for b in buffers], buffers

    def put(self, prepared: Any) -> None:
        keys, ptrs, sizes, _ = prepared
        _check_all(
            "mooncake batch_put_from",
            self._store.batch_put_from(keys, ptrs, sizes),
            lambda rc: rc == 0,
        )

    def get(self, prepared: Any) -> Sequence[Any]:
        keys, ptrs, sizes, dests = prepared
        got = self._store.batch_get_into(keys, ptrs, sizes)
        _check_all("mooncake batch_get_into", got, lambda n: n == sizes[0])
        return dests  # type: ignore[no-any-return]

    def delete(self, keys: list[Any]) -> None:
        self._store.batch_remove(keys, True)

    def close(self) -> None:
        pass


class MooncakeSystem:
    name = "mooncake"
    note = (
        "Mooncake Store over TCP in a private network namespace: mooncake_master, HTTP metadata "
        "server, separate storage process (2 GiB segment); client with 0 global segment and "
        "512 MiB local buffer, registered buffers, batch_put_from / batch_get_into; threads "
        "share the one store client"
    )

    def __init__(self, store: Any) -> None:
        self.store = store
        self.node_pid: int | None = None  # storage and master split the work; not measured

    def key(self, tag: str, i: int) -> Any:
        return f"{tag}/{i}"

    def connect(self) -> Conn:
        return MooncakeConn(self.store)


# --------------------------------------------------------------------------------------------
# Measurement


@dataclass
class Cell:
    op: str
    threads: int
    block_bytes: int
    batch: int
    batches_per_round: int
    bytes_per_round: int
    gbps: float  # median of rounds, GB = 1e9 bytes
    rounds_gbps: list[float]
    latency: LatencyStats
    verified_blocks: int
    # The server process's CPU time summed over the measured rounds, and per GB they moved.
    node_cpu_s: float | None = None
    node_cpu_s_per_gb: float | None = None


@dataclass
class SystemResult:
    available: bool
    note: str = ""
    reason: str = ""
    cells: list[Cell] = field(default_factory=list)


def _verify(what: str, got: Any, expected: np.ndarray) -> None:
    actual = np.frombuffer(got, dtype=np.uint8)
    if actual.nbytes != expected.nbytes or not np.array_equal(actual, expected):
        raise BenchError(f"{what}: block differs from what was written")


class Runner:
    def __init__(self, system: System, plan: Plan, data: Data, nonce: str) -> None:
        self.system = system
        self.plan = plan
        self.data = data
        self.nonce = nonce
        self.conns = [system.connect() for _ in range(max(plan.threads))]
        self.rng = np.random.default_rng()

    def close(self) -> None:
        for c in self.conns:
            c.close()

    def _delete(self, keys: list[Any]) -> None:
        for chunk in chunks(keys, 256):
            self.conns[0].delete(list(chunk))

    def put_blocks(self, tag: str, size: int, count: int) -> list[Any]:
        """Untimed bulk write of blocks 0..count-1 (contents ``data.block(size, i)``)."""
        keys = [self.system.key(tag, i) for i in range(count)]
        for start in range(0, count, self.plan.batch):
            ks = keys[start : start + self.plan.batch]
            blocks = [self.data.block(size, start + i) for i in range(len(ks))]
            self.conns[0].put(self.conns[0].prepare(ks, blocks))
        return keys

    def _round(
        self, op: str, size: int, threads: int, nb: int, r: int, ws_keys: list[Any]
    ) -> tuple[float, list[float], int, float | None]:
        data, batch = self.data, self.plan.batch
        # Everything but the data movement is prepared here, outside the timed region.
        work: list[list[Any]] = []
        expect: list[list[list[np.ndarray]]] = []  # [thread][batch][block]
        round_keys: list[Any] = []
        for t in range(threads):
            conn = self.conns[t]
            batches: list[Any] = []
            expected: list[list[np.ndarray]] = []
            if op == "PUT":
                tag = f"{self.nonce}/put/{size}/{threads}/{r}/{t}"
                for b in range(nb):
                    gs = [(t * nb + b) * batch + i for i in range(batch)]
                    keys = [self.system.key(tag, g) for g in gs]
                    blocks = [data.block(size, g) for g in gs]
                    round_keys.extend(keys)
                    batches.append(conn.prepare(keys, blocks))
                    expected.append(blocks)
            else:
                n_ws = len(ws_keys)
                first = t * n_ws // threads + r * batch
                for b in range(nb):
                    ws = [(first + b * batch + i) % n_ws for i in range(batch)]
                    dests = data.dest_batch(t, size, batch, b, final=b == nb - 1)
                    batches.append(conn.prepare([ws_keys[w] for w in ws], dests))
                    expected.append([data.block(size, w) for w in ws])
                # The checked batch must really be written by this round's GET.
                for d in data.dest_batch(t, size, batch, nb - 1, final=True):
                    d.fill(0)
            work.append(batches)
            expect.append(expected)

        barrier = threading.Barrier(threads)
        spans: list[tuple[float, float]] = [(0.0, 0.0)] * threads
        lat: list[list[float]] = [[] for _ in range(threads)]
        last: list[Sequence[Any]] = [[] for _ in range(threads)]
        errors: list[BaseException] = []

        def worker(t: int) -> None:
            conn, mine, times = self.conns[t], work[t], lat[t]
            try:
                barrier.wait()
                start = time.perf_counter()
                result: Sequence[Any] = []
                for prepared in mine:
                    t0 = time.perf_counter()
                    if op == "PUT":
                        conn.put(prepared)
                    else:
                        result = conn.get(prepared)
                    times.append(time.perf_counter() - t0)
                spans[t] = (start, time.perf_counter())
                last[t] = result
            except BaseException as e:  # reported by the main thread
                errors.append(e)
                barrier.abort()

        pid = self.system.node_pid
        cpu0 = process_cpu_seconds(pid) if pid else 0.0
        pool = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join()
        node_cpu = process_cpu_seconds(pid) - cpu0 if pid else None
        if errors:
            raise errors[0]
        wall = max(e for _, e in spans) - min(s for s, _ in spans)
        gbps = threads * nb * batch * size / wall / 1e9

        # One block per thread, byte for byte, from the round's last batch.
        for t in range(threads):
            i = int(self.rng.integers(batch))
            if op == "PUT":
                key = self.system.key(
                    f"{self.nonce}/put/{size}/{threads}/{r}/{t}", (t * nb + nb - 1) * batch + i
                )
                scratch = [data.scratch(size)]
                got = self.conns[0].get(self.conns[0].prepare([key], scratch))[0]
                _verify(f"{self.system.name} PUT read-back", got, expect[t][-1][i])
            else:
                _verify(f"{self.system.name} GET", last[t][i], expect[t][-1][i])
        if round_keys:
            self._delete(round_keys)
        return gbps, [x for ts in lat for x in ts], threads, node_cpu

    def cell(self, op: str, size: int, threads: int, ws_keys: list[Any]) -> Cell:
        plan = self.plan
        nb = plan.batches_per_thread(size, threads)
        rounds: list[float] = []
        lats: list[float] = []
        cpus: list[float] = []
        verified = 0
        for r in range(-1, plan.rounds):  # round -1 warms up
            gbps, lat, checked, node_cpu = self._round(op, size, threads, nb, r, ws_keys)
            verified += checked
            if r >= 0:
                rounds.append(gbps)
                lats.extend(lat)
                if node_cpu is not None:
                    cpus.append(node_cpu)
        moved_gb = len(rounds) * nb * threads * plan.batch * size / 1e9
        cell = Cell(
            op=op,
            threads=threads,
            block_bytes=size,
            batch=plan.batch,
            batches_per_round=nb * threads,
            bytes_per_round=nb * threads * plan.batch * size,
            gbps=median(rounds),
            rounds_gbps=rounds,
            latency=LatencyStats.of(lats),
            verified_blocks=verified,
            node_cpu_s=sum(cpus) if cpus else None,
            node_cpu_s_per_gb=sum(cpus) / moved_gb if cpus else None,
        )
        cpu_note = (
            f", node CPU {cell.node_cpu_s_per_gb:.3f} s/GB"
            if cell.node_cpu_s_per_gb is not None
            else ""
        )
        log(
            f"  {self.system.name:8} {op} {format_size(size):>6} x{threads}: "
            f"{cell.gbps:6.2f} GB/s (rounds {', '.join(f'{g:.2f}' for g in rounds)}), "
            f"p50 {cell.latency.p50_ms:.2f} ms, p99 {cell.latency.p99_ms:.2f} ms{cpu_note}"
        )
        return cell

    def run_all(self) -> list[Cell]:
        cells: list[Cell] = []
        for size in self.plan.sizes:
            for threads in self.plan.threads:
                cells.append(self.cell("PUT", size, threads, []))
            n_ws = self.plan.working_set_blocks(size)
            ws_keys = self.put_blocks(f"{self.nonce}/ws/{size}", size, n_ws)
            probe = self.conns[0].get(
                self.conns[0].prepare([ws_keys[-1]], [self.data.scratch(size)])
            )[0]
            _verify(f"{self.system.name} working set", probe, self.data.block(size, n_ws - 1))
            for threads in self.plan.threads:
                cells.append(self.cell("GET", size, threads, ws_keys))
            self._delete(ws_keys)
        return cells


def measure(system: System, plan: Plan, data: Data, nonce: str) -> SystemResult:
    runner = Runner(system, plan, data, nonce)
    try:
        return SystemResult(available=True, note=system.note, cells=runner.run_all())
    finally:
        runner.close()


# --------------------------------------------------------------------------------------------
# Physical references


def run_iperf3(seconds: int) -> dict[str, Any]:
    try:
        return _run_iperf3(seconds)
    except (ServiceError, subprocess.TimeoutExpired, ValueError, KeyError) as e:
        return {"available": False, "reason": f"{type(e).__name__}: {e}"}


def _run_iperf3(seconds: int) -> dict[str, Any]:
    exe = shutil.which("iperf3")
    if exe is None:
        return {"available": False, "reason": "iperf3 not on PATH (apt-get install iperf3)"}
    port = free_port()
    with ProcessSet() as procs:
        server = procs.start(
            "iperf3 -s", [exe, "-s", "-1", "-p", str(port), "-B", HOST, "--forceflush"]
        )
        server.wait_for_line(r"Server listening on", timeout=10)
        out = subprocess.run(
            [exe, "-c", HOST, "-p", str(port), "-t", str(seconds), "-J"],
            capture_output=True,
            text=True,
            timeout=seconds + 30,
            check=False,
        )
        if out.returncode != 0:
            raise ServiceError(f"iperf3 -c failed ({out.returncode}): {out.stdout[-500:]}")
        bps = float(json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"])
    return {"available": True, "gbps": bps / 8e9, "bits_per_second": bps, "seconds": seconds}


def combine_iperf(first: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
    runs = [r for r in (first, last) if r.get("available")]
    if not runs:
        return first
    return {
        "available": True,
        "gbps": max(r["gbps"] for r in runs),
        "runs_gbps": [r["gbps"] for r in runs],
        "seconds": runs[0]["seconds"],
        "command": "iperf3 -c 127.0.0.1 -t SECONDS -J against iperf3 -s -1 -B 127.0.0.1",
    }


def run_memcpy(plan: Plan, data: Data) -> dict[str, Any]:
    """One thread copying blocks between two arenas that dwarf the caches."""
    dst = np.empty(SOURCE_BYTES, dtype=np.uint8)
    dst.fill(0)
    out: dict[str, Any] = {}
    for size in plan.sizes:
        n = plan.batches_per_thread(size, 1) * plan.batch
        slots = SOURCE_BYTES // size
        rounds = []
        for r in range(-1, plan.rounds):
            shift = (r + 1) * 7919  # source and destination walk out of step
            pairs = [
                (dst[(j % slots) * size : (j % slots + 1) * size], data.block(size, j + shift))
                for j in range(n)
            ]
            t0 = time.perf_counter()
            for d, s in pairs:
                np.copyto(d, s)
            wall = time.perf_counter() - t0
            if not np.array_equal(pairs[-1][0], pairs[-1][1]):
                raise BenchError("memcpy copied wrong bytes")
            if r >= 0:
                rounds.append(n * size / wall / 1e9)
        out[str(size)] = {"gbps": median(rounds), "rounds_gbps": rounds}
        log(f"  memcpy   {format_size(size):>6}: {median(rounds):6.2f} GB/s")
    return out


# --------------------------------------------------------------------------------------------
# kvpool and Redis (in this process)


@dataclass
class NodeOptions:
    """How every ``kvpool server`` of the run is started (``--node-python``, ``--auth``,
    ``--node-metrics``): to measure what a build or a feature costs, run twice and compare."""

    python: str = sys.executable
    auth_token: str = ""  # also in this process's KVPOOL_AUTH_TOKEN, for the clients
    scrape_interval: float = 0.0  # > 0: a metrics port on each node, scraped this often
    scrapers: list[Scraper] = field(default_factory=list)


class Scraper:
    """GETs a node's /metrics every ``interval`` seconds until closed or the node exits; counts
    and times it (a failure while the node runs is a failure)."""

    def __init__(self, url: str, interval: float, alive: Callable[[], bool]) -> None:
        self.url, self.interval, self._alive = url, interval, alive
        self.scrapes, self.seconds, self.failures = 0, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import urllib.request

        while not self._stop.wait(self.interval):
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    r.read()
                self.scrapes += 1
                self.seconds += time.perf_counter() - t0
            except OSError:
                if not self._alive():
                    return  # its section is over
                self.failures += 1

    def close(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(10)
        mean = self.seconds / self.scrapes * 1e3 if self.scrapes else None
        return {"url": self.url, "scrapes": self.scrapes, "failures": self.failures,
                "mean_ms": mean}  # fmt: skip


NODE = NodeOptions()


def start_kvpool(
    procs: ProcessSet,
    plan: Plan,
    env: dict[str, str] | None = None,
    extra: Sequence[str] = (),
) -> tuple[Any, str]:
    """A ``kvpool server`` (TCP and shared memory, the defaults; RDMA too where ``env`` names a
    provider) on a free port, ready; started as ``NODE`` says."""
    argv = [NODE.python, "-m", "kvpool", "server", "--port", "0"]
    argv += ["--memory", plan.kvpool_memory, "--log-level", "info", *extra]
    env = dict(env or {})
    if NODE.auth_token:
        env["KVPOOL_AUTH_TOKEN"] = NODE.auth_token
    metrics_port = free_port() if NODE.scrape_interval > 0 else 0
    if metrics_port:
        argv += ["--metrics-port", str(metrics_port)]
    server = procs.start("kvpool server", argv, env=env)
    m = server.wait_for_line(r"listening on ([0-9.]+):(\d+)", timeout=120)
    address = f"{m.group(1)}:{m.group(2)}"
    log(f"kvpool server pid {server.pid} on {address} ({plan.kvpool_memory})")
    if metrics_port:
        server.wait_for_line(r"metrics on http://", timeout=60)
        url = f"http://{HOST}:{metrics_port}/metrics"
        NODE.scrapers.append(Scraper(url, NODE.scrape_interval, lambda: server.proc.poll() is None))
        log(f"  scraping {url} every {NODE.scrape_interval:g}s")
    return server, address


def transport_counters(address: str, transport: str) -> dict[str, dict[str, int]]:
    import kvpool

    client = kvpool.Client(address, timeout=60.0, transport=transport)
    try:
        counters: dict[str, dict[str, int]] = client.stats()["transports"]
        return counters
    finally:
        client.close()


def counter_delta(
    before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]
) -> dict[str, dict[str, int]]:
    keys = ("bytes_in", "bytes_out", "copied_in", "copied_out")
    return {
        t: {k: after[t][k] - before.get(t, {}).get(k, 0) for k in keys if k in after[t]}
        for t in after
    }


def check_only_over(transport: str, moved: dict[str, dict[str, int]]) -> None:
    """No node counter of another transport moved during a section that used ``transport``."""
    others = sorted(t for t, c in moved.items() if t != transport and any(c.values()))
    if others:
        raise BenchError(f"the {transport} section moved bytes over {others}: {moved}")


def bench_kvpool(plan: Plan, data: Data, nonce: str) -> SystemResult:
    with ProcessSet() as procs:
        server, address = start_kvpool(procs, plan)
        before = transport_counters(address, "tcp")
        result = measure(KVPoolSystem(address, server.pid), plan, data, nonce)
        moved = counter_delta(before, transport_counters(address, "tcp"))
        server.check_alive()
        check_only_over("tcp", moved)
        log(f"  kvpool node transport counters moved: {moved}")
        return result


def bench_redis(plan: Plan, data: Data, nonce: str) -> SystemResult:
    exe = shutil.which("redis-server")
    if exe is None:
        return SystemResult(False, reason="redis-server not on PATH (apt-get install redis-server)")
    try:
        import redis
        import redis.utils
    except ImportError as e:
        return SystemResult(False, reason=f"redis-py missing: {e}")
    if not redis.utils.HIREDIS_AVAILABLE:
        return SystemResult(False, reason="hiredis is not installed (pip install hiredis)")
    with ProcessSet() as procs:
        server, port = start_redis(procs)
        result = measure(RedisSystem(port, server.pid), plan, data, nonce)
        server.check_alive()
        return result


# --------------------------------------------------------------------------------------------
# kvpool over shared memory and over RDMA (same host), against memcpy of the same bytes


@dataclass(frozen=True)
class ArenaTransport:
    """A transport on which the node moves the bytes of the client's staging arena itself."""

    name: str  # kvpool's transport name (and the report's key): shm, rdma
    title: str
    wire: str  # where ordinary buffers' bytes ride
    target: float  # x memcpy, staging buffers, at ARENA_TARGET_SIZES
    env: dict[str, str]  # for the node and for this process while the section runs
    # Also time a bare process_vm_writev / readv of the same bytes: the soft provider's limit.
    process_vm: bool = False
    node_args: tuple[str, ...] = ()  # more `kvpool server` flags (RDMA device selection)
    client_kwargs: dict[str, Any] = field(default_factory=dict)  # more kvpool.Client arguments
    line_rate_gbps: float | None = None  # the NIC port's rate (GB/s): a device's denominator
    line_rate_source: str = ""  # where it came from: the sysfs file and what it says


ARENA_TRANSPORTS = {
    "kvpool-shm": ArenaTransport("shm", "Shared memory", "the unix socket", 0.8, {}),
    "kvpool-rdma": ArenaTransport(
        "rdma",
        "RDMA on the software provider (process_vm_readv/writev, not hardware)",
        "the TCP socket",
        0.6,
        {"KVPOOL_RDMA_PROVIDER": "soft"},
        process_vm=True,
    ),
}
ARENA_TARGET_SIZES = (256 << 10, 2 << 20)
LINE_RATE_TARGET = 0.8  # x the NIC port's line rate, RDMA on a device, >= 256 KiB blocks


_PORT_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*Gb/sec(?:\s*\([^()]*\))?\s*")


def parse_port_rate(text: str) -> float:
    """sysfs ``ports/N/rate`` ("400 Gb/sec (4X NDR)", "25 Gb/sec (1X EDR)") -> Gb/s. ValueError
    naming the text for anything else, a rate of 0 included (it would void every ratio)."""
    m = _PORT_RATE.fullmatch(text)
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"not an RDMA port rate (like '400 Gb/sec (4X NDR)'): {text!r}")
    return float(m.group(1))


def ibverbs_transport(
    devices: str, link_type: str, port: int, sysfs: Path = Path("/sys/class/infiniband")
) -> ArenaTransport:
    """The kvpool-rdma section on a real device through libibverbs (node and client on this
    host: NIC loopback), judged against the port's line rate: that of the first device in
    ``devices`` (its name, without a GID index), else of the first device under ``sysfs`` by
    name, kvpool's own default. BenchError, one line, before anything starts: no device, a bad
    setting, the device not there, or no readable rate for its port."""
    from kvpool.rdma import RdmaSettings

    try:
        RdmaSettings(devices, link_type, port).check()
    except KVPoolError as e:
        raise BenchError(f"--rdma-devices/--rdma-link-type/--rdma-port: {e}") from None
    try:
        found = sorted(p.name for p in sysfs.iterdir())
    except OSError:
        found = []
    if not found:
        raise BenchError(
            f"no RDMA device under {sysfs}: --rdma-provider ibverbs needs one; the default "
            "soft provider runs anywhere"
        )
    device = devices.split(",")[0].split(":")[0].strip() if devices else found[0]
    if device not in found:
        raise BenchError(f"RDMA device {device!r} is not under {sysfs} (found: {', '.join(found)})")
    rate_file = sysfs / device / "ports" / str(port) / "rate"
    try:
        text = rate_file.read_text(encoding="ascii", errors="replace").strip()
        gbit = parse_port_rate(text)
    except OSError as e:
        raise BenchError(f"cannot read the line rate of {device} port {port}: {e}") from None
    except ValueError as e:
        raise BenchError(f"{rate_file}: {e}") from None
    # The device is named to node and client even when kvpool would pick it anyway, so the
    # bytes go where the denominator was read.
    devices = devices or device
    return ArenaTransport(
        "rdma",
        f"RDMA on {device} port {port} ({link_type}, libibverbs) through the NIC (node and "
        "client on this host: NIC loopback)",
        "the TCP socket",
        0.0,  # judged against line rate, not memcpy
        {"KVPOOL_RDMA_PROVIDER": "ibverbs"},
        node_args=("--rdma-devices", devices, "--rdma-link-type", link_type)
        + ("--rdma-port", str(port)),
        client_kwargs={"rdma_devices": devices, "rdma_link_type": link_type, "rdma_port": port},
        line_rate_gbps=gbit / 8,
        line_rate_source=f"{rate_file}: {text!r} = {gbit:g} Gb/s / 8",
    )


TCP_TARGET = 1.1  # x iperf3, one client thread


def arena_rows(tr: ArenaTransport) -> list[tuple[str, str, str]]:
    """Rows of a transport's table: (row, op, buffers). memcpy rows copy between the same
    staging buffers and a large arena the way the node does: PUT reads the staging buffer and
    writes memory that is not in cache, GET reads memory that is not in cache and writes the
    buffer; process_vm rows move the same bytes to and from another process's arena."""
    rows = []
    for op, way in (("PUT", "staging -> arena"), ("GET", "arena -> staging")):
        rows.append((f"memcpy {op}", "memcpy", way))
        if tr.process_vm:
            rows.append((f"process_vm {op}", "process_vm", way.replace("arena", "peer arena")))
        rows.append((f"{tr.name} {op} staging", op, "staging"))
        rows.append((f"{tr.name} {op} ordinary", op, "ordinary"))
    return rows


def arena_baselines(tr: ArenaTransport, base: str) -> dict[str, str]:
    """kvpool row -> the ``base`` (memcpy, process_vm) row its ratio divides by."""
    return {row: f"{base} {op}" for row, op, _ in arena_rows(tr) if op in OPS}


@dataclass
class ArenaCell:
    row: str
    op: str  # PUT, GET, memcpy or process_vm
    buffers: str  # staging (zero-copy), ordinary (inline on the socket), baseline direction
    block_bytes: int
    batch: int
    batches_per_round: int
    bytes_per_round: int
    gbps: float  # median of rounds
    rounds_gbps: list[float]
    latency: LatencyStats | None  # per batch (kvpool rows)
    node_cpu_s: float | None  # summed over the measured rounds (kvpool rows)
    node_cpu_s_per_gb: float | None
    client_cpu_s_per_gb: float  # this whole process, all its threads
    verified_blocks: int


@dataclass
class _Round:
    wall: float
    node_cpu: float
    client_cpu: float
    lat: list[float]
    verified: int


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


# The peer of the process_vm rows: Data.source again (GET reads it), an arena as large (PUT
# writes it), every page faulted in; it prints both addresses and waits for SIGTERM.
_PEER_CODE = """
import signal, sys
import numpy as np
n, seed = int(sys.argv[1]), int(sys.argv[2])
src = np.frombuffer(np.random.default_rng(seed).bytes(n), dtype=np.uint8)
dst = np.empty(n, dtype=np.uint8)
dst.fill(0)
print("peer ready", src.ctypes.data, dst.ctypes.data, flush=True)
signal.pause()
"""


class ProcessVmPeer:
    """Another process's memory, moved by bare process_vm_writev / readv calls from this one
    (one call per batch, one iovec per block): what the soft provider's copy costs without
    kvpool around it."""

    def __init__(self, procs: ProcessSet) -> None:
        argv = [sys.executable, "-c", _PEER_CODE, str(SOURCE_BYTES), str(SOURCE_SEED)]
        peer = procs.start("process_vm peer", argv)
        m = peer.wait_for_line(r"peer ready (\d+) (\d+)", timeout=120)
        self.pid, self.src, self.dst = peer.pid, int(m.group(1)), int(m.group(2))
        libc = ctypes.CDLL(None, use_errno=True)
        self._calls = {True: libc.process_vm_writev, False: libc.process_vm_readv}
        for fn in self._calls.values():
            fn.restype = ctypes.c_ssize_t
            iov = ctypes.POINTER(_Iovec)
            fn.argtypes = [ctypes.c_int, iov, ctypes.c_ulong, iov, ctypes.c_ulong, ctypes.c_ulong]

    def prepare(self, local: list[np.ndarray], remote: list[int], write: bool) -> Any:
        n = len(local)
        near = (_Iovec * n)(*[_Iovec(a.ctypes.data, a.nbytes) for a in local])
        far = (_Iovec * n)(*[_Iovec(r, a.nbytes) for a, r in zip(local, remote, strict=True)])
        return self._calls[write], near, far, n, sum(a.nbytes for a in local)

    def move(self, prepared: Any) -> None:
        fn, near, far, n, total = prepared
        moved = fn(self.pid, near, n, far, n, 0)
        if moved != total:
            raise BenchError(
                f"process_vm moved {moved} of {total} bytes (errno {ctypes.get_errno()})"
            )


class ArenaBench:
    """One client thread on a transport with a staging arena (shm, rdma); every round of every
    row is interleaved with the others, so load that comes and goes shifts them alike."""

    def __init__(
        self,
        tr: ArenaTransport,
        client: Any,
        node_pid: int,
        plan: Plan,
        data: Data,
        nonce: str,
        peer: ProcessVmPeer | None,
    ) -> None:
        self.tr = tr
        self.client = client
        self.node_pid = node_pid
        self.plan = plan
        self.data = data
        self.nonce = nonce
        self.peer = peer
        self.rng = np.random.default_rng()
        self.arena = np.empty(SOURCE_BYTES, dtype=np.uint8)  # memcpy PUT's destination
        self.arena.fill(0)

    # One timed loop for all kvpool rows: node CPU, own CPU and batch latency around it.
    def _timed(self, calls: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> _Round:
        lat: list[float] = []
        cpu0, own0 = process_cpu_seconds(self.node_pid), own_cpu_seconds()
        start = time.perf_counter()
        for fn, args in calls:
            t0 = time.perf_counter()
            fn(*args)
            lat.append(time.perf_counter() - t0)
        wall = time.perf_counter() - start
        own = own_cpu_seconds() - own0
        return _Round(wall, process_cpu_seconds(self.node_pid) - cpu0, own, lat, 0)

    def _put(self, keys: list[bytes], blocks: list[Any]) -> None:
        held = self.client.put(keys, blocks)
        if held != len(keys):
            raise BenchError(f"kvpool {self.tr.name} put held {held} of {len(keys)} blocks")

    def _get(self, keys: list[bytes], dests: list[Any]) -> None:
        _check_all(f"kvpool {self.tr.name} get_into", self.client.get_into(keys, dests), bool)

    def _delete(self, keys: list[bytes]) -> None:
        for chunk in chunks(keys, 256):
            self.client.delete(chunk)

    def run_size(self, size: int) -> list[ArenaCell]:
        plan, data, batch, name = self.plan, self.data, self.plan.batch, self.tr.name
        nb = plan.batches_per_thread(size, 1)
        span = batch * size
        slots = SOURCE_BYTES // size
        # Two staging buffers: every batch but a round's last one uses the first; the last one
        # (the one checked) has its own, so stale bytes never pass for its result.
        bufs = [self.client.staging_buffer(span), self.client.staging_buffer(span)]
        stage = [np.frombuffer(b, dtype=np.uint8) for b in bufs]
        for s in stage:
            s.fill(0)  # fault every page in here, not in a timed round
        views = [[b[i * size : (i + 1) * size] for i in range(batch)] for b in bufs]
        arrays = [[s[i * size : (i + 1) * size] for i in range(batch)] for s in stage]

        # GETs read a working set written beforehand (untimed, ordinary buffers).
        n_ws = plan.working_set_blocks(size)
        ws_keys = [kvpool_key(f"{self.nonce}/{name}-ws/{size}", i) for i in range(n_ws)]
        for start in range(0, n_ws, batch):
            ks = ws_keys[start : start + batch]
            self._put(ks, [data.block(size, start + i) for i in range(len(ks))])
        probe = data.scratch(size)
        self._get([ws_keys[-1]], [probe])
        _verify(f"kvpool {name} working set", probe, data.block(size, n_ws - 1))

        def ws_batch(r: int, b: int) -> list[int]:
            return [(r * batch + b * batch + i) % n_ws for i in range(batch)]

        # The baselines' blocks, batch by batch: PUT copies staging buffer 0 into arena slots
        # that walk out of step with it; GET copies source blocks into the staging buffers.
        def put_slots(r: int, b: int) -> list[int]:
            return [((r + 1) * 7919 + b * batch + i) % slots for i in range(batch)]

        def get_pairs(r: int, b: int) -> list[tuple[np.ndarray, int]]:
            dst = arrays[1 if b == nb - 1 else 0]
            return [(dst[i], (w + 7919) % slots) for i, w in enumerate(ws_batch(r, b))]

        def baseline(r: int, op: str, kind: str) -> _Round:
            if op == "PUT":
                pairs = [
                    (self.arena[j * size : (j + 1) * size], arrays[0][i], j)
                    for b in range(nb)
                    for i, j in enumerate(put_slots(r, b))
                ]
            else:
                pairs = [(d, data.block(size, g), g) for b in range(nb) for d, g in get_pairs(r, b)]
            peer, put = self.peer, op == "PUT"
            calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
            if peer is None or kind == "memcpy":
                calls = [(np.copyto, (d, s)) for d, s, _ in pairs]
            else:
                for part in chunks(pairs, batch):  # one call per batch
                    local = [s if put else d for d, s, _ in part]
                    remote = [(peer.dst if put else peer.src) + g * size for _, _, g in part]
                    calls.append((peer.move, (peer.prepare(local, remote, put),)))
            t0 = time.perf_counter()
            for fn, args in calls:
                fn(*args)
            wall = time.perf_counter() - t0
            d, s, g = pairs[-1]
            if peer is not None and kind == "process_vm" and put:
                d = data.scratch(size)  # read the peer's block back
                peer.move(peer.prepare([d], [peer.dst + g * size], False))
            if not np.array_equal(d, s):
                raise BenchError(f"{kind} {op} copied wrong bytes")
            return _Round(wall, 0.0, wall, [], 0)

        def kv_put(r: int, staging: bool) -> _Round:
            tag = f"{self.nonce}/{name}-put/{'staging' if staging else 'ordinary'}/{size}/{r}"
            first = (r + 1) * 7919 * batch  # this round's contents
            if staging:
                for i in range(batch):  # the round's contents, copied in untimed
                    np.copyto(arrays[0][i], data.block(size, first + i))
            keys = [[kvpool_key(tag, b * batch + i) for i in range(batch)] for b in range(nb)]
            calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
            expected: list[np.ndarray] = []
            for b in range(nb):
                if staging:
                    blocks: list[Any] = views[0]
                    expected = arrays[0]
                else:
                    blocks = expected = [
                        data.block(size, first + b * batch + i) for i in range(batch)
                    ]
                calls.append((self._put, (keys[b], blocks)))
            stored0 = self.client.stats()["stored"]
            out = self._timed(calls)
            stored = self.client.stats()["stored"] - stored0
            if stored != nb * batch:
                raise BenchError(f"kvpool {name} PUT stored {stored} new blocks of {nb * batch}")
            i = int(self.rng.integers(batch))
            got = data.scratch(size)
            self._get([keys[-1][i]], [got])
            _verify(f"kvpool {name} PUT read-back", got, expected[i])
            self._delete([k for ks in keys for k in ks])
            out.verified = 1
            return out

        def kv_get(r: int, staging: bool) -> _Round:
            calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
            for b in range(nb):
                final = b == nb - 1
                if staging:
                    dests: list[Any] = views[1 if final else 0]
                else:
                    dests = data.dest_batch(0, size, batch, b, final=final)
                calls.append((self._get, ([ws_keys[w] for w in ws_batch(r, b)], dests)))
            checked = arrays[1] if staging else data.dest_batch(0, size, batch, nb - 1, final=True)
            for d in checked:
                d.fill(0)
            out = self._timed(calls)
            i = int(self.rng.integers(batch))
            _verify(f"kvpool {name} GET", checked[i], data.block(size, ws_batch(r, nb - 1)[i]))
            out.verified = 1
            return out

        def run(row: str, op: str, buffers: str, r: int) -> _Round:
            if op in OPS:
                return (kv_put if op == "PUT" else kv_get)(r, buffers == "staging")
            return baseline(r, row.split()[1], op)

        rows = arena_rows(self.tr)
        rounds: dict[str, list[_Round]] = {row: [] for row, _, _ in rows}
        for r in range(-1, plan.shm_rounds):  # round -1 warms up (page tables, connections)
            for row, op, buffers in rows:
                got_round = run(row, op, buffers, r)
                if r >= 0:
                    rounds[row].append(got_round)
        self._delete(ws_keys)

        cells = []
        for row, op, buffers in rows:
            rs = rounds[row]
            moved_gb = len(rs) * nb * batch * size / 1e9
            node_cpu = sum(x.node_cpu for x in rs)
            kv = op in OPS
            cell = ArenaCell(
                row=row,
                op=op,
                buffers=buffers,
                block_bytes=size,
                batch=batch,
                batches_per_round=nb,
                bytes_per_round=nb * batch * size,
                gbps=median([nb * batch * size / x.wall / 1e9 for x in rs]),
                rounds_gbps=[nb * batch * size / x.wall / 1e9 for x in rs],
                latency=LatencyStats.of([t for x in rs for t in x.lat]) if kv else None,
                node_cpu_s=node_cpu if kv else None,
                node_cpu_s_per_gb=node_cpu / moved_gb if kv else None,
                client_cpu_s_per_gb=sum(x.client_cpu for x in rs) / moved_gb,
                verified_blocks=sum(x.verified for x in rs),
            )
            cpu = f", node CPU {cell.node_cpu_s_per_gb:.3f} s/GB" if kv else ""
            log(
                f"  {row:19} {format_size(size):>6}: {cell.gbps:6.2f} GB/s "
                f"(rounds {', '.join(f'{g:.2f}' for g in cell.rounds_gbps)}){cpu}"
            )
            cells.append(cell)
        return cells


def check_arena_counters(
    tr: ArenaTransport, moved: dict[str, dict[str, int]], cells: list[ArenaCell], rounds: int
) -> None:
    """The section's bytes went over ``tr`` alone, and the node copied exactly the staging
    rows' bytes (all rounds, the warm-up too) through the arena."""
    check_only_over(tr.name, moved)

    def total(op: str, staging: bool | None = None) -> int:
        return sum(
            c.bytes_per_round * rounds
            for c in cells
            if c.op == op and (staging is None or (c.buffers == "staging") == staging)
        )

    mine = moved[tr.name]
    if mine["bytes_in"] < total("PUT"):
        raise BenchError(
            f"the node counted {mine['bytes_in']} {tr.name} bytes in, sent {total('PUT')}"
        )
    for key, op in (("copied_in", "PUT"), ("copied_out", "GET")):
        if mine[key] != total(op, staging=True):
            raise BenchError(
                f"the node's {tr.name} {key} moved {mine[key]}, the staging {op} rows "
                f"moved {total(op, staging=True)}"
            )


def bench_kvpool_arena(tr: ArenaTransport, plan: Plan, data: Data, nonce: str) -> dict[str, Any]:
    import kvpool

    saved = {k: os.environ.get(k) for k in tr.env}
    os.environ.update(tr.env)  # the client's side of the provider
    try:
        with ProcessSet() as procs:
            server, address = start_kvpool(procs, plan, tr.env, tr.node_args)
            peer = ProcessVmPeer(procs) if tr.process_vm else None
            # Two staging buffers of the largest batch, and slack for the allocator's rounding.
            arena = kvpool.StagingArena(2 * plan.batch * max(plan.sizes) + (8 << 20))
            client = kvpool.Client(
                address, timeout=60.0, transport=tr.name, arena=arena, **tr.client_kwargs
            )
            try:
                before = client.stats()["transports"]
                if client.transport != tr.name:
                    raise BenchError(f"kvpool client asked for {tr.name}, got {client.transport}")
                bench = ArenaBench(tr, client, server.pid, plan, data, nonce, peer)
                cells = [c for size in plan.sizes for c in bench.run_size(size)]
                moved = counter_delta(before, client.stats()["transports"])
            finally:
                client.close()
            server.check_alive()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    check_arena_counters(tr, moved, cells, plan.shm_rounds + 1)
    log(f"  kvpool node transport counters moved: {moved}")
    by = {(c.row, c.block_bytes): c for c in cells}

    def ratios_to(base: str) -> dict[str, dict[str, float]]:
        return {
            row: {str(s): by[(row, s)].gbps / by[(b, s)].gbps for s in plan.sizes}
            for row, b in arena_baselines(tr, base).items()
        }

    limit = (
        "; process_vm rows: this process's bare process_vm_writev (PUT) / process_vm_readv "
        "(GET), one call per batch, between the same staging buffers and a 256 MiB arena in "
        "another process: the soft provider's own copy (the node makes one call per block)"
        if tr.process_vm
        else ""
    )
    return {
        "available": True,
        "note": (
            f"second kvpool server process{' with ' + str(tr.env) if tr.env else ''}; one "
            f"client thread, kvpool.Client(transport='{tr.name}') with its own StagingArena; "
            f"'staging' rows put/get_into slices of staging_buffer() (zero-copy on the client, "
            f"the node does the one copy), 'ordinary' rows numpy buffers outside the arena "
            f"(bytes inline on {tr.wire}); memcpy rows: np.copyto, one thread, between the same "
            f"staging buffer and a 256 MiB arena, interleaved round by round with the kvpool "
            f"rows; a batch of >= 8 MiB travels over two connections{limit}"
        ),
        "cells": [asdict(c) for c in cells],
        "ratios": ratios_to("memcpy"),
        **({"ratios_process_vm": ratios_to("process_vm")} if tr.process_vm else {}),
        **(
            {
                "line_rate_gbps": tr.line_rate_gbps,
                "line_rate_source": tr.line_rate_source,
                # Staging rows only: ordinary buffers ride the TCP socket, not the NIC.
                "ratios_line_rate": {
                    row: {str(s): by[(row, s)].gbps / tr.line_rate_gbps for s in plan.sizes}
                    for row, _, buffers in arena_rows(tr)
                    if buffers == "staging"
                },
            }
            if tr.line_rate_gbps
            else {}
        ),
        "transport_bytes_moved": moved,
    }


# --------------------------------------------------------------------------------------------
# Mooncake (child process inside a private network namespace)


def mooncake_env() -> dict[str, str]:
    # The transfer engine binds to the first non-loopback address unless told otherwise; glog
    # would print every INFO line to our stderr.
    return {"MC_TCP_BIND_ADDRESS": HOST, "GLOG_minloglevel": "1"}


def mooncake_dir() -> Path:
    spec = importlib.util.find_spec("mooncake")
    if spec is None or spec.origin is None:
        raise ServiceError("mooncake is not installed (pip install -r requirements/bench.txt)")
    return Path(spec.origin).parent


def run_mooncake_storage(args: argparse.Namespace) -> int:
    """--mooncake-storage: holds the store's memory in its own process until SIGTERM."""
    install_interrupt_handlers()
    os.environ.update(mooncake_env())
    from mooncake.store import MooncakeDistributedStore  # type: ignore[import-not-found,unused-ignore]

    store = MooncakeDistributedStore()
    rc = store.setup(HOST, args.mc_metadata, args.mc_segment, 16 << 20, "tcp", "", args.mc_master)
    if rc != 0:
        print(f"mooncake storage setup failed: {rc}", flush=True)
        return 1
    print("mooncake storage ready", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    return 0


def run_mooncake_only(args: argparse.Namespace, plan: Plan) -> int:
    """--mooncake-only: runs inside ``unshare -n``; writes a SystemResult to --json-out."""
    install_interrupt_handlers()
    out = Path(args.json_out)
    try:
        result = _mooncake_in_netns(args, plan)
    except (ServiceError, BenchError, ImportError, OSError, subprocess.CalledProcessError) as e:
        hint = " (the wheel needs libibverbs1: apt-get install libibverbs1)"
        result = SystemResult(
            False, reason=f"{type(e).__name__}: {e}" + (hint if "libibverbs" in str(e) else "")
        )
    out.write_text(json.dumps({"mooncake": asdict(result)}, indent=1))
    return 0


def _mooncake_in_netns(args: argparse.Namespace, plan: Plan) -> SystemResult:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    os.environ.update(mooncake_env())
    mc = mooncake_dir()
    from mooncake.store import MooncakeDistributedStore  # type: ignore[import-not-found,unused-ignore]

    rpc, metrics, meta = free_port(), free_port(), free_port()
    master_addr, meta_url = f"{HOST}:{rpc}", f"http://{HOST}:{meta}/metadata"
    data = Data(max(plan.threads), max(plan.sizes) * plan.batch)
    with ProcessSet() as procs:
        master_argv = [str(mc / "mooncake_master"), f"--rpc_address={HOST}", f"--rpc_port={rpc}"]
        master_argv += [f"--metrics_host={HOST}", f"--metrics_port={metrics}"]
        master = procs.start("mooncake_master", [*master_argv, "--enable_metric_reporting=false"])
        meta_argv = [sys.executable, "-m", "mooncake.http_metadata_server"]
        metadata = procs.start(
            "mooncake metadata", [*meta_argv, "--host", HOST, "--port", str(meta)]
        )
        wait_for_port(HOST, rpc, 30, service=master)
        wait_for_port(HOST, meta, 30, service=metadata)
        storage_argv = [sys.executable, str(Path(__file__).resolve()), "--mooncake-storage"]
        storage_argv += ["--mc-master", master_addr, "--mc-metadata", meta_url]
        storage_argv += ["--mc-segment", str(plan.mooncake_segment)]
        storage = procs.start("mooncake storage", storage_argv, env=mooncake_env())
        storage.wait_for_line(r"mooncake storage ready", timeout=60)
        log(
            f"mooncake master pid {master.pid}, metadata pid {metadata.pid}, "
            f"storage pid {storage.pid} ({format_size(plan.mooncake_segment)} segment)"
        )

        store = MooncakeDistributedStore()
        rc = store.setup(HOST, meta_url, 0, MOONCAKE_LOCAL_BUFFER, "tcp", "", master_addr)
        if rc != 0:
            raise ServiceError(f"mooncake client setup returned {rc}")
        for arr in [data.source, *data.dests]:
            rc = store.register_buffer(arr.ctypes.data, arr.nbytes)
            if rc != 0:
                raise ServiceError(f"mooncake register_buffer returned {rc}")
        system = MooncakeSystem(store)
        # Fresh segment memory is slow on first touch: write most of it once, then free it.
        t0 = time.perf_counter()
        warm = Runner(system, plan, data, args.nonce)
        size = 2 << 20
        keys = warm.put_blocks(f"{args.nonce}/warm", size, plan.mooncake_warmup_bytes // size)
        warm._delete(keys)
        log(
            f"mooncake warm-up: wrote {format_size(plan.mooncake_warmup_bytes)} in "
            f"{time.perf_counter() - t0:.1f}s"
        )
        result = measure(system, plan, data, args.nonce)
        storage.check_alive()
        # Only on success: after an interrupt, client threads may still be inside the store,
        # and closing it under them crashes the process before its children are stopped.
        for arr in [data.source, *data.dests]:
            store.unregister_buffer(arr.ctypes.data)
        t_close = time.perf_counter()
        store.close()
        log(f"mooncake client closed in {time.perf_counter() - t_close:.1f}s")
        return result


def bench_mooncake(args: argparse.Namespace, plan: Plan, nonce: str) -> SystemResult:
    if importlib.util.find_spec("mooncake") is None:
        return SystemResult(
            False,
            reason="mooncake-transfer-engine-non-cuda is not installed "
            "(pip install -r requirements/bench.txt)",
        )
    unshare = shutil.which("unshare")
    if unshare is None or shutil.which("ip") is None:
        return SystemResult(False, reason="needs unshare (util-linux) and ip (iproute2)")
    out = Path(args.json_out).with_suffix(".mooncake.json")
    out.unlink(missing_ok=True)
    argv = [
        unshare,
        "-n",
        sys.executable,
        str(Path(__file__).resolve()),
        "--mooncake-only",
        "--json-out",
        str(out),
        "--nonce",
        nonce,
        *forwarded_args(args),
    ]
    with ProcessSet() as procs:
        # Relay the child's progress lines, not Mooncake's glog chatter.
        child = procs.start("mooncake (unshare -n)", argv, echo="  | ", quiet=MOONCAKE_NOISE)
        rc = child.wait()
    if not out.exists():
        return SystemResult(
            False, reason=f"mooncake child exited {rc} without results:\n{child.tail()}"
        )
    raw = json.loads(out.read_text())["mooncake"]
    out.unlink()
    return system_result_from_json(raw)


def system_result_from_json(raw: dict[str, Any]) -> SystemResult:
    cells = [Cell(**{**c, "latency": LatencyStats(**c["latency"])}) for c in raw["cells"]]
    return SystemResult(raw["available"], raw["note"], raw["reason"], cells)


# --------------------------------------------------------------------------------------------
# Report


def _cell_map(result: SystemResult) -> dict[tuple[str, int, int], Cell]:
    return {(c.op, c.threads, c.block_bytes): c for c in result.cells}


def ratios(report: dict[str, Any], systems: dict[str, SystemResult]) -> dict[str, Any]:
    """``{"<system>/iperf3": {"<system> <op> x<threads>": {size: r}}, "kvpool/<peer>": {...}}``"""
    link = report["iperf3"].get("gbps")
    base = _cell_map(systems["kvpool"]) if "kvpool" in systems else {}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, result in systems.items():
        for (op, threads, size), cell in _cell_map(result).items():
            if link:
                row = out.setdefault(f"{name}/iperf3", {}).setdefault(f"{name} {op} x{threads}", {})
                row[str(size)] = cell.gbps / link
            mine = base.get((op, threads, size))
            if name != "kvpool" and mine is not None:
                row = out.setdefault(f"kvpool/{name}", {}).setdefault(f"{op} x{threads}", {})
                row[str(size)] = mine.gbps / cell.gbps
    return out


def print_tables(report: dict[str, Any], systems: dict[str, SystemResult], plan: Plan) -> None:
    sizes = plan.sizes
    link = report["iperf3"].get("gbps")
    heads = [format_size(s) for s in sizes]
    w = 20

    def line(label: str, cells: list[str]) -> str:
        return f"{label:<24}" + "".join(f"{c:>{w}}" for c in cells)

    def tput(gbps: float) -> str:
        return f"{gbps:.2f} GB/s" + (f" {gbps / link:.2f}x" if link else "")

    def latency(c: Cell | None) -> str:
        return f"{c.latency.p50_ms:.2f} / {c.latency.p99_ms:.2f}" if c else "-"

    print()
    if link:
        runs = ", ".join(f"{g:.2f}" for g in report["iperf3"]["runs_gbps"])
        print(
            f"Throughput, GB/s and ratio to iperf3 loopback ({link:.2f} GB/s, one stream, "
            f"best of {runs} at start and end), "
            f"batches of {plan.batch}, median of {plan.rounds} rounds"
        )
    else:
        print(f"Throughput, GB/s (iperf3 unavailable: {report['iperf3'].get('reason')})")
    print(line("system op threads", heads))
    if link:
        print(line("iperf3 loopback", [tput(link)] * len(sizes)))
    print(line("memcpy 1 thread, cold", [tput(report["memcpy"][str(s)]["gbps"]) for s in sizes]))
    lat_rows: list[str] = []
    for name, result in systems.items():
        if not result.available:
            reason = result.reason.splitlines()[0] if result.reason else ""
            print(f"{name:<24}unavailable: {reason}")
            continue
        cm = _cell_map(result)
        for op in OPS:
            for threads in plan.threads:
                label = f"{name} {op} x{threads}"
                cells = [cm[(op, threads, s)] if (op, threads, s) in cm else None for s in sizes]
                print(line(label, [tput(c.gbps) if c else "-" for c in cells]))
                lat_rows.append(line(label, [latency(c) for c in cells]))
    print()
    print("Batch latency, p50 / p99 ms")
    print(line("system op threads", heads))
    for row in lat_rows:
        print(row)
    for key, rows in report["ratios"].items():
        if not key.startswith("kvpool/") or key == "kvpool/iperf3":
            continue
        print()
        print(f"Ratio {key} (throughput)")
        print(line("op threads", heads))
        for row, by_size in rows.items():
            print(
                line(row, [f"{by_size[str(s)]:.2f}x" if str(s) in by_size else "-" for s in sizes])
            )
    print()
    arenas = arena_sections(report)
    for tr, section in arenas:
        print_arena_tables(tr, section, plan)
    print_cpu_table(systems, arenas, plan)
    print_targets(report, systems, arenas, plan)


def arena_sections(report: dict[str, Any]) -> list[tuple[ArenaTransport, dict[str, Any]]]:
    """The arena transports' sections of this report (JSON key: the transport's name)."""
    return [(tr, report[tr.name]) for tr in ARENA_TRANSPORTS.values() if tr.name in report]


def _arena_cells(section: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(c["row"], c["block_bytes"]): c for c in section.get("cells", [])}


def arena_label(tr: ArenaTransport, row: str, op: str, buffers: str) -> str:
    if op == "memcpy":
        return f"memcpy 1 thread, {buffers}"
    if op == "process_vm":
        return f"process_vm_{'writev' if row.endswith('PUT') else 'readv'}, {buffers}"
    kind = "staging buffers" if buffers == "staging" else "ordinary (inline)"
    return f"kvpool {tr.name} {op}, {kind}"


def print_arena_tables(tr: ArenaTransport, section: dict[str, Any], plan: Plan) -> None:
    sizes = plan.sizes
    w = 32 if section.get("line_rate_gbps") else 28  # room for "(0.85x line)"

    def line(label: str, cells: list[str]) -> str:
        return f"{label:<40}" + "".join(f"{c:>{w}}" for c in cells)

    if not section.get("available"):
        print(f"kvpool {tr.name} unavailable: {section.get('reason', '').splitlines()[0]}")
        print()
        return
    cm = _arena_cells(section)
    vm = section.get("ratios_process_vm", {})
    to_line = section.get("ratios_line_rate", {})
    line_rate = section.get("line_rate_gbps")
    print(
        f"{tr.title}, GB/s and ratio to memcpy of the same bytes"
        f"{' (and to process_vm)' if vm else ''}"
        f"{' (and to the line rate, staging rows)' if line_rate else ''}: one client thread, "
        f"batches of {plan.batch}, "
        f"median of {plan.shm_rounds} rounds, each row's rounds interleaved with the others'"
    )
    print(line("row", [format_size(s) for s in sizes]))
    if line_rate:
        print(line("line rate (sysfs)", [f"{line_rate:.2f} GB/s"] * len(sizes)))
    rows = arena_rows(tr)
    for row, op, buffers in rows:
        out = []
        for s in sizes:
            c = cm.get((row, s))
            if c is None:
                out.append("-")
                continue
            text = f"{c['gbps']:.2f} GB/s"
            ratio = section["ratios"].get(row, {}).get(str(s))
            text += f" {ratio:.2f}x" if ratio is not None else ""
            ratio = vm.get(row, {}).get(str(s))
            text += f" ({ratio:.2f}x vm)" if ratio is not None else ""
            ratio = to_line.get(row, {}).get(str(s))
            out.append(text + (f" ({ratio:.2f}x line)" if ratio is not None else ""))
        print(line(arena_label(tr, row, op, buffers), out))
    print()
    print(f"{tr.title}, batch latency p50 / p99 ms")
    print(line("row", [format_size(s) for s in sizes]))
    for row, op, buffers in rows:
        if op not in OPS:
            continue
        out = []
        for s in sizes:
            lat = cm[(row, s)]["latency"] if (row, s) in cm else None
            out.append(f"{lat['p50_ms']:.2f} / {lat['p99_ms']:.2f}" if lat else "-")
        print(line(arena_label(tr, row, op, buffers), out))
    print()


def print_cpu_table(
    systems: dict[str, SystemResult],
    arenas: list[tuple[ArenaTransport, dict[str, Any]]],
    plan: Plan,
) -> None:
    sizes = plan.sizes
    w = 20

    def line(label: str, cells: list[str]) -> str:
        return f"{label:<36}" + "".join(f"{c:>{w}}" for c in cells)

    def fmt(node: float | None, client: float | None = None) -> str:
        if node is None:
            return "-"
        return f"{node:.3f}" + (f" ({client:.3f})" if client is not None else "")

    rows: list[str] = []
    moved_gb: list[float] = []  # per row and size: what one clock tick is divided by
    for name, result in systems.items():
        cm = _cell_map(result)
        for op in OPS:
            for threads in plan.threads:
                cells = [cm.get((op, threads, s)) for s in sizes]
                if all(c is None or c.node_cpu_s_per_gb is None for c in cells):
                    continue
                moved_gb += [len(c.rounds_gbps) * c.bytes_per_round / 1e9 for c in cells if c]
                label = f"{name} {'tcp ' if name == 'kvpool' else ''}{op} x{threads}"
                rows.append(line(label, [fmt(c.node_cpu_s_per_gb if c else None) for c in cells]))
    for tr, section in arenas:
        if not section.get("available"):
            continue
        cm2 = _arena_cells(section)
        for row, op, buffers in arena_rows(tr):
            if op not in OPS:
                continue
            cells2 = [cm2.get((row, s)) for s in sizes]
            moved_gb += [len(c["rounds_gbps"]) * c["bytes_per_round"] / 1e9 for c in cells2 if c]
            rows.append(
                line(
                    f"kvpool {tr.name} {op} x1, {buffers}",
                    [
                        fmt(c["node_cpu_s_per_gb"], c["client_cpu_s_per_gb"]) if c else "-"
                        for c in cells2
                    ],
                )
            )
    if not rows:
        return
    tick = 1 / CLOCK_TICKS
    print(
        f"Node CPU time per GB moved, s/GB: utime+stime of the server process "
        f"(/proc/<pid>/stat) over all measured rounds, one tick ({tick:.2f} s) = "
        f"{tick / max(moved_gb):.3f}..{tick / min(moved_gb):.3f} s/GB here; "
        f"shm and rdma rows: (this client process's CPU)"
    )
    print(line("system transport op threads", [format_size(s) for s in sizes]))
    for r in rows:
        print(r)
    print()


def print_targets(
    report: dict[str, Any],
    systems: dict[str, SystemResult],
    arenas: list[tuple[ArenaTransport, dict[str, Any]]],
    plan: Plan,
) -> None:
    lines: list[str] = []
    link = report["iperf3"].get("gbps")
    if "kvpool" in systems and systems["kvpool"].available and link and 1 in plan.threads:
        cm = _cell_map(systems["kvpool"])
        for op in OPS:
            parts = [
                f"{format_size(s)} {cm[(op, 1, s)].gbps / link:.2f}x"
                + ("" if cm[(op, 1, s)].gbps / link >= TCP_TARGET else " (below)")
                for s in plan.sizes
                if (op, 1, s) in cm
            ]
            lines.append(f"kvpool tcp {op} x1 >= {TCP_TARGET}x iperf3: " + ", ".join(parts))
    for tr, section in arenas:
        if not section.get("available"):
            continue
        if tr.line_rate_gbps:  # a device: judged against its port's line rate
            for op in OPS:
                row = f"{tr.name} {op} staging"
                parts = [
                    f"{format_size(s)} {r:.2f}x {'met' if r >= LINE_RATE_TARGET else 'NOT met'}"
                    f" ({section['ratios'][row][str(s)]:.2f}x memcpy)"
                    for s, r in (
                        (s, section["ratios_line_rate"][row].get(str(s)))
                        for s in plan.sizes
                        if s >= ARENA_TARGET_SIZES[0]
                    )
                    if r is not None
                ]
                lines.append(
                    f"kvpool rdma {op} x1 >= {LINE_RATE_TARGET}x line rate "
                    f"({tr.line_rate_gbps:.1f} GB/s): " + ", ".join(parts)
                )
            continue
        vm = section.get("ratios_process_vm", {})
        for op in OPS:
            row = f"{tr.name} {op} staging"
            parts = []
            for s in ARENA_TARGET_SIZES:
                ratio = section["ratios"][row].get(str(s))
                if ratio is None:
                    continue
                verdict = "met" if ratio >= tr.target else "NOT met"
                to_vm = vm.get(row, {}).get(str(s))
                extra = f" ({to_vm:.2f}x process_vm)" if to_vm is not None else ""
                parts.append(f"{format_size(s)} {ratio:.2f}x {verdict}{extra}")
            if parts:
                what = f"kvpool {tr.name}" + (" (soft provider)" if tr.process_vm else "")
                lines.append(f"{what} {op} x1 >= {tr.target}x memcpy: " + ", ".join(parts))
    if lines:
        print("Targets")
        for text in lines:
            print(f"  {text}")
        print()
    steal = report.get("host_steal_fraction", {})
    if steal:
        shown = ", ".join(f"{name} {frac:.1%}" for name, frac in steal.items())
        print(f"Host steal time (CPU the hypervisor gave to other guests) per section: {shown}")
        print()


# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# Command line


def parse_list(text: str, convert: Callable[[str], int]) -> tuple[int, ...]:
    return tuple(convert(x.strip()) for x in text.split(",") if x.strip())


def parse_size(text: str) -> int:
    if text.isdigit():
        return int(text)
    from kvpool import parse_size as kv_parse_size

    return kv_parse_size(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="small run (about a minute) to check setup")
    p.add_argument("--sizes", default="64KiB,256KiB,2MiB", help="block sizes, default %(default)s")
    p.add_argument("--threads", default="1,4", help="client thread counts (default: %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="blocks per batch (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds per cell (median)")
    p.add_argument("--round-mib", type=int, help="MiB moved per round (default 256, quick 32)")
    p.add_argument("--systems", help=f"subset of {','.join(SYSTEMS)} (default: all)")
    p.add_argument(
        "--transport",
        choices=tuple(TRANSPORT_SYSTEMS),
        help="kvpool on one transport only: the same as --systems "
        + ", ".join(f"{s} ({t})" for t, s in TRANSPORT_SYSTEMS.items()),
    )
    p.add_argument("--kvpool-memory", default="3GiB", help="kvpool server --memory")
    p.add_argument(
        "--shm-rounds",
        type=int,
        help="measured rounds of the kvpool-shm and kvpool-rdma sections (default 9, quick 3)",
    )
    p.add_argument(
        "--rdma-provider",
        choices=("soft", "ibverbs"),
        default="soft",
        help="kvpool-rdma on the software provider (anywhere; the default) or on a real device "
        "through libibverbs (node and client on this host, through the NIC; judged against the "
        "port's line rate)",
    )
    p.add_argument("--rdma-devices", default="", help="with ibverbs: name[:gid_index],...")
    p.add_argument("--rdma-link-type", default="Ethernet", help="with ibverbs: IB or Ethernet")
    p.add_argument("--rdma-port", type=int, default=1, help="with ibverbs: the device port")
    p.add_argument(
        "--node-python",
        default=sys.executable,
        help="the interpreter that runs every kvpool server (a venv with another build of "
        "kvpool, for an A/B run; default: this one)",
    )
    p.add_argument(
        "--auth", action="store_true", help="nodes and clients use a data-plane auth token"
    )
    p.add_argument(
        "--node-metrics",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="give every node a metrics port and scrape /metrics this often (0: no metrics port)",
    )
    p.add_argument("--json-out", default=str(DEFAULT_JSON), help="default: %(default)s")
    # Internal: the Mooncake child (inside unshare -n) and its storage process.
    hidden = argparse.SUPPRESS
    p.add_argument("--mooncake-only", action="store_true", help=hidden)
    p.add_argument("--mooncake-storage", action="store_true", help=hidden)
    p.add_argument("--nonce", default="", help=hidden)
    p.add_argument("--mc-master", help=hidden)
    p.add_argument("--mc-metadata", help=hidden)
    p.add_argument("--mc-segment", type=int, help=hidden)
    return p


def forwarded_args(args: argparse.Namespace) -> list[str]:
    """The options that shape the plan, for the Mooncake child."""
    # Sizes go as plain byte counts, so the child never imports kvpool.
    sizes = ",".join(str(n) for n in parse_list(args.sizes, parse_size))
    out = ["--sizes", sizes, "--threads", args.threads]
    out += ["--batch", str(args.batch), "--rounds", str(args.rounds)]
    if args.quick:
        out.append("--quick")
    if args.round_mib is not None:
        out += ["--round-mib", str(args.round_mib)]
    return out


def make_plan(args: argparse.Namespace) -> Plan:
    quick = bool(args.quick)
    round_mib = args.round_mib if args.round_mib is not None else (32 if quick else 256)
    return Plan(
        sizes=parse_list(args.sizes, parse_size),
        threads=parse_list(args.threads, int),
        batch=args.batch,
        rounds=args.rounds,
        round_bytes=round_mib << 20,
        min_batches=2 if quick else 8,
        working_set_bytes=(64 if quick else 256) << 20,
        iperf_seconds=1 if quick else 3,
        kvpool_memory=args.kvpool_memory,
        shm_rounds=args.shm_rounds if args.shm_rounds is not None else (3 if quick else 9),
        mooncake_segment=2 << 30,
        mooncake_warmup_bytes=(256 << 20) if quick else (1536 << 20),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.mooncake_storage:
        return run_mooncake_storage(args)
    plan = make_plan(args)
    if (
        plan.batch < 1
        or plan.rounds < 1
        or plan.shm_rounds < 1
        or not plan.sizes
        or not plan.threads
    ):
        raise SystemExit(
            "--batch, --rounds, --shm-rounds, --sizes and --threads must be positive and non-empty"
        )
    if args.mooncake_only:
        return run_mooncake_only(args, plan)

    install_interrupt_handlers()
    NODE.python = args.node_python
    NODE.scrape_interval = args.node_metrics
    if args.auth:
        NODE.auth_token = os.environ["KVPOOL_AUTH_TOKEN"] = "bench-" + os.urandom(16).hex()
    if args.transport and args.systems:
        raise SystemExit("give --systems or --transport, not both")
    wanted = TRANSPORT_SYSTEMS[args.transport] if args.transport else args.systems
    chosen = [s.strip() for s in (wanted or ",".join(SYSTEMS)).split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SYSTEMS))
    if unknown:
        raise SystemExit(f"unknown system(s) {unknown}; choose from {list(SYSTEMS)}")
    if args.rdma_provider == "ibverbs" and "kvpool-rdma" in chosen:
        try:
            ARENA_TRANSPORTS["kvpool-rdma"] = ibverbs_transport(
                args.rdma_devices, args.rdma_link_type, args.rdma_port
            )
        except BenchError as e:
            raise SystemExit(f"data_path.py: {e}") from None
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)  # the Mooncake child writes beside it
    nonce = os.urandom(4).hex()
    started = time.time()
    log(
        f"plan: sizes {[format_size(s) for s in plan.sizes]}, threads {list(plan.threads)}, "
        f"batch {plan.batch}, {plan.rounds} rounds of ~{format_size(plan.round_bytes)}"
    )

    report: dict[str, Any] = {
        "meta": {
            **run_meta(
                ("kvpool", "numpy", "redis", "hiredis", "mooncake-transfer-engine-non-cuda"),
                ("redis-server", "iperf3"),
                plan,
            ),
            "units": "GB/s with GB = 1e9 bytes; latency per batch in ms",
            "nodes": {
                "python": NODE.python,
                "auth": bool(NODE.auth_token),
                "scrape_interval_s": NODE.scrape_interval,
            },  # fmt: skip
        }
    }
    log(f"iperf3: one stream over loopback for {plan.iperf_seconds}s")
    first_iperf = report["iperf3"] = run_iperf3(plan.iperf_seconds)
    if first_iperf.get("available"):
        log(f"  iperf3 {first_iperf['gbps']:.2f} GB/s")
    data = Data(max(plan.threads), max(plan.sizes) * plan.batch)
    log("memcpy: one thread, cold buffers")
    report["memcpy"] = run_memcpy(plan, data)

    systems: dict[str, SystemResult] = {}
    steal: dict[str, float] = report.setdefault("host_steal_fraction", {})
    for name in chosen:
        log(f"{name}: starting")
        t0 = time.perf_counter()
        steal0 = host_steal_seconds()
        if name in ARENA_TRANSPORTS:
            # Its own table (ratios to memcpy, not to iperf3); kept out of ``systems``.
            tr = ARENA_TRANSPORTS[name]
            try:
                report[tr.name] = bench_kvpool_arena(tr, plan, data, nonce)
                status = "done"
            except (ServiceError, BenchError, KVPoolError) as e:
                report[tr.name] = {"available": False, "reason": f"{type(e).__name__}: {e}"}
                status = f"unavailable: {report[tr.name]['reason'].splitlines()[0]}"
            steal[name] = (host_steal_seconds() - steal0) / (time.perf_counter() - t0) / NCPU
            log(f"{name}: {status} ({time.perf_counter() - t0:.0f}s, host steal {steal[name]:.1%})")
            continue
        try:
            if name == "kvpool":
                systems[name] = bench_kvpool(plan, data, nonce)
            elif name == "redis":
                systems[name] = bench_redis(plan, data, nonce)
            else:
                systems[name] = bench_mooncake(args, plan, nonce)
        except (ServiceError, BenchError) as e:
            # A wrong answer or a dead server voids that system's numbers, not the whole run.
            systems[name] = SystemResult(False, reason=f"{type(e).__name__}: {e}")
        result = systems[name]
        reason = result.reason.splitlines()[0] if result.reason else "?"
        status = "done" if result.available else f"unavailable: {reason}"
        steal[name] = (host_steal_seconds() - steal0) / (time.perf_counter() - t0) / NCPU
        log(f"{name}: {status} ({time.perf_counter() - t0:.0f}s, host steal {steal[name]:.1%})")

    # The link is measured again at the end; ratios use the faster of the two, so load that
    # came and went during the run cannot flatter anything.
    log(f"iperf3 again: one stream over loopback for {plan.iperf_seconds}s")
    last_iperf = run_iperf3(plan.iperf_seconds)
    report["iperf3"] = combine_iperf(first_iperf, last_iperf)
    if last_iperf.get("available"):
        log(f"  iperf3 {last_iperf['gbps']:.2f} GB/s")
    report["systems"] = {name: asdict(r) for name, r in systems.items()}
    report["ratios"] = ratios(report, systems)
    report["meta"]["duration_s"] = round(time.time() - started, 1)
    report["meta"]["nodes"]["scrapes"] = scrapes = [sc.close() for sc in NODE.scrapers]
    if scrapes:
        n = sum(sc["scrapes"] for sc in scrapes)
        failed = sum(sc["failures"] for sc in scrapes)
        log(f"metrics: {n} scrapes of {len(scrapes)} nodes during the run, {failed} failed")
    out.write_text(json.dumps(report, indent=1))
    print_tables(report, systems, plan)
    print(f"JSON: {out}  ({report['meta']['duration_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    run_main(main)
