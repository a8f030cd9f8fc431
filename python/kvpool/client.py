"""``kvpool.Client``: batched block I/O against one storage node."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from kvpool import _core
from kvpool._closing import Closing
from kvpool.config import read_auth_tokens
from kvpool.errors import InvalidArgumentError, KVPoolConnectionError
from kvpool.rdma import RdmaSettings
from kvpool.staging import StagingArena

__all__ = ["TRANSPORTS", "Client", "parse_address"]

#: Values of ``transport``: "auto" takes shared memory when the node serves it on this host, RDMA
#: when a node elsewhere offers it (falling back to TCP, logged once, when either fails); "tcp",
#: "shm" and "rdma" force one.
TRANSPORTS = ("auto", "tcp", "shm", "rdma")

# protocol::PutStatus
_STORED, _EXISTS = 0, 1


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` -> (host, port); InvalidArgumentError naming the address otherwise."""
    host, sep, port = address.rpartition(":")
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise InvalidArgumentError(f"address {address!r} is not of the form host:port")
    return host, int(port)


def client_token(auth_token: str | None) -> str:
    """``auth_token``, or when None that of ``KVPOOL_AUTH_TOKEN`` / ``KVPOOL_AUTH_TOKEN_FILE``."""
    if auth_token is not None:
        return auth_token
    tokens = read_auth_tokens(
        os.environ.get("KVPOOL_AUTH_TOKEN", ""),
        os.environ.get("KVPOOL_AUTH_TOKEN_FILE", ""),
        key="KVPOOL_AUTH_TOKEN",
    )
    return tokens[0] if tokens else ""


def _as_buffer(block: Any) -> Any:
    """Objects with the buffer protocol pass through; CPU torch tensors become byte views of
    their storage (no copy), whatever their dtype."""
    if type(block).__module__.startswith("torch"):
        if block.device.type != "cpu":
            raise InvalidArgumentError(f"tensor on {block.device} is not a CPU tensor")
        if not block.is_contiguous():
            raise InvalidArgumentError("tensor is not contiguous")
        import torch

        return block.detach().reshape(-1).view(torch.uint8).numpy()
    return block


class Client(Closing):
    """A connection pool to one storage node.

    Every call is batched (a batch larger than the node's limits is split and pipelined), has a
    deadline of ``timeout`` seconds, and releases the GIL while it waits. Thread-safe; concurrent
    calls use separate connections. Errors raise :class:`kvpool.KVPoolError` subclasses.

    ``transport`` picks how block bytes cross (:data:`TRANSPORTS`); :attr:`transport` tells
    which one is in use. On shared memory, buffers from :meth:`staging_buffer` (or from the
    ``arena`` passed in) cross with a single copy, done by the node, and on RDMA with none: the
    node's NIC reads and writes them. ``rdma_devices`` (``"mlx5_1:6,mlx5_2:7"``),
    ``rdma_link_type`` (``"IB"`` or ``"Ethernet"``), ``rdma_port`` and ``rdma_gpu`` choose the
    RDMA device (:mod:`kvpool.rdma`). ``auth_token`` is proven to nodes that require one
    (default: ``KVPOOL_AUTH_TOKEN``, else the first line of ``KVPOOL_AUTH_TOKEN_FILE``); a node
    that refuses it raises :class:`kvpool.UnauthorizedError` naming the node.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 5.0,
        connect_timeout: float = 2.0,
        max_idle_connections: int = 8,
        transport: str = "auto",
        arena: StagingArena | None = None,
        rdma_devices: str = "",
        rdma_link_type: str = "Ethernet",
        rdma_port: int = 1,
        rdma_gpu: int = -1,
        auth_token: str | None = None,
    ) -> None:
        if timeout <= 0 or connect_timeout <= 0:
            raise InvalidArgumentError(
                f"timeout ({timeout}) and connect_timeout ({connect_timeout}) must be > 0"
            )
        if transport not in TRANSPORTS:
            raise InvalidArgumentError(
                f"transport {transport!r} is not one of {', '.join(TRANSPORTS)}"
            )
        host, port = parse_address(address)
        rdma = RdmaSettings(rdma_devices, rdma_link_type, rdma_port, rdma_gpu).options()
        token = client_token(auth_token)
        self.address = address
        self._arena = arena
        self._handle: Any = _core.Client(
            host,
            port,
            int(timeout * 1000),
            int(connect_timeout * 1000),
            max_idle_connections,
            transport,
            arena._native if arena is not None else None,
            rdma=rdma,
            auth_token=token,
        )

    @property
    def transport(self) -> str:
        """The transport of the most recent connection: ``"tcp"``, ``"shm"`` or ``"rdma"``."""
        return str(self._native.transport)

    @property
    def arena(self) -> StagingArena:
        """The staging arena (the one passed in, else the client's own, made on first use)."""
        if self._arena is None:
            self._arena = StagingArena(_native=self._native.arena())
        return self._arena

    def staging_buffer(self, nbytes: int) -> memoryview:
        """A writable buffer of ``nbytes`` in the client's arena: ``put`` and ``get_into`` with
        it are zero-copy on shared memory (and ordinary buffers on TCP)."""
        return self.arena.buffer(nbytes)

    @property
    def _native(self) -> Any:
        if self._handle is None:
            raise KVPoolConnectionError(f"client for {self.address} is closed")
        return self._handle

    def put(self, keys: Sequence[bytes], blocks: Sequence[Any]) -> int:
        """Stores ``blocks[i]`` under ``keys[i]``. Blocks are immutable: a key that exists is
        left as it is. Returns how many of the keys the node holds after the call (newly
        stored or already present); the rest were refused for lack of space."""
        return sum(self.put_held(keys, blocks))

    def put_held(self, keys: Sequence[bytes], blocks: Sequence[Any]) -> list[bool]:
        """Like :meth:`put`, per key: whether the node holds it after the call."""
        if len(keys) != len(blocks):
            raise InvalidArgumentError(f"{len(keys)} keys but {len(blocks)} blocks")
        views = [_as_buffer(b) for b in blocks]
        return [s in (_STORED, _EXISTS) for s in self._native.put(keys, views)]

    def get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """The blocks' bytes, ``None`` for keys the node does not hold."""
        return list(self._native.get(keys))

    def get_into(self, keys: Sequence[bytes], buffers: Sequence[Any]) -> list[bool]:
        """Reads ``keys[i]`` straight into ``buffers[i]`` (writable, C-contiguous, exactly the
        block's size: a size mismatch reads as a miss and leaves the buffer untouched)."""
        if len(keys) != len(buffers):
            raise InvalidArgumentError(f"{len(keys)} keys but {len(buffers)} buffers")
        views = [_as_buffer(b) for b in buffers]
        return list(self._native.get_into(keys, views))

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        return list(self._native.exists(keys))

    def match_prefix(self, keys: Sequence[bytes]) -> int:
        """How many leading keys the node holds."""
        return int(self._native.match_prefix(keys))

    def delete(self, keys: Sequence[bytes]) -> int:
        """Removes keys; returns how many were present. Readers in flight finish first."""
        return sum(self.delete_each(keys))

    def delete_each(self, keys: Sequence[bytes]) -> list[bool]:
        """Like :meth:`delete`, per key: whether it was present."""
        return list(self._native.delete(keys))

    def stats(self) -> dict[str, Any]:
        """The node's counters: capacity/used bytes, entries, hits, misses, evictions, ..."""
        result: dict[str, Any] = json.loads(self._native.stats_json())
        return result

    def close(self) -> None:
        """Closes every connection. The client is unusable afterwards."""
        self._handle = None

    def __repr__(self) -> str:
        transport = self._handle.transport if self._handle is not None else "closed"
        return f"kvpool.Client({self.address!r}, transport={transport!r})"
