"""Counting the cluster's Redis traffic: a round-trip counting relay and INFO counter deltas.

``RoundTripRelay`` sits between the nodes' cluster agents and Redis and counts round trips and
FCALLs per node; ``redis_counters`` / ``counters_delta`` diff Redis's own ``INFO stats`` /
``cpu`` / ``commandstats`` over a stretch of work (the benchmark's own INFO calls left out).
"""

from __future__ import annotations

import re
import selectors
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from _util import log
from cluster_phases.common import HOST

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


def command_calls(delta: dict[str, Any], name: str) -> int:
    return int(delta["commands"].get(name, {}).get("calls", 0))


def command_usec(delta: dict[str, Any], name: str) -> int:
    return int(delta["commands"].get(name, {}).get("usec", 0))
