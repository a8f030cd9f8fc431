"""The ``kvpool`` Redis Functions library (redis_scripts/*.lua) against a real redis-server:
every function's contract and error codes, fencing and lease reaping, the typed wrappers of
kvpool.metadata, library loading/upgrading, and the hash-slot layout (Redis Cluster).

Each test uses a cluster name of its own on one session redis-server, so tests never see each
other's keys. Waiting for a lease to expire polls the Redis server clock with a deadline."""

from __future__ import annotations

import random
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import redis
from conftest import RedisFactory, RedisProcess, cluster_name, free_port, wait_until
from kvpool.metadata import (
    INDEX_SENTINEL,
    LIBRARY_VERSION,
    NUM_PARTITIONS,
    ClusterKeys,
    FencedError,
    Member,
    MetadataError,
    NotMemberError,
    Registry,
    incarnation_entry,
    library_source,
    load_library,
    partition_of,
)

BAD_ARGS, FENCED, NOT_MEMBER = -1, -2, -3
LONG_TTL = 60_000
SHORT_TTL = 200
#: Slack for the Redis server clock (a wall clock) between two TIME calls of a test.
CLOCK_MARGIN_MS = 1000

FUNCTIONS = {
    "kvpool_version",
    "kvpool_join",
    "kvpool_heartbeat",
    "kvpool_leave",
    "kvpool_members",
    "kvpool_epoch",
    "kvpool_stats",
    "kvpool_fence",
    "kvpool_publish",
    "kvpool_lookup",
    "kvpool_gc",
}
READ_ONLY = {"kvpool_version", "kvpool_epoch", "kvpool_stats", "kvpool_lookup"}


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def r(redis_server: RedisProcess) -> Iterator[redis.Redis]:
    client = redis_server.client()
    load_library(client)
    yield client
    client.close()


@pytest.fixture
def ck() -> ClusterKeys:
    return ClusterKeys(cluster_name())


def join(
    r: redis.Redis,
    ck: ClusterKeys,
    node: str,
    *,
    address: str = "127.0.0.1:7070",
    transports: str = "tcp",
    capacity: int = 1 << 30,
    ttl: int = LONG_TTL,
) -> tuple[int, int]:
    reply = r.fcall("kvpool_join", 4, *ck.membership, node, address, transports, capacity, ttl)
    assert isinstance(reply, list), f"join {node} failed: {reply}"
    return int(reply[0]), int(reply[1])


def heartbeat(
    r: redis.Redis, ck: ClusterKeys, node: str, inc: Any, ttl: Any = LONG_TTL, *stats: Any
) -> Any:
    return r.fcall("kvpool_heartbeat", 4, *ck.membership, node, inc, ttl, *stats)


def leave(r: redis.Redis, ck: ClusterKeys, *argv: Any) -> Any:
    return r.fcall("kvpool_leave", 4, *ck.membership, *argv)


def members(r: redis.Redis, ck: ClusterKeys) -> tuple[int, dict[str, tuple[str, int]]]:
    reply = r.fcall("kvpool_members", 4, *ck.membership)
    return int(reply[0]), {n.decode(): (i.decode(), int(e)) for n, i, e in reply[1:]}


def epoch(r: redis.Redis, ck: ClusterKeys) -> int:
    return int(r.fcall_ro("kvpool_epoch", 1, ck.membership[0]))


def publish(
    r: redis.Redis,
    ck: ClusterKeys,
    p: int,
    node: str,
    inc: Any,
    added: Sequence[bytes],
    removed: Sequence[bytes] = (),
) -> Any:
    return r.fcall(
        "kvpool_publish", 2, ck.loc(p), ck.fence(p), node, inc, len(added), *added, *removed
    )


def lookup(r: redis.Redis, ck: ClusterKeys, p: int, keys: list[bytes]) -> list[str | None]:
    return [
        None if v is None else v.decode() for v in r.fcall_ro("kvpool_lookup", 1, ck.loc(p), *keys)
    ]


def held(*incarnations: int) -> str:
    """A holder list as the index stores it: base-36 incarnations, comma-separated."""
    return ",".join(incarnation_entry(i) for i in incarnations)


def fence(r: redis.Redis, ck: ClusterKeys, p: int, *argv: Any) -> Any:
    return r.fcall("kvpool_fence", 2, ck.loc(p), ck.fence(p), *argv)


def keys_in(p: int, n: int, tag: bytes = b"") -> list[bytes]:
    """n distinct 16-byte keys of partition p."""
    out = []
    i = 0
    while len(out) < n:
        k = (
            (p + NUM_PARTITIONS * i).to_bytes(2, "big")
            + tag.ljust(6, b".")[:6]
            + i.to_bytes(8, "big")
        )
        assert partition_of(k) == p
        out.append(k)
        i += 1
    return out


def redis_ms(r: redis.Redis) -> int:
    s, us = r.time()
    return int(s) * 1000 + int(us) // 1000


def wait_redis_clock_past(r: redis.Redis, ms: int, timeout: float = 5.0) -> None:
    wait_until(lambda: redis_ms(r) > ms, timeout=timeout, what=f"redis clock past {ms}")


def assert_counts_from_clock(value: int, before: int, after: int, what: str) -> None:
    """The first value a new (or emptied) cluster hands out is the Redis server clock (ms) at
    that join, + 1: after ``before`` and no later than ``after`` (TIME read around the join)."""
    assert value > 0, what
    assert before - CLOCK_MARGIN_MS < value <= after + 1 + CLOCK_MARGIN_MS, (
        what, value, before, after,
    )  # fmt: skip


def pairs(flat: list[Any]) -> dict[Any, Any]:
    """A RESP2 flat key/value list as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def hgetall(r: redis.Redis, key: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in r.hgetall(key).items()}


# CRC16/XMODEM as Redis Cluster uses it for key slots.
def crc16(data: bytes) -> int:
    crc = 0
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def keyslot(key: str | bytes) -> int:
    k = key.encode() if isinstance(key, str) else key
    start = k.find(b"{")
    if start != -1:
        end = k.find(b"}", start + 1)
        if end > start + 1:
            k = k[start + 1 : end]
    return crc16(k) % 16384


# ---------------------------------------------------------------------------------------------
# The library itself


def test_version_and_function_list(r: redis.Redis) -> None:
    # The Python constant and the Lua library agree (and the loaded library is this one).
    declared = re.search(r"^local LIBRARY_VERSION = (\d+)$", library_source(), re.M)
    assert declared and int(declared.group(1)) == LIBRARY_VERSION
    assert r.fcall("kvpool_version", 0) == LIBRARY_VERSION
    assert r.fcall_ro("kvpool_version", 0) == LIBRARY_VERSION
    libs = r.function_list(library="kvpool")
    assert len(libs) == 1
    lib = pairs(libs[0])
    assert lib[b"library_name"] == b"kvpool"
    found = {}
    for f in lib[b"functions"]:
        fd = pairs(f)
        found[fd[b"name"].decode()] = {x.decode() for x in fd[b"flags"]}
    assert set(found) == FUNCTIONS
    for name, flags in found.items():
        assert ("no-writes" in flags) == (name in READ_ONLY), (name, flags)


def test_every_function_is_documented() -> None:
    src = library_source()
    assert src.startswith("#!lua name=kvpool\n")
    registered = set(re.findall(r"register_function\{?\(?(?:function_name = )?'(\w+)'", src))
    assert registered == FUNCTIONS
    for name in FUNCTIONS:
        m = re.search(r"--\[\[\n" + name + r"\b(.*?)\]\]", src, re.S)
        assert m, f"{name} has no header comment"
        assert "KEYS" in m.group(1) and "reply" in m.group(1), f"{name}: KEYS/reply undocumented"
    assert "-1 BAD_ARGS" in src and "-2 FENCED" in src and "-3 NOT_MEMBER" in src


def test_load_library_loads_when_missing_and_replaces_other_versions(
    start_redis: RedisFactory,
) -> None:
    r = start_redis().client()
    try:
        assert r.function_list() == []
        with pytest.raises(redis.ResponseError):
            r.fcall("kvpool_version", 0)
        load_library(r)  # missing: loaded
        assert r.fcall("kvpool_version", 0) == LIBRARY_VERSION
        load_library(r)  # same version: a no-op (and no error about an existing library)

        def names() -> set[str]:
            (lib,) = r.function_list(library="kvpool")
            return {pairs(f)[b"name"].decode() for f in pairs(lib)[b"functions"]}

        assert names() == FUNCTIONS

        def fake(version: int) -> str:
            return (
                "#!lua name=kvpool\n"
                "redis.register_function{function_name='kvpool_version', flags={'no-writes'},"
                f" callback=function() return {version} end}}\n"
            )

        # An older (different) version is replaced.
        r.function_load(fake(0), replace=True)
        assert names() == {"kvpool_version"} and r.fcall("kvpool_version", 0) == 0
        load_library(r)
        assert names() == FUNCTIONS and r.fcall("kvpool_version", 0) == LIBRARY_VERSION
        # A newer one too (the version must be equal, not merely >=).
        r.function_load(fake(LIBRARY_VERSION + 1), replace=True)
        load_library(r)
        assert names() == FUNCTIONS and r.fcall("kvpool_version", 0) == LIBRARY_VERSION
        # A library that reports the same version is left alone (the version is the contract).
        r.function_load(fake(LIBRARY_VERSION), replace=True)
        load_library(r)
        assert names() == {"kvpool_version"}
    finally:
        r.close()


# ---------------------------------------------------------------------------------------------
# Membership


def test_join_fresh_incarnations_and_epoch(r: redis.Redis, ck: ClusterKeys) -> None:
    assert epoch(r, ck) == 0
    assert not r.exists(ck.membership[0])
    before = redis_ms(r)
    inc_a, ep_a = join(r, ck, "a", address="10.0.0.1:7070", transports="tcp,rdma", capacity=123)
    first = redis_ms(r)
    # A new cluster counts incarnations and epochs from the Redis server clock...
    assert_counts_from_clock(inc_a, before, first, "first incarnation")
    assert_counts_from_clock(ep_a, before, first, "first epoch")
    inc_b, ep_b = join(r, ck, "b", ttl=5000)
    inc_a2, ep_a2 = join(r, ck, "a", address="10.0.0.1:7071")  # re-join supersedes
    # ...then every join takes the next incarnation and moves the epoch by exactly 1.
    assert (inc_b, inc_a2) == (inc_a + 1, inc_a + 2)
    assert (ep_b, ep_a2) == (ep_a + 1, ep_a + 2)
    assert epoch(r, ck) == ep_a2
    assert int(r.hget(ck.membership[0], "next_incarnation")) == inc_a2
    after = redis_ms(r)

    nodes = hgetall(r, ck.membership[1])
    assert set(nodes) == {"a", "b"}
    inc, address, transports, capacity, joined = nodes["a"].split("|")
    assert (int(inc), address, transports, int(capacity)) == (
        inc_a2,
        "10.0.0.1:7071",
        "tcp",
        1 << 30,
    )
    assert before <= int(joined) <= after
    m = Member.parse("a", nodes["a"])
    assert m.entry == incarnation_entry(inc_a2) and m.transports == ("tcp",)
    # The lease is the server clock + ttl.
    lease_b = r.zscore(ck.membership[2], "b")
    assert before + 5000 <= lease_b <= after + 5000

    ep, ms = members(r, ck)
    assert ep == ep_a2 and set(ms) == {"a", "b"} and ms["b"][1] == int(lease_b)


def test_join_after_data_loss_never_repeats_values(r: redis.Redis, ck: ClusterKeys) -> None:
    """A cluster whose keys are gone (Redis lost its data) counts from the clock again: once the
    clock has passed the values handed out before, no incarnation or epoch repeats."""
    inc_a, _ = join(r, ck, "a")
    inc_b, ep_b = join(r, ck, "b")
    assert leave(r, ck, "b", inc_b) == ep_b + 1 == epoch(r, ck)
    old_inc, old_ep = inc_b, ep_b + 1
    r.delete(*ck.membership)  # the data loss
    assert epoch(r, ck) == 0 and members(r, ck) == (0, {})
    wait_redis_clock_past(r, max(old_inc, old_ep))
    before = redis_ms(r)
    inc_a2, ep = join(r, ck, "a")
    after = redis_ms(r)
    assert_counts_from_clock(inc_a2, before, after, "incarnation after the loss")
    assert_counts_from_clock(ep, before, after, "epoch after the loss")
    assert inc_a2 > old_inc and ep > old_ep
    # The old incarnation stays fenced; the new one counts on by exactly 1.
    assert heartbeat(r, ck, "a", inc_a) == FENCED
    assert join(r, ck, "b") == (inc_a2 + 1, ep + 1)


@pytest.mark.parametrize(
    "argv",
    [
        ["", "h:1", "tcp", 1, 1000],  # empty node id
        ["a|b", "h:1", "tcp", 1, 1000],  # separators are reserved in node ids
        ["a@b", "h:1", "tcp", 1, 1000],
        ["a,b", "h:1", "tcp", 1, 1000],
        ["a", "h:1", "tcp", "lots", 1000],  # capacity not a number
        ["a", "h:1", "tcp", 1, 0],  # ttl must be > 0
        ["a", "h:1", "tcp", 1, -5],
        ["a", "h:1", "tcp", 1, "soon"],
        ["a", "h:1", "tcp", 1],  # missing ttl
        ["a"],
        [],
    ],
)
def test_join_bad_args(r: redis.Redis, ck: ClusterKeys, argv: list[Any]) -> None:
    # On a new cluster a refused join does not start the count either: nothing is written.
    assert r.fcall("kvpool_join", 4, *ck.membership, *argv) == BAD_ARGS
    assert epoch(r, ck) == 0
    assert not any(r.exists(k) for k in ck.membership)
    inc, ep = join(r, ck, "other")
    meta = hgetall(r, ck.membership[0])
    assert r.fcall("kvpool_join", 4, *ck.membership, *argv) == BAD_ARGS
    assert epoch(r, ck) == ep  # nothing changed
    assert hgetall(r, ck.membership[0]) == meta
    assert set(hgetall(r, ck.membership[1])) == {"other"}
    assert join(r, ck, "next") == (inc + 1, ep + 1)  # no incarnation was used up
    with pytest.raises(MetadataError, match="BAD_ARGS"):
        Registry(r, ck.name).join("x|y", "h:1", "tcp", 1, 1000)


def test_heartbeat_extends_lease_and_records_stats(r: redis.Redis, ck: ClusterKeys) -> None:
    inc, ep = join(r, ck, "a", ttl=1000)
    lease0 = r.zscore(ck.membership[2], "a")
    assert heartbeat(r, ck, "a", inc, 30_000, 100, 7, 5, 2) == ep
    lease1 = r.zscore(ck.membership[2], "a")
    assert lease1 >= lease0 + 29_000
    used, blocks, hits, misses, updated = hgetall(r, ck.membership[3])["a"].split("|")
    assert (used, blocks, hits, misses) == ("100", "7", "5", "2")
    assert abs(int(updated) - redis_ms(r)) < 10_000
    # A heartbeat never moves the epoch.
    assert epoch(r, ck) == ep
    # The typed wrapper sends the node's stats dict.
    reg = Registry(r, ck.name)
    assert reg.heartbeat("a", inc, 30_000, {"used_bytes": 9, "entries": 3, "hits": 1}) == ep
    ep2, rows = reg.node_stats()
    assert ep2 == ep
    ((m, st),) = rows
    assert m.node_id == "a" and m.incarnation == inc
    assert {k: st[k] for k in ("used_bytes", "blocks", "hits", "misses")} == {
        "used_bytes": 9, "blocks": 3, "hits": 1, "misses": 0,
    }  # fmt: skip


def test_heartbeat_of_superseded_incarnation_is_fenced(r: redis.Redis, ck: ClusterKeys) -> None:
    old, _ = join(r, ck, "a")
    new, ep = join(r, ck, "a", ttl=2000)
    lease = r.zscore(ck.membership[2], "a")
    assert heartbeat(r, ck, "a", old, LONG_TTL) == FENCED
    assert r.zscore(ck.membership[2], "a") == lease  # the fenced call did not extend it
    assert "a" not in hgetall(r, ck.membership[3])  # nor record stats
    assert heartbeat(r, ck, "a", new, LONG_TTL) == ep
    reg = Registry(r, ck.name)
    with pytest.raises(FencedError):
        reg.heartbeat("a", old, LONG_TTL, {})
    # An incarnation from the future is not the current one either.
    assert heartbeat(r, ck, "a", new + 1000) == FENCED


def test_heartbeat_unknown_node_and_bad_args(r: redis.Redis, ck: ClusterKeys) -> None:
    assert heartbeat(r, ck, "ghost", 1) == NOT_MEMBER
    with pytest.raises(NotMemberError):
        Registry(r, ck.name).heartbeat("ghost", 1, LONG_TTL, {})
    inc, _ = join(r, ck, "a")
    assert heartbeat(r, ck, "a", "one") == BAD_ARGS
    assert heartbeat(r, ck, "a", inc, 0) == BAD_ARGS
    assert heartbeat(r, ck, "a", inc, -1) == BAD_ARGS
    assert r.fcall("kvpool_heartbeat", 4, *ck.membership, "a") == BAD_ARGS
    assert r.fcall("kvpool_heartbeat", 4, *ck.membership) == BAD_ARGS


def test_expired_lease_is_reaped_and_cannot_heartbeat(r: redis.Redis, ck: ClusterKeys) -> None:
    inc, ep = join(r, ck, "a", ttl=SHORT_TTL)
    heartbeat(r, ck, "a", inc, SHORT_TTL, 1, 1, 1, 1)
    expiry = int(r.zscore(ck.membership[2], "a"))
    wait_redis_clock_past(r, expiry)
    # Expired but not reaped yet: the read-only epoch does not move...
    assert epoch(r, ck) == ep
    # ...the heartbeat reaps it first, then finds no such member.
    assert heartbeat(r, ck, "a", inc, LONG_TTL) == NOT_MEMBER
    assert epoch(r, ck) == ep + 1
    assert "a" not in hgetall(r, ck.membership[1])
    assert r.zscore(ck.membership[2], "a") is None
    assert "a" not in hgetall(r, ck.membership[3])
    assert members(r, ck) == (ep + 1, {})
    # Leaving is refused too; joining again gives a fresh incarnation (the cluster lives on:
    # the count goes on by 1, it does not restart from the clock).
    assert leave(r, ck, "a", inc) == NOT_MEMBER
    assert join(r, ck, "a") == (inc + 1, ep + 2)


def test_members_reaps_expired_leases_atomically(r: redis.Redis, ck: ClusterKeys) -> None:
    short1, _ = join(r, ck, "s1", ttl=SHORT_TTL)
    short2, _ = join(r, ck, "s2", ttl=SHORT_TTL)
    long_inc, ep = join(r, ck, "keep", ttl=LONG_TTL)
    for node, inc, ttl in (
        ("s1", short1, SHORT_TTL),
        ("s2", short2, SHORT_TTL),
        ("keep", long_inc, LONG_TTL),
    ):
        heartbeat(r, ck, node, inc, ttl, 1, 2, 3, 4)
    ep0, ms = members(r, ck)
    assert ep0 == ep and set(ms) == {"s1", "s2", "keep"}
    assert ms["s1"][0].startswith(f"{short1}|")

    latest = int(max(r.zscore(ck.membership[2], "s1"), r.zscore(ck.membership[2], "s2")))
    wait_redis_clock_past(r, latest)
    ep1, ms = members(r, ck)
    # Both expired leases went in one call: one epoch bump, every structure cleaned.
    assert set(ms) == {"keep"} and ep1 == ep + 1
    assert set(hgetall(r, ck.membership[1])) == {"keep"}
    assert [x.decode() for x in r.zrange(ck.membership[2], 0, -1)] == ["keep"]
    assert set(hgetall(r, ck.membership[3])) == {"keep"}
    assert members(r, ck) == (ep1, ms)  # nothing more to reap: the epoch stays
    # The typed view.
    ep2, typed = Registry(r, ck.name).members()
    assert ep2 == ep1 and [m.entry for m in typed] == [held(long_inc)]
    assert typed[0].lease_expiry_ms == ms["keep"][1]


def test_members_drop_a_node_within_its_ttl(r: redis.Redis, ck: ClusterKeys) -> None:
    """Polling members() (no bare sleep) sees an unrenewed lease go within ttl + a margin."""
    t0 = time.monotonic()
    join(r, ck, "a", ttl=SHORT_TTL)
    wait_until(lambda: "a" not in members(r, ck)[1], timeout=2.0, what="lease reaped")
    assert time.monotonic() - t0 >= SHORT_TTL / 1000 - 0.05


def test_leave(r: redis.Redis, ck: ClusterKeys) -> None:
    old, _ = join(r, ck, "a")
    inc, ep = join(r, ck, "a")
    join(r, ck, "b")
    ep = epoch(r, ck)
    heartbeat(r, ck, "a", inc, LONG_TTL, 1, 1, 1, 1)
    assert leave(r, ck, "a", old) == FENCED  # a superseded incarnation cannot leave for it
    assert leave(r, ck, "ghost", 1) == NOT_MEMBER
    assert leave(r, ck, "a") == BAD_ARGS
    assert leave(r, ck, "a", "x") == BAD_ARGS
    assert leave(r, ck) == BAD_ARGS
    assert epoch(r, ck) == ep and "a" in members(r, ck)[1]

    assert leave(r, ck, "a", inc) == ep + 1
    assert set(members(r, ck)[1]) == {"b"}
    assert "a" not in hgetall(r, ck.membership[3])
    assert r.zscore(ck.membership[2], "a") is None
    assert leave(r, ck, "a", inc) == NOT_MEMBER
    reg = Registry(r, ck.name)
    with pytest.raises(NotMemberError):
        reg.leave("a", inc)
    b_inc = int(hgetall(r, ck.membership[1])["b"].split("|")[0])
    with pytest.raises(FencedError):
        reg.leave("b", b_inc - 1)
    assert reg.leave("b", b_inc) == ep + 2
    assert members(r, ck) == (ep + 2, {})


def test_epoch_moves_with_every_membership_change_only(r: redis.Redis, ck: ClusterKeys) -> None:
    reg = Registry(r, ck.name)
    assert reg.epoch() == 0
    before = redis_ms(r)
    inc, ep = join(r, ck, "a")
    assert_counts_from_clock(ep, before, redis_ms(r), "first epoch")
    assert reg.epoch() == ep
    heartbeat(r, ck, "a", inc)
    members(r, ck)
    r.fcall_ro("kvpool_stats", 4, *ck.membership)
    assert reg.epoch() == ep
    inc2, _ = join(r, ck, "a")  # re-join: a change
    assert reg.epoch() == ep + 1
    assert reg.leave("a", inc2) == ep + 2
    assert reg.epoch() == ep + 2
    # Fence, publish, lookup and gc are index operations: the epoch stays.
    reg.fence_all("a", 99)
    reg.publish("a", 99, keys_in(0, 2), [])
    reg.lookup(keys_in(0, 2))
    reg.gc([])
    assert reg.epoch() == ep + 2


def test_stats(r: redis.Redis, ck: ClusterKeys) -> None:
    assert r.fcall_ro("kvpool_stats", 4, *ck.membership) == [0]
    inc_a, _ = join(r, ck, "a", capacity=1000)
    inc_b, ep = join(r, ck, "b", capacity=2000)
    heartbeat(r, ck, "a", inc_a, LONG_TTL, 500, 10, 7, 3)
    reply = r.fcall_ro("kvpool_stats", 4, *ck.membership)
    assert reply[0] == ep
    rows = {n.decode(): (info.decode(), st) for n, info, st in reply[1:]}
    assert set(rows) == {"a", "b"}
    assert rows["a"][0].split("|")[3] == "1000" and rows["b"][0].split("|")[3] == "2000"
    assert rows["a"][1].decode().split("|")[:4] == ["500", "10", "7", "3"]
    assert rows["b"][1] is None  # no heartbeat yet: false
    _, typed = Registry(r, ck.name).node_stats()
    by_id = {m.node_id: (m, st) for m, st in typed}
    assert by_id["a"][1]["used_bytes"] == 500 and by_id["a"][1]["blocks"] == 10
    assert by_id["a"][0].capacity == 1000 and by_id["b"][1] == {}


# ---------------------------------------------------------------------------------------------
# The block-location index


def test_fence_is_monotonic(r: redis.Redis, ck: ClusterKeys) -> None:
    assert fence(r, ck, 3, "a", 5) == 5
    assert fence(r, ck, 3, "a", 3) == 5
    assert fence(r, ck, 3, "a", 5) == 5
    assert fence(r, ck, 3, "a", 7) == 7
    assert fence(r, ck, 3, "b", 1) == 1
    assert hgetall(r, ck.fence(3)) == {"a": "7", "b": "1"}
    # The loc hash got its sentinel (only the sentinel: no block key was published).
    assert r.hkeys(ck.loc(3)) == [INDEX_SENTINEL.encode()]
    assert fence(r, ck, 3, "a") == BAD_ARGS
    assert fence(r, ck, 3, "a", "x") == BAD_ARGS
    assert fence(r, ck, 3) == BAD_ARGS
    # Both keys are needed (the fence and the loc hash of the partition).
    assert r.fcall("kvpool_fence", 1, ck.fence(5), "a", 1) == BAD_ARGS
    assert not r.exists(ck.fence(5)) and not r.exists(ck.loc(5))
    assert r.hget(ck.fence(4), "a") is None  # partitions are independent
    assert not r.exists(ck.loc(4))
    Registry(r, ck.name).fence_all("c", 4)
    for p in range(NUM_PARTITIONS):
        assert r.hget(ck.fence(p), "c") == b"4"
        assert r.hexists(ck.loc(p), INDEX_SENTINEL)


def test_publish_adds_and_removes(r: redis.Redis, ck: ClusterKeys) -> None:
    k = keys_in(5, 4)
    a1, b, c, a2 = (1_764_300_000_123 + i for i in range(4))
    assert publish(r, ck, 5, "a", a1, k[:3]) == 3
    assert lookup(r, ck, 5, k) == [held(a1), held(a1), held(a1), None]
    assert publish(r, ck, 5, "a", a1, k[:1]) == 1  # idempotent: no duplicate entry
    assert lookup(r, ck, 5, k[:1]) == [held(a1)]
    # Other incarnations holding the same key are appended.
    assert publish(r, ck, 5, "b", b, [k[0]]) == 1
    assert publish(r, ck, 5, "c", c, [k[0]]) == 1
    assert lookup(r, ck, 5, k[:1]) == [held(a1, b, c)]
    # Publishing an entry again dedupes it (it moves to the end of the list).
    assert publish(r, ck, 5, "a", a1, [k[0]]) == 1
    assert lookup(r, ck, 5, k[:1]) == [held(b, c, a1)]
    # A newer incarnation of a is another entry: a1's stays (dead) until kvpool_gc drops it.
    assert publish(r, ck, 5, "a", a2, [k[0], k[2]]) == 2
    assert lookup(r, ck, 5, k) == [held(b, c, a1, a2), held(a1), held(a1, a2), None]
    # Removals drop the identical entry only; a key that does not list it is not counted.
    assert publish(r, ck, 5, "a", a2, [], [k[0], k[1], k[3]]) == 1
    assert lookup(r, ck, 5, k) == [held(b, c, a1), held(a1), held(a1, a2), None]
    assert publish(r, ck, 5, "b", b, [], [k[0]]) == 1
    assert lookup(r, ck, 5, k[:1]) == [held(c, a1)]
    # Adds and removes in one batch; a key whose list empties goes.
    assert publish(r, ck, 5, "a", a2, [k[3]], [k[2]]) == 2
    assert lookup(r, ck, 5, k) == [held(c, a1), held(a1), held(a1), held(a2)]
    assert publish(r, ck, 5, "a", a2, [], [k[3]]) == 1
    assert not r.hexists(ck.loc(5), k[3])
    # The call raised the partition's fence to the newest incarnation it saw: a1 is fenced.
    assert hgetall(r, ck.fence(5))["a"] == str(a2)
    assert publish(r, ck, 5, "a", a1, [], [k[1]]) == FENCED
    assert lookup(r, ck, 5, k[1:2]) == [held(a1)]


def test_publish_is_fenced_by_a_newer_incarnation(r: redis.Redis, ck: ClusterKeys) -> None:
    reg = Registry(r, ck.name)
    old, _ = reg.join("a", "h:1", "tcp", 100, LONG_TTL)
    reg.fence_all("a", old)
    k = keys_in(2, 2) + keys_in(9, 2)
    assert reg.publish("a", old, k, []) == 4
    new, _ = reg.join("a", "h:1", "tcp", 100, LONG_TTL)
    reg.fence_all("a", new)
    with pytest.raises(FencedError):
        reg.publish("a", old, keys_in(2, 3, b"late"), [])
    assert publish(r, ck, 9, "a", old, [], k[2:]) == FENCED
    assert lookup(r, ck, 9, k[2:]) == [held(old)] * 2  # the fenced removal changed nothing
    assert lookup(r, ck, 2, keys_in(2, 3, b"late")) == [None] * 3
    assert reg.publish("a", new, k, []) == 4
    # The old incarnation's entries stay (dead) beside the new ones until gc drops them.
    assert reg.lookup(k) == [[held(old), held(new)]] * 4
    assert reg.collect_garbage() == 4
    assert reg.lookup(k) == [[held(new)]] * 4
    # Fencing one partition is enough to fence publishes to it, even without a new join.
    fence(r, ck, 7, "b", 10)
    assert publish(r, ck, 7, "b", 9, keys_in(7, 1)) == FENCED
    assert publish(r, ck, 7, "b", 10, keys_in(7, 1)) == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["a", 1],  # no n_added
        ["a", 1, -1],  # negative n_added
        ["a", 1, 3, b"k1", b"k2"],  # n_added larger than the keys given
        ["a", "one", 0],  # incarnation not a number
        ["a", 1, "many"],
        ["a", "1.5", 0],  # the incarnation must be an integer in [0, 2^53)
        ["a", -1, 0],
        ["a", 2**53, 0],
        ["a", 1, 1, INDEX_SENTINEL],  # the sentinel is no block key
        ["a", 1, 1, b"k1", INDEX_SENTINEL],
        [],
    ],
)
def test_publish_bad_args(r: redis.Redis, ck: ClusterKeys, argv: list[Any]) -> None:
    assert r.fcall("kvpool_publish", 2, ck.loc(0), ck.fence(0), *argv) == BAD_ARGS
    assert not r.exists(ck.loc(0)) and not r.exists(ck.fence(0))


def test_lookup_order_and_missing(r: redis.Redis, ck: ClusterKeys) -> None:
    k = keys_in(11, 6)
    a, b = 1_764_300_000_003, 1_764_300_000_005
    publish(r, ck, 11, "a", a, [k[4], k[1]])
    publish(r, ck, 11, "b", b, [k[1], k[5]])
    assert lookup(r, ck, 11, [k[5], k[0], k[1], k[4], k[2], k[1]]) == [
        held(b), None, held(a, b), held(a), None, held(a, b),
    ]  # fmt: skip
    assert r.fcall_ro("kvpool_lookup", 1, ck.loc(11)) == []
    assert r.fcall_ro("kvpool_lookup", 1, ck.loc(12), k[0]) == [None]


@pytest.mark.parametrize("transport", ["tcp (C++ reader)", "unix socket (redis-py)"])
def test_registry_lookup_and_locate_span_partitions(
    redis_server: RedisProcess, r: redis.Redis, ck: ClusterKeys, transport: str
) -> None:
    """lookup keeps the caller's order over all partitions; locate returns only live holders.
    Both readers (the core's, for plain TCP, and redis-py's otherwise) agree."""
    rng = random.Random(7)
    conn = (
        redis.Redis(unix_socket_path=redis_server.unix_socket, socket_timeout=5)
        if transport.startswith("unix")
        else redis_server.client()
    )
    try:
        reg = Registry(conn, ck.name)
        assert (reg._reader is None) == transport.startswith("unix")
        a, ep_a = reg.join("a", "h:1", "tcp", 1, LONG_TTL)
        b, ep_b = reg.join("b", "h:2", "tcp", 1, LONG_TTL)
        assert (b, ep_b) == (a + 1, ep_a + 1)
        keys = [rng.randbytes(16) for _ in range(600)]
        assert len({partition_of(k) for k in keys}) == NUM_PARTITIONS
        on_a, on_b, on_dead = keys[:300], keys[200:400], keys[450:500]
        reg.publish("a", a, on_a, [])
        reg.publish("b", b, on_b, [])
        reg.publish("gone", 1, on_dead, [])  # entries of a node that is no member
        expect: list[list[str]] = []
        for i in range(len(keys)):
            e = []
            if 0 <= i < 300:
                e.append(held(a))
            if 200 <= i < 400:
                e.append(held(b))
            if 450 <= i < 500:
                e.append(held(1))
            expect.append(e)
        ep, holders = reg.lookup_with_epoch(keys)
        assert ep == reg.epoch() == ep_b
        assert holders == expect
        order = list(range(len(keys)))
        rng.shuffle(order)
        assert reg.lookup([keys[i] for i in order]) == [expect[i] for i in order]
        assert reg.lookup([]) == []

        live = [held(b), held(a)]
        ep, where = reg.locate(keys, live)
        assert ep == ep_b
        for i, w in enumerate(where):
            if i < 300:
                assert w == 1
            elif i < 400:
                assert w == 0
            else:
                assert w == -1, i  # missing, or only a dead node lists it
        # Only b live: a's entries are never returned.
        _, where = reg.locate(keys[:400], [held(b)])
        assert where == [-1] * 200 + [0] * 200
    finally:
        conn.close()


def test_gc_removes_dead_incarnations_and_keeps_live(r: redis.Redis, ck: ClusterKeys) -> None:
    # 1200 keys in one partition: more than a listpack hash holds, so HSCAN really pages.
    k = keys_in(6, 1200)
    publish(r, ck, 6, "a", 1, k[:700])  # a/1 dead
    publish(r, ck, 6, "b", 2, k[400:1200])  # b/2 live
    publish(r, ck, 6, "c", 3, k[500:520])  # c/3 dead
    publish(r, ck, 6, "a", 40, k[100:150])  # a/40 live (a/1 stays listed there too)
    assert r.object("encoding", ck.loc(6)) == b"hashtable"
    live = [held(2), held(40), held(9)]
    assert live == ["2", "14", "9"]
    removed, cursor, calls = 0, "0", 0
    while True:
        nxt, n = r.fcall("kvpool_gc", 1, ck.loc(6), cursor, 10, *live)
        removed += n
        calls += 1
        cursor = nxt.decode()
        if cursor == "0":
            break
        assert calls < 10_000, "gc cursor loop does not terminate"
    assert calls > 10  # paged
    # a/1 on 0..699 (700 entries), c/3 on 500..519 (20)
    assert removed == 700 + 20
    got = lookup(r, ck, 6, k)
    for i, v in enumerate(got):
        want = []
        if 100 <= i < 150:
            want.append(held(40))
        if i >= 400:
            want.append(held(2))
        assert sorted(v.split(",") if v else []) == sorted(want), i
    assert r.hlen(ck.loc(6)) == 50 + 800 + 1  # + the sentinel
    # A second pass finds nothing; the wrapper covers every partition.
    reg = Registry(r, ck.name)
    publish(r, ck, 13, "a", 1, keys_in(13, 3))
    assert reg.gc(live, page=7) == 3
    assert reg.gc(live) == 0
    assert r.hkeys(ck.loc(13)) == [INDEX_SENTINEL.encode()]
    # Bad args.
    assert r.fcall("kvpool_gc", 1, ck.loc(6), "0", 0) == BAD_ARGS
    assert r.fcall("kvpool_gc", 1, ck.loc(6), "0", "x") == BAD_ARGS
    assert r.fcall("kvpool_gc", 1, ck.loc(6)) == BAD_ARGS
    # Nothing live: every entry goes; the sentinel stays.
    assert reg.gc([], page=100) == 850
    assert r.hkeys(ck.loc(6)) == [INDEX_SENTINEL.encode()]


def test_entries_are_base36_incarnations(r: redis.Redis, ck: ClusterKeys) -> None:
    """An index entry is the incarnation alone, in base 36 (lowercase): what Lua writes is what
    Member.entry and incarnation_entry say, and int(entry, 36) gives the incarnation back."""
    assert incarnation_entry(1_764_300_000_123) == "miiao0or"
    assert [incarnation_entry(i) for i in (0, 9, 10, 35, 36, 1295, 1296)] == [
        "0", "9", "a", "z", "10", "zz", "100",
    ]  # fmt: skip
    with pytest.raises(ValueError):
        incarnation_entry(-1)
    reg = Registry(r, ck.name)
    inc, _ = reg.join("a", "h:1", "tcp", 1, LONG_TTL)
    reg.fence_all("a", inc)
    (m,) = reg.members()[1]
    key = keys_in(4, 1)[0]
    assert reg.publish("a", inc, [key], []) == 1
    (raw,) = lookup(r, ck, 4, [key])
    assert raw == m.entry == incarnation_entry(inc)
    assert re.fullmatch(r"[0-9a-z]+", raw) and int(raw, 36) == inc
    assert reg.locate([key], [m.entry]) == (reg.epoch(), [0])
    # Lua's encoder agrees with Python's on the edges of the range (one node id per value, so
    # each publish passes its fence), up to the largest incarnation a Lua number holds exactly.
    edge = [0, 1, 35, 36, 1295, 1296, 36**6 - 1, 36**6, inc, 2**53 - 1]
    keys = keys_in(8, len(edge))
    for i, (n, k) in enumerate(zip(edge, keys, strict=True)):
        assert publish(r, ck, 8, f"n{i}", n, [k]) == 1
    assert lookup(r, ck, 8, keys) == [incarnation_entry(n) for n in edge]
    assert [int(e, 36) for e in lookup(r, ck, 8, keys) if e] == edge


def test_same_incarnation_once_two_incarnations_both(r: redis.Redis, ck: ClusterKeys) -> None:
    reg = Registry(r, ck.name)
    a, _ = reg.join("a", "h:1", "tcp", 1, LONG_TTL)
    b, _ = reg.join("b", "h:2", "tcp", 1, LONG_TTL)
    reg.fence_all("a", a)
    reg.fence_all("b", b)
    k = keys_in(1, 3) + keys_in(12, 3)
    assert reg.publish("a", a, k, []) == 6
    assert reg.publish("a", a, k[:2] + k[3:5], []) == 4  # the same keys again, same incarnation
    assert reg.lookup(k) == [[held(a)]] * 6  # one entry each
    assert reg.publish("b", b, k[1:5], []) == 4
    assert reg.publish("b", b, k[1:5], []) == 4
    both = [
        [held(a)],
        [held(a), held(b)],
        [held(a), held(b)],
        [held(a), held(b)],
        [held(a), held(b)],
        [held(a)],
    ]
    assert reg.lookup(k) == both
    # Either holder is found through the member list; each removes only its own entry.
    _, where = reg.locate(k, [held(b)])
    assert where == [-1, 0, 0, 0, 0, -1]
    assert reg.publish("a", a, [], k[2:4]) == 2
    assert reg.lookup(k[2:4]) == [[held(b)]] * 2
    # Holder lists map to node ids through the members (the entry no longer names the node).
    node_of = {m.entry: m.node_id for m in reg.members()[1]}
    assert [sorted(node_of[e] for e in h) for h in reg.lookup(k)] == [
        ["a"], ["a", "b"], ["b"], ["b"], ["a", "b"], ["a"],
    ]  # fmt: skip
    # A superseded incarnation of a: its entries are dead, gc drops them and nothing else.
    a2, _ = reg.join("a", "h:1", "tcp", 1, LONG_TTL)
    reg.fence_all("a", a2)
    assert reg.publish("a", a2, k[:1], []) == 1
    assert reg.lookup(k[:1]) == [[held(a), held(a2)]]
    assert reg.collect_garbage() == 4  # a's entries on k[0], k[1], k[4], k[5]
    assert reg.lookup(k) == [[held(a2)], [held(b)], [held(b)], [held(b)], [held(b)], []]


def test_fenced_partitions_stay_hashtables(r: redis.Redis, ck: ClusterKeys) -> None:
    """A node fences every partition right after it joins: with only a handful of keys the loc
    hashes are already hashtables (HMGET a hash lookup, not a listpack scan), and stay so."""
    max_value = int(r.config_get("hash-max-listpack-value")["hash-max-listpack-value"])
    reg = Registry(r, ck.name)
    inc, _ = reg.join("a", "h:1", "tcp", 1, LONG_TTL)
    reg.fence_all("a", inc)
    keys = [bytes([0, p]) + bytes(14) for p in range(5)]
    assert reg.publish("a", inc, keys, []) == 5
    for p in range(NUM_PARTITIONS):
        assert r.object("encoding", ck.loc(p)) == b"hashtable", p
        value = r.hget(ck.loc(p), INDEX_SENTINEL)
        assert value is not None and len(value) > max_value
    assert reg.index_keys() == 5
    # A publish without a fence first (a loc hash recreated after a FLUSH) writes it as well.
    other = ClusterKeys(cluster_name())
    publish(r, other, 0, "a", inc, keys[:1])
    assert r.object("encoding", other.loc(0)) == b"hashtable"
    assert r.hexists(other.loc(0), INDEX_SENTINEL)
    # Without the sentinel the same handful of keys is a listpack (what the sentinel prevents).
    r.hdel(other.loc(0), INDEX_SENTINEL)
    r.restore(f"{other.loc(0)}:re", 0, r.dump(other.loc(0)))
    assert r.object("encoding", f"{other.loc(0)}:re") == b"listpack"
    r.delete(f"{other.loc(0)}:re")
    # It stays a hashtable through RDB serialisation (DUMP/RESTORE, as when Redis loads its RDB).
    copy = f"{ck.loc(0)}:copy"
    r.restore(copy, 0, r.dump(ck.loc(0)))
    try:
        assert r.object("encoding", copy) == b"hashtable"
    finally:
        r.delete(copy)
    # And once every block key is gone (gc or removals), the hash stays, a hashtable.
    assert reg.publish("a", inc, [], keys) == 5
    assert reg.index_keys() == 0
    for p in range(NUM_PARTITIONS):
        assert r.hkeys(ck.loc(p)) == [INDEX_SENTINEL.encode()]
        assert r.object("encoding", ck.loc(p)) == b"hashtable"


def test_gc_never_removes_the_sentinel(r: redis.Redis, ck: ClusterKeys) -> None:
    reg = Registry(r, ck.name)
    live, _ = reg.join("live", "h:1", "tcp", 1, LONG_TTL)
    dead, _ = reg.join("dead", "h:2", "tcp", 1, LONG_TTL)
    reg.fence_all("live", live)
    reg.fence_all("dead", dead)
    rng = random.Random(3)
    keys = [rng.randbytes(16) for _ in range(300)]
    reg.publish("live", live, keys[:100], [])
    reg.publish("dead", dead, keys[50:300], [])
    reg.leave("dead", dead)
    assert reg.index_keys() == 300
    # Small pages: the sentinel comes up in some page of every partition and is skipped.
    assert reg.gc([held(live)], page=3) == 250  # entries, the sentinel not among them
    assert reg.index_keys() == 100
    assert reg.lookup(keys) == [[held(live)]] * 100 + [[]] * 200
    assert reg.collect_garbage() == 0
    # Nothing live: every entry goes, every sentinel stays (HLEN counts it, index_keys not).
    assert reg.gc([], page=1) == 100
    assert reg.gc([]) == 0
    assert reg.index_keys() == 0
    for p in range(NUM_PARTITIONS):
        assert r.hlen(ck.loc(p)) == 1 and r.hexists(ck.loc(p), INDEX_SENTINEL)
        assert r.object("encoding", ck.loc(p)) == b"hashtable"
    # A direct kvpool_gc call with the ">N" rule does not touch it either.
    for p in range(NUM_PARTITIONS):
        assert r.fcall("kvpool_gc", 1, ck.loc(p), "0", 100, ">0") == [b"0", 0]
        assert r.hexists(ck.loc(p), INDEX_SENTINEL)


# ---------------------------------------------------------------------------------------------
# Key layout: hash slots (Redis Cluster)


def test_key_slots() -> None:
    # CRC16/XMODEM check value and Redis' documented examples.
    assert crc16(b"123456789") == 0x31C3
    assert keyslot("foo") == 12182
    assert keyslot("{user1000}.following") == keyslot("{user1000}.followers")
    for name in ("default", "prod", cluster_name()):
        ck = ClusterKeys(name)
        assert len(ck.membership) == 4 and len(set(ck.membership)) == 4
        assert len({keyslot(k) for k in ck.membership}) == 1
        member_slot = keyslot(ck.membership[0])
        loc_slots = [keyslot(ck.loc(p)) for p in range(NUM_PARTITIONS)]
        assert len(set(loc_slots)) == NUM_PARTITIONS, name
        assert member_slot not in loc_slots
        for p in range(NUM_PARTITIONS):
            assert keyslot(ck.fence(p)) == loc_slots[p]  # publish touches both in one call
    for bad in ("", "a{b", "a}b", "a/b"):
        with pytest.raises(Exception, match="cluster name"):
            ClusterKeys(bad)
    assert partition_of(b"\x00\x05" + bytes(14)) == 5
    assert partition_of(b"\xff\xff" + bytes(14)) == 0xFFFF % NUM_PARTITIONS


def cluster_port() -> int:
    """A free port a cluster node can use: <= 55535, its bus port (+10000) free as well."""
    for _ in range(1000):
        port = free_port()
        if port <= 55535 and port_free(port + 10000):
            return port
    raise AssertionError("no free port pair for a Redis Cluster node")


def port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_library_on_a_redis_cluster_node(start_redis: RedisFactory) -> None:
    """On a (single-node) Redis Cluster every call is single-slot: no CROSSSLOT errors, and the
    server's own CLUSTER KEYSLOT agrees with the slots computed above."""
    node = start_redis(
        port=cluster_port(),
        extra=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"],
    )
    r = node.client()
    try:
        r.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        wait_until(
            lambda: b"cluster_state:ok" in r.execute_command("CLUSTER", "INFO"),
            timeout=10,
            what="cluster_state:ok",
        )
        ck = ClusterKeys(cluster_name())
        for key in [*ck.membership, *(ck.loc(p) for p in range(NUM_PARTITIONS))]:
            assert r.execute_command("CLUSTER", "KEYSLOT", key) == keyslot(key)
        # Keys in different slots are refused in one call: the layout is what makes it work.
        with pytest.raises(redis.ResponseError, match="same slot"):
            r.fcall("kvpool_version", 2, ck.loc(0), ck.loc(1))
        load_library(r)
        reg = Registry(r, ck.name)
        inc, ep = reg.join("a", "h:1", "tcp", 10, LONG_TTL)
        reg.fence_all("a", inc)
        assert reg.heartbeat("a", inc, LONG_TTL, {"used_bytes": 1}) == ep
        keys = [bytes([i, i]) + bytes(14) for i in range(64)]
        assert reg.publish("a", inc, keys, []) == 64
        assert reg.lookup(keys) == [[held(inc)]] * 64
        assert reg.locate(keys, [held(inc)]) == (ep, [0] * 64)
        assert [m.entry for m in reg.members()[1]] == [held(inc)]
        assert reg.node_stats()[1][0][1]["used_bytes"] == 1
        assert reg.index_keys() == 64
        assert reg.gc([]) == 64
        assert reg.index_keys() == 0
        for p in range(NUM_PARTITIONS):
            assert r.hkeys(ck.loc(p)) == [INDEX_SENTINEL.encode()]
        assert reg.leave("a", inc) == ep + 1
    finally:
        r.close()


# ---------------------------------------------------------------------------------------------
# Operators: redis-cli


def redis_cli(server: RedisProcess, *args: str | bytes) -> list[str]:
    out = subprocess.run(
        ["redis-cli", "-p", str(server.port), *args],
        capture_output=True,
        timeout=10,
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return out.stdout.decode().split("\n")[:-1]


def test_redis_cli_fcall(redis_server: RedisProcess, r: redis.Redis) -> None:
    """The README's operator commands work as documented (redis-cli prints one reply element
    per line when its output is not a terminal)."""
    ck = ClusterKeys(cluster_name())
    m = ck.membership
    assert redis_cli(redis_server, "FCALL", "kvpool_version", "0") == [str(LIBRARY_VERSION)]
    join_argv = ["ops", "127.0.0.1:7070", "tcp", "1024", "60000"]
    before = redis_ms(r)
    out = redis_cli(redis_server, "FCALL", "kvpool_join", "4", *m, *join_argv)
    inc, ep = (int(x) for x in out)
    assert_counts_from_clock(inc, before, redis_ms(r), "incarnation")
    assert_counts_from_clock(ep, before, redis_ms(r), "epoch")
    out = redis_cli(redis_server, "FCALL", "kvpool_members", "4", *m)
    assert out[0] == str(ep) and out[1] == "ops"
    assert out[2].startswith(f"{inc}|127.0.0.1:7070|tcp|1024|")
    assert int(out[3]) > redis_ms(r)
    assert redis_cli(redis_server, "FCALL_RO", "kvpool_epoch", "1", m[0]) == [str(ep)]
    hb = ["ops", str(inc), "60000", "5", "6", "7", "8"]
    assert redis_cli(redis_server, "FCALL", "kvpool_heartbeat", "4", *m, *hb) == [str(ep)]
    out = redis_cli(redis_server, "FCALL_RO", "kvpool_stats", "4", *m)
    assert out[:2] == [str(ep), "ops"] and out[3].startswith("5|6|7|8|")
    key = "abcdefghijklmnop"  # a printable 16-byte key: partition 0x6162 % 16
    p = partition_of(key.encode())
    publish_argv = [ck.loc(p), ck.fence(p), "ops", str(inc), "1", key]
    assert redis_cli(redis_server, "FCALL", "kvpool_publish", "2", *publish_argv) == ["1"]
    assert redis_cli(redis_server, "FCALL_RO", "kvpool_lookup", "1", ck.loc(p), key, "nope") == [
        held(inc),
        "",
    ]
    assert redis_cli(redis_server, "FCALL", "kvpool_heartbeat", "4", *m, "ops", "0", "1000") == [
        str(FENCED)
    ]
    assert redis_cli(redis_server, "FCALL", "kvpool_leave", "4", *m, "ops", str(inc)) == [
        str(ep + 1)
    ]
    assert redis_cli(redis_server, "FCALL", "kvpool_leave", "4", *m, "ops", str(inc)) == [
        str(NOT_MEMBER)
    ]


def test_gc_keeps_incarnations_newer_than_the_member_list(r: redis.Redis, ck: ClusterKeys) -> None:
    """A node that joins after the sweeper read the members must not lose its fresh entries."""
    reg = Registry(r, ck.name)
    old_inc, _ = reg.join("old", "h:1", "tcp", 1, 60_000)
    reg.fence_all("old", old_inc)
    k = keys_in(5, 30)
    reg.publish("old", old_inc, k[:10], [])
    reg.leave("old", old_inc)  # old@inc is dead now
    _, members = reg.members()
    newest = max((m.incarnation for m in members), default=old_inc)
    # "new" joins after that member list was read.
    new_inc, _ = reg.join("new", "h:2", "tcp", 1, 60_000)
    reg.fence_all("new", new_inc)
    reg.publish("new", new_inc, k[10:20], [])
    removed = reg.gc([m.entry for m in members], keep_newer_than=newest)
    assert removed == 10
    holders = reg.lookup(k[:20])
    assert holders[:10] == [[]] * 10
    assert holders[10:] == [[held(new_inc)]] * 10
    # The agent's sweep reads the members itself; "new" is live, so nothing more goes.
    assert reg.collect_garbage() == 0
    assert reg.lookup(k[10:20]) == [[held(new_inc)]] * 10
    reg.leave("new", new_inc)
    assert reg.collect_garbage() == 10
