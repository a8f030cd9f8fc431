"""Cluster metadata in Redis: the ``kvpool`` Functions library, its key names and typed wrappers.

Every function of ``redis_scripts/`` is called through this module; its negative-integer domain
errors become :class:`MetadataError` subclasses here and nowhere else.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from functools import cached_property
from pathlib import Path
from typing import Any

import redis as redis_py

from kvpool import _core
from kvpool.errors import InstallError, KVPoolError

__all__ = [
    "INDEX_SENTINEL",
    "LIBRARY_VERSION",
    "NUM_PARTITIONS",
    "ClusterKeys",
    "FencedError",
    "Member",
    "MetadataError",
    "MetadataErrorCode",
    "NotMemberError",
    "Registry",
    "incarnation_entry",
    "library_current",
    "library_source",
    "load_library",
    "partition_of",
]

#: Must equal LIBRARY_VERSION in redis_scripts/00_common.lua.
LIBRARY_VERSION = 4
#: Fixed number of index partitions; part of the cluster's data format (changing it orphans the
#: index of a running cluster).
NUM_PARTITIONS = 16
#: The field every index partition hash (``kvpool:{C/p}:loc``) holds besides its block keys:
#: INDEX_SENTINEL in redis_scripts/00_common.lua. kvpool_fence writes it with a value longer than
#: Redis's hash-max-listpack-value, which keeps the hash in hashtable encoding (HMGET a hash
#: lookup, not a listpack scan). Never a block key (those are 16 bytes): whoever counts the block
#: keys of a partition with HLEN subtracts it.
INDEX_SENTINEL = "~"

_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def incarnation_entry(inc: int) -> str:
    """How the index names an incarnation: base 36, lowercase (``int(entry, 36)`` decodes it).
    Incarnations are unique within a cluster, so the member list maps an entry to its node."""
    if inc < 0:
        raise ValueError(f"incarnation {inc} is negative")
    digits = []
    while True:
        inc, d = divmod(inc, 36)
        digits.append(_BASE36[d])
        if not inc:
            return "".join(reversed(digits))


class MetadataErrorCode(IntEnum):
    """The library's negative-integer replies (redis_scripts/00_common.lua)."""

    BAD_ARGS = -1
    FENCED = -2
    NOT_MEMBER = -3


class MetadataError(KVPoolError):
    """A kvpool Redis function refused the call."""


class FencedError(MetadataError):
    """The node's incarnation was superseded by a newer join of the same node id."""


class NotMemberError(MetadataError):
    """The node is unknown to the cluster or its lease expired: it must join again."""


_ERRORS: dict[int, type[MetadataError]] = {
    MetadataErrorCode.FENCED: FencedError,
    MetadataErrorCode.NOT_MEMBER: NotMemberError,
}


def _check(reply: Any, what: str) -> Any:
    if isinstance(reply, int) and reply < 0:
        code = MetadataErrorCode(reply)
        raise _ERRORS.get(code, MetadataError)(f"{what}: {code.name}")
    return reply


def _library_files() -> list[Path]:
    """The library's Lua files: package data of an installed kvpool (``kvpool/redis_scripts/``,
    installed by CMake from the repository's ``redis_scripts/``), or that folder itself in a
    source checkout (editable install)."""
    here = Path(__file__).resolve().parent
    candidates = [here / "redis_scripts"]
    if (here.parents[1] / "pyproject.toml").is_file():  # python/kvpool/ of a source checkout
        candidates.append(here.parents[1] / "redis_scripts")
    for folder in candidates:
        files = sorted(folder.glob("*.lua"))
        if files:
            return files
    raise InstallError(
        f"the Redis Functions library (redis_scripts/*.lua) is missing from {candidates[0]}: "
        "the kvpool install is incomplete; reinstall kvpool"
    )


def library_source() -> str:
    """The library as loaded: ``redis_scripts/*.lua`` in name order, concatenated."""
    return "\n".join(f.read_text() for f in _library_files())


def load_library(redis: Any) -> None:
    """Loads the library unless the loaded one reports LIBRARY_VERSION (FUNCTION LOAD REPLACE)."""
    if not library_current(redis):
        redis.function_load(library_source(), replace=True)


def library_current(redis: Any) -> bool:
    """Whether Redis holds this version of the library (``kvpool_version`` == LIBRARY_VERSION);
    False when it holds none or another one."""
    try:
        return int(redis.fcall("kvpool_version", 0)) == LIBRARY_VERSION
    except redis_py.ResponseError:  # no such function: no library
        return False


def partition_of(key: bytes) -> int:
    """The index partition of a block key (its first two bytes are already uniform)."""
    return int.from_bytes(key[:2], "big") % NUM_PARTITIONS


@dataclass(frozen=True)
class ClusterKeys:
    """Redis key names of one cluster. Membership shares the slot ``{name}``; each index
    partition has its own slot ``{name/p}`` so the index spreads over a Redis Cluster."""

    name: str

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "{}/"):
            raise KVPoolError(f"cluster name {self.name!r} must be non-empty without {{, }} or /")

    @property
    def membership(self) -> list[str]:
        tag = f"kvpool:{{{self.name}}}"
        return [f"{tag}:meta", f"{tag}:nodes", f"{tag}:leases", f"{tag}:stats"]

    def loc(self, p: int) -> str:
        return f"kvpool:{{{self.name}/{p}}}:loc"

    def fence(self, p: int) -> str:
        return f"kvpool:{{{self.name}/{p}}}:fence"


@dataclass(frozen=True)
class Member:
    """A live storage node as the membership library reports it."""

    node_id: str
    incarnation: int
    address: str
    transports: tuple[str, ...]
    capacity: int
    joined_ms: int
    lease_expiry_ms: int = 0

    @cached_property
    def entry(self) -> str:
        """How the index names this incarnation: :func:`incarnation_entry` (base 36)."""
        return incarnation_entry(self.incarnation)

    @property
    def weight(self) -> float:
        return float(max(self.capacity, 1))

    @property
    def shm(self) -> tuple[str, str] | None:
        """(host id, socket path) when the node serves shared memory, else None."""
        for t in self.transports:
            name, _, where = t.partition("=")
            host, sep, path = where.partition(":")
            if name == "shm" and sep:
                return host, path
        return None

    def transport_names(self) -> tuple[str, ...]:
        """``("tcp", "shm")``: the transports without their endpoints."""
        return tuple(t.partition("=")[0] for t in self.transports)

    @staticmethod
    def parse(node_id: str, info: str, lease_expiry_ms: int = 0) -> Member:
        inc, address, transports, capacity, joined = info.split("|")
        return Member(
            node_id=node_id,
            incarnation=int(inc),
            address=address,
            transports=tuple(t for t in transports.split(",") if t),
            capacity=int(capacity),
            joined_ms=int(joined),
            lease_expiry_ms=lease_expiry_ms,
        )


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class Registry:
    """Typed calls of the membership and index functions for one cluster."""

    def __init__(self, redis: Any, cluster: str) -> None:
        self.redis = redis
        self.keys = ClusterKeys(cluster)
        self._reader = _index_reader(redis, self.keys)

    def join(
        self, node_id: str, address: str, transports: str, capacity: int, ttl_ms: int
    ) -> tuple[int, int]:
        reply = _check(
            self.redis.fcall(
                "kvpool_join",
                4,
                *self.keys.membership,
                node_id,
                address,
                transports,
                capacity,
                ttl_ms,
            ),
            f"join {node_id}",
        )
        return int(reply[0]), int(reply[1])

    def heartbeat(self, node_id: str, incarnation: int, ttl_ms: int, stats: dict[str, int]) -> int:
        return int(
            _check(
                self.redis.fcall(
                    "kvpool_heartbeat",
                    4,
                    *self.keys.membership,
                    node_id,
                    incarnation,
                    ttl_ms,
                    stats.get("used_bytes", 0),
                    stats.get("entries", 0),
                    stats.get("hits", 0),
                    stats.get("misses", 0),
                ),
                f"heartbeat {node_id}@{incarnation}",
            )
        )

    def leave(self, node_id: str, incarnation: int) -> int:
        return int(
            _check(
                self.redis.fcall("kvpool_leave", 4, *self.keys.membership, node_id, incarnation),
                f"leave {node_id}@{incarnation}",
            )
        )

    def collect_garbage(self, page: int = 1000) -> int:
        """Drops the index entries of every incarnation that is no longer a member."""
        _, members = self.members()
        newest = max((m.incarnation for m in members), default=0)
        # An empty member list says nothing about incarnations that join meanwhile: keep all
        # entries above the newest one handed out so far.
        if not members:
            newest = int(self.redis.hget(self.keys.membership[0], "next_incarnation") or 0)
        return self.gc([m.entry for m in members], page, keep_newer_than=newest)

    def members(self) -> tuple[int, list[Member]]:
        reply = self.redis.fcall("kvpool_members", 4, *self.keys.membership)
        return int(reply[0]), [Member.parse(_s(n), _s(i), int(e or 0)) for n, i, e in reply[1:]]

    def epoch(self) -> int:
        return int(self.redis.fcall_ro("kvpool_epoch", 1, self.keys.membership[0]))

    def node_stats(self) -> tuple[int, list[tuple[Member, dict[str, int]]]]:
        reply = self.redis.fcall_ro("kvpool_stats", 4, *self.keys.membership)
        out = []
        for n, info, st in reply[1:]:
            stats: dict[str, int] = {}
            if st:
                used, blocks, hits, misses, updated = (int(x) for x in _s(st).split("|"))
                stats = {
                    "used_bytes": used,
                    "blocks": blocks,
                    "hits": hits,
                    "misses": misses,
                    "updated_ms": updated,
                }
            out.append((Member.parse(_s(n), _s(info)), stats))
        return int(reply[0]), out

    def fence_all(self, node_id: str, incarnation: int) -> None:
        """Tells every partition the node's incarnation (and writes its INDEX_SENTINEL)."""
        pipe = self.redis.pipeline(transaction=False)
        for p in range(NUM_PARTITIONS):
            pipe.fcall(
                "kvpool_fence", 2, self.keys.loc(p), self.keys.fence(p), node_id, incarnation
            )
        for reply in pipe.execute():
            _check(reply, f"fence {node_id}@{incarnation}")

    def publish(
        self, node_id: str, incarnation: int, added: list[bytes], removed: list[bytes]
    ) -> int:
        """One pipeline (one round trip) for any number of keys: one call per partition touched.
        The index lists the keys under :func:`incarnation_entry` of ``incarnation``."""
        by_part: dict[int, tuple[list[bytes], list[bytes]]] = {}
        for k in added:
            by_part.setdefault(partition_of(k), ([], []))[0].append(k)
        for k in removed:
            by_part.setdefault(partition_of(k), ([], []))[1].append(k)
        if not by_part:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for p, (a, r) in by_part.items():
            pipe.fcall(
                "kvpool_publish",
                2,
                self.keys.loc(p),
                self.keys.fence(p),
                node_id,
                incarnation,
                len(a),
                *a,
                *r,
            )
        changed = 0
        for reply in pipe.execute():
            changed += int(_check(reply, f"publish {node_id}@{incarnation}"))
        return changed

    def lookup(self, keys: list[bytes]) -> list[list[str]]:
        """Published holders of each key (entries: base-36 incarnations, see
        :func:`incarnation_entry`; dead ones included), one pipeline in total."""
        return self.lookup_with_epoch(keys)[1]

    def lookup_with_epoch(self, keys: list[bytes]) -> tuple[int, list[list[str]]]:
        """The cluster epoch and the published holders of each key, in one pipeline: one call
        per partition the keys fall in, plus the epoch. Plain-TCP Redis is read by the core's
        RedisIndexReader (C++, no per-key Python work); TLS and unix sockets use redis-py."""
        if self._reader is not None:
            epoch, holders = self._reader.lookup(keys)
            return int(epoch), [h.split(",") if h else [] for h in holders]
        by_part: dict[int, list[int]] = {}
        for i, k in enumerate(keys):
            by_part.setdefault(partition_of(k), []).append(i)
        pipe = self.redis.pipeline(transaction=False)
        pipe.fcall_ro("kvpool_epoch", 1, self.keys.membership[0])
        parts = list(by_part.items())
        for p, idx in parts:
            pipe.fcall_ro("kvpool_lookup", 1, self.keys.loc(p), *(keys[i] for i in idx))
        replies = pipe.execute()
        out: list[list[str]] = [[] for _ in keys]
        for (_, idx), reply in zip(parts, replies[1:], strict=True):
            for i, v in zip(idx, reply, strict=True):
                if v:
                    out[i] = _s(v).split(",")
        return int(replies[0]), out

    def locate(self, keys: Sequence[bytes], live: list[str]) -> tuple[int, list[int]]:
        """The epoch and, per key, the index in ``live`` (the members' :attr:`Member.entry`) of
        its first published live holder, or -1: entries of dead incarnations never come back."""
        if self._reader is not None:
            epoch, holder = self._reader.locate(keys, live)
            return int(epoch), holder
        epoch, holders = self.lookup_with_epoch(list(keys))
        where = {e: i for i, e in enumerate(live)}
        return epoch, [next((where[e] for e in h if e in where), -1) for h in holders]

    def gc(
        self, live_entries: list[str], page: int = 1000, *, keep_newer_than: int | None = None
    ) -> int:
        """Drops index entries of incarnations not in ``live_entries`` (the members'
        :attr:`Member.entry`), keeping any incarnation above ``keep_newer_than`` (nodes that
        joined after the member list was read); returns how many. The partitions' INDEX_SENTINEL
        stays."""
        if keep_newer_than is not None:
            live_entries = [*live_entries, f">{keep_newer_than}"]
        removed = 0
        for p in range(NUM_PARTITIONS):
            cursor = "0"
            while True:
                nxt, n = self.redis.fcall(
                    "kvpool_gc", 1, self.keys.loc(p), cursor, page, *live_entries
                )
                removed += int(n)
                cursor = _s(nxt)
                if cursor == "0":
                    break
        return removed

    def index_keys(self) -> int:
        """How many block keys the index lists over all partitions, in one pipeline: HLEN of
        each partition less its INDEX_SENTINEL field."""
        pipe = self.redis.pipeline(transaction=False)
        for p in range(NUM_PARTITIONS):
            pipe.hlen(self.keys.loc(p))
            pipe.hexists(self.keys.loc(p), INDEX_SENTINEL)
        replies = pipe.execute()
        return sum(int(n) - int(bool(s)) for n, s in zip(replies[::2], replies[1::2], strict=True))


def _index_reader(redis: Any, keys: ClusterKeys) -> Any:
    """The core's fast index reader for a plain-TCP Redis, else None."""
    pool = getattr(redis, "connection_pool", None)
    if pool is None or pool.connection_class is not redis_py.Connection:
        return None
    kw = pool.connection_kwargs
    timeout = kw.get("socket_timeout") or 5.0
    return _core.RedisIndexReader(
        kw.get("host", "127.0.0.1"),
        int(kw.get("port", 6379)),
        kw.get("username") or "",
        kw.get("password") or "",
        int(kw.get("db", 0) or 0),
        keys.membership[0],
        [keys.loc(p) for p in range(NUM_PARTITIONS)],
        int(timeout * 1000),
    )


def node_id_for(address: str) -> str:
    """A stable default node id for an address (so a restarted node keeps its id)."""
    return "n" + hashlib.blake2b(address.encode(), digest_size=6).hexdigest()
