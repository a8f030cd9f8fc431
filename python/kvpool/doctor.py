"""``kvpool doctor``: checks a deployment and says what to fix.

Every check yields one :class:`Check` (``OK``, ``WARN`` or ``FAIL``, a name, what it found and,
unless OK, one sentence of advice). Nothing here changes the deployment: the Redis Functions
library is reported, never loaded. Every network call is bounded by the timeout, and a check that
breaks becomes a FAIL line of its own instead of stopping the others.

The host checks are pure functions of their inputs (``/proc/meminfo`` text, a path and a uid, the
RDMA probe and device list), so they can be tested with made-up values.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from kvpool.errors import (
    InvalidArgumentError,
    KVPoolConnectionError,
    KVPoolError,
    KVPoolTimeoutError,
    ProtocolError,
    UnauthorizedError,
)

__all__ = [
    "CLOCK_SKEW_WARN_S",
    "Check",
    "EngineSpec",
    "cuda_check",
    "format_checks",
    "hugepages_check",
    "namespace_checks",
    "node_checks",
    "parse_meminfo",
    "rdma_checks",
    "redact_url",
    "redis_checks",
    "run_checks",
    "run_doctor",
    "shm_dir_check",
    "shm_dir_path",
]

OK, WARN, FAIL = "OK", "WARN", "FAIL"
#: Clock difference between this host and Redis above which the clock check warns.
CLOCK_SKEW_WARN_S = 0.5
#: A member whose remaining lease is below this fraction of its lease time has missed at least
#: two heartbeats (nodes renew every third of it).
LEASE_WARN_FRACTION = 1 / 3


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    status: str
    check: str
    detail: str
    advice: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _ok(check: str, detail: str) -> Check:
    return Check(OK, check, detail)


def _warn(check: str, detail: str, advice: str) -> Check:
    return Check(WARN, check, detail, advice)


def _fail(check: str, detail: str, advice: str) -> Check:
    return Check(FAIL, check, detail, advice)


def _guarded(name: str, fn: Callable[[], list[Check]]) -> list[Check]:
    """Runs a group of checks; an unexpected exception becomes one FAIL line, never a
    traceback."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - one broken check must not stop the others
        return [_fail(name, f"the check itself failed: {type(e).__name__}: {e}", "report this bug")]


def _bytes(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------------------------------------
# Redis and cluster membership


def redact_url(url: str) -> str:
    """``url`` with its password (in the user info or a ``password=`` query) shown as ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:***@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k == "password" for k, _ in pairs):
            query = urlencode([(k, "***" if k == "password" else v) for k, v in pairs], safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    if "://" not in url:
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    # By hand: urlunsplit drops the "//" of an empty host (unix:///path).
    out = f"{parts.scheme}://{netloc}{parts.path}"
    return out + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")


def _scrub(text: str, url: str) -> str:
    """Removes the URL's password from an error message, should the message quote it."""
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    return text.replace(password, "***") if password else text


def _redis_client(url: str, timeout: float) -> Any:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    try:
        return redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # one attempt: every call is bounded by the timeout
        )
    except ValueError as e:
        raise InvalidArgumentError(f"--redis {redact_url(url)}: {e}") from None


def _library_code(r: Any) -> str | None:
    """The code Redis holds for the ``kvpool`` library (FUNCTION LIST), or None."""
    for lib in r.function_list(library="kvpool", withcode=True):
        fields = lib if isinstance(lib, dict) else dict(zip(lib[::2], lib[1::2], strict=True))
        name = fields.get(b"library_name", fields.get("library_name"))
        if name in (b"kvpool", "kvpool"):
            code = fields.get(b"library_code", fields.get("library_code"))
            if isinstance(code, bytes):
                return code.decode(errors="replace")
            return None if code is None else str(code)
    return None


def _library_check(r: Any) -> Check:
    import redis as redis_py

    from kvpool.metadata import LIBRARY_VERSION, library_current, library_source

    name = "redis.library"
    try:
        loaded: int | None = int(r.fcall("kvpool_version", 0))
    except redis_py.ResponseError:
        loaded = None
    if loaded is None:
        return _fail(
            name,
            "the kvpool Redis Functions library is not loaded",
            "start a kvpool node with --redis on this Redis (it loads the library on join)",
        )
    if not library_current(r):
        return _fail(
            name,
            f"Redis holds library version {loaded}, this kvpool expects {LIBRARY_VERSION}",
            "run the same kvpool version on every node and client (a node of this version "
            "replaces the library when it joins)",
        )
    try:
        same_code = _library_code(r) == library_source()
    except (redis_py.RedisError, ValueError, TypeError):
        same_code = True  # FUNCTION LIST refused (an ACL) or odd: the version is what counts
    if not same_code:
        return _warn(
            name,
            f"library version {loaded} is loaded, but its code differs from this package's",
            "make sure every node runs the same kvpool build (another one loaded this library)",
        )
    return _ok(name, f"kvpool library version {loaded} loaded (this package expects it)")


def _clock_check(redis_s: float, local_before: float, local_after: float) -> Check:
    skew = redis_s - (local_before + local_after) / 2
    rtt = local_after - local_before
    side = "ahead of" if skew >= 0 else "behind"
    detail = f"Redis clock {abs(skew):.3f} s {side} this host's (round trip {rtt * 1000:.1f} ms)"
    if abs(skew) > CLOCK_SKEW_WARN_S:
        return _warn(
            "redis.clock",
            detail,
            "synchronise the clocks of this host and the Redis host (chrony or NTP)",
        )
    return _ok("redis.clock", detail)


def _lease_check(member: Any, stats: Mapping[str, int], redis_now_ms: int) -> Check:
    """One member's remaining lease, on Redis's clock (the only clock leases are judged by)."""
    name = f"cluster.lease {member.node_id}"
    remaining_ms = member.lease_expiry_ms - redis_now_ms
    # The last heartbeat (or the join) set the lease to "then + ttl": the lease time follows.
    renewed_ms = int(stats.get("updated_ms") or member.joined_ms)
    ttl_ms = member.lease_expiry_ms - renewed_ms
    used = stats.get("used_bytes")
    usage = f", used {_bytes(used)} of {_bytes(member.capacity)}" if used is not None else ""
    detail = (
        f"{member.address} (incarnation {member.incarnation}): lease {remaining_ms / 1000:.2f} s "
        f"left of {ttl_ms / 1000:.2f} s{usage}"
    )
    if remaining_ms <= 0 or (ttl_ms > 0 and remaining_ms < ttl_ms * LEASE_WARN_FRACTION):
        return _warn(
            name,
            detail + ": heartbeats are late",
            "check the node's log, its load and its connection to Redis",
        )
    return _ok(name, detail)


def redis_checks(url: str, cluster: str, timeout: float) -> tuple[list[Check], list[Any]]:
    """Redis reachable, the library loaded and current, the clock, and the cluster's members
    (returned too, so their nodes get checked)."""
    import redis as redis_py

    from kvpool.metadata import ClusterKeys, Registry

    ClusterKeys(cluster)  # a bad name is a usage error (KVPoolError)
    shown = redact_url(url)
    r = _redis_client(url, timeout)
    checks: list[Check] = []
    members: list[Any] = []
    try:
        try:
            t0 = time.monotonic()
            r.ping()
            ping_ms = (time.monotonic() - t0) * 1000
        except redis_py.AuthenticationError as e:
            msg = _scrub(str(e), url)
            return [
                _fail("redis", f"{shown}: {msg}", "put the right user and password in the URL")
            ], []
        except (redis_py.RedisError, OSError) as e:
            return [
                _fail(
                    "redis",
                    f"{shown} unreachable: {_scrub(str(e), url)}",
                    "check that redis-server runs there and that the URL is right",
                )
            ], []
        checks.append(_ok("redis", f"{shown} answered PING in {ping_ms:.1f} ms"))

        def library() -> list[Check]:
            return [_library_check(r)]

        checks += _guarded("redis.library", library)

        def clock() -> list[Check]:
            before = time.time()
            sec, usec = r.time()
            after = time.time()
            return [_clock_check(int(sec) + int(usec) / 1e6, before, after)]

        checks += _guarded("redis.clock", clock)

        def membership() -> list[Check]:
            registry = Registry(r, cluster)
            try:
                # Stats first, then members, then TIME: a heartbeat in between can only make a
                # lease look longer, never expiring.
                _, with_stats = registry.node_stats()
                _, found = registry.members()
                sec, usec = r.time()
            except redis_py.ResponseError as e:
                return [
                    _fail(
                        "cluster.members",
                        f"cannot list the members of cluster {cluster!r}: {_scrub(str(e), url)}",
                        "load the kvpool library first (see redis.library)",
                    )
                ]
            now_ms = int(sec) * 1000 + int(usec) // 1000
            stats = {m.node_id: st for m, st in with_stats}
            members.extend(found)
            if not found:
                return [
                    _fail(
                        "cluster.members",
                        f"cluster {cluster!r} has no members",
                        "start nodes with --redis and --cluster "
                        f"{cluster} (or check the cluster name)",
                    )
                ]
            out = [
                _ok(
                    "cluster.members",
                    f"cluster {cluster!r}: {len(found)} member(s), "
                    f"{_bytes(sum(m.capacity for m in found))} in all",
                )
            ]
            out += [_lease_check(m, stats.get(m.node_id, {}), now_ms) for m in found]
            return out

        checks += _guarded("cluster.members", membership)
    finally:
        r.close()
    return checks, members


# ---------------------------------------------------------------------------------------------
# Storage nodes


@dataclass(frozen=True)
class _Node:
    address: str
    member: Any = None  # kvpool.metadata.Member when the cluster lists it


def _token_in_use() -> bool:
    from kvpool.client import client_token

    try:
        return bool(client_token(None))
    except KVPoolError:
        return False


def _connect_failure(check: str, address: str, e: Exception, timeout: float) -> Check:
    if isinstance(e, UnauthorizedError):
        if _token_in_use():
            return _fail(
                check,
                f"node refused this process's auth token ({e})",
                "set KVPOOL_AUTH_TOKEN (or KVPOOL_AUTH_TOKEN_FILE) to one of the node's tokens",
            )
        return _fail(
            check,
            "node requires an auth token",
            "set KVPOOL_AUTH_TOKEN (or KVPOOL_AUTH_TOKEN_FILE) to one of the node's tokens",
        )
    if isinstance(e, KVPoolTimeoutError):
        return _fail(
            check,
            f"{address} did not answer within {timeout:g} s ({e})",
            "check that the node runs, is not overloaded, and that no firewall drops the port",
        )
    if isinstance(e, KVPoolConnectionError):
        return _fail(
            check,
            f"{address} unreachable: {e}",
            "check that a node runs and listens there (its --host, --port and --advertise)",
        )
    if isinstance(e, ProtocolError):
        return _fail(
            check,
            f"{address} does not speak the kvpool protocol: {e}",
            "check the address: it must be a kvpool node's port",
        )
    return _fail(check, f"{address}: {type(e).__name__}: {e}", "see the node's log")


def _transport_check(address: str, transport: str, timeout: float) -> tuple[bool, str]:
    """(connected over ``transport``, what happened)."""
    from kvpool.client import Client

    try:
        with Client(
            address, transport=transport, timeout=timeout, connect_timeout=timeout
        ) as client:
            client.stats()
            if client.transport != transport:
                return False, f"the connection fell back to {client.transport}"
            return True, ""
    except KVPoolError as e:
        return False, str(e)


def node_checks(node: _Node, timeout: float, local_host: str) -> list[Check]:
    """TCP, then each transport the node advertises: shm when it shares this host, rdma."""
    from kvpool.client import Client

    address = node.address
    tcp = f"node.tcp {address}"
    try:
        with Client(address, transport="tcp", timeout=timeout, connect_timeout=timeout) as c:
            stats = c.stats()
    except KVPoolError as e:
        return [_connect_failure(tcp, address, e, timeout)]
    cap, used = int(stats.get("capacity_bytes", 0)), int(stats.get("used_bytes", 0))
    served = list(stats.get("transports", {}))
    who = f"member {node.member.node_id}, " if node.member is not None else ""
    out = [
        _ok(
            tcp,
            f"{who}used {_bytes(used)} of {_bytes(cap)} ({100 * used / max(cap, 1):.1f}%), "
            f"{stats.get('entries', 0)} blocks, auth {'on' if stats.get('auth') else 'off'}, "
            f"serves {','.join(served) or 'tcp'}",
        )
    ]
    if node.member is not None:
        advertised = set(node.member.transport_names())
        where = node.member.shm
        shm_host, shm_path = where if where is not None else (None, "")
    else:
        advertised = set(served)
        shm_host, shm_path = None, str(stats.get("shm_socket", ""))

    if "shm" in advertised:
        check = f"node.shm {address}"
        if shm_host is not None and shm_host != local_host:
            out.append(_ok(check, f"not checked: the node runs on another host (id {shm_host})"))
        else:
            ok, why = _transport_check(address, "shm", timeout)
            if ok:
                out.append(_ok(check, f"shared memory through {shm_path}"))
            elif "runs on another host" in why:
                out.append(_ok(check, "not checked: the node runs on another host"))
            else:
                out.append(
                    _warn(
                        check,
                        f"shared memory unavailable: {why}",
                        "same-host clients fall back to TCP; check the socket and that this "
                        "uid may use it (node's uid, root or shm_allow_uids)",
                    )
                )
    if "rdma" in advertised:
        check = f"node.rdma {address}"
        ok, why = _transport_check(address, "rdma", timeout)
        if ok:
            out.append(_ok(check, "RDMA connection established"))
        else:
            out.append(
                _warn(
                    check,
                    f"this process cannot use RDMA to the node: {why}",
                    "clients here use TCP instead; see host.rdma for this host's devices",
                )
            )
    return out


def _nodes(members: Iterable[Any], addresses: Iterable[str]) -> list[_Node]:
    """Members first, then the addresses given that no member has, each once."""
    seen: dict[str, _Node] = {}
    for m in members:
        seen.setdefault(m.address, _Node(m.address, m))
    for a in addresses:
        seen.setdefault(a, _Node(a))
    return list(seen.values())


# ---------------------------------------------------------------------------------------------
# This host


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` as {field: number} (the number as written: kB for sizes, a count for
    HugePages_*); lines that do not parse are skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        words = rest.split()
        if sep and words and words[0].isdigit():
            out[key.strip()] = int(words[0])
    return out


def hugepages_check(meminfo: str | None) -> Check:
    """Explicit hugepages reserved (``meminfo``: the text of /proc/meminfo, None if unreadable)."""
    name = "host.hugepages"
    if meminfo is None:
        return _warn(name, "cannot read /proc/meminfo", "run doctor on the Linux host of the nodes")
    info = parse_meminfo(meminfo)
    if "HugePages_Total" not in info:
        return _warn(
            name,
            "/proc/meminfo lists no HugePages_Total (kernel without hugetlbfs)",
            "nodes use transparent hugepages here; nothing to do unless you want explicit ones",
        )
    total, free = info["HugePages_Total"], info.get("HugePages_Free", 0)
    size_kb = info.get("Hugepagesize", 2048)
    if total == 0:
        return _warn(
            name,
            f"no hugepages reserved (page size {size_kb} kB): nodes fall back to transparent "
            "hugepages",
            f"reserve pages for the node pools: sysctl vm.nr_hugepages=N (N x {size_kb} kB >= "
            "the pools' memory)",
        )
    return _ok(
        name,
        f"{total} hugepages of {size_kb} kB reserved ({_bytes(total * size_kb * 1024)}), "
        f"{free} free ({_bytes(free * size_kb * 1024)})",
    )


def shm_dir_path(env: Mapping[str, str], uid: int) -> Path:
    """The directory of a uid's default shared-memory sockets: ``$XDG_RUNTIME_DIR`` (else
    ``/tmp``) ``/kvpool-<uid>``, as the node computes it."""
    return Path(env.get("XDG_RUNTIME_DIR") or "/tmp") / f"kvpool-{uid}"


def shm_dir_check(path: Path, uid: int) -> Check:
    """The socket directory, if it exists, must be a real directory of ``uid`` with mode 0700
    (the node refuses to serve shared memory from anything else)."""
    name = "host.shm_dir"
    try:
        st = path.lstat()
    except FileNotFoundError:
        return _ok(name, f"{path} does not exist yet (a node creates it)")
    except OSError as e:
        return _fail(
            name, f"cannot inspect {path}: {e.strerror}", f"check the permissions above {path}"
        )
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
        return _fail(
            name,
            f"{path} is {kind}: nodes refuse it and serve no shared memory",
            f"remove {path} (a node recreates it) or set shm_socket elsewhere",
        )
    if st.st_uid != uid:
        return _fail(
            name,
            f"{path} belongs to uid {st.st_uid}, not to this uid {uid}",
            f"remove {path} (a node recreates it) or set shm_socket elsewhere",
        )
    if mode != 0o700:
        return _fail(
            name,
            f"{path} has mode {mode:04o}, not 0700",
            f"chmod 700 {path}",
        )
    return _ok(name, f"{path}: directory of uid {uid}, mode 0700")


def rdma_checks(
    probe: Mapping[str, Any], devices: Sequence[Mapping[str, Any]], provider: str = ""
) -> list[Check]:
    """This host's RDMA: ``probe`` is ``_core.rdma_probe()``, ``devices`` is
    ``_core.rdma_devices()``, ``provider`` the value of ``KVPOOL_RDMA_PROVIDER``. One line for
    the whole, then one per device port."""
    name = "host.rdma"
    reason = str(probe.get("reason") or "")
    if provider == "soft":
        return [
            _ok(
                name,
                "the software provider is selected (KVPOOL_RDMA_PROVIDER=soft): RDMA between "
                "processes of this host only, no device used",
            )
        ]
    if not devices:
        return [
            _warn(
                name,
                "no RDMA devices (TCP and shared memory only)" + (f": {reason}" if reason else ""),
                "nothing to do without an RDMA NIC; with one, install rdma-core and its driver",
            )
        ]
    listed = ", ".join(str(d.get("name")) for d in devices)
    out: list[Check] = []
    if not probe.get("built"):
        out.append(
            _warn(
                name,
                f"devices {listed} present, but this kvpool was built without verbs support",
                "rebuild kvpool with the rdma-core headers (libibverbs-dev) installed",
            )
        )
    elif not probe.get("library"):
        out.append(
            _warn(
                name,
                f"devices {listed} present, but libibverbs does not load"
                + (f": {reason}" if reason else ""),
                "install rdma-core (libibverbs1 and the device's provider)",
            )
        )
    else:
        out.append(_ok(name, f"{len(devices)} device(s): {listed}; libibverbs loads"))
    for dev in devices:
        for port in dev.get("ports", []):
            check = f"host.rdma {dev.get('name')}/{port.get('number')}"
            link = str(port.get("link_layer") or "?")
            gids = [
                f"{g.get('index')}={g.get('ipv4')}"
                for g in port.get("gids", [])
                if g.get("roce_v2") and g.get("ipv4")
            ]
            detail = (
                f"{'ACTIVE' if port.get('active') else 'not active'}, {link}, "
                f"NUMA node {dev.get('numa_node')}, RoCE v2 IPv4 GIDs: {', '.join(gids) or 'none'}"
            )
            if not port.get("active"):
                out.append(
                    _warn(check, detail, "bring the link up (cable, switch port; see ibv_devinfo)")
                )
            elif link == "Ethernet" and not gids:
                out.append(
                    _warn(
                        check,
                        detail,
                        "give the port's network interface an IPv4 address, or name a GID "
                        "index in rdma_devices (name:gid_index)",
                    )
                )
            else:
                out.append(_ok(check, detail))
    return out


def cuda_check(copy_module: Any) -> Check:
    """Whether this build has the CUDA copy engine and, when it has, whether a device can use it
    here (``kvpool.copy.cuda_built()`` / ``cuda_unavailable_reason()``). Storage nodes need no
    GPU, so a build without a usable device is OK; the detail says why it is not usable."""
    name = "host.cuda"
    if not copy_module.cuda_built():
        return _ok(name, "this build has no CUDA copy engine (CPU copy engine only)")
    why = copy_module.cuda_unavailable_reason()
    if why:
        return _ok(name, f"this build has the CUDA copy engine; not usable here: {why}")
    return _ok(name, "this build has the CUDA copy engine and a CUDA device can use it")


def _host_checks() -> list[Check]:
    def hugepages() -> list[Check]:
        try:
            text: str | None = Path("/proc/meminfo").read_text()
        except OSError:
            text = None
        return [hugepages_check(text)]

    def shm_dir() -> list[Check]:
        uid = os.geteuid()
        return [shm_dir_check(shm_dir_path(os.environ, uid), uid)]

    def rdma() -> list[Check]:
        from kvpool import _core

        provider = os.environ.get("KVPOOL_RDMA_PROVIDER", "")
        return rdma_checks(_core.rdma_probe(), _core.rdma_devices(), provider)

    def cuda() -> list[Check]:
        from kvpool import copy

        return [cuda_check(copy)]

    checks: list[Check] = []
    for name, fn in (
        ("host.hugepages", hugepages),
        ("host.shm_dir", shm_dir),
        ("host.rdma", rdma),
        ("host.cuda", cuda),
    ):
        checks += _guarded(name, fn)
    return checks


# ---------------------------------------------------------------------------------------------
# The connector's namespace


@dataclass(frozen=True)
class EngineSpec:
    """What decides an engine's block-key namespace, as ``vllm serve`` flags name it."""

    model: str
    block_size: int | None = None
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    model_id: str = ""  # the connector's model_id setting (default: the model as given)


def namespace_checks(spec: EngineSpec) -> list[Check]:
    """One line per TP rank: the namespace (and its fingerprint, the first link of every block
    key) that the connector of an engine started with ``spec`` uses on this host. Engines share
    blocks exactly when these lines agree; compare them across hosts to see why hits are missing."""
    name = "connector.namespace"
    # vLLM logs to stdout by default: keep the report (and --json) the only thing there.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:
        from vllm.engine.arg_utils import EngineArgs
    except ImportError as e:
        return [_warn(name, f"vllm does not import here ({e})", "run doctor where the engine runs")]
    from kvpool.vllm.connector import connector_namespace

    try:
        config = EngineArgs(
            model=spec.model,
            block_size=spec.block_size,
            tensor_parallel_size=spec.tensor_parallel_size,
            dtype=spec.dtype,  # type: ignore[arg-type]
            kv_cache_dtype=spec.kv_cache_dtype,  # type: ignore[arg-type]
        ).create_engine_config()
    except Exception as e:  # noqa: BLE001 - vLLM's own reason is the detail
        return [_fail(name, f"vLLM refuses the engine settings: {e}", "fix the model or flags")]
    out = []
    for rank in range(spec.tensor_parallel_size):
        ns = connector_namespace(config, spec.model_id, rank)
        fields = (
            f"model {ns.model!r}, revision {ns.revision or '-'}, dtype {ns.dtype}, "
            f"layout {ns.kv_layout}, backend {ns.attention_backend}, "
            f"{ns.block_tokens}-token blocks, tp {ns.tp_rank}/{ns.tp_size}"
        )
        out.append(_ok(f"{name} rank {rank}", f"{ns.fingerprint().hex()} ({fields})"))
    return out


# ---------------------------------------------------------------------------------------------
# Putting it together


def run_checks(
    *,
    redis_url: str | None,
    cluster: str,
    addresses: Sequence[str],
    timeout: float,
    engine: EngineSpec | None = None,
) -> list[Check]:
    """Every check, in report order: Redis and the cluster, the nodes, this host, and the
    connector's namespace for ``engine``. Raises :class:`kvpool.KVPoolError` only for bad
    arguments (exit code 2)."""
    from kvpool.client import parse_address

    if timeout <= 0:
        raise InvalidArgumentError(f"--timeout {timeout} must be > 0")
    if engine is not None and engine.tensor_parallel_size < 1:
        raise InvalidArgumentError(
            f"--tensor-parallel-size {engine.tensor_parallel_size} must be >= 1"
        )
    for a in addresses:
        parse_address(a)
    checks: list[Check] = []
    members: list[Any] = []
    if redis_url:
        from kvpool.metadata import ClusterKeys

        ClusterKeys(cluster)  # a bad name or URL is a usage error, before any check
        _redis_client(redis_url, timeout).close()

        def cluster_checks() -> list[Check]:
            got, found = redis_checks(redis_url, cluster, timeout)
            members.extend(found)
            return got

        checks += _guarded("redis", cluster_checks)
    nodes = _nodes(members, addresses)
    if nodes:
        local_host = ""
        try:
            from kvpool import _core

            local_host = str(_core.host_id())
        except Exception:  # noqa: BLE001 - the node checks say what is broken
            pass
        # Nodes in parallel: the report takes one timeout, not one per node.
        with ThreadPoolExecutor(max_workers=min(16, len(nodes))) as pool:
            per_node = list(
                pool.map(
                    lambda n: _guarded(
                        f"node.tcp {n.address}", lambda: node_checks(n, timeout, local_host)
                    ),
                    nodes,
                )
            )
        for got in per_node:
            checks += got
    checks += _host_checks()
    if engine is not None:
        checks += _guarded("connector.namespace", lambda: namespace_checks(engine))
    if redis_url:  # whatever quoted the URL, its password never reaches the report
        checks = [Check(c.status, c.check, _scrub(c.detail, redis_url), c.advice) for c in checks]
    return checks


def format_checks(checks: Sequence[Check]) -> list[str]:
    """Text lines: status, check name, detail, and ``-> advice`` for WARN and FAIL."""
    width = max((len(c.check) for c in checks), default=0)
    lines = []
    for c in checks:
        line = f"{c.status:<4}  {c.check:<{width}}  {c.detail}"
        if c.advice and c.status != OK:
            line += f" -> {c.advice}"
        lines.append(line)
    return lines


def run_doctor(
    *,
    redis_url: str | None,
    cluster: str,
    addresses: Sequence[str],
    timeout: float,
    as_json: bool,
    engine: EngineSpec | None = None,
    out: TextIO | None = None,
) -> int:
    """``kvpool doctor``: prints the report; 1 when any check failed, else 0."""
    stream = out if out is not None else sys.stdout
    checks = run_checks(
        redis_url=redis_url, cluster=cluster, addresses=addresses, timeout=timeout, engine=engine
    )
    if as_json:
        print(json.dumps([c.as_dict() for c in checks], indent=2), file=stream)
    else:
        for line in format_checks(checks):
            print(line, file=stream)
    return 1 if any(c.status == FAIL for c in checks) else 0
