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
