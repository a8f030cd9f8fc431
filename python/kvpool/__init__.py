"""kvpool: a distributed KV-cache pool for LLM inference engines.

Storage nodes (``kvpool server``) pool their DRAM; engines write the KV blocks they compute and
read back blocks any engine computed. This package holds the Python API over the C++ core.
"""

from kvpool.client import Client
from kvpool.cluster import Cluster
from kvpool.config import ServerConfig, parse_size
from kvpool.errors import (
    ConfigError,
    ErrorCode,
    InvalidArgumentError,
    KVPoolConnectionError,
    KVPoolError,
    KVPoolTimeoutError,
    NoSpaceError,
    ProtocolError,
    TooLargeError,
)
from kvpool.keys import Namespace, block_keys
from kvpool.server import LocalServer

__version__ = "0.1.0"

__all__ = [
    "Client",
    "Cluster",
    "ConfigError",
    "ErrorCode",
    "InvalidArgumentError",
    "KVPoolConnectionError",
    "KVPoolError",
    "KVPoolTimeoutError",
    "LocalServer",
    "Namespace",
    "NoSpaceError",
    "ProtocolError",
    "ServerConfig",
    "TooLargeError",
    "block_keys",
    "parse_size",
]
