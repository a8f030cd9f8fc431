"""``kvpool doctor`` against real redis-server and kvpool server processes, and its host checks
(pure functions) on made-up inputs."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import (
    RedisFactory,
    RedisProcess,
    ServerFactory,
    cluster_name,
    free_port,
    run_kvpool,
    wait_until,
)
from kvpool import _core, doctor
from kvpool.metadata import Member, Registry

TOKEN = "doctor-test-token-0123456789abcdef"


Report = list[tuple[str, str, str, str]]


def lines(stdout: str) -> Report:
    """(status, check, detail, advice) of every report line."""
    out = []
    for line in stdout.splitlines():
        status, _, rest = line.partition("  ")
        assert status.strip() in ("OK", "WARN", "FAIL"), line
        # The check name is padded to a common width: it ends at the first double space.
        check, _, detail = rest.strip().partition("  ")
        detail, _, advice = detail.strip().partition(" -> ")
        out.append((status.strip(), check.strip(), detail, advice))
    return out


def find(report: Report, check: str) -> tuple[str, str]:
    """(status, detail) of the one line named ``check``."""
    hits = [(s, d) for s, c, d, _ in report if c == check]
    assert len(hits) == 1, (check, report)
    return hits[0]


def names(report: Report) -> list[str]:
    return [c for _, c, _, _ in report]


def doctor_json(args: list[str], env: dict[str, str] | None = None) -> tuple[int, list[Any]]:
    r = run_kvpool(["doctor", "--json", *args], env=env)
    assert r.stderr == "", r.stderr
    return r.returncode, json.loads(r.stdout)


def wait_members(redis_server: RedisProcess, name: str, n: int) -> None:
    r = redis_server.client()
    try:
        registry = Registry(r, name)
        wait_until(
            lambda: len(registry.members()[1]) == n, timeout=10.0, what=f"{n} members in {name}"
        )
    finally:
        r.close()


# ---------------------------------------------------------------------------------------------
# Against real processes


def test_healthy_cluster(redis_server: RedisProcess, start_cluster_node: ServerFactory) -> None:
    name = cluster_name()
    nodes = [start_cluster_node(redis_server.url, name) for _ in range(2)]
    wait_members(redis_server, name, 2)
    r = run_kvpool(["doctor", "--redis", redis_server.url, "--cluster", name])
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr == ""
    report = lines(r.stdout)
    assert all(s != "FAIL" for s, _, _, _ in report), r.stdout
    assert find(report, "redis")[0] == "OK"
    assert "answered PING" in find(report, "redis")[1]
    assert find(report, "redis.library") == (
        "OK",
        "kvpool library version 4 loaded (this package expects it)",
    )
    assert find(report, "redis.clock")[0] == "OK"
    status, detail = find(report, "cluster.members")
    assert status == "OK" and f"cluster {name!r}: 2 member(s)" in detail, detail
    assert len([c for c in names(report) if c.startswith("cluster.lease ")]) == 2
    for node in nodes:
        status, detail = find(report, f"node.tcp {node.address}")
        assert status == "OK" and "of 64.0 MiB" in detail and "auth off" in detail, detail
        status, detail = find(report, f"node.shm {node.address}")
        assert status == "OK" and detail.startswith("shared memory through "), detail
    # The host checks run too, whatever this machine has.
    assert {"host.hugepages", "host.shm_dir", "host.cuda"} <= set(names(report))
    assert any(c.startswith("host.rdma") for c in names(report))

    # --json: the same checks with the same statuses (leases move between two runs).
    rc, checks = doctor_json(["--redis", redis_server.url, "--cluster", name])
    assert rc == 0
    assert all(set(c) == {"status", "check", "detail", "advice"} for c in checks)
    stable = {(s, c) for s, c, _, _ in report if not c.startswith("cluster.lease")}
    assert {
        (c["status"], c["check"]) for c in checks if not c["check"].startswith("cluster.lease")
    } == stable
    assert all(c["advice"] for c in checks if c["status"] != "OK")


def test_cluster_without_members_fails(redis_server: RedisProcess) -> None:
    empty = cluster_name("empty")
    url = f"redis://:not-a-secret-at-all@127.0.0.1:{redis_server.port}/0"
    r = run_kvpool(["doctor", "--redis", redis_server.url, "--cluster", empty])
    assert r.returncode == 1, r.stdout + r.stderr
    report = lines(r.stdout)
    status, detail = find(report, "cluster.members")
    assert status == "FAIL" and f"cluster {empty!r} has no members" in detail
    assert "start nodes with --redis" in r.stdout
    assert [s for s, c, _, _ in report if c.startswith("redis")] == ["OK", "OK", "OK"]

    rc, checks = doctor_json(["--redis", url, "--cluster", empty])
    assert rc == 1
    assert {c["check"]: c["status"] for c in checks}["cluster.members"] == "FAIL"
    assert "not-a-secret" not in json.dumps(checks)  # the URL's password never shows


def test_library_missing_or_of_another_version(start_redis: RedisFactory) -> None:
    server = start_redis()
    r = run_kvpool(["doctor", "--redis", server.url])
    assert r.returncode == 1
    report = lines(r.stdout)
    assert find(report, "redis")[0] == "OK"
    assert find(report, "redis.library") == (
        "FAIL",
        "the kvpool Redis Functions library is not loaded",
    )
    status, detail = find(report, "cluster.members")
    assert status == "FAIL" and "cannot list the members of cluster 'default'" in detail
    # doctor reports, it never loads the library.
    client = server.client()
    try:
        assert client.function_list() == []
        client.function_load(
            "#!lua name=kvpool\nredis.register_function{function_name='kvpool_version', "
            "callback=function() return 3 end, flags={'no-writes'}}"
        )
    finally:
        client.close()
    r = run_kvpool(["doctor", "--redis", server.url])
    assert r.returncode == 1
    status, detail = find(lines(r.stdout), "redis.library")
    assert status == "FAIL" and "Redis holds library version 3, this kvpool expects 4" in detail


def test_unreachable_redis_fails_and_hides_the_password() -> None:
    port = free_port()
    url = f"redis://kvp:hunter2-password@127.0.0.1:{port}/0"
    r = run_kvpool(["doctor", "--redis", url, "--timeout", "1"])
    assert r.returncode == 1
    status, detail = find(lines(r.stdout), "redis")
    assert status == "FAIL" and f"redis://kvp:***@127.0.0.1:{port}/0 unreachable" in detail
    assert "hunter2" not in r.stdout + r.stderr


def test_nothing_listening_fails_within_the_timeout() -> None:
    dead = f"127.0.0.1:{free_port()}"
    # A port that accepts connections (the kernel's backlog) and never answers: the HELLO must
    # give up at the deadline.
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        silent = f"127.0.0.1:{mute.getsockname()[1]}"
        t0 = time.monotonic()
        checks = doctor.run_checks(
            redis_url=None, cluster="default", addresses=[dead, silent], timeout=1.0
        )
        elapsed = time.monotonic() - t0
    assert elapsed < 1.0 + 1.0, elapsed  # the nodes are checked in parallel, each bounded
    by_name = {c.check: c for c in checks}
    assert by_name[f"node.tcp {dead}"].status == "FAIL"
    assert f"{dead} unreachable" in by_name[f"node.tcp {dead}"].detail
    assert by_name[f"node.tcp {silent}"].status == "FAIL"
    assert "did not answer within 1 s" in by_name[f"node.tcp {silent}"].detail

    r = run_kvpool(["doctor", "--timeout", "1", dead])
    assert r.returncode == 1 and r.stderr == ""
    status, detail = find(lines(r.stdout), f"node.tcp {dead}")
    assert status == "FAIL" and dead in detail and "check that a node runs" in r.stdout


def test_auth_token(start_node: ServerFactory) -> None:
    node = start_node(env={"KVPOOL_AUTH_TOKEN": TOKEN})
    r = run_kvpool(["doctor", node.address])
    assert r.returncode == 1, r.stdout + r.stderr
    report = lines(r.stdout)
    assert find(report, f"node.tcp {node.address}") == ("FAIL", "node requires an auth token")
    assert "set KVPOOL_AUTH_TOKEN" in r.stdout
    assert f"node.shm {node.address}" not in names(report)

    r = run_kvpool(["doctor", node.address], env={"KVPOOL_AUTH_TOKEN": "x" * 20})
    assert r.returncode == 1
    status, detail = find(lines(r.stdout), f"node.tcp {node.address}")
    assert status == "FAIL" and "refused this process's auth token" in detail

    r = run_kvpool(["doctor", node.address], env={"KVPOOL_AUTH_TOKEN": TOKEN})
    assert r.returncode == 0, r.stdout + r.stderr
    report = lines(r.stdout)
    status, detail = find(report, f"node.tcp {node.address}")
    assert status == "OK" and "auth on" in detail, detail
    assert find(report, f"node.shm {node.address}")[0] == "OK"

    rc, checks = doctor_json([node.address])
    assert rc == 1
    [tcp] = [c for c in checks if c["check"] == f"node.tcp {node.address}"]
    assert tcp["status"] == "FAIL" and "auth token" in tcp["detail"]


def test_member_records_drive_the_transport_checks(
    redis_server: RedisProcess, start_node: ServerFactory
) -> None:
    # A real node, registered by hand with a record that claims another host's shared memory and
    # RDMA: shm is not tried (wrong host), rdma is tried and cannot work (the node serves none).
    node = start_node(extra=["--transports", "tcp,shm"])
    name = cluster_name()
    r = redis_server.client()
    try:
        from kvpool.metadata import load_library

        load_library(r)
        registry = Registry(r, name)
        transports = "tcp,shm=some-other-host:/nowhere/node.sock,rdma"
        registry.join("nfake", node.address, transports, 64 << 20, 30_000)
    finally:
        r.close()
    # The address given as an argument too: checked once, as the member.
    res = run_kvpool(["doctor", "--redis", redis_server.url, "--cluster", name, node.address])
    assert res.returncode == 0, res.stdout + res.stderr
    report = lines(res.stdout)
    status, detail = find(report, f"node.tcp {node.address}")
    assert status == "OK" and "member nfake" in detail
    status, detail = find(report, f"node.shm {node.address}")
    assert status == "OK" and "another host (id some-other-host)" in detail
    status, detail = find(report, f"node.rdma {node.address}")
    assert status == "WARN" and "does not serve RDMA" in detail, detail
    status, detail = find(report, "cluster.lease nfake")
    assert status == "OK" and "left of 30.00 s" in detail


def test_rdma_over_the_software_provider(start_node: ServerFactory) -> None:
    soft = {"KVPOOL_RDMA_PROVIDER": "soft"}
    node = start_node(env=soft)
    rc, checks = doctor_json([node.address], env=soft)
    by_name = {c["check"]: c for c in checks}
    assert by_name[f"node.rdma {node.address}"]["status"] == "OK", checks
    assert by_name["host.rdma"]["status"] == "OK"
    assert "software provider" in by_name["host.rdma"]["detail"]
    assert rc == 0


def test_bad_arguments_exit_2(redis_server: RedisProcess) -> None:
    for args in (
        ["not-an-address"],
        ["--timeout", "0"],
        ["--redis", "ftp://x"],
        ["--model", "m", "--tensor-parallel-size", "0"],
    ):
        r = run_kvpool(["doctor", *args])
        assert r.returncode == 2 and r.stderr.startswith("kvpool: error:"), (args, r.stderr)
    r = run_kvpool(["doctor", "--redis", redis_server.url, "--cluster", "a/b"])
    assert r.returncode == 2 and "cluster name" in r.stderr


# ---------------------------------------------------------------------------------------------
# Host checks on made-up inputs

MEMINFO = """MemTotal:       131072000 kB
MemFree:         1000000 kB
HugePages_Total:     {total}
HugePages_Free:      {free}
HugePages_Rsvd:        0
Hugepagesize:       2048 kB
Hugetlb:               0 kB
"""


def test_parse_meminfo() -> None:
    info = doctor.parse_meminfo(MEMINFO.format(total=512, free=100) + "garbage line\nX: y\n")
    assert info["HugePages_Total"] == 512 and info["HugePages_Free"] == 100
    assert info["Hugepagesize"] == 2048 and info["MemTotal"] == 131072000
    assert "X" not in info


def test_hugepages_check() -> None:
    c = doctor.hugepages_check(MEMINFO.format(total=0, free=0))
    assert c.status == "WARN" and "no hugepages reserved" in c.detail
    assert "sysctl vm.nr_hugepages=N" in c.advice
    c = doctor.hugepages_check(MEMINFO.format(total=512, free=256))
    assert c == doctor.Check(
        "OK", "host.hugepages", "512 hugepages of 2048 kB reserved (1.0 GiB), 256 free (512.0 MiB)"
    )
    assert doctor.hugepages_check("MemTotal: 1 kB\n").status == "WARN"
    assert doctor.hugepages_check(None).status == "WARN"


def test_shm_dir_path() -> None:
    assert doctor.shm_dir_path({"XDG_RUNTIME_DIR": "/run/user/5"}, 5) == Path(
        "/run/user/5/kvpool-5"
    )
    assert doctor.shm_dir_path({}, 7) == Path("/tmp/kvpool-7")
    assert doctor.shm_dir_path({"XDG_RUNTIME_DIR": ""}, 7) == Path("/tmp/kvpool-7")


def test_shm_dir_check(tmp_path: Path) -> None:
    uid = os.geteuid()
    d = tmp_path / f"kvpool-{uid}"
    c = doctor.shm_dir_check(d, uid)
    assert c.status == "OK" and "does not exist yet" in c.detail
    d.mkdir(mode=0o700)
    d.chmod(0o700)
    assert doctor.shm_dir_check(d, uid).status == "OK"
    c = doctor.shm_dir_check(d, uid + 1)  # as seen by another uid: not its directory
    assert c.status == "FAIL" and f"belongs to uid {uid}" in c.detail and "remove" in c.advice
    d.chmod(0o755)
    c = doctor.shm_dir_check(d, uid)
    assert c.status == "FAIL" and "mode 0755" in c.detail and c.advice == f"chmod 700 {d}"
    f = tmp_path / "file"
    f.write_text("")
    c = doctor.shm_dir_check(f, uid)
    assert c.status == "FAIL" and "not a directory" in c.detail
    link = tmp_path / "link"
    link.symlink_to(d)
    c = doctor.shm_dir_check(link, uid)
    assert c.status == "FAIL" and "symbolic link" in c.detail


def _fake_sysfs(root: Path, *, active: bool, roce_v2_ipv4: bool) -> None:
    port = root / "mlx5_0" / "ports" / "1"
    (port / "gids").mkdir(parents=True)
    (port / "gid_attrs" / "types").mkdir(parents=True)
    (root / "mlx5_0" / "device").mkdir()
    (root / "mlx5_0" / "device" / "numa_node").write_text("1\n")
    (port / "state").write_text("4: ACTIVE\n" if active else "1: DOWN\n")
    (port / "link_layer").write_text("Ethernet\n")
    (port / "gids" / "0").write_text("fe80:0000:0000:0000:0000:00ff:fe00:0001\n")
    (port / "gid_attrs" / "types" / "0").write_text("IB/RoCE v1\n")
    if roce_v2_ipv4:
        (port / "gids" / "3").write_text("0000:0000:0000:0000:0000:ffff:c0a8:0165\n")
        (port / "gid_attrs" / "types" / "3").write_text("RoCE v2\n")


def test_rdma_checks(tmp_path: Path) -> None:
    probe = {"built": True, "library": True, "devices": [], "reason": "no RDMA devices here"}
    [c] = doctor.rdma_checks(probe, [])
    assert c.status == "WARN" and c.detail.startswith(
        "no RDMA devices (TCP and shared memory only)"
    )

    good = tmp_path / "good"
    _fake_sysfs(good, active=True, roce_v2_ipv4=True)
    devices = _core.rdma_devices(str(good))
    whole, port = doctor.rdma_checks({**probe, "devices": ["mlx5_0"], "reason": ""}, devices)
    assert whole.status == "OK" and "mlx5_0" in whole.detail
    assert port == doctor.Check(
        "OK",
        "host.rdma mlx5_0/1",
        "ACTIVE, Ethernet, NUMA node 1, RoCE v2 IPv4 GIDs: 3=192.168.1.101",
    )
    whole, _ = doctor.rdma_checks({**probe, "library": False, "reason": "no libibverbs"}, devices)
    assert whole.status == "WARN" and "libibverbs does not load: no libibverbs" in whole.detail

    down = tmp_path / "down"
    _fake_sysfs(down, active=False, roce_v2_ipv4=False)
    _, port = doctor.rdma_checks(probe, _core.rdma_devices(str(down)))
    assert port.status == "WARN" and port.detail.startswith("not active")
    noip = tmp_path / "noip"
    _fake_sysfs(noip, active=True, roce_v2_ipv4=False)
    _, port = doctor.rdma_checks(probe, _core.rdma_devices(str(noip)))
    assert port.status == "WARN" and "GIDs: none" in port.detail and "IPv4" in port.advice

    [c] = doctor.rdma_checks(probe, [], provider="soft")
    assert c.status == "OK" and "software provider" in c.detail


def test_cuda_check() -> None:
    from kvpool import copy

    def build(built: bool, why: str) -> SimpleNamespace:
        return SimpleNamespace(cuda_built=lambda: built, cuda_unavailable_reason=lambda: why)

    assert "no CUDA copy engine" in doctor.cuda_check(build(False, "not built")).detail
    c = doctor.cuda_check(build(True, "no CUDA device"))
    assert c.status == "OK" and c.detail.endswith("not usable here: no CUDA device")
    assert doctor.cuda_check(build(True, "")).detail.endswith("a CUDA device can use it")
    # This build, on this host: the line says exactly what kvpool.copy says.
    here = doctor.cuda_check(copy)
    assert here.status == "OK"
    assert copy.cuda_unavailable_reason() in here.detail


def test_lease_and_clock_checks() -> None:
    member = Member("n1", 7, "h:1", ("tcp",), 1 << 30, joined_ms=7_000, lease_expiry_ms=10_000)
    assert doctor._lease_check(member, {"updated_ms": 7_000}, 7_500).status == "OK"
    c = doctor._lease_check(member, {"updated_ms": 7_000}, 9_500)  # 0.5 s of 3 s left
    assert c.status == "WARN" and "lease 0.50 s left of 3.00 s" in c.detail
    assert doctor._lease_check(member, {}, 9_500).status == "WARN"  # the join set the lease
    assert doctor._clock_check(100.2, 100.0, 100.0).status == "OK"
    c = doctor._clock_check(101.0, 100.0, 100.0)
    assert c.status == "WARN" and "1.000 s ahead" in c.detail and "NTP" in c.advice


def test_redact_url() -> None:
    assert doctor.redact_url("redis://u:pw@h:6379/2") == "redis://u:***@h:6379/2"
    assert doctor.redact_url("rediss://:pw@h:6380/0") == "rediss://:***@h:6380/0"
    assert doctor.redact_url("redis://h:6379/0") == "redis://h:6379/0"
    assert (
        doctor.redact_url("unix:///r.sock?db=1&password=pw") == "unix:///r.sock?db=1&password=***"
    )


@pytest.mark.parametrize("status", ["OK", "WARN", "FAIL"])
def test_format_checks(status: str) -> None:
    [line] = doctor.format_checks([doctor.Check(status, "x.y", "found", "do this")])
    assert line == f"{status:<4}  x.y  found" + ("" if status == "OK" else " -> do this")
