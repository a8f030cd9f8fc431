"""ConnectorConfig: the vLLM connector's settings (defaults < TOML < KVPOOL_* < extra_config)."""

from __future__ import annotations

from pathlib import Path

import pytest
from kvpool.config import ConnectorConfig
from kvpool.errors import ConfigError

EXTRA = "kv_connector_extra_config"


def load(
    extra: dict[str, object] | None = None,
    env: dict[str, str] | None = None,
    file: Path | None = None,
) -> ConnectorConfig:
    return ConnectorConfig.load(file=file, env=env or {}, overrides=extra, overrides_source=EXTRA)


def test_defaults_and_layering(tmp_path: Path) -> None:
    c = load()
    assert (c.redis_url, c.cluster, c.timeout, c.replicas) == ("", "default", 2.0, 0)
    assert c.load_blocks and c.save_blocks and c.max_pending_save == 1 << 30
    toml = tmp_path / "kvpool.toml"
    toml.write_text(
        'cluster = "from-file"\n[server]\nmemory = "1GiB"\n'
        '[connector]\ntimeout = 5\nmax_pending_save = "64MiB"\n'
    )
    env = {"KVPOOL_CLUSTER": "from-env", "KVPOOL_SAVE_BLOCKS": "off", "KVPOOL_MEMORY": "x"}
    c = load({"redis_url": "rediss://u:p@h:6380/2", "replicas": 1}, env, toml)
    assert c.redis_url == "rediss://u:p@h:6380/2"
    assert c.cluster == "from-env"  # env beats the file
    assert c.timeout == 5.0 and c.max_pending_save == 64 << 20  # the [connector] table
    assert c.save_blocks is False and c.load_blocks is True and c.replicas == 1


def test_unknown_keys_and_bad_values_name_themselves() -> None:
    with pytest.raises(ConfigError, match=f"{EXTRA}: unknown key 'redis' .*redis_url"):
        load({"redis": "redis://h:1"})
    with pytest.raises(ConfigError, match="load_blocks = 'maybe' is not a valid"):
        load({"load_blocks": "maybe"})
    with pytest.raises(ConfigError, match="timeout must be > 0"):
        load({"timeout": 0})
    with pytest.raises(ConfigError, match="replicas = True is not a valid"):
        load({"replicas": True})
    with pytest.raises(ConfigError, match="'http://h' is not a redis://"):
        load({"redis_url": "http://h"})
    with pytest.raises(ConfigError, match="environment: timeout = 'soon'"):
        load(env={"KVPOOL_TIMEOUT": "soon"})


def test_rdma_settings_are_checked_by_name() -> None:
    c = load({"rdma_devices": "mlx5_1:6,mlx5_2:7", "rdma_link_type": "IB", "rdma_port": 2})
    assert (c.rdma_devices, c.rdma_link_type, c.rdma_port, c.rdma_gpu) == (
        "mlx5_1:6,mlx5_2:7",
        "IB",
        2,
        -1,
    )
    with pytest.raises(ConfigError, match="rdma_devices = 'mlx5_1:6,,mlx5_2'.*empty entry"):
        load({"rdma_devices": "mlx5_1:6,,mlx5_2"})
    with pytest.raises(ConfigError, match="rdma_devices = 'mlx5_1:300'.*'300'"):
        load({"rdma_devices": "mlx5_1:300"})
    with pytest.raises(ConfigError, match="rdma_link_type = 'fddi'"):
        load({"rdma_link_type": "fddi"})
    with pytest.raises(ConfigError, match="rdma_port = 0"):
        load({"rdma_port": 0})
    with pytest.raises(ConfigError, match="rdma_gpu = -2"):
        load({"rdma_gpu": -2})


AIBRIX = "AIBRIX_KV_CACHE_OL_INFINISTORE_"


def test_the_seeds_infinistore_variables_map_below_kvpools_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seed = {
        AIBRIX + "CONNECTION_TYPE": "RDMA",
        AIBRIX + "LINK_TYPE": "IB",
        AIBRIX + "VISIBLE_DEV_LIST": "mlx5_1:6,mlx5_2:7",
        AIBRIX + "HOST_ADDR": "10.0.0.1",  # an InfiniStore server: kvpool finds nodes in Redis
    }
    with caplog.at_level("INFO", logger="kvpool.config"):
        c = load(env=seed)
    # RDMA where nodes offer it, with TCP fallback (the seed had none).
    assert (c.transport, c.rdma_link_type, c.rdma_devices) == ("auto", "IB", "mlx5_1:6,mlx5_2:7")
    logged = caplog.text
    assert f"{AIBRIX}VISIBLE_DEV_LIST read as rdma_devices = 'mlx5_1:6,mlx5_2:7'" in logged
    assert f"{AIBRIX}HOST_ADDR ignored" in logged
    meta = {"AIBRIX_KV_CACHE_OL_META_SERVICE_URL": "redis://:pw@meta:6379/0"}
    meta["AIBRIX_KV_CACHE_OL_META_SERVICE_BACKEND"] = "REDIS"
    with caplog.at_level("INFO", logger="kvpool.config"):
        assert load(env=meta).redis_url == "redis://:pw@meta:6379/0"
    assert "META_SERVICE_URL read as redis_url = '***'" in caplog.text
    assert ":pw@" not in caplog.text  # the password is not logged
    meta["AIBRIX_KV_CACHE_OL_META_SERVICE_BACKEND"] = "ETCD"
    with pytest.raises(ConfigError, match="META_SERVICE_BACKEND = 'ETCD'.*Redis"):
        load(env=meta)
    with pytest.raises(ConfigError, match="META_SERVICE_URL"):
        load(env={"AIBRIX_KV_CACHE_OL_META_SERVICE_URL": "etcd://meta:2379"})
    # kvpool's own settings win: a TOML file, KVPOOL_* and extra_config.
    toml = tmp_path / "kvpool.toml"
    toml.write_text('[connector]\nrdma_link_type = "Ethernet"\n')
    c = load({"transport": "tcp"}, env={**seed, "KVPOOL_RDMA_DEVICES": "mlx5_0"}, file=toml)
    assert (c.transport, c.rdma_link_type, c.rdma_devices) == ("tcp", "Ethernet", "mlx5_0")
    assert load(env={AIBRIX + "CONNECTION_TYPE": "tcp"}).transport == "tcp"
    with pytest.raises(ConfigError, match=f"{AIBRIX}CONNECTION_TYPE = 'UDP', expected RDMA or TCP"):
        load(env={AIBRIX + "CONNECTION_TYPE": "UDP"})
    with pytest.raises(ConfigError, match=f"{AIBRIX}LINK_TYPE = 'token-ring': link type must"):
        load(env={AIBRIX + "LINK_TYPE": "token-ring"})
