"""kvpool for vLLM: ``KVPoolConnector``, a KV connector that shares prefix KV blocks between
engines through a kvpool cluster. One flag on an unmodified vLLM::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVPoolConnector",
        "kv_connector_module_path": "kvpool.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"redis_url": "redis://HOST:6379/0", "cluster": "NAME"}}'

The connector (and with it vLLM) is imported only when asked for, so that
``kvpool.vllm.tiny_model`` and the runner work without paying for ``import vllm``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KVPoolConnector"]


def __getattr__(name: str) -> Any:
    if name == "KVPoolConnector":
        from kvpool.vllm.connector import KVPoolConnector

        return KVPoolConnector
    raise AttributeError(f"module 'kvpool.vllm' has no attribute {name!r}")
