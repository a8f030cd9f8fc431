"""The storage node launcher: config, logging and signals in Python, the data path in C++."""

from __future__ import annotations

import json
import logging
import resource
import signal
import threading
from typing import Any

from kvpool import _core
from kvpool._closing import Closing
from kvpool.config import ServerConfig
from kvpool.errors import ConfigError

__all__ = ["LocalServer", "ensure_fd_limit", "serve"]

#: Descriptors a node needs besides one per connection (listeners, Redis, metrics, logs, ...).
FD_RESERVE = 64

log = logging.getLogger(__name__)

_CORE_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def _core_options(config: ServerConfig) -> Any:
    o = _core.ServerOptions()
    o.host = config.host
    o.port = config.port
    o.capacity = config.memory
    o.eviction = config.eviction
    o.high_watermark = config.high_watermark
    o.hugepages = config.hugepages
    o.max_batch_keys = config.max_batch_keys
    o.max_frame_bytes = config.max_frame_bytes
    o.max_block_bytes = config.max_block_bytes
    o.max_connections = config.max_connections
    o.io_timeout_ms = max(1, int(config.io_timeout * 1000))
    o.protocol_version = config.protocol_version
    o.transports = config.transport_list() if config.protocol_version >= 2 else ["tcp"]
    o.shm_socket = config.shm_socket
    o.shm_allow_uids = config.allowed_ids("shm_allow_uids")
    o.shm_allow_gids = config.allowed_ids("shm_allow_gids")
    o.shm_max_arena_bytes = config.shm_max_arena_bytes
    o.rdma = config.rdma().options()
    o.auth_tokens = config.auth_tokens()
    if config.redis:
        o.event_capacity = 1 << 18  # drained every publish interval; overflow forces a resync
    return o


class LocalServer(Closing):
    """A storage node running in this process (its I/O threads are C++ threads).

    ``kvpool server`` wraps one of these; tests and ``kvpool local`` embed it directly::

        with LocalServer(ServerConfig(port=0, memory=256 << 20)) as node:
            client = kvpool.Client(node.address)
    """

    def __init__(self, config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        self.config.validate()
        self._server: Any = _core.Server.start(_core_options(self.config))

    @property
    def port(self) -> int:
        return int(self._server.port)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def shm_socket(self) -> str:
        """The shared-memory socket's path ("" when shared memory is not served)."""
        return str(self._server.shm_socket)

    def advertised_transports(self) -> str:
        """The membership record's transport list: ``tcp`` and, when served,
        ``shm=<host id>:<socket path>``."""
        served = ["tcp"]
        if self.shm_socket:
            served.append(f"shm={_core.host_id()}:{self.shm_socket}")
        if "rdma" in self.stats()["transports"]:
            served.append("rdma")
        return ",".join(served)

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self._server.stats_json())
        return result

    @property
    def core(self) -> Any:
        """The extension's server handle (event ring, key snapshot) for the cluster agent."""
        return self._server

    def stop(self) -> None:
        """Disconnects every client (aborting their unfinished writes) and frees the pool."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    close = stop


def ensure_fd_limit(max_connections: int) -> str:
    """Raises this process's soft limit on open descriptors (RLIMIT_NOFILE) toward what
    ``max_connections`` needs (one per connection plus :data:`FD_RESERVE`), as far as the hard
    limit allows, the way servers that take thousands of connections do. Returns "" when the
    limit now suffices, else a warning naming the numbers."""
    need = max_connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft != resource.RLIM_INFINITY and soft < need:
        return (
            f"max_connections {max_connections} needs {need} open descriptors, but the hard limit "
            f"(ulimit -Hn) is {hard}: connections beyond about {max(0, soft - FD_RESERVE)} will be "
            "refused (raise the limit, e.g. LimitNOFILE= or ulimit -n, or lower max_connections)"
        )
    return ""


def serve(config: ServerConfig, *, ready: threading.Event | None = None) -> int:
    """Runs a node until SIGTERM or SIGINT; returns the process exit code."""
    _core.set_log_level(_CORE_LEVELS[config.log_level])
    if why := ensure_fd_limit(config.max_connections):
        log.warning("%s", why)
    if config.redis:
        from kvpool.metadata import library_source

        library_source()  # a node that cannot load the library would never join: fail now
    # Block the stop signals before the core starts its threads, so they inherit the mask and the
    # signals reach sigwait below instead of interrupting an I/O thread.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    node = LocalServer(config)
    agent = None
    metrics = None
    try:
        if config.metrics_port:
            from kvpool.metrics import MetricsServer

            host = config.metrics_host or config.host
            try:
                metrics = MetricsServer(
                    node, host, config.metrics_port, clustered=bool(config.redis)
                )
            except OSError as e:
                raise ConfigError(
                    f"metrics_port {config.metrics_port}: cannot listen on {host}: {e.strerror}"
                ) from None
        if config.redis:
            from kvpool.agent import ClusterAgent
            from kvpool.metadata import node_id_for

            advertise = config.advertise or node.address
            agent = ClusterAgent(
                node.core,
                redis_url=config.redis,
                cluster=config.cluster,
                node_id=config.node_id or node_id_for(advertise),
                address=advertise,
                capacity=config.memory,
                lease_ttl=config.lease_ttl,
                transports=node.advertised_transports(),
            )
            if metrics is not None:
                metrics.attach(agent)
            agent.start()
        if metrics is not None:
            log.info("metrics on http://%s/metrics (/healthz, /readyz)", metrics.address)
        # The ready line comes last: once it is printed, every endpoint answers.
        log.info(
            "kvpool server listening on %s (memory=%d bytes, eviction=%s, hugepages=%s, shm=%s, "
            "auth=%s)",
            node.address,
            config.memory,
            config.eviction,
            node.stats().get("hugepages"),
            node.shm_socket or "off",
            f"{n} token(s)" if (n := len(config.auth_tokens(warn=False))) else "off",
        )
        if ready is not None:
            ready.set()
        sig = signal.sigwait(stop_signals)
        log.info("received %s, stopping", signal.Signals(sig).name)
    finally:
        if metrics is not None:
            metrics.close()
        if agent is not None:
            agent.stop()
        stats = node.stats()
        node.stop()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
    log.info(
        "kvpool server stopped (entries=%d hits=%d misses=%d evictions=%d)",
        stats["entries"],
        stats["hits"],
        stats["misses"],
        stats["evictions"],
    )
    return 0
