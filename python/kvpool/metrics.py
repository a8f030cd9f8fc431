"""A node's Prometheus endpoint: ``/metrics`` (text format, prometheus-client), ``/healthz``
(the process answers) and ``/readyz`` (the pool is mapped, and the node has joined its cluster
when one is configured), served on ``metrics_port`` by ``kvpool server``.

Every scrape reads the node's counters at that moment (one STATS snapshot, in-process, no
network) and the cluster agent's state; nothing runs between scrapes, so metrics cost the data
path nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

log = logging.getLogger("kvpool.metrics")

# STATS key -> (metric name, help). Counters get "_total" from prometheus-client.
_GAUGES = {
    "capacity_bytes": ("kvpool_pool_capacity_bytes", "Bytes of the node's pool."),
    "used_bytes": ("kvpool_pool_used_bytes", "Bytes of the pool holding blocks."),
    "high_watermark_bytes": ("kvpool_pool_high_watermark_bytes", "Eviction starts above this."),
    "entries": ("kvpool_blocks", "Blocks stored."),
    "reserved_bytes": ("kvpool_reserved_bytes", "Bytes reserved by PUTs still arriving."),
    "pinned_bytes": ("kvpool_pinned_bytes", "Bytes pinned by GETs being sent."),
    "connections": ("kvpool_connections", "Open client connections."),
}
_COUNTERS = {
    "hits": ("kvpool_hits", "GET keys found."),
    "misses": ("kvpool_misses", "GET keys not found."),
    "stored": ("kvpool_blocks_stored", "Blocks committed by PUT."),
    "existing": ("kvpool_blocks_existing", "PUT blocks already present (kept as they were)."),
    "rejected": ("kvpool_blocks_rejected", "PUT blocks refused (no space, too large)."),
    "evictions": ("kvpool_evictions", "Blocks evicted to make room."),
    "deletes": ("kvpool_deletes", "Blocks deleted."),
    "bytes_in": ("kvpool_bytes_in", "Payload bytes stored by PUT."),
    "bytes_out": ("kvpool_bytes_out", "Payload bytes sent by GET."),
    "connections_accepted": ("kvpool_connections_accepted", "Connections accepted."),
    "connections_rejected": ("kvpool_connections_rejected", "Connections over max_connections."),
    "protocol_errors": ("kvpool_protocol_errors", "Connections closed for a protocol error."),
    "auth_refused": ("kvpool_auth_refused", "Connections refused for a missing or wrong token."),
}
_TRANSPORT_COUNTERS = {
    "accepted": "Connections that took this transport.",
    "bytes_in": "Payload bytes received (inline and copied).",
    "bytes_out": "Payload bytes sent (inline and copied).",
    "copied_in": "PUT bytes the node copied from the peer's memory.",
    "copied_out": "GET bytes the node copied into the peer's memory.",
}

# STATS "ops" counters, per op and transport.
_OP_COUNTERS = {
    "requests": ("kvpool_requests", "Requests (frames whose header arrived), by op and transport."),
    "errors": (
        "kvpool_request_errors",
        "Requests answered with an error or cut off mid-frame (each closes its connection).",
    ),
    "keys": ("kvpool_request_keys", "Keys named by requests that succeeded."),
    "bytes": ("kvpool_request_bytes", "Payload bytes moved by requests (PUT stored, GET sent)."),
}


def _op_metrics(stats: dict[str, Any]) -> Iterator[Metric]:
    ops: dict[str, dict[str, dict[str, Any]]] = stats.get("ops", {})
    labels = ["op", "transport"]
    for key, (name, doc) in _OP_COUNTERS.items():
        c = CounterMetricFamily(name, doc, labels=labels)
        for op, per_transport in ops.items():
            for t, v in per_transport.items():
                c.add_metric([op, t], float(v[key]))
        yield c
    bounds = [b / 1e6 for b in stats.get("latency_bounds_us", [])]
    h = HistogramMetricFamily(
        "kvpool_request_duration_seconds",
        "Time from a request's header arriving to its reply sent, by op and transport.",
        labels=labels,
    )
    for op, per_transport in ops.items():
        for t, v in per_transport.items():
            running = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip([*map(str, bounds), "+Inf"], v["latency"], strict=True):
                running += count
                buckets.append((bound, float(running)))
            h.add_metric([op, t], buckets, sum_value=v["latency_sum_us"] / 1e6)
    yield h


class NodeCollector:
    """Reads the node (and its cluster agent, when it has one) at every scrape."""

    def __init__(self, node: Any, agent: Any = None) -> None:
        self._node = node
        self._agent = agent

    def attach(self, agent: Any) -> None:
        self._agent = agent

    def collect(self) -> Iterator[Metric]:
        stats = self._node.stats()
        for key, (name, doc) in _GAUGES.items():
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(stats[key]))
            yield g
        for key, (name, doc) in _COUNTERS.items():
            c = CounterMetricFamily(name, doc)
            c.add_metric([], float(stats[key]))
            yield c
        transports = stats.get("transports", {})
        g = GaugeMetricFamily(
            "kvpool_transport_connections", "Open connections per transport.", labels=["transport"]
        )
        for t, v in transports.items():
            g.add_metric([t], float(v["connections"]))
        yield g
        for key, doc in _TRANSPORT_COUNTERS.items():
            c = CounterMetricFamily(f"kvpool_transport_{key}", doc, labels=["transport"])
            for t, v in transports.items():
                c.add_metric([t], float(v[key]))
            yield c
        yield from _op_metrics(stats)
        if self._agent is not None:
            yield from self._agent_metrics(self._agent.metrics())

    @staticmethod
    def _agent_metrics(m: dict[str, float]) -> Iterator[Metric]:
        for name, doc, value in (
            ("kvpool_cluster_joined", "1 while the node is a member of its cluster.", m["joined"]),
            (
                "kvpool_cluster_publish_backlog_keys",
                "Index updates not yet in Redis.",
                m["backlog"],
            ),
            (
                "kvpool_cluster_publish_lag_seconds",
                "Age of the oldest index update not yet in Redis (0: none waiting).",
                m["lag_s"],
            ),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g
        for name, doc, value in (
            ("kvpool_cluster_joins", "Joins (a first join and every re-join).", m["joins"]),
            ("kvpool_cluster_lease_renewals", "Heartbeats that renewed the lease.", m["renewals"]),
        ):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], value)
            yield c


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` (port 0: a free one), served
    by a thread of their own; :meth:`attach` adds the cluster agent once there is one. With
    ``clustered``, the node is not ready until an agent is attached and has joined (the endpoint
    is up before the agent exists)."""

    def __init__(self, node: Any, host: str, port: int, *, clustered: bool = False) -> None:
        self._clustered = clustered
        registry = CollectorRegistry()
        self._collector = NodeCollector(node)
        registry.register(self._collector)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b"ok\n")
                elif path == "/readyz":
                    why = outer.not_ready()
                    self._send(503 if why else 200, (why or "ready").encode() + b"\n")
                else:
                    self._send(404, b"not found: /metrics, /healthz, /readyz\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("%s " + format, self.address_string(), *args)

        self._node: Any = node
        self._agent: Any = None
        self._http = ThreadingHTTPServer((host, port), Handler)
        self._http.daemon_threads = True
        self.address = f"{host}:{self._http.server_address[1]}"
        self._thread = threading.Thread(
            target=self._http.serve_forever, name="kvpool-metrics", daemon=True
        )
        self._thread.start()

    def attach(self, agent: Any) -> None:
        """The cluster agent, once it exists (before it starts): readiness then needs a join."""
        self._agent = agent
        self._collector.attach(agent)

    def not_ready(self) -> str:
        """Why the node is not ready ("" when it is)."""
        try:
            self._node.stats()
        except Exception as e:  # noqa: BLE001 - a stopped node is simply not ready
            return f"node not serving: {e}"
        if (self._clustered or self._agent is not None) and not (
            self._agent is not None and self._agent.incarnation
        ):
            return "not a member of the cluster yet (Redis unreachable, or joining)"
        return ""

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(5.0)
