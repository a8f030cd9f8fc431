"""``kvpool server --metrics-port``: /metrics scraped and parsed with prometheus-client's own
parser while traffic runs (counters move by exactly what the traffic did), /healthz and /readyz
for a node alone, a node in a cluster, and a node whose Redis is unreachable."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

import kvpool
import pytest
from conftest import (
    OP_GET,
    OP_PUT,
    RawConnection,
    RedisProcess,
    ServerFactory,
    cluster_name,
    free_port,
    header,
    random_keys,
    wait_until,
)
from kvpool.config import ServerConfig
from kvpool.errors import ConfigError
from prometheus_client.parser import text_string_to_metric_families


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    status, text = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_counters_move_by_what_the_traffic_did(start_node: ServerFactory) -> None:
    port = free_port()
    node = start_node(memory="64MiB", extra=["--metrics-port", str(port)])
    assert f"metrics on http://127.0.0.1:{port}/metrics" in node.stderr
    before = scrape(port)
    assert value(before, "kvpool_pool_capacity_bytes") == 64 << 20
    with kvpool.Client(node.address, transport="tcp") as c:
        keys = random_keys(10)
        assert c.put(keys, [os.urandom(1000) for _ in keys]) == 10
        assert c.put(keys[:3], [b"x" * 1000] * 3) == 3  # already present: kept as they were
        got = c.get(keys + random_keys(2))
        assert sum(g is not None for g in got) == 10
        during = scrape(port)  # while this client's connection is open
    after = scrape(port)

    def delta(name: str, **labels: str) -> float:
        # A series appears with its first sample: absent before means 0.
        return value(after, name, **labels) - before.get((name, tuple(sorted(labels.items()))), 0)

    assert delta("kvpool_blocks_stored_total") == 10
    assert delta("kvpool_blocks_existing_total") == 3
    assert delta("kvpool_hits_total") == 10 and delta("kvpool_misses_total") == 2
    assert delta("kvpool_bytes_in_total") == 10_000
    assert delta("kvpool_bytes_out_total") == 10_000
    assert delta("kvpool_blocks") == 10
    assert delta("kvpool_transport_accepted_total", transport="tcp") >= 1
    assert delta("kvpool_transport_bytes_in_total", transport="tcp") >= 10_000
    assert delta("kvpool_transport_bytes_in_total", transport="shm") == 0
    assert value(during, "kvpool_transport_connections", transport="tcp") >= 1
    assert value(after, "kvpool_reserved_bytes") == 0 and value(after, "kvpool_pinned_bytes") == 0
    # Per op and transport: requests, keys, bytes moved, and the latency histogram.
    tcp = {"transport": "tcp"}
    assert delta("kvpool_requests_total", op="put", **tcp) == 2
    assert delta("kvpool_request_keys_total", op="put", **tcp) == 13
    assert delta("kvpool_request_bytes_total", op="put", **tcp) == 10_000  # the 3 were kept
    assert delta("kvpool_requests_total", op="get", **tcp) == 1
    assert delta("kvpool_request_keys_total", op="get", **tcp) == 12
    assert delta("kvpool_request_bytes_total", op="get", **tcp) == 10_000
    assert delta("kvpool_requests_total", op="hello", **tcp) == 1
    for op in ("put", "get", "hello"):
        assert value(after, "kvpool_request_errors_total", op=op, **tcp) == 0
        requests = value(after, "kvpool_requests_total", op=op, **tcp)
        assert value(after, "kvpool_request_duration_seconds_count", op=op, **tcp) == requests
        inf = value(after, "kvpool_request_duration_seconds_bucket", op=op, le="+Inf", **tcp)
        assert inf == requests
        assert 0 < value(after, "kvpool_request_duration_seconds_sum", op=op, **tcp) < 10
    assert get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
    assert get(f"http://127.0.0.1:{port}/readyz") == (200, "ready\n")
    assert get(f"http://127.0.0.1:{port}/nope")[0] == 404


def test_readiness_follows_cluster_membership(
    redis_server: RedisProcess, start_node: ServerFactory
) -> None:
    port = free_port()
    args = ["--redis", redis_server.url, "--cluster", cluster_name(), "--lease-ttl", "0.6"]
    start_node(extra=[*args, "--metrics-port", str(port)])
    wait_until(lambda: get(f"http://127.0.0.1:{port}/readyz")[0] == 200, what="ready once joined")
    first = scrape(port)
    assert value(first, "kvpool_cluster_joined") == 1
    assert value(first, "kvpool_cluster_joins_total") == 1
    wait_until(
        lambda: (
            value(scrape(port), "kvpool_cluster_lease_renewals_total")
            > value(first, "kvpool_cluster_lease_renewals_total")
        ),
        what="a lease renewal counted",
    )
    assert value(scrape(port), "kvpool_cluster_publish_backlog_keys") >= 0


def test_a_node_whose_redis_is_gone_is_alive_but_not_ready(start_node: ServerFactory) -> None:
    port = free_port()
    dead = f"redis://127.0.0.1:{free_port()}/0"
    node = start_node(extra=["--redis", dead, "--cluster", "c", "--metrics-port", str(port)])
    assert get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
    status, body = get(f"http://127.0.0.1:{port}/readyz")
    assert status == 503 and "not a member of the cluster" in body
    assert value(scrape(port), "kvpool_cluster_joined") == 0
    with kvpool.Client(node.address) as c:  # it still serves the data plane meanwhile
        assert c.put(random_keys(1), [b"v"]) == 1


def test_metrics_port_is_checked() -> None:
    with pytest.raises(ConfigError, match="metrics_port 70000 is outside"):
        ServerConfig(metrics_port=70000).validate()


def test_a_metrics_port_in_use_stops_the_node_with_one_line(start_node: ServerFactory) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        node = start_node(extra=["--metrics-port", str(port)], wait=False)
        node.proc.wait(30)
        node.kill()
    assert node.proc.returncode == 2, node.stderr
    assert f"metrics_port {port}: cannot listen on 127.0.0.1" in node.stderr
    assert "Traceback" not in node.stderr


def test_errors_are_counted_under_their_op(start_node: ServerFactory) -> None:
    """A frame the node refuses counts one error under its op (or "unknown" for an op byte
    that is none), and a request cut off mid-frame counts one too."""
    port = free_port()
    node = start_node(
        memory="32MiB", extra=["--metrics-port", str(port)], env={"KVPOOL_IO_TIMEOUT": "0.5"}
    )
    before = scrape(port)
    with RawConnection(node.address) as c:
        c.send(header(OP_GET, count=1, body_bytes=16, flags=0x80))  # a reserved flag: BadFrame
        frame = c.read_frame()
        assert frame is not None and frame[0][2] & 1  # an error reply, then the close
        assert c.read_frame() is None
    with RawConnection(node.address) as c:
        c.hello()
        c.send(header(77))
        frame = c.read_frame()
        assert frame is not None and frame[0][2] & 1
    with RawConnection(node.address) as c:
        c.hello()
        c.send(header(OP_PUT, count=1, body_bytes=24 + 1000) + b"k" * 16)  # then silence
        assert c.read_frame() is None  # closed after io_timeout
    wait_until(lambda: kvpool.Client(node.address, transport="tcp").stats()["connections"] == 1,
               timeout=5, what="connections closed")  # fmt: skip
    after = scrape(port)

    def errors(op: str) -> float:
        key = ("kvpool_request_errors_total", (("op", op), ("transport", "tcp")))
        return after.get(key, 0) - before.get(key, 0)

    assert errors("get") == 1 and errors("unknown") == 1 and errors("put") == 1
    assert errors("hello") == 0


def test_a_clustered_node_is_not_ready_before_its_agent_exists() -> None:
    """The endpoint is up before the cluster agent is made: until one is attached and joined,
    /readyz says not ready (a node alone is ready at once)."""
    from kvpool.metrics import MetricsServer
    from kvpool.server import LocalServer

    with LocalServer(ServerConfig(memory=16 << 20)) as node:
        for clustered, expected in ((True, 503), (False, 200)):
            m = MetricsServer(node, "127.0.0.1", 0, clustered=clustered)
            try:
                assert get(f"http://{m.address}/readyz")[0] == expected
            finally:
                m.close()
