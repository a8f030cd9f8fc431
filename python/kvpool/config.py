"""Typed configuration: defaults < TOML file < ``KVPOOL_*`` environment < CLI flags."""

from __future__ import annotations

import logging
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields
from fractions import Fraction
from pathlib import Path
from typing import Any, Self

from kvpool.errors import ConfigError
from kvpool.rdma import RdmaSettings

log = logging.getLogger("kvpool.config")

__all__ = ["ConnectorConfig", "ServerConfig", "parse_size"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int, *, name: str = "size") -> int:
    """``"4GiB"`` -> 4294967296. Decimal (kB, MB, GB) and binary (KiB, MiB, GiB) units."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{name}: size must be >= 0, got {value}")
        return value
    m = _SIZE_RE.match(str(value))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ConfigError(f"{name}: cannot parse size {value!r} (examples: 4GiB, 512MiB, 1048576)")
    # Exact (a float rounds "8192.05g" down a byte, and overflows on long digit strings).
    return int(Fraction(m.group(1)) * _UNITS[unit])


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
#: What a node can serve in this build (RDMA joins with its transport).
SERVER_TRANSPORTS = ("tcp", "shm", "rdma")
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _size(default: int) -> Any:
    """A byte-size setting: accepts ``"4GiB"``-style strings (:func:`parse_size`)."""
    return field(default=default, metadata={"size": True})


def _choice(default: str, choices: tuple[str, ...]) -> Any:
    """A setting that takes one of ``choices`` (listed in errors and ``--help`` in this order)."""
    assert default in choices
    return field(default=default, metadata={"choices": choices})


def read_auth_tokens(
    token: str, token_file: str, *, key: str = "auth_token", warn: bool = True
) -> list[str]:
    """The data-plane tokens of ``token`` and of each non-empty line of ``token_file`` (a node
    accepts them all, for rotation; a client proves the first). ConfigError naming the file when
    it cannot be read, and (``warn``) a warning for a token shorter than 16 bytes: validation
    reads without warning, the one place that uses the tokens warns."""
    tokens = [token] if token else []
    if token_file:
        try:
            text = Path(token_file).read_text(encoding="utf-8")  # proofs use a token's UTF-8 bytes
        except OSError as e:
            raise ConfigError(f"{key}_file = {token_file!r} cannot be read: {e.strerror}") from None
        except ValueError as e:  # not UTF-8, or a NUL in the path
            raise ConfigError(f"{key}_file = {token_file!r} cannot be read: {e}") from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise ConfigError(f"{key}_file = {token_file!r} holds no token")
        tokens += lines
    for t in tokens:
        if t != t.strip() or len(t.encode()) > 4096:
            raise ConfigError(f"{key}: a token must be 1..4096 bytes without surrounding spaces")
        if warn and len(t.encode()) < 16:
            log.warning(
                "%s is %d bytes long: use at least 16 random bytes (e.g. openssl rand -hex 32)",
                key,
                len(t.encode()),
            )
    return tokens


def _check_redis_url(key: str, url: str) -> None:
    if url and not url.startswith(_REDIS_SCHEMES):
        raise ConfigError(f"{key} = {url!r} is not a redis://, rediss:// or unix:// URL")
    if url:
        # redis-py's own parser, which reads the URL when the cluster connects: a bad port, host
        # or query argument is refused here, by name, rather than there.
        from redis.connection import parse_url

        try:
            parse_url(url)  # type: ignore[no-untyped-call]  # (redis-py ships it untyped)
        except ValueError as e:
            raise ConfigError(f"{key} = {url!r}: {e}") from None


class _Settings:
    """A dataclass of settings: typed coercion, unknown keys refused, layered sources."""

    #: The TOML table that holds these settings (keys may also sit at the top level).
    _section = ""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def choices(cls, name: str) -> tuple[str, ...]:
        """The values setting ``name`` takes (a KeyError for a setting without choices)."""
        field_ = next(f for f in fields(cls) if f.name == name)  # type: ignore[arg-type]
        return tuple(field_.metadata["choices"])

    def update(self, values: Mapping[str, Any], *, source: str) -> Self:
        """Applies ``values`` (from ``source``, named in errors); unknown keys are errors."""
        known = {f.name: f for f in fields(self)}  # type: ignore[arg-type]
        for key, raw in values.items():
            if raw is None:
                continue
            if key not in known:
                raise ConfigError(
                    f"{source}: unknown key {key!r} (known: {', '.join(sorted(known))})"
                )
            setattr(self, key, self._coerce(known[key], raw, source))
        self.validate()
        return self

    @staticmethod
    def _coerce(f: Field[Any], raw: Any, source: str) -> Any:
        key, typ = f.name, f.type
        try:
            if f.metadata.get("size"):
                return parse_size(raw, name=f"{source}: {key}")
            if typ in (bool, "bool"):
                if isinstance(raw, bool):
                    return raw
                if str(raw).strip().lower() in _TRUE + _FALSE:
                    return str(raw).strip().lower() in _TRUE
                raise ValueError
            if typ in (int, "int"):
                if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                    raise ValueError
                return int(raw)
            if typ in (float, "float"):
                if isinstance(raw, bool) or not math.isfinite(float(raw)):
                    raise ValueError  # durations and fractions: nan and inf mean nothing here
                return float(raw)
            value = str(raw)
        except ConfigError:
            raise
        except (TypeError, ValueError, OverflowError):  # OverflowError: float(10**400)
            raise ConfigError(f"{source}: {key} = {raw!r} is not a valid {typ}") from None
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{source}: {key} = {value!r}, expected one of {', '.join(choices)}")
        return value

    def validate(self) -> None:
        """Raises ConfigError naming the first bad value."""

    @classmethod
    def _seed_settings(cls, env: Mapping[str, str]) -> dict[str, Any]:
        """Settings read from the seed's (AIBrix's) variables, below all of kvpool's own."""
        return {}

    @classmethod
    def load(
        cls,
        *,
        file: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
        overrides_source: str = "command line",
    ) -> Self:
        """Defaults, then the seed's variables (:meth:`_seed_settings`), then ``file`` (TOML; keys
        at top level or under the class's section), then ``KVPOOL_<KEY>`` variables from ``env``
        (default ``os.environ``), then ``overrides``."""
        config = cls()
        env = os.environ if env is None else env
        seeded = cls._seed_settings(env)
        if seeded:
            config.update(seeded, source="AIBrix environment")
        path = file or env.get("KVPOOL_CONFIG")
        if path:
            try:
                data = tomllib.loads(Path(path).read_text())
            except FileNotFoundError:
                raise ConfigError(f"config file {str(path)!r} does not exist") from None
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"config file {str(path)!r}: {e}") from None
            section = data.pop(cls._section, None)
            for other in _Settings.__subclasses__():  # another component's table is not ours
                data.pop(other._section, None)
            if isinstance(section, dict):
                data.update(section)
            config.update(data, source=f"config file {str(path)!r}")
        from_env = {
            name: env[f"KVPOOL_{name.upper()}"]
            for name in cls.field_names()
            if f"KVPOOL_{name.upper()}" in env
        }
        config.update(from_env, source="environment")
        if overrides:
            config.update(overrides, source=overrides_source)
        return config


@dataclass
class ServerConfig(_Settings):
    """Settings of one storage node (``kvpool server``)."""

    _section = "server"

    host: str = "127.0.0.1"
    port: int = 7070
    memory: int = _size(1 << 30)
    eviction: str = _choice("s3fifo", ("s3fifo", "lru"))
    high_watermark: float = 0.95
    hugepages: str = _choice("auto", ("auto", "on", "off"))
    max_batch_keys: int = 4096
    max_frame_bytes: int = _size(1 << 30)
    max_block_bytes: int = _size(256 << 20)
    max_connections: int = 16384
    io_timeout: float = 30.0
    log_level: str = _choice("info", ("debug", "info", "warning", "error"))
    #: Cluster membership: the node joins ``cluster`` through the Redis at ``redis`` (URL with
    #: password, user, TLS ``rediss://`` and database number as redis-py understands them).
    redis: str = ""
    cluster: str = "default"
    node_id: str = ""  #: default: derived from the advertised address
    advertise: str = ""  #: host:port clients use to reach this node; default host:port
    lease_ttl: float = 3.0
    #: Transports served, comma-separated: "tcp" always (discovery and remote clients), "shm"
    #: for same-host clients over the unix-domain socket ``shm_socket``, "rdma" when an RDMA
    #: device opens (the device ``rdma_*`` select; without one the node says why and serves on).
    transports: str = "tcp,shm,rdma"
    #: Default: $XDG_RUNTIME_DIR (else /tmp) /kvpool-<uid>/node-<host>-<port>.sock.
    shm_socket: str = ""
    #: Uids and gids (comma-separated) allowed on the shared-memory socket besides the node's
    #: own uid and root.
    shm_allow_uids: str = ""
    shm_allow_gids: str = ""
    #: Largest staging arena one shared-memory connection may map (address space, not memory).
    shm_max_arena_bytes: int = _size(64 << 30)
    #: The newest wire protocol version the node speaks (1 or 2). 1 serves TCP only, exactly as
    #: a v1 node did: for a rolling downgrade, or to test a client against an old node.
    protocol_version: int = 2
    #: RDMA devices, ``name[:gid_index],...`` (``mlx5_1:6,mlx5_2:7``); default: the first found.
    rdma_devices: str = ""
    #: ``IB`` (LID routing) or ``Ethernet`` (RoCE v2; the GID of the port's IPv4 address unless
    #: the device list gives an index).
    rdma_link_type: str = "Ethernet"
    rdma_port: int = 1
    #: Data-plane authentication: connections must prove this token (challenge-response; it
    #: never crosses the wire). ``auth_token_file`` holds one per line, all accepted (rotation).
    auth_token: str = ""
    auth_token_file: str = ""
    #: Prometheus ``/metrics``, ``/healthz`` and ``/readyz`` on this port (0: off), bound to
    #: ``metrics_host`` (default: the node's ``host``).
    metrics_port: int = 0
    metrics_host: str = ""

    def transport_list(self) -> list[str]:
        return [t.strip() for t in self.transports.split(",") if t.strip()]

    def allowed_ids(self, key: str) -> list[int]:
        return [int(v) for v in getattr(self, key).split(",") if v.strip()]

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is outside 0..65535")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port {self.metrics_port} is outside 0..65535 (0: off)")
        if self.memory < 1 << 20:
            raise ConfigError(f"memory {self.memory} is below the 1 MiB minimum")
        if not 0.0 < self.high_watermark <= 1.0:
            raise ConfigError(f"high_watermark {self.high_watermark} is not in (0, 1]")
        for key in ("max_batch_keys", "max_frame_bytes", "max_block_bytes", "max_connections"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.io_timeout <= 0:
            raise ConfigError(f"io_timeout must be > 0 seconds, got {self.io_timeout}")
        if self.lease_ttl < 0.3:
            raise ConfigError(f"lease_ttl must be >= 0.3 seconds, got {self.lease_ttl}")
        _check_redis_url("redis", self.redis)
        if self.protocol_version not in (1, 2):
            raise ConfigError(f"protocol_version must be 1 or 2, got {self.protocol_version}")
        served = self.transport_list()
        unknown = [t for t in served if t not in SERVER_TRANSPORTS]
        if unknown or "tcp" not in served:
            raise ConfigError(
                f"transports = {self.transports!r}: a comma list of {', '.join(SERVER_TRANSPORTS)}"
                " that includes tcp"
            )
        bad = [c for c in ',|"\\\n' if c in self.shm_socket]
        too_long = len(self.shm_socket.encode()) > 107
        if self.shm_socket and (bad or too_long or not self.shm_socket.startswith("/")):
            raise ConfigError(
                f"shm_socket = {self.shm_socket!r}: an absolute path of at most 107 bytes"
                ' without , | " \\'
            )
        for key in ("shm_allow_uids", "shm_allow_gids"):
            try:
                ids = self.allowed_ids(key)
            except ValueError:
                ids = [-1]
            if any(not 0 <= i < 1 << 32 for i in ids):
                raise ConfigError(f"{key} = {getattr(self, key)!r} is not a comma list of ids")
        self.rdma().check(ConfigError)
        self.auth_tokens(warn=False)

    def auth_tokens(self, *, warn: bool = True) -> list[str]:
        return read_auth_tokens(self.auth_token, self.auth_token_file, warn=warn)

    def rdma(self) -> RdmaSettings:
        return RdmaSettings(self.rdma_devices, self.rdma_link_type, self.rdma_port)


@dataclass
class ConnectorConfig(_Settings):
    """Settings of the vLLM connector (``kvpool.vllm.KVPoolConnector``): from
    ``kv_connector_extra_config``, ``KVPOOL_*`` variables or a TOML file's ``[connector]`` table."""

    _section = "connector"

    #: The cluster's Redis (``redis://[user:password@]host:port/db``, ``rediss://`` for TLS).
    redis_url: str = ""
    cluster: str = "default"
    #: Deadline of every lookup, load and save call, in seconds: a slow cluster costs at most this.
    timeout: float = 2.0
    replicas: int = 0
    load_blocks: bool = True  #: load hits (off: the engine only writes)
    save_blocks: bool = True  #: save computed blocks (off: the engine only reads)
    #: Saves queued for the background writer beyond this many bytes are dropped (and counted).
    max_pending_save: int = _size(1 << 30)
    #: The model's name in block keys; default: vLLM's model name or path. Set it when engines
    #: load the same weights from different paths.
    model_id: str = ""
    #: How block bytes cross to each node: "auto" (shared memory to nodes on this host, RDMA to
    #: nodes elsewhere that offer it, TCP to the rest; falling back to TCP, logged once), "tcp",
    #: or "shm" / "rdma" (nodes that offer it must take it: no fallback).
    transport: str = _choice("auto", ("auto", "tcp", "shm", "rdma"))
    #: The worker's staging arena (shared with same-host nodes); loads and saves that do not fit
    #: use ordinary memory, whose bytes cross on the socket instead.
    staging_bytes: int = _size(256 << 20)
    #: A load of more bytes than this is fetched in chunks of about this size, each copied into
    #: the KV cache while the next one arrives (0: one fetch, then one copy).
    load_chunk_bytes: int = _size(8 << 20)
    #: RDMA device selection, as on nodes (``rdma_devices``, ``rdma_link_type``, ``rdma_port``),
    #: and the GPU whose nearest device to use: -1 takes the worker's own CUDA device when vLLM
    #: runs on GPUs (none on CPU).
    rdma_devices: str = ""
    rdma_link_type: str = "Ethernet"
    rdma_port: int = 1
    rdma_gpu: int = -1
    #: The token proven to nodes that require one (or the first line of ``auth_token_file``).
    auth_token: str = ""
    auth_token_file: str = ""

    @classmethod
    def _seed_settings(cls, env: Mapping[str, str]) -> dict[str, Any]:
        """AIBrix's ``AIBRIX_KV_CACHE_OL_*`` variables that mean something here: the metadata
        service (a Redis, which is the cluster's), the connection type, and the RDMA device list
        and link type. The rest (an InfiniStore server's address, the L1 tier's settings, ...)
        have no counterpart yet: logged as ignored. Each one read is logged."""
        prefix = "AIBRIX_KV_CACHE_OL_"
        keys = {
            "META_SERVICE_URL": "redis_url",
            "META_SERVICE_BACKEND": None,  # checked, maps to nothing
            "INFINISTORE_CONNECTION_TYPE": "transport",
            "INFINISTORE_LINK_TYPE": "rdma_link_type",
            "INFINISTORE_VISIBLE_DEV_LIST": "rdma_devices",
        }
        out: dict[str, Any] = {}
        for var in sorted(v for v in env if v.startswith(prefix)):
            what, value = var[len(prefix) :], env[var]
            if what not in keys:
                log.info("%s ignored: it has no counterpart in kvpool", var)
                continue
            key = keys[what]
            if key is None:
                if value.strip().upper() != "REDIS":
                    raise ConfigError(f"{var} = {value!r}: kvpool's metadata service is Redis")
                continue
            if key == "transport":
                # RDMA where nodes offer it, shared memory on the same host, TCP fallback.
                kinds = {"RDMA": "auto", "TCP": "tcp"}
                if value.strip().upper() not in kinds:
                    raise ConfigError(f"{var} = {value!r}, expected RDMA or TCP")
                value = kinds[value.strip().upper()]
            out[key] = value
            log.info("%s read as %s = %r", var, key, "***" if key == "redis_url" else value)
        names = {
            "devices": prefix + "INFINISTORE_VISIBLE_DEV_LIST",
            "link_type": prefix + "INFINISTORE_LINK_TYPE",
        }
        defaults = RdmaSettings()
        RdmaSettings(
            out.get("rdma_devices", defaults.devices),
            out.get("rdma_link_type", defaults.link_type),
        ).check(ConfigError, names)
        if "redis_url" in out:
            _check_redis_url(prefix + "META_SERVICE_URL", out["redis_url"])
        return out

    def validate(self) -> None:
        _check_redis_url("redis_url", self.redis_url)
        if self.staging_bytes <= 0:
            raise ConfigError(f"staging_bytes must be > 0, got {self.staging_bytes}")
        if self.load_chunk_bytes < 0:
            raise ConfigError(f"load_chunk_bytes must be >= 0, got {self.load_chunk_bytes}")
        if self.timeout <= 0:
            raise ConfigError(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.replicas < 0:
            raise ConfigError(f"replicas must be >= 0, got {self.replicas}")
        RdmaSettings(self.rdma_devices, self.rdma_link_type, self.rdma_port, self.rdma_gpu).check(
            ConfigError
        )
        self.token(warn=False)

    def token(self, *, warn: bool = True) -> str:
        """The data-plane token to prove ("" for none)."""
        tokens = read_auth_tokens(self.auth_token, self.auth_token_file, warn=warn)
        return tokens[0] if tokens else ""
