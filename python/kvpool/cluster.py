"""``kvpool.Cluster``: the Client API over every live node of a cluster."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

import redis

from kvpool import _core
from kvpool._closing import Closing
from kvpool.client import TRANSPORTS, Client, client_token
from kvpool.errors import InstallError, InvalidArgumentError, KVPoolError
from kvpool.metadata import Member, Registry, load_library
from kvpool.rdma import RdmaSettings
from kvpool.staging import StagingArena

__all__ = ["Cluster"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: A node that failed is skipped for this long before it is tried again.
_SUSPECT_SECONDS = 1.0
#: Without a lookup to piggyback on, the epoch is polled at most this often.
_EPOCH_POLL_SECONDS = 0.2


class Cluster(Closing):
    """Reads and writes blocks across all live nodes of a cluster.

    Writes go to the nodes chosen by weighted rendezvous hashing (``replicas`` extra copies on the
    next-ranked nodes). Reads go where the Redis index says the block is, and to the placement
    nodes when Redis is unreachable. All nodes of a call are contacted in parallel and the call
    returns by its deadline: a dead or slow node turns into misses, never into an exception or a
    hang. The member view is refreshed only when the cluster epoch moves.

    ``transport`` is chosen per member: shared memory for nodes that advertise it on this host
    (``"auto"`` falls back to TCP when it fails, ``"shm"`` does not), TCP for the rest. All members
    share one staging ``arena``: a buffer from :meth:`staging_buffer` is zero-copy to each of them.
    Members elsewhere that advertise RDMA get the configured ``transport`` too, on the device the
    ``rdma_*`` settings choose (as for :class:`kvpool.Client`), and ``auth_token`` is proven to
    every member that requires one.
    """

    def __init__(
        self,
        redis_url: str,
        cluster: str = "default",
        *,
        timeout: float = 5.0,
        replicas: int = 0,
        max_workers: int = 16,
        transport: str = "auto",
        arena: StagingArena | None = None,
        rdma_devices: str = "",
        rdma_link_type: str = "Ethernet",
        rdma_port: int = 1,
        rdma_gpu: int = -1,
        auth_token: str | None = None,
    ) -> None:
        if timeout <= 0:
            raise InvalidArgumentError(f"timeout must be > 0, got {timeout}")
        if transport not in TRANSPORTS:
            raise InvalidArgumentError(
                f"transport {transport!r} is not one of {', '.join(TRANSPORTS)}"
            )
        self.transport = transport
        self._rdma = RdmaSettings(rdma_devices, rdma_link_type, rdma_port, rdma_gpu)
        self._rdma.options()  # a bad setting or GPU binding fails here, not per member
        self._auth_token = client_token(auth_token)
        self._arena = arena
        self._host_id = _core.host_id()
        if replicas < 0:
            raise InvalidArgumentError(f"replicas must be >= 0, got {replicas}")
        self.timeout = timeout
        self.replicas = replicas
        self._redis = redis.Redis.from_url(
            redis_url, socket_timeout=min(timeout, 1.0), socket_connect_timeout=min(timeout, 1.0)
        )
        self._registry = Registry(self._redis, cluster)
        self._lock = threading.Lock()
        self._epoch = -1
        self._members: list[Member] = []
        self._live: dict[str, Member] = {}
        self._view: tuple[list[Member], list[str]] = ([], [])
        self._placement: tuple[list[Member], Any] = ([], _core.Placement([], []))
        self._clients: dict[str, Client] = {}
        self._suspect: dict[str, float] = {}
        self._epoch_checked = 0.0
        self._pool = ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="kvpool-cluster"
        )
        try:
            load_library(self._redis)
            self._refresh(force=True)
        except InstallError:
            self.close()
            raise  # no Redis coming back fixes a broken install
        except Exception as e:  # noqa: BLE001 - Redis may come later; calls degrade meanwhile
            log.warning("cluster %s: redis unavailable at start (%s)", cluster, e)

    # -- view ------------------------------------------------------------------------------

    @property
    def arena(self) -> StagingArena:
        """The staging arena every member's client shares (made on first use)."""
        with self._lock:
            if self._arena is None:
                self._arena = StagingArena()
            return self._arena

    def staging_buffer(self, nbytes: int) -> memoryview:
        """A writable buffer in :attr:`arena`: zero-copy to every same-host member."""
        return self.arena.buffer(nbytes)

    def transports(self) -> dict[str, str]:
        """The transport in use per connected member (node id -> "tcp" / "shm")."""
        with self._lock:
            by_entry = {m.entry: m.node_id for m in self._members}
            return {by_entry.get(e, e): c.transport for e, c in self._clients.items()}

    def members(self) -> list[Member]:
        """The live nodes (refreshed when the epoch moved)."""
        self._maybe_refresh()
        return list(self._members)

    @property
    def epoch(self) -> int:
        return self._epoch

    def _refresh(self, *, force: bool = False, epoch: int | None = None) -> None:
        if epoch is None:
            epoch = self._registry.epoch()
        self._epoch_checked = time.monotonic()
        if not force and epoch == self._epoch:
            return
        new_epoch, members = self._registry.members()
        with self._lock:
            self._epoch = new_epoch
            self._members = sorted(members, key=lambda m: m.node_id)
            self._live = {m.entry: m for m in self._members}
            self._view = (self._members, [m.entry for m in self._members])
            self._placement = (
                self._members,
                _core.Placement(
                    [m.node_id for m in self._members], [m.weight for m in self._members]
                ),
            )
            for entry in [e for e in self._clients if e not in self._live]:
                self._clients.pop(entry).close()

    def _maybe_refresh(self) -> None:
        if time.monotonic() - self._epoch_checked < _EPOCH_POLL_SECONDS:
            return
        try:
            self._refresh()
        except Exception as e:  # noqa: BLE001 - keep the last view
            self._epoch_checked = time.monotonic()
            log.debug("epoch check failed: %s", e)

    def _client(self, m: Member) -> Client | None:
        entry = m.entry
        client = self._clients.get(entry)
        if client is not None:
            return client
        if self._suspect.get(entry, 0.0) > time.monotonic():
            return None
        shm = m.shm
        same_host = shm is not None and shm[0] == self._host_id
        # Shared memory on this host, RDMA to a member elsewhere that offers it, else TCP.
        fast = same_host or "rdma" in m.transport_names()
        transport = self.transport if fast else "tcp"
        try:
            client = Client(
                m.address,
                timeout=self.timeout,
                connect_timeout=min(self.timeout, 1.0),
                transport=transport,
                arena=self.arena if transport != "tcp" else None,
                rdma_devices=self._rdma.devices,
                rdma_link_type=self._rdma.link_type,
                rdma_port=self._rdma.port,
                rdma_gpu=self._rdma.gpu,
                auth_token=self._auth_token,
            )
        except KVPoolError as e:
            log.info("node %s (%s) unreachable: %s", m.node_id, m.address, e)
            self._suspect[entry] = time.monotonic() + _SUSPECT_SECONDS
            return None
        with self._lock:
            return self._clients.setdefault(entry, client)

    # -- placement and lookup ----------------------------------------------------------------

    def _place(self, keys: Sequence[bytes], k: int) -> list[list[Member]]:
        members, placement = self._placement  # one attribute read: the two always match
        if not members or not keys:
            return [[] for _ in keys]
        return [[members[i] for i in r] for r in placement.rank(list(keys), k)]

    def _holders(self, keys: Sequence[bytes]) -> tuple[list[Member], list[int]] | None:
        """A member view and, per key, the index in it of a live holder (-1: none) per the
        index; None when Redis is unreachable."""
        try:
            for _ in range(2):
                members, live = self._view  # one attribute read: the two always match
                epoch, holder = self._registry.locate(keys, live)
                if epoch == self._epoch:
                    break
                self._refresh(epoch=epoch)  # the view moved: map again against the new one
            return members, holder
        except Exception as e:  # noqa: BLE001 - index unreachable
            log.debug("index lookup failed (%s)", e)
            return None

    def _locate(self, keys: Sequence[bytes]) -> list[list[Member]]:
        """Live holders of each key per the index; placement when Redis is unreachable."""
        found = self._holders(keys)
        if found is None:
            return self._place(keys, 1 + self.replicas)
        members, holder = found
        return [[members[j]] if j >= 0 else [] for j in holder]

    # -- fan-out -------------------------------------------------------------------------------

    def _fan_out(
        self, groups: dict[str, tuple[Member, list[int]]], fn: Callable[[Client, list[int]], T]
    ) -> list[tuple[list[int], T | None]]:
        """Runs fn(client, indices) for every node in parallel; a failed, unreachable or late
        node yields None for its indices."""
        deadline = time.monotonic() + self.timeout
        futures: list[tuple[str, Member, list[int], Future[T] | None]] = []
        for entry, (member, idx) in groups.items():
            client = self._client(member)
            futures.append(
                (entry, member, idx, None if client is None else self._pool.submit(fn, client, idx))
            )
        out: list[tuple[list[int], T | None]] = []
        for entry, member, idx, fut in futures:
            result: T | None = None
            if fut is not None:
                try:
                    result = fut.result(timeout=max(0.0, deadline - time.monotonic()))
                except FutureTimeout:
                    log.info("node %s missed the deadline", member.node_id)
                except KVPoolError as e:
                    log.info("node %s failed: %s", member.node_id, e)
                    self._suspect[entry] = time.monotonic() + _SUSPECT_SECONDS
                    with self._lock:
                        bad = self._clients.pop(entry, None)
                    if bad is not None:
                        bad.close()
            out.append((idx, result))
        return out

    @staticmethod
    def _group(targets: list[list[Member]], which: int = 0) -> dict[str, tuple[Member, list[int]]]:
        groups: dict[str, tuple[Member, list[int]]] = {}
        for i, ms in enumerate(targets):
            if len(ms) > which:
                m = ms[which]
                groups.setdefault(m.entry, (m, []))[1].append(i)
        return groups

    # -- the Client API --------------------------------------------------------------------------

    def put(self, keys: Sequence[bytes], blocks: Sequence[Any]) -> int:
        """Stores each block on its placement node(s); returns how many keys at least one node
        holds afterwards. Unreachable nodes make their keys count as not stored."""
        if len(keys) != len(blocks):
            raise InvalidArgumentError(f"{len(keys)} keys but {len(blocks)} blocks")
        self._maybe_refresh()
        targets = self._place(keys, 1 + self.replicas)
        held = [False] * len(keys)
        for copy in range(1 + self.replicas):
            groups = self._group(targets, copy)
            results = self._fan_out(
                groups,
                lambda c, idx: c.put_held([keys[i] for i in idx], [blocks[i] for i in idx]),
            )
            for idx, ok in results:
                if ok is not None:
                    for i, h in zip(idx, ok, strict=True):
                        held[i] = held[i] or h
        return sum(held)

    def get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        out: list[bytes | None] = [None] * len(keys)
        for idx, blocks in self._fan_out(
            self._group(self._locate(keys)), lambda c, idx: c.get([keys[i] for i in idx])
        ):
            if blocks is not None:
                for i, b in zip(idx, blocks, strict=True):
                    out[i] = b
        return out

    def get_into(self, keys: Sequence[bytes], buffers: Sequence[Any]) -> list[bool]:
        if len(keys) != len(buffers):
            raise InvalidArgumentError(f"{len(keys)} keys but {len(buffers)} buffers")
        out = [False] * len(keys)
        results = self._fan_out(
            self._group(self._locate(keys)),
            lambda c, idx: c.get_into([keys[i] for i in idx], [buffers[i] for i in idx]),
        )
        for idx, found in results:
            if found is not None:
                for i, f in zip(idx, found, strict=True):
                    out[i] = f
        return out

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        """Asks the nodes the index names (so a block evicted since it was listed is absent)."""
        return self._exists_at(keys, self._locate(keys))

    def _exists_at(self, keys: Sequence[bytes], targets: list[list[Member]]) -> list[bool]:
        out = [False] * len(keys)
        results = self._fan_out(
            self._group(targets), lambda c, idx: c.exists([keys[i] for i in idx])
        )
        for idx, present in results:
            if present is not None:
                for i, p in zip(idx, present, strict=True):
                    out[i] = p
        return out

    def match_prefix(self, keys: Sequence[bytes]) -> int:
        """How many leading keys are held by live nodes, per the index (one Redis round trip);
        when Redis is unreachable, per the placement nodes."""
        found = self._holders(keys)
        if found is None:  # index unreachable: ask the placement nodes themselves
            present = self._exists_at(keys, self._place(keys, 1 + self.replicas))
            return next((i for i, p in enumerate(present) if not p), len(keys))
        holder = found[1]
        return holder.index(-1) if -1 in holder else len(holder)

    def match_prefixes(self, key_lists: Sequence[Sequence[bytes]]) -> list[int]:
        """:meth:`match_prefix` of each list, in one Redis round trip for all of them (e.g. the
        key chains of every TP rank); when Redis is unreachable, per the placement nodes."""
        flat = [k for keys in key_lists for k in keys]
        found = self._holders(flat)
        if found is None:
            return [self.match_prefix(keys) for keys in key_lists]
        holder, out, at = found[1], [], 0
        for keys in key_lists:
            mine = holder[at : at + len(keys)]
            out.append(mine.index(-1) if -1 in mine else len(mine))
            at += len(keys)
        return out

    def delete(self, keys: Sequence[bytes]) -> int:
        """Deletes keys from every live node; returns how many keys were present anywhere."""
        self._maybe_refresh()
        everywhere = [list(self._members) for _ in keys]
        deleted = [False] * len(keys)
        for copy in range(len(self._members)):
            for idx, flags in self._fan_out(
                self._group(everywhere, copy),
                lambda c, idx: c.delete_each([keys[i] for i in idx]),
            ):
                if flags is not None:
                    for i, f in zip(idx, flags, strict=True):
                        deleted[i] = deleted[i] or bool(f)
        return sum(deleted)

    def stats(self) -> dict[str, Any]:
        """Per-node counters (from the nodes) and their totals."""
        self._maybe_refresh()
        groups = {m.entry: (m, [i]) for i, m in enumerate(self._members)}
        nodes: dict[str, Any] = {}
        for idx, st in self._fan_out(groups, lambda c, idx: c.stats()):
            m = self._members[idx[0]]
            nodes[m.node_id] = {
                "address": m.address,
                "incarnation": m.incarnation,
                **(st or {"unreachable": True}),
            }
        totals: dict[str, int] = {}
        for st in nodes.values():
            for k, v in st.items():
                if isinstance(v, int) and not isinstance(v, bool) and k != "incarnation":
                    totals[k] = totals.get(k, 0) + v
        return {"epoch": self._epoch, "nodes": nodes, "totals": totals}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for c in self._clients.values():
            c.close()
        self._clients.clear()
        self._redis.close()
