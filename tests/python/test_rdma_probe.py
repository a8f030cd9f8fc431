"""RDMA discovery on this machine, which has no RDMA device and no kernel RDMA support: the probe
loads the real libibverbs at run time, finds nothing, and says so instead of failing; nodes and
clients on the libibverbs provider (the default) serve and use TCP and shared memory, saying why
once; bad device settings are refused by name."""

from __future__ import annotations

import ctypes.util
import os
from pathlib import Path

import kvpool
import pytest
from conftest import RedisProcess, ServerFactory, cluster_name
from kvpool import _core


def test_probe_finds_no_device_and_says_why() -> None:
    probe = _core.rdma_probe()
    # scripts/setup.sh installs the rdma-core headers, so the build has the verbs probe.
    assert probe["built"] == os.path.exists("/usr/include/infiniband/verbs.h")
    assert probe["library"] == (ctypes.util.find_library("ibverbs") is not None)
    if not Path("/sys/class/infiniband").exists():
        assert probe["devices"] == []
        assert "no RDMA devices" in probe["reason"] or "not loadable" in probe["reason"]
        assert _core.rdma_devices() == []


def test_device_discovery_reads_a_sysfs_tree(tmp_path: Path) -> None:
    port = tmp_path / "mlx5_0" / "ports" / "1"
    (port / "gids").mkdir(parents=True)
    (port / "gid_attrs" / "types").mkdir(parents=True)
    (tmp_path / "mlx5_0" / "device").mkdir()
    (tmp_path / "mlx5_0" / "device" / "numa_node").write_text("1\n")
    (port / "state").write_text("4: ACTIVE\n")
    (port / "link_layer").write_text("Ethernet\n")
    (port / "gids" / "0").write_text("fe80:0000:0000:0000:0000:00ff:fe00:0001\n")
    (port / "gids" / "3").write_text("0000:0000:0000:0000:0000:ffff:c0a8:0165\n")
    (port / "gids" / "4").write_text("0000:0000:0000:0000:0000:0000:0000:0000\n")
    (port / "gid_attrs" / "types" / "0").write_text("IB/RoCE v1\n")
    (port / "gid_attrs" / "types" / "3").write_text("RoCE v2\n")
    [dev] = _core.rdma_devices(str(tmp_path))
    assert dev["name"] == "mlx5_0" and dev["numa_node"] == 1
    [p] = dev["ports"]
    assert p["active"] and p["link_layer"] == "Ethernet"
    assert [(g["index"], g["roce_v2"], g["ipv4"]) for g in p["gids"]] == [
        (0, False, ""),
        (3, True, "192.168.1.101"),
    ]


def test_the_package_imports_without_rdma() -> None:
    # libibverbs is loaded at run time, never linked: the extension imports with no rdma-core.
    assert kvpool.Client is not None


def test_a_node_without_devices_serves_and_says_why_once(start_node: ServerFactory) -> None:
    node = start_node(env={"KVPOOL_RDMA_PROVIDER": ""})  # the default: libibverbs
    assert node.stderr.count("RDMA not served") == 1, node.stderr
    assert "no RDMA devices" in node.stderr
    with kvpool.Client(node.address) as c:
        assert c.transport == "shm"
        assert "rdma" not in c.stats()["transports"]
    with pytest.raises(kvpool.KVPoolError, match="does not serve RDMA"):
        kvpool.Client(node.address, transport="rdma")


def test_a_device_asked_for_and_missing_is_a_warning_naming_it(start_node: ServerFactory) -> None:
    node = start_node(extra=["--rdma-devices", "mlx5_1:6,mlx5_2:7", "--rdma-link-type", "IB"])
    line = next(ln for ln in node.stderr.splitlines() if "RDMA not served" in ln)
    assert "level=warning" in line and "'mlx5_1:6,mlx5_2:7' asked for" in line, line
    with kvpool.Client(node.address, transport="tcp") as c:
        assert c.put([b"k" * 16], [b"v"]) == 1  # and the node serves on


@pytest.mark.parametrize(
    ("flag", "value", "named"),
    [
        ("--rdma-devices", "mlx5_1:6,,mlx5_2", "rdma_devices = 'mlx5_1:6,,mlx5_2'"),
        ("--rdma-devices", "mlx5_1:x", "rdma_devices = 'mlx5_1:x'"),
        ("--rdma-link-type", "fddi", "rdma_link_type = 'fddi'"),
        ("--rdma-port", "0", "rdma_port = 0"),
    ],
)
def test_bad_rdma_settings_stop_the_node_naming_them(
    start_node: ServerFactory, flag: str, value: str, named: str
) -> None:
    node = start_node(extra=[flag, value], wait=False)
    node.proc.wait(30)
    node.kill()  # reaps the output threads
    assert node.proc.returncode != 0
    assert named in node.stderr and "Traceback" not in node.stderr, node.stderr


def test_bad_rdma_settings_are_refused_by_client_and_cluster(redis_server: RedisProcess) -> None:
    with pytest.raises(kvpool.InvalidArgumentError, match="rdma_link_type = 'fddi'"):
        kvpool.Client("127.0.0.1:1", rdma_link_type="fddi")
    with pytest.raises(kvpool.InvalidArgumentError, match="rdma_devices = ':3'"):
        kvpool.Cluster(redis_server.url, cluster_name(), rdma_devices=":3")
    with pytest.raises(kvpool.InvalidArgumentError, match="rdma_gpu = 7, but this host has"):
        kvpool.Cluster(redis_server.url, cluster_name(), rdma_gpu=7)
