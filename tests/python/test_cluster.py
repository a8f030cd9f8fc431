"""Clusters of real ``kvpool server --redis URL --cluster NAME`` processes and a real redis-server
on free ports, used through ``kvpool.cluster.Cluster``: spread and byte-exact round trips, a node
killed with SIGKILL under load and restarted, Redis unreachable and Redis restarted empty, evicted
blocks still listed in the index, and a clean leave on SIGTERM.

Every wait polls with a deadline. Leases are 1 s (``--lease-ttl 1``) to keep the file fast."""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import kvpool
import pytest
import redis
from conftest import (
    RedisFactory,
    RedisProcess,
    ServerFactory,
    ServerProcess,
    cluster_name,
    random_keys,
    wait_until,
)
from kvpool import _core
from kvpool.cluster import Cluster
from kvpool.metadata import Registry, incarnation_entry, load_library, node_id_for

LEASE_TTL = 1.0
CLIENT_TIMEOUT = 2.0
KiB = 1 << 10


def blocks_for(keys: list[bytes], *, lo: int = 1, hi: int = 8 * KiB, seed: int = 0) -> list[bytes]:
    """Random payloads of random sizes (a block served for the wrong key or offset shows)."""
    rng = random.Random(seed)
    return [rng.randbytes(rng.randint(lo, hi)) for _ in keys]


def node_id(node: ServerProcess) -> str:
    return node_id_for(node.address)


def off_placement_blocks(s: Stack) -> tuple[list[bytes], list[bytes]]:
    """One block per running node, stored directly on a node that is *not* the key's placement
    node: only a read that follows the index can find it (placement would ask another node)."""
    members = s.registry.members()[1]
    ids = [m.node_id for m in members]
    weights = [m.weight for m in members]
    keys, blocks = [], []
    for node in s.nodes:
        if not node.running():
            continue
        while True:
            (key,) = random_keys(1)
            if ids[_core.Placement(ids, weights).rank([key], 1)[0][0]] != node_id(node):
                break
        block = random.randbytes(1000)
        with kvpool.Client(node.address) as nc:
            assert nc.put([key], [block]) == 1
        keys.append(key)
        blocks.append(block)
    return keys, blocks


def entry_of(s: Stack, node: ServerProcess) -> str:
    """The index entry of a node's live incarnation (the member list names the node)."""
    return next(m.entry for m in s.registry.members()[1] if m.node_id == node_id(node))


def node_entries(node: ServerProcess) -> int:
    with kvpool.Client(node.address) as c:
        return int(c.stats()["entries"])


@dataclass
class Stack:
    """A redis-server, the nodes of one cluster, an admin Registry and a Cluster client."""

    redis: RedisProcess
    name: str
    nodes: list[ServerProcess]
    registry: Registry
    start: Callable[..., ServerProcess]
    cluster: Cluster | None = None
    clients: list[Cluster] = field(default_factory=list)

    @property
    def c(self) -> Cluster:
        assert self.cluster is not None
        return self.cluster

    def client(self) -> Cluster:
        """Another Cluster client of this cluster (closed at the end of the test)."""
        c = Cluster(self.redis.url, cluster=self.name, timeout=CLIENT_TIMEOUT)
        self.clients.append(c)
        return c

    def add_node(self, *, port: int = 0, memory: str = "64MiB", **kw: object) -> ServerProcess:
        node = self.start(self.redis.url, self.name, port=port, memory=memory, **kw)
        self.nodes.append(node)
        return node

    def member_ids(self) -> set[str] | None:
        """The member node ids as Redis has them (None while Redis does not answer)."""
        try:
            return {m.node_id for m in self.registry.members()[1]}
        except redis.RedisError:
            return None

    def wait_members(self, ids: set[str], timeout: float = 10.0) -> None:
        wait_until(lambda: self.member_ids() == ids, timeout=timeout, what=f"members == {ids}")

    def wait_indexed(self, c: Cluster, keys: list[bytes], timeout: float = 10.0) -> None:
        wait_until(lambda: c.match_prefix(keys) == len(keys), timeout=timeout, what="index")


@pytest.fixture
def make_stack(
    start_redis: RedisFactory, start_cluster_node: ServerFactory
) -> Iterator[Callable[..., Stack]]:
    """``make_stack(n, memory=..., lease_ttl=...)``: redis + n joined nodes + a Cluster client
    that sees all n."""
    stacks: list[Stack] = []

    def make(n: int = 3, *, memory: str = "64MiB", lease_ttl: float = LEASE_TTL) -> Stack:
        rp = start_redis()
        name = cluster_name("c")
        nodes = [
            start_cluster_node(rp.url, name, memory=memory, lease_ttl=lease_ttl, wait=False)
            for _ in range(n)
        ]
        for node in nodes:
            node.wait_ready()
        admin = rp.client(socket_timeout=2.0, socket_connect_timeout=1.0)
        stack = Stack(rp, name, nodes, Registry(admin, name), start_cluster_node)
        stacks.append(stack)
        stack.wait_members({node_id(x) for x in nodes})
        stack.cluster = stack.client()
        assert len(stack.c.members()) == n
        return stack

    yield make
    for s in stacks:
        for c in s.clients:
            c.close()
        s.registry.redis.close()


# ---------------------------------------------------------------------------------------------


def test_three_nodes_spread_round_trip_and_match_prefix(make_stack: Callable[..., Stack]) -> None:
    s = make_stack(3)
    c = s.c
    keys = random_keys(600)
    blocks = blocks_for(keys)
    assert c.put(keys, blocks) == len(keys)

    # Spread over all three nodes, as the nodes count it and as the client reports it.
    per_node = {node_id(n): node_entries(n) for n in s.nodes}
    assert all(v > 0 for v in per_node.values()), per_node
    assert sum(per_node.values()) == len(keys)  # no replicas: exactly one copy each
    st = c.stats()
    assert {k: v["entries"] for k, v in st["nodes"].items()} == per_node
    assert st["totals"]["entries"] == len(keys)

    # Byte-exact round trips (reads go where the index says: wait for the nodes to publish).
    s.wait_indexed(c, keys)
    assert c.get(keys) == blocks
    bufs = [bytearray(len(b)) for b in blocks]
    assert c.get_into(keys, bufs) == [True] * len(keys)
    assert [bytes(b) for b in bufs] == blocks
    order = list(range(len(keys)))
    random.Random(1).shuffle(order)
    views = [memoryview(bytearray(len(b))) for b in blocks]
    assert c.get_into([keys[i] for i in order], [views[i] for i in order]) == [True] * len(keys)
    assert all(views[i].tobytes() == blocks[i] for i in order)
    assert c.exists(keys) == [True] * len(keys)
    missing = random_keys(5)
    assert c.get(missing) == [None] * 5
    assert c.exists(missing) == [False] * 5
    assert c.get_into(missing, [bytearray(8) for _ in missing]) == [False] * 5

    # match_prefix spans the nodes.
    assert c.match_prefix(keys) == len(keys)
    assert c.match_prefix(keys[:300] + missing[:1] + keys[300:]) == 300
    assert c.match_prefix(missing + keys) == 0
    assert c.match_prefix([]) == 0
    # Several chains in one round trip (the connector's TP ranks): each its own prefix.
    lists = [keys, keys[:300] + missing[:1] + keys[300:], missing + keys, [], keys[:7]]
    assert c.match_prefixes(lists) == [len(keys), 300, 0, 0, 7]
    # Entries are incarnations: the member list maps them to node ids.
    node_of = {m.entry: m.node_id for m in c.members()}
    assert len({node_of[h[0]] for h in s.registry.lookup(keys[:30])}) == 3
    # The index names exactly the node that holds each block, under its live incarnation.
    listed = s.registry.lookup(keys)
    assert all(len(h) == 1 and h[0] in node_of for h in listed)
    for node in s.nodes:
        with kvpool.Client(node.address) as nc:
            present = nc.exists(keys)
        assert present == [node_of[h[0]] == node_id(node) for h in listed]

    # Reads go where the index says, not merely to the placement nodes.
    probe, probe_blocks = off_placement_blocks(s)
    s.wait_indexed(c, probe)
    assert c.get(probe) == probe_blocks
    assert c.exists(probe) == [True] * len(probe)

    # Deletes reach every node; the index follows.
    assert c.delete(keys[:50] + missing) == 50
    assert c.get(keys[:50]) == [None] * 50
    assert c.get(keys[50:]) == blocks[50:]
    assert c.match_prefix(keys[50:]) == 550
    wait_until(lambda: c.match_prefix(keys) == 0, what="deleted keys leave the index")


def test_members_advertise_shared_memory_and_the_cluster_uses_it(
    make_stack: Callable[..., Stack],
) -> None:
    s = make_stack(2)
    host = kvpool._core.host_id()
    for m in s.c.members():
        assert m.transport_names() == ("tcp", "shm")
        assert m.shm is not None and m.shm[0] == host
        with kvpool.Client(m.address, transport="tcp") as nc:
            assert m.shm[1] == nc.stats()["shm_socket"]
    keys = random_keys(64)
    # Staging buffers from the cluster's one arena cross to every member without a client copy.
    staged = [s.c.staging_buffer(4 * KiB) for _ in keys]
    for i, b in enumerate(staged):
        b[:] = bytes([i]) * len(b)
    assert s.c.put(keys, staged) == len(keys)
    s.wait_indexed(s.c, keys)
    outs = [s.c.staging_buffer(4 * KiB) for _ in keys]
    assert s.c.get_into(keys, outs) == [True] * len(keys)
    assert [bytes(o) for o in outs] == [bytes(b) for b in staged]
    assert set(s.c.transports().values()) == {"shm"} and len(s.c.transports()) == 2
    moved = 0
    for node in s.nodes:
        with kvpool.Client(node.address, transport="tcp") as nc:
            moved += nc.stats()["transports"]["shm"]["bytes_in"]
    assert moved == len(keys) * 4 * KiB
    with Cluster(s.redis.url, s.name, timeout=CLIENT_TIMEOUT, transport="tcp") as tcp:
        assert tcp.get(keys) == [bytes(b) for b in staged]
        assert set(tcp.transports().values()) == {"tcp"}


def test_kill_9_under_load_then_restart(make_stack: Callable[..., Stack]) -> None:
    s = make_stack(3)
    c = s.c
    keys = random_keys(300)
    blocks = blocks_for(keys, hi=4 * KiB, seed=2)
    assert c.put(keys, blocks) == len(keys)
    s.wait_indexed(c, keys)
    victim = s.nodes[1]
    victim_id, victim_port = node_id(victim), victim.port
    old_inc = next(m.incarnation for m in c.members() if m.node_id == victim_id)
    old_entry = incarnation_entry(old_inc)
    assert old_entry == entry_of(s, victim)
    on_victim = sorted(i for i, h in enumerate(s.registry.lookup(keys)) if h[0] == old_entry)
    assert 0 < len(on_victim) < len(keys)

    # A reader thread with a Cluster client of its own: get_into in a loop, checking bytes.
    loader = s.client()
    stop = threading.Event()
    errors: list[BaseException] = []
    wrong: list[int] = []
    rounds: list[tuple[float, float, list[bool]]] = []  # (start, end, hit per key)

    def load() -> None:
        bufs = [bytearray(len(b)) for b in blocks]
        while not stop.is_set():
            for b in bufs:  # poison: a buffer left over from the last round cannot pass
                b[:1] = b"\x00" if b[:1] != b"\x00" else b"\xff"
            t0 = time.monotonic()
            try:
                hits = loader.get_into(keys, bufs)
            except BaseException as e:  # noqa: BLE001 - any exception is a failure
                errors.append(e)
                return
            t1 = time.monotonic()
            wrong.extend(i for i, h in enumerate(hits) if h and bytes(bufs[i]) != blocks[i])
            rounds.append((t0, t1, hits))

    t = threading.Thread(target=load, daemon=True)
    t.start()
    try:
        wait_until(lambda: len(rounds) >= 3 or errors, timeout=10, what="load running")
        assert all(all(h) for _, _, h in rounds), "misses before the kill"

        t_kill = time.monotonic()
        victim.kill()  # SIGKILL: no leave, the lease has to expire
        wait_until(
            lambda: victim_id not in {m.node_id for m in c.members()},
            timeout=LEASE_TTL + 5,
            interval=0.02,
            what="killed node leaves the member list",
        )
        t_drop = time.monotonic()
        assert t_drop - t_kill <= LEASE_TTL + 1.0, f"dropped after {t_drop - t_kill:.2f} s"
        assert len(c.members()) == 2
        n = len(rounds)
        wait_until(lambda: len(rounds) >= n + 3 or errors, timeout=10, what="load after drop")
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()
    assert errors == [], errors
    assert wrong == [], f"{len(wrong)} wrong blocks"
    # Never a hang past the deadline; the killed node's blocks are misses, the rest hit.
    assert max(t1 - t0 for t0, t1, _ in rounds) <= CLIENT_TIMEOUT + 1.0
    for t0, _, hits in rounds:
        missed = [i for i, h in enumerate(hits) if not h]
        assert set(missed) <= set(on_victim)
        if t0 > t_drop:
            assert missed == on_victim
    got = c.get(keys)
    assert [i for i, g in enumerate(got) if g is None] == on_victim
    assert all(got[i] == blocks[i] for i in range(len(keys)) if i not in on_victim)
    assert c.match_prefix([keys[i] for i in on_victim]) == 0

    # Restarted on the same port (so the same node id): a new incarnation that serves again.
    restarted = s.add_node(port=victim_port)
    assert node_id(restarted) == victim_id
    wait_until(lambda: victim_id in {m.node_id for m in c.members()}, timeout=10, what="rejoin")
    new_inc = next(m.incarnation for m in c.members() if m.node_id == victim_id)
    assert new_inc > old_inc
    # It restarted empty, and the old incarnation's index entries are never used.
    again = [keys[i] for i in on_victim]
    assert c.get(again) == [None] * len(again)
    assert c.match_prefix(again) == 0
    # Written again, they land on it (same id, same rank) and are published under new_inc.
    assert c.put(again, [blocks[i] for i in on_victim]) == len(again)
    assert node_entries(restarted) == len(again)
    s.wait_indexed(c, keys)  # c sees the whole prefix again
    # Listed under the new incarnation; the old (dead) entries stay until a gc sweep drops them.
    new_entry = incarnation_entry(new_inc)
    assert all(h in ([old_entry, new_entry], [new_entry]) for h in s.registry.lookup(again))
    s.registry.collect_garbage()
    assert s.registry.lookup(again) == [[new_entry]] * len(again)
    assert c.get(keys) == blocks
    assert loader.get(keys) == blocks  # the client that saw the crash recovered too
    fresh = random_keys(300)
    fresh_blocks = blocks_for(fresh, seed=3)
    assert c.put(fresh, fresh_blocks) == len(fresh)
    assert node_entries(restarted) > len(again)
    s.wait_indexed(loader, fresh)
    assert loader.get(fresh) == fresh_blocks


def test_redis_unreachable_reads_fall_back_to_placement(make_stack: Callable[..., Stack]) -> None:
    s = make_stack(3)
    c = s.c
    keys = random_keys(300)
    blocks = blocks_for(keys, seed=4)
    assert c.put(keys, blocks) == len(keys)
    s.wait_indexed(c, keys)

    s.redis.kill()
    t0 = time.monotonic()
    assert c.get(keys) == blocks
    bufs = [bytearray(len(b)) for b in blocks]
    assert c.get_into(keys, bufs) == [True] * len(keys)
    assert [bytes(b) for b in bufs] == blocks
    assert c.exists(keys) == [True] * len(keys)
    assert c.match_prefix(keys) == len(keys)  # asked the placement nodes
    assert c.match_prefix(keys[:10] + random_keys(1) + keys[10:]) == 10
    assert c.match_prefixes([keys, keys[:10] + random_keys(1)]) == [len(keys), 10]
    assert len(c.members()) == 3  # the last view is kept
    # Writes still go to the placement nodes and read back.
    more = random_keys(100)
    more_blocks = blocks_for(more, seed=5)
    assert c.put(more, more_blocks) == len(more)
    assert c.get(more) == more_blocks
    assert time.monotonic() - t0 < 4 * CLIENT_TIMEOUT
    # A client created while Redis is down does not raise; it has no view yet (all misses).
    late = s.client()
    assert late.get(keys[:5]) == [None] * 5
    assert all(n.running() for n in s.nodes)


def test_redis_restarted_empty_nodes_reregister_and_client_recovers(
    make_stack: Callable[..., Stack],
) -> None:
    s = make_stack(3)
    c = s.c
    keys = random_keys(300)
    blocks = blocks_for(keys, seed=6)
    assert c.put(keys, blocks) == len(keys)
    s.wait_indexed(c, keys)
    before = {m.node_id: m.incarnation for m in c.members()}

    s.redis.kill()
    assert c.get(keys) == blocks  # Redis down: placement
    s.redis.start()  # same port, empty
    # Every node joins again and re-publishes what it holds.
    s.wait_members(set(before), timeout=10)

    def rebuilt() -> bool:
        live = {m.entry for m in s.registry.members()[1]}
        return all(any(e in live for e in h) for h in s.registry.lookup(keys))

    wait_until(rebuilt, timeout=10, what="index rebuilt")
    # The same Cluster client, never recreated, recovers: view, index and data.
    try:
        s.wait_indexed(c, keys, timeout=5)
    except AssertionError as e:
        raise AssertionError(
            f"{e}; client view epoch {c.epoch} {[m.entry for m in c.members()]}, Redis: "
            f"epoch {s.registry.epoch()} {[m.entry for m in s.registry.members()[1]]}"
        ) from None
    assert {m.node_id: m.incarnation for m in c.members()} == {
        m.node_id: m.incarnation for m in s.registry.members()[1]
    }
    assert c.get(keys) == blocks
    bufs = [bytearray(len(b)) for b in blocks]
    assert c.get_into(keys, bufs) == [True] * len(keys)
    assert [bytes(b) for b in bufs] == blocks
    more = random_keys(100)
    assert c.put(more, blocks[:100]) == 100
    s.wait_indexed(c, more)
    # It reads through the index again (not through the placement fallback).
    probe, probe_blocks = off_placement_blocks(s)
    s.wait_indexed(c, probe)
    assert c.get(probe) == probe_blocks


def test_client_view_follows_redis_data_loss_epoch_moves_forward(
    start_redis: RedisFactory, start_node: ServerFactory
) -> None:
    """After Redis lost its data the cluster counts incarnations and epochs from the Redis
    clock again, so the epoch a client cached can never come back: the same sequence of
    membership changes that gave epoch 3 twice with the library's old count-from-0 now gives
    a greater epoch and a greater incarnation, and the client's view follows. Driven by hand
    (a node without an agent) to make the sequence deterministic."""
    rp = start_redis()
    node = start_node(memory="16MiB")
    name = cluster_name("e")
    admin = rp.client()
    key, block = random_keys(1)[0], b"block bytes" * 10
    with kvpool.Client(node.address) as nc:
        assert nc.put([key], [block]) == 1

    def redis_ms() -> int:
        sec, usec = admin.time()
        return int(sec) * 1000 + int(usec) // 1000

    def register(first: str) -> tuple[dict[str, int], list[int]]:
        """Joins n and a ghost node (in that order or the other), the ghost leaves, n publishes
        the block. Returns the incarnations and every epoch a call returned, in order."""
        load_library(admin)
        reg = Registry(admin, name)
        order = ["n", "ghost"] if first == "n" else ["ghost", "n"]
        incs, epochs = {}, []
        for nid in order:
            address = node.address if nid == "n" else "127.0.0.1:1"
            incs[nid], ep = reg.join(nid, address, "tcp", 1, 60_000)
            epochs.append(ep)
        epochs.append(reg.leave("ghost", incs["ghost"]))
        reg.fence_all("n", incs["n"])
        reg.publish("n", incs["n"], [key], [])
        assert reg.epoch() == epochs[-1]
        # One step of the epoch per membership change; one incarnation per join.
        assert epochs == [epochs[0], epochs[0] + 1, epochs[0] + 2], epochs
        assert incs[order[1]] == incs[order[0]] + 1
        return incs, epochs

    try:
        before = redis_ms()
        old_incs, old_epochs = register("n")
        assert min(*old_incs.values(), *old_epochs) >= before  # counted from the Redis clock
        c = Cluster(rp.url, cluster=name, timeout=CLIENT_TIMEOUT)
        try:
            assert c.get([key]) == [block]
            assert c.epoch == old_epochs[-1]
            assert [m.entry for m in c.members()] == [incarnation_entry(old_incs["n"])]
            seen = max(*old_epochs, c.epoch)

            rp.restart()  # empty: the meta hash (epoch, next_incarnation) is gone
            assert admin.dbsize() == 0 and admin.function_list() == []
            # The contract holds once the clock passed the values handed out before (one per
            # change, so a restart takes far longer); poll rather than assume it.
            last = max(seen, *old_incs.values())
            wait_until(lambda: redis_ms() > last, timeout=5, what="redis clock past old values")
            new_incs, new_epochs = register("ghost")  # the same changes, in the other order
            assert min(new_epochs) > seen, (old_epochs, new_epochs)
            assert new_incs["n"] > old_incs["n"] and new_incs["ghost"] > old_incs["ghost"]
            inc = new_incs["n"]

            # The same client, never recreated, moves to the new view and reads n's block.
            wait_until(
                lambda: (
                    [m.entry for m in c.members()] == [incarnation_entry(inc)]
                    and c.epoch == new_epochs[-1]
                ),
                timeout=5,
                what="client view moved to the new incarnation and epoch",
            )
            assert c.match_prefix([key]) == 1
            assert c.get([key]) == [block]
            buf = bytearray(len(block))
            assert c.get_into([key], [buf]) == [True] and bytes(buf) == block
        finally:
            c.close()
    finally:
        admin.close()


def test_evicted_block_listed_in_index_reads_as_miss(make_stack: Callable[..., Stack]) -> None:
    s = make_stack(1, memory="1MiB")
    c = s.c
    (node,) = s.nodes
    nid = node_id(node)
    first = random_keys(16)
    first_blocks = blocks_for(first, lo=16 * KiB, hi=16 * KiB, seed=7)
    assert c.put(first, first_blocks) == len(first)
    s.wait_indexed(c, first)
    # Fill the node well past its memory: the early blocks are evicted, their memory reused.
    filler = random_keys(200)
    filler_blocks = blocks_for(filler, lo=16 * KiB, hi=16 * KiB, seed=8)
    for i in range(0, len(filler), 20):  # no reads in between: they would protect the blocks
        assert c.put(filler[i : i + 20], filler_blocks[i : i + 20]) == 20
    # Read the early blocks back right away, before the node published the evictions.
    got = c.get(first)
    assert all(g is None or g == b for g, b in zip(got, first_blocks, strict=True)), "wrong bytes"
    bufs = [bytearray(len(b)) for b in first_blocks]
    hits = c.get_into(first, bufs)
    assert all(not h or bytes(buf) == b for h, buf, b in zip(hits, bufs, first_blocks, strict=True))
    with kvpool.Client(node.address) as nc:
        held = nc.exists(first)
        assert nc.stats()["evictions"] > 0
    evicted = [k for k, h in zip(first, held, strict=True) if not h]
    assert evicted, "nothing was evicted"
    # The node publishes its evictions: the index drops them...
    wait_until(
        lambda: all(h == [] for h in s.registry.lookup(evicted)),
        timeout=5,
        what="evictions published",
    )
    # ...and a stale listing (put back by hand, for the node's live incarnation) reads as a miss.
    inc = next(m.incarnation for m in c.members() if m.node_id == nid)
    s.registry.publish(nid, inc, evicted, [])
    assert s.registry.lookup(evicted) == [[incarnation_entry(inc)]] * len(evicted)
    assert c.match_prefix(evicted) == len(evicted)  # the index vouches for them...
    assert c.get(evicted) == [None] * len(evicted)  # ...the node does not
    assert c.get_into(evicted, [bytearray(16 * KiB) for _ in evicted]) == [False] * len(evicted)
    assert c.exists(evicted) == [False] * len(evicted)
    # The blocks that are still there read back exactly.
    kept = [i for i, h in enumerate(held) if h]
    assert c.get([first[i] for i in kept]) == [first_blocks[i] for i in kept]


def test_sigterm_exits_0_and_leaves_at_once(make_stack: Callable[..., Stack]) -> None:
    # A long lease: only an explicit leave can drop the node within the test's deadline.
    s = make_stack(2, lease_ttl=30.0)
    c = s.c
    keys = random_keys(100)
    blocks = blocks_for(keys, seed=9)
    assert c.put(keys, blocks) == len(keys)
    s.wait_indexed(c, keys)
    leaving, staying = s.nodes
    leaving_entry = entry_of(s, leaving)
    on_leaving = {i for i, h in enumerate(s.registry.lookup(keys)) if h[0] == leaving_entry}
    assert 0 < len(on_leaving) < len(keys)
    epoch = s.registry.epoch()
    assert leaving.stop(signal.SIGTERM) == 0
    assert "left cluster" in leaving.stderr
    assert s.member_ids() == {node_id(staying)}  # right away, not after the 30 s lease
    assert s.registry.epoch() == epoch + 1
    wait_until(lambda: len(c.members()) == 1, timeout=1.0, what="client view drops the node")
    got = c.get(keys)
    assert {i for i, g in enumerate(got) if g is None} == on_leaving
    assert all(got[i] == blocks[i] for i in range(len(keys)) if i not in on_leaving)
    assert c.match_prefix([keys[i] for i in sorted(on_leaving)]) == 0
    assert staying.running()


def test_delete_then_put_of_the_same_keys_never_loses_them_from_the_index(
    make_stack: Callable[..., Stack],
) -> None:
    """300 rounds of delete -> put -> read-back of the same keys, the holder moving every round
    (placement, then each node in turn by hand): after every round the index catches up to
    exactly the node that holds each key (no key left absent, no stale holder named) and every
    block reads back byte-exact. Every round waits for the removals to be indexed before it
    puts, so the index naming the holder can only mean the new commit (a delete and a put
    drained together are covered by the agent test below)."""
    s = make_stack(3, lease_ttl=30.0)  # no lease may lapse on a loaded machine mid-test
    members = s.registry.members()[1]
    ids = [m.node_id for m in members]
    entry = {m.node_id: m.entry for m in members}
    by_id = {node_id(n): n for n in s.nodes}
    keys = random_keys(8)
    placement = _core.Placement(ids, [m.weight for m in members])
    placed = [ids[r[0]] for r in placement.rank(keys, 1)]
    clients = {i: kvpool.Client(n.address) for i, n in by_id.items()}
    try:
        for round_ in range(300):
            blocks = blocks_for(keys, lo=512, hi=4 * KiB, seed=round_)
            if round_ % 2:  # by hand on one node: the holder moves away from placement
                holder = [ids[(round_ // 2) % 3]] * len(keys)
                assert clients[holder[0]].put(keys, blocks) == len(keys)
            else:
                holder = placed
                assert s.c.put(keys, blocks) == len(keys)
            want = [[entry[h]] for h in holder]
            wait_until(
                lambda: s.registry.lookup(keys) == want,  # noqa: B023 - evaluated in the round
                timeout=5.0,
                what=f"round {round_}: the index naming exactly the holders",
            )
            assert s.c.get(keys) == blocks, f"round {round_}"
            assert s.c.match_prefix(keys) == len(keys)
            assert s.c.delete(keys) == len(keys), f"round {round_}"
            wait_until(
                lambda: s.registry.lookup(keys) == [[]] * len(keys),
                timeout=5.0,
                what=f"round {round_}: the removals indexed",
            )
    finally:
        for cl in clients.values():
            cl.close()


def test_agent_publishes_the_last_event_of_each_key(redis_server: RedisProcess) -> None:
    """Commits and removals of the same keys drained in one batch: the agent publishes only
    each key's last state, so a delete and a put of one key (in either order) that land in the
    same drain leave the index exactly as the store ends up. Driven step by step (the agent's
    thread is not started) so every event lands in one drain."""
    from kvpool.agent import ClusterAgent
    from kvpool.config import ServerConfig
    from kvpool.server import LocalServer

    name = cluster_name("a")
    with LocalServer(ServerConfig(port=0, memory=16 << 20, redis=redis_server.url)) as node:
        agent = ClusterAgent(
            node.core,
            redis_url=redis_server.url,
            cluster=name,
            node_id="n-agent-test",
            address=node.address,
            capacity=16 << 20,
            lease_ttl=30.0,
        )
        try:
            agent._try_join()
            assert agent.incarnation
            entry = incarnation_entry(agent.incarnation)
            kept, gone, back = random_keys(3)
            with kvpool.Client(node.address) as c:
                assert c.put([kept, gone, back], [b"k", b"g", b"b"]) == 3
                agent._drain()
                agent._publish_pending()
                assert agent.registry.lookup([kept, gone, back]) == [[entry]] * 3
                assert c.delete([gone, back]) == 2  # gone: removed for good
                assert c.put([back], [b"B"]) == 1  # back: removed, then committed again
                assert c.delete([kept]) == 1 and c.put([kept], [b"K"]) == 1
            agent._drain()  # all five events in one drain
            assert agent._pending == {gone: False, back: True, kept: True}
            agent._publish_pending()
            assert agent.registry.lookup([kept, gone, back]) == [[entry], [], [entry]]
        finally:
            agent.stop()
