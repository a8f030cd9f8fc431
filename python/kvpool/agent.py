"""The storage node's cluster agent: joins through Redis, heartbeats, publishes block locations.

Runs in one background thread of ``kvpool server --redis URL --cluster NAME``. It never touches
the data path: committed and evicted keys reach it through the core's event ring, drained in
batches. Redis being away only delays the index; the node keeps serving and re-registers (with a
new incarnation and a full re-publication of its keys) as soon as Redis answers again, also when
Redis lost all its data.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import threading
import time
from typing import Any

import redis

from kvpool.keys import KEY_BYTES
from kvpool.metadata import (
    LIBRARY_VERSION,
    MetadataError,
    Registry,
    library_current,
    library_source,
    load_library,
)

log = logging.getLogger(__name__)

#: Events drained per publish round (one Redis pipeline).
_DRAIN_BATCH = 8192
#: Seconds between sweeps of the index for entries of dead incarnations (jittered per node).
_GC_INTERVAL = 60.0


class ClusterAgent:
    """Membership and index upkeep for one node. ``start()`` returns once the first join was
    attempted; failures are retried in the background with backoff."""

    def __init__(
        self,
        server: Any,
        *,
        redis_url: str,
        cluster: str,
        node_id: str,
        address: str,
        capacity: int,
        lease_ttl: float = 3.0,
        publish_interval: float = 0.05,
        transports: str = "tcp",
    ) -> None:
        library_source()  # InstallError now, not a join that fails forever in the background
        self._server = server
        self._redis = redis.Redis.from_url(
            redis_url, socket_timeout=max(0.5, lease_ttl / 3), socket_connect_timeout=1.0
        )
        self.registry = Registry(self._redis, cluster)
        self.node_id = node_id
        self.address = address
        self.capacity = capacity
        self.transports = transports
        self.ttl_ms = int(lease_ttl * 1000)
        self.publish_interval = publish_interval
        self.incarnation = 0  # 0 = not joined
        self.epoch = 0
        self.joins = 0  # successful joins (the first and every re-join)
        self.renewals = 0  # heartbeats that renewed the lease
        self._pending: dict[bytes, bool] = {}
        self._pending_since: float | None = None  # when the oldest unpublished update arrived
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvpool-agent", daemon=True)

    def start(self) -> None:
        self._try_join()
        self._thread.start()

    def stop(self) -> None:
        """Publishes what is pending and leaves the cluster (best effort)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self.incarnation:
            try:
                self._publish_pending()
                self.registry.leave(self.node_id, self.incarnation)
                log.info(
                    "left cluster %s as %s@%d",
                    self.registry.keys.name,
                    self.node_id,
                    self.incarnation,
                )
            except Exception as e:  # noqa: BLE001 - shutdown must not fail on Redis
                log.warning("could not leave the cluster cleanly: %s", e)
        self._redis.close()

    def abandon(self) -> None:
        """Stops the agent without leaving: the lease expires as if the process had died."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._redis.close()

    # -- background loop -------------------------------------------------------------------

    def _run(self) -> None:
        next_beat = time.monotonic() + self.ttl_ms / 3000
        next_gc = time.monotonic() + _GC_INTERVAL * random.uniform(0.5, 1.5)
        backoff = 0.1
        while not self._stop.wait(self.publish_interval):
            try:
                if not self.incarnation:
                    self._try_join()
                if self.incarnation:
                    self._drain()
                    self._publish_pending()
                    if time.monotonic() >= next_beat:
                        self._heartbeat()
                        next_beat = time.monotonic() + self.ttl_ms / 3000
                    if time.monotonic() >= next_gc:
                        removed = self.registry.collect_garbage()
                        if removed:
                            log.info("removed %d index entries of dead incarnations", removed)
                        next_gc = time.monotonic() + _GC_INTERVAL * random.uniform(0.5, 1.5)
                    backoff = 0.1
                    continue
            except MetadataError as e:
                log.warning("cluster membership lost (%s); joining again", e)
                self.incarnation = 0
            except redis.ResponseError as e:
                # Redis refused a call: when it is because the library is gone or another
                # version replaced it (Redis lost its data, someone removed or replaced it), join
                # again, which loads this version and re-publishes every key. Asked of Redis,
                # not read from the error text.
                if self._library_gone():
                    log.warning(
                        "kvpool library (version %d) missing in Redis (data lost?); joining again",
                        LIBRARY_VERSION,
                    )
                    self.incarnation = 0
                else:
                    log.warning("redis refused a call (%s); retrying", e)
            except Exception as e:  # noqa: BLE001 - Redis down: keep serving, retry
                log.warning("redis unavailable (%s); the node keeps serving", e)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 2.0)

    def _library_gone(self) -> bool:
        try:
            return not library_current(self._redis)
        except Exception:  # noqa: BLE001 - Redis went away meanwhile: the loop retries
            return False

    def _try_join(self) -> None:
        try:
            load_library(self._redis)
            inc, epoch = self.registry.join(
                self.node_id, self.address, self.transports, self.capacity, self.ttl_ms
            )
            self.registry.fence_all(self.node_id, inc)
            # Everything the node holds is re-published under the new incarnation: drop the
            # pending events first, since the snapshot taken after them covers them.
            self._drain()
            self._pending.clear()
            snapshot = self._server.snapshot_keys()
            for i in range(0, len(snapshot), KEY_BYTES):
                self._pending[snapshot[i : i + KEY_BYTES]] = True
            self._pending_since = time.monotonic() if self._pending else None
            self.incarnation, self.epoch = inc, epoch
            self.joins += 1
            log.info(
                "joined cluster %s as %s@%d (epoch %d, %d keys to publish)",
                self.registry.keys.name,
                self.node_id,
                inc,
                epoch,
                len(self._pending),
            )
            self._publish_pending()
        except Exception as e:  # noqa: BLE001 - retried by the loop
            log.warning("join failed: %s", e)

    def _drain(self) -> None:
        """Moves the store's events into ``_pending``, oldest first, so that for each key only
        the last event (committed or removed) is published."""
        while True:
            keys, added, dropped = self._server.drain_events(_DRAIN_BATCH)
            if dropped:
                log.warning(
                    "event ring overflowed (%d events lost); re-publishing all keys", dropped
                )
                self.incarnation = 0  # forces a join with a full snapshot
            if added and self._pending_since is None:
                self._pending_since = time.monotonic()
            for i, flag in enumerate(added):
                self._pending[keys[i * KEY_BYTES : (i + 1) * KEY_BYTES]] = flag == 1
            if len(added) < _DRAIN_BATCH:
                return

    def _publish_pending(self) -> None:
        while self._pending and self.incarnation:
            batch = dict(itertools.islice(self._pending.items(), _DRAIN_BATCH))
            added = [k for k, a in batch.items() if a]
            removed = [k for k, a in batch.items() if not a]
            self.registry.publish(self.node_id, self.incarnation, added, removed)
            for k in batch:
                del self._pending[k]
        if not self._pending:
            self._pending_since = None

    def _heartbeat(self) -> None:
        stats = self._server_stats()
        self.epoch = self.registry.heartbeat(self.node_id, self.incarnation, self.ttl_ms, stats)
        self.renewals += 1

    def metrics(self) -> dict[str, float]:
        """For /metrics (read from another thread: plain reads of ints and a length)."""
        since = self._pending_since
        return {
            "joined": 1.0 if self.incarnation else 0.0,
            "backlog": float(len(self._pending)),
            "lag_s": time.monotonic() - since if since is not None else 0.0,
            "joins": float(self.joins),
            "renewals": float(self.renewals),
        }

    def _server_stats(self) -> dict[str, int]:
        return {
            k: int(v)
            for k, v in json.loads(self._server.stats_json()).items()
            if isinstance(v, int)
        }
