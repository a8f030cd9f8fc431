"""``kvpool.StagingArena``: staging memory that same-host nodes copy to and from directly."""

from __future__ import annotations

from typing import Any

from kvpool import _core
from kvpool.errors import InvalidArgumentError, NoSpaceError

__all__ = ["StagingArena"]


class StagingArena:
    """One region of memory (a sealed memfd) that a client hands to every same-host node it
    talks to over shared memory. ``put`` and ``get_into`` with buffers from :meth:`buffer` are
    zero-copy on the client: the node copies straight between the arena and its pool. Buffers
    elsewhere still work (their bytes ride on the socket). Share one arena among the clients of
    a process (``kvpool.Cluster`` does), so a staging buffer is zero-copy to every member.

    Pages are faulted in when a buffer is first handed out (by this process, so they are charged
    to it, not to the node), so an arena costs memory only for what is used.
    """

    def __init__(self, nbytes: int = 64 << 20, *, _native: Any = None) -> None:
        if _native is None:
            if nbytes <= 0:
                raise InvalidArgumentError(f"staging arena size must be > 0, got {nbytes}")
            _native = _core.StagingArena(nbytes)
        self._native = _native

    @property
    def size(self) -> int:
        return int(self._native.size)

    @property
    def address(self) -> int:
        """The address of the arena's first byte (it spans :attr:`size` bytes)."""
        return int(self._native.address)

    @property
    def used_bytes(self) -> int:
        """Bytes of the buffers currently handed out (rounded up to 4 KiB each)."""
        return int(self._native.used_bytes)

    def buffer(self, nbytes: int) -> memoryview:
        """A writable buffer of ``nbytes`` inside the arena. It returns to the arena when the
        last view of it is dropped; never before a call that uses it has returned.
        NoSpaceError when the arena has no room left."""
        if nbytes < 0:
            raise InvalidArgumentError(f"buffer size must be >= 0, got {nbytes}")
        native = self._native.take(nbytes)
        if native is None:
            raise NoSpaceError(
                f"staging arena of {self.size} bytes has no room for {nbytes} more "
                f"({self.used_bytes} in use)"
            )
        return memoryview(native)

    def try_buffer(self, nbytes: int) -> memoryview | None:
        """Like :meth:`buffer`, ``None`` instead of NoSpaceError."""
        if nbytes < 0:
            raise InvalidArgumentError(f"buffer size must be >= 0, got {nbytes}")
        native = self._native.take(nbytes)
        return None if native is None else memoryview(native)

    def __repr__(self) -> str:
        return f"kvpool.StagingArena(size={self.size}, used_bytes={self.used_bytes})"
