"""The ``kvpool`` command line and the configuration sources behind ``kvpool server``."""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import Sequence
from pathlib import Path

import kvpool
import pytest
from conftest import (
    RawConnection,
    ServerFactory,
    ServerProcess,
    free_port,
    random_keys,
    run_kvpool,
)
from kvpool import ConfigError, ServerConfig, parse_size

MiB = 1 << 20


# --- ServerConfig.load --------------------------------------------------------------------------


def test_defaults() -> None:
    c = ServerConfig.load(env={})
    assert c == ServerConfig()
    assert (c.host, c.port, c.memory, c.eviction) == ("127.0.0.1", 7070, 1 << 30, "s3fifo")


def test_precedence_defaults_file_env_overrides(tmp_path: Path) -> None:
    f = tmp_path / "kvpool.toml"
    f.write_text(
        'memory = "24MiB"\neviction = "lru"\nport = 1111\nio_timeout = 7\n'
        "max_batch_keys = 11\nhigh_watermark = 0.5\n"
    )
    env = {"KVPOOL_MEMORY": "40MiB", "KVPOOL_PORT": "2222", "KVPOOL_MAX_BATCH_KEYS": "13"}
    c = ServerConfig.load(file=f, env=env, overrides={"port": 3333, "eviction": None})
    assert c.port == 3333  # CLI beats env and file
    assert c.memory == 40 * MiB  # env beats file
    assert c.max_batch_keys == 13  # env beats file
    assert c.eviction == "lru"  # file beats default; a None override is "not given"
    assert c.io_timeout == 7.0 and isinstance(c.io_timeout, float)
    assert c.high_watermark == 0.5
    assert c.max_frame_bytes == ServerConfig().max_frame_bytes  # default survives

    # Without the env, the file wins over defaults; without the file, env over defaults.
    assert ServerConfig.load(file=f, env={}).memory == 24 * MiB
    assert ServerConfig.load(env=env).memory == 40 * MiB


def test_server_section_and_kvpool_config_env(tmp_path: Path) -> None:
    f = tmp_path / "kvpool.toml"
    f.write_text('[server]\nmemory = "2GiB"\nhugepages = "off"\n')
    c = ServerConfig.load(env={"KVPOOL_CONFIG": str(f)})
    assert c.memory == 2 << 30 and c.hugepages == "off"


@pytest.mark.parametrize(
    "text",
    ["bogus_key = 1\n", '[server]\nmemory = "1GiB"\nbogus_key = 1\n'],
    ids=["top", "section"],
)
def test_unknown_toml_key_is_named(tmp_path: Path, text: str) -> None:
    f = tmp_path / "kvpool.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match="bogus_key"):
        ServerConfig.load(file=f, env={})


@pytest.mark.parametrize(
    ("source", "value"),
    [("file", '"12XB"'), ("env", "12XB"), ("override", "12XB"), ("file", '"lots"')],
)
def test_bad_size_is_named(tmp_path: Path, source: str, value: str) -> None:
    f = tmp_path / "kvpool.toml"
    f.write_text(f"memory = {value}\n" if source == "file" else "")
    env = {"KVPOOL_MEMORY": value} if source == "env" else {}
    overrides = {"memory": value} if source == "override" else None
    with pytest.raises(ConfigError, match=r"memory.*" + value.strip('"')) as err:
        ServerConfig.load(file=f, env=env, overrides=overrides)
    # The message says what was expected: a size (not "an int").
    assert "size" in str(err.value).replace(str(f), ""), str(err.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("eviction", "fifo"),
        ("port", "70000"),
        ("port", "x"),
        ("high_watermark", "0"),
        ("high_watermark", "1.5"),
        ("memory", "1KiB"),
        ("max_batch_keys", "0"),
        ("io_timeout", "0"),
        ("log_level", "loud"),
    ],
)
def test_bad_values_from_env_are_named(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=key):
        ServerConfig.load(env={f"KVPOOL_{key.upper()}": value})


def test_bad_toml_syntax_and_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "broken.toml"
    f.write_text("memory = = 1\n")
    with pytest.raises(ConfigError, match="broken.toml"):
        ServerConfig.load(file=f, env={})
    with pytest.raises(ConfigError, match="missing.toml"):
        ServerConfig.load(file=tmp_path / "missing.toml", env={})


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4GiB", 4 << 30),
        ("512MiB", 512 << 20),
        ("1048576", 1 << 20),
        ("1.5KiB", 1536),
        ("2 MB", 2_000_000),
        ("64kib", 64 << 10),
        (123, 123),
    ],
)
def test_parse_size(text: str | int, value: int) -> None:
    assert parse_size(text) == value


# --- The real CLI ---------------------------------------------------------------------------------


def test_cli_precedence_end_to_end(start_node: ServerFactory, tmp_path: Path) -> None:
    f = tmp_path / "node.toml"
    f.write_text(
        '[server]\nmemory = "24MiB"\neviction = "lru"\nmax_batch_keys = 11\nhigh_watermark = 0.5\n'
    )
    node = start_node(
        memory="32MiB",  # CLI flag beats env and file
        extra=["--config", str(f)],
        env={"KVPOOL_MEMORY": "40MiB", "KVPOOL_MAX_BATCH_KEYS": "13"},
    )
    with kvpool.Client(node.address) as c:
        s = c.stats()
    assert s["capacity_bytes"] == 32 * MiB
    assert s["eviction"] == "lru"  # from the file
    assert s["high_watermark_bytes"] == 16 * MiB  # from the file
    with RawConnection(node.address) as raw:
        assert raw.hello()[1] == 13  # env beats file
    assert "eviction=lru" in node.stderr and f"memory={32 * MiB}" in node.stderr


def test_cli_eviction_flag_beats_env(start_node: ServerFactory) -> None:
    node = start_node(eviction="s3fifo", env={"KVPOOL_EVICTION": "lru", "KVPOOL_MEMORY": "8MiB"})
    with kvpool.Client(node.address) as c:
        assert c.stats()["eviction"] == "s3fifo"


def _failed_start(
    start_node: ServerFactory,
    *,
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
    memory: str = "16MiB",
) -> ServerProcess:
    """Starts a node that must refuse to start: nonzero exit, an error message, no traceback."""
    node = start_node(memory=memory, extra=extra, env=env, wait=False)
    node.proc.wait(30)
    node.kill()  # reaps the output threads
    assert node.proc.returncode != 0, node.stderr
    assert "Traceback" not in node.stderr, node.stderr
    return node


def test_cli_unknown_toml_key(start_node: ServerFactory, tmp_path: Path) -> None:
    f = tmp_path / "node.toml"
    f.write_text('memory = "16MiB"\nno_such_setting = true\n')
    node = _failed_start(start_node, extra=["--config", str(f)])
    assert "no_such_setting" in node.stderr


def test_cli_bad_size(start_node: ServerFactory) -> None:
    node = _failed_start(start_node, memory="12XB")
    assert "12XB" in node.stderr and "memory" in node.stderr


def test_cli_bad_size_from_env(start_node: ServerFactory, tmp_path: Path) -> None:
    f = tmp_path / "node.toml"
    f.write_text("")
    node = _failed_start(
        start_node, extra=["--config", str(f)], env={"KVPOOL_MAX_FRAME_BYTES": "huge"}
    )
    assert "huge" in node.stderr and "max_frame_bytes" in node.stderr


def test_cli_bad_choice(start_node: ServerFactory) -> None:
    node = _failed_start(start_node, extra=["--eviction", "fifo"])
    assert "fifo" in node.stderr


def test_cli_port_in_use(start_node: ServerFactory) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        node = _failed_start(start_node, extra=["--port", str(port)])
    assert str(port) in node.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_server_cleanly(start_node: ServerFactory, sig: int) -> None:
    node = start_node(memory="16MiB")
    # With a client connected, an idle raw connection and a writer stuck mid-frame.
    client = kvpool.Client(node.address)
    key = random_keys(1)
    assert client.put(key, [b"x" * 1000]) == 1
    idle = RawConnection(node.address)
    idle.hello()
    stuck = RawConnection(node.address)
    stuck.hello()
    stuck.send(b"KVP1\x02")  # the first bytes of a header
    try:
        assert node.stop(sig) == 0
        assert idle.closed_by_peer(timeout=1.0)
        assert stuck.closed_by_peer(timeout=1.0)
    finally:
        client.close()
        idle.close()
        stuck.close()
    assert "stopped" in node.stderr


def test_kvpool_stats_command(shared_node: ServerProcess) -> None:
    with kvpool.Client(shared_node.address) as c:
        key = random_keys(1)
        c.put(key, [b"s" * 100])
        c.get(key)
        expected = c.stats()
    out = run_kvpool(["stats", shared_node.address])
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(None, 1) for line in out.stdout.strip().splitlines())
    for name in ("capacity_bytes", "used_bytes", "entries", "hits", "misses", "evictions"):
        assert name in lines, name
    assert int(lines["capacity_bytes"]) == 256 * MiB
    assert int(lines["hits"]) >= expected["hits"]

    out = run_kvpool(["stats", shared_node.address, "--json"])
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["capacity_bytes"] == 256 * MiB
    assert data["entries"] >= 1
    assert data["stored"] >= expected["stored"]


def test_kvpool_stats_unreachable() -> None:
    out = run_kvpool(["stats", f"127.0.0.1:{free_port()}", "--timeout", "1"])
    assert out.returncode != 0
    assert "kvpool: error:" in out.stderr
    assert "Traceback" not in out.stderr


def test_kvpool_local_end_to_end() -> None:
    out = run_kvpool(
        ["local", "--engines", "synthetic", "--tokens", "2048", "--memory", "128MiB"], timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "bytes verified" in out.stdout
    # 2048 shared tokens are 128 blocks of 16 that the second engine finds in the pool.
    assert "engine B: 128 of 132 blocks already in kvpool" in out.stdout
