"""Redis URLs with an ACL user, a password and a database number reach every part of the
cluster layer: the node agent (redis-py), the Cluster client, and the core's index reader."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import kvpool
import pytest
import redis
from conftest import ServerFactory, cluster_name, free_port, wait_until
from kvpool.local import redis_argv, wait_for_redis

USER, PASSWORD, DB = "kvp", "s3cret-pw", 3


@pytest.fixture
def acl_redis(tmp_path: os.PathLike[str]) -> Iterator[int]:
    """A redis-server whose default user needs a password and that has an ACL user ``kvp``."""
    port = free_port()
    argv = redis_argv(
        port,
        extra=["--dir", str(tmp_path), "--requirepass", "default-pw",
               "--user", USER, "on", f">{PASSWORD}", "~*", "&*", "+@all"],
    )  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_redis(port, proc)
        r = redis.Redis(port=port, username=USER, password=PASSWORD, socket_timeout=1.0)
        assert _pings(r), "the ACL user cannot PING"
        r.close()
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _pings(r: redis.Redis) -> bool:
    try:
        return bool(r.ping())
    except redis.RedisError:
        return False


def test_acl_user_password_and_database_number(
    acl_redis: int, start_cluster_node: ServerFactory
) -> None:
    url = f"redis://{USER}:{PASSWORD}@127.0.0.1:{acl_redis}/{DB}"
    name = cluster_name()
    nodes = [start_cluster_node(url, name) for _ in range(2)]
    with kvpool.Cluster(url, name, timeout=2.0) as cluster:
        assert wait_until(lambda: len(cluster.members()) == 2, timeout=10.0)
        # The index reader is the core's own RESP client: it must have authenticated as the
        # ACL user and selected the database too, or lookups would find nothing.
        assert cluster._registry._reader is not None
        keys = kvpool.block_keys(list(range(16 * 64)), kvpool.Namespace(model="auth"))
        blocks = [os.urandom(4096) for _ in keys]
        assert cluster.put(keys, blocks) == len(keys)
        assert wait_until(lambda: cluster.match_prefix(keys) == len(keys), timeout=10.0)
        assert cluster.get(keys) == blocks
    # Everything lives in database 3, nothing in database 0.
    r3 = redis.Redis(port=acl_redis, username=USER, password=PASSWORD, db=DB)
    r0 = redis.Redis(port=acl_redis, username=USER, password=PASSWORD, db=0)
    assert any(k.startswith(f"kvpool:{{{name}".encode()) for k in r3.keys("kvpool:*"))
    assert r0.keys("kvpool:*") == []
    assert all(n.running() for n in nodes)


def test_wrong_password_degrades_without_errors(acl_redis: int, start_node: ServerFactory) -> None:
    bad = f"redis://{USER}:wrong@127.0.0.1:{acl_redis}/{DB}"
    name = cluster_name()
    # The node still starts and serves its data path; it only cannot join.
    node = start_node(extra=["--redis", bad, "--cluster", name, "--lease-ttl", "1"])
    with kvpool.Client(node.address) as client:
        assert client.put([b"k" * 16], [b"v"]) == 1
        assert client.get([b"k" * 16]) == [b"v"]
    # A Cluster with bad credentials gives misses and no exceptions.
    t = time.monotonic()
    with kvpool.Cluster(bad, name, timeout=1.0) as cluster:
        assert cluster.members() == []
        assert cluster.match_prefix([b"k" * 16]) == 0
        assert cluster.get([b"k" * 16]) == [None]
    assert time.monotonic() - t < 10
