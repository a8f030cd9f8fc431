"""kvpool: a distributed KV-cache pool for LLM inference engines.

Storage nodes (``kvpool server``) pool their DRAM; engines write the KV blocks they compute and
read back blocks any engine computed. This package holds the Python API over the C++ core.

The names that need the C++ extension are imported on first use, so that ``kvpool.errors``,
``kvpool.config`` and the ``kvpool`` command line load even when a piece of the install is
broken, and can say which.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kvpool.config import ServerConfig, parse_size
from kvpool.errors import (
    ConfigError,
    ErrorCode,
    InstallError,
    InvalidArgumentError,
    KVPoolConnectionError,
    KVPoolError,
    KVPoolTimeoutError,
    NoSpaceError,
    ProtocolError,
    TooLargeError,
    UnauthorizedError,
)

if TYPE_CHECKING:
    from kvpool.client import Client
    from kvpool.cluster import Cluster
    from kvpool.keys import Namespace, block_keys
    from kvpool.server import LocalServer
    from kvpool.staging import StagingArena

__version__ = "0.1.0"

_LAZY = {
    "Client": "kvpool.client",
    "Cluster": "kvpool.cluster",
    "Namespace": "kvpool.keys",
    "block_keys": "kvpool.keys",
    "LocalServer": "kvpool.server",
    "StagingArena": "kvpool.staging",
}


if not TYPE_CHECKING:  # type checkers see the imports above, and no catch-all attribute

    def __getattr__(name: str) -> Any:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'kvpool' has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value


__all__ = [
    "Client",
    "Cluster",
    "ConfigError",
    "ErrorCode",
    "InstallError",
    "InvalidArgumentError",
    "KVPoolConnectionError",
    "KVPoolError",
    "KVPoolTimeoutError",
    "LocalServer",
    "Namespace",
    "NoSpaceError",
    "ProtocolError",
    "UnauthorizedError",
    "ServerConfig",
    "StagingArena",
    "TooLargeError",
    "block_keys",
    "parse_size",
]
