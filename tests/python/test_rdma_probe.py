"""RDMA discovery on this machine, which has no RDMA device and no kernel RDMA support: the probe
loads the real libibverbs at run time, finds nothing, and says so instead of failing."""

from __future__ import annotations

import ctypes.util
import os
from pathlib import Path

import kvpool
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
