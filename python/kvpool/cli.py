"""The ``kvpool`` command line: ``kvpool server``, ``kvpool local``, ``kvpool stats``,
``kvpool status``, ``kvpool doctor``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from kvpool.config import ServerConfig
from kvpool.errors import KVPoolError, describe_import_error

log = logging.getLogger("kvpool")


def _add_server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file with server settings (also KVPOOL_CONFIG)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default 7070; 0 picks a free one)")
    p.add_argument("--memory", help="pool size, e.g. 4GiB (default 1GiB)")
    choices = ServerConfig.choices
    p.add_argument(
        "--eviction", choices=choices("eviction"), help="eviction policy (default s3fifo)"
    )
    p.add_argument(
        "--high-watermark",
        type=float,
        dest="high_watermark",
        help="fraction of the pool kept in use at most (default 0.95)",
    )
    p.add_argument("--hugepages", choices=choices("hugepages"), help="back the pool by hugepages")
    p.add_argument("--log-level", dest="log_level", choices=choices("log_level"))
    p.add_argument("--redis", help="Redis URL of the cluster metadata (enables membership)")
    p.add_argument("--cluster", help="cluster name (default 'default')")
    p.add_argument("--node-id", dest="node_id", help="node id (default: from the address)")
    p.add_argument("--advertise", help="host:port clients reach this node at (default host:port)")
    p.add_argument("--lease-ttl", dest="lease_ttl", type=float, help="seconds (default 3)")
    p.add_argument(
        "--transports",
        help="transports served, comma-separated (default tcp,shm,rdma; tcp always)",
    )
    p.add_argument(
        "--rdma-devices",
        dest="rdma_devices",
        help="RDMA devices name[:gid_index],... e.g. mlx5_1:6,mlx5_2:7 (default: first found)",
    )
    p.add_argument(
        "--rdma-link-type", dest="rdma_link_type", help="IB or Ethernet (RoCE v2; the default)"
    )
    p.add_argument("--rdma-port", dest="rdma_port", type=int, help="RDMA device port (default 1)")
    p.add_argument(
        "--metrics-port",
        dest="metrics_port",
        type=int,
        help="serve Prometheus /metrics, /healthz and /readyz on this port (default off)",
    )
    p.add_argument(
        "--auth-token-file",
        dest="auth_token_file",
        help="data-plane tokens, one per line, all accepted (or KVPOOL_AUTH_TOKEN)",
    )
    p.add_argument(
        "--shm-socket",
        dest="shm_socket",
        help="the shared-memory unix socket (default $XDG_RUNTIME_DIR or /tmp /kvpool-<uid>/...)",
    )


def _server_config(args: argparse.Namespace) -> ServerConfig:
    overrides = {k: getattr(args, k) for k in ServerConfig.field_names() if hasattr(args, k)}
    return ServerConfig.load(file=args.config, overrides=overrides)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _cmd_server(args: argparse.Namespace) -> int:
    from kvpool.server import serve

    config = _server_config(args)
    _setup_logging(config.log_level)
    return serve(config)


def _cmd_local(args: argparse.Namespace) -> int:
    from kvpool.local import run_local

    _setup_logging("info")
    return run_local(
        serve_forever=args.serve,
        memory=args.memory,
        prompt_tokens=args.tokens,
        engines=args.engines,
        model=args.model,
    )


def _cmd_stats(args: argparse.Namespace) -> int:
    from kvpool.client import Client

    with Client(args.address, timeout=args.timeout, transport="tcp") as client:
        stats = client.stats()
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
    else:
        # Nested tables (per transport) flatten to "transports.shm.bytes_in".
        flat: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                flat[prefix] = value

        walk("", stats)
        width = max(len(k) for k in flat)
        for key in sorted(flat):
            print(f"{key:<{width}}  {flat[key]}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    import redis

    from kvpool.metadata import Registry, load_library

    r = redis.Redis.from_url(
        args.redis, socket_timeout=args.timeout, socket_connect_timeout=args.timeout
    )
    try:
        load_library(r)
        registry = Registry(r, args.cluster)
        epoch, nodes = registry.node_stats()
    except redis.RedisError as e:
        print(f"kvpool: error: redis {args.redis}: {e}", file=sys.stderr)
        return 2
    finally:
        r.close()
    rows: list[dict[str, Any]] = []
    for m, st in nodes:
        hits, misses = st.get("hits", 0), st.get("misses", 0)
        rows.append(
            {
                "node_id": m.node_id,
                "address": m.address,
                "incarnation": m.incarnation,
                "capacity_bytes": m.capacity,
                "used_bytes": st.get("used_bytes", 0),
                "blocks": st.get("blocks", 0),
                "hits": hits,
                "misses": misses,
                "hit_rate": hits / (hits + misses) if hits + misses else None,
            }
        )
    if args.json:
        print(json.dumps({"cluster": args.cluster, "epoch": epoch, "nodes": rows}, indent=2))
        return 0
    cap = sum(r["capacity_bytes"] for r in rows)
    used = sum(r["used_bytes"] for r in rows)
    print(
        f"cluster {args.cluster!r}  epoch {epoch}  nodes {len(rows)}  "
        f"used {_gib(used)} of {_gib(cap)}"
    )
    header = ("NODE", "ADDRESS", "INC", "CAPACITY", "USED", "USE%", "BLOCKS", "HIT RATE")
    table = [header] + [
        (
            r["node_id"],
            r["address"],
            str(r["incarnation"]),
            _gib(r["capacity_bytes"]),
            _gib(r["used_bytes"]),
            f"{100 * r['used_bytes'] / max(r['capacity_bytes'], 1):.1f}",
            str(r["blocks"]),
            "-" if r["hit_rate"] is None else f"{100 * r['hit_rate']:.1f}%",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from kvpool.doctor import EngineSpec, run_doctor

    engine = None
    if args.model:
        engine = EngineSpec(
            model=args.model,
            block_size=args.block_size,
            tensor_parallel_size=args.tensor_parallel_size,
            dtype=args.dtype,
            kv_cache_dtype=args.kv_cache_dtype,
            model_id=args.model_id,
        )
    return run_doctor(
        redis_url=args.redis,
        cluster=args.cluster,
        addresses=args.addresses,
        timeout=args.timeout,
        as_json=args.json,
        engine=engine,
    )


def _gib(n: int) -> str:
    """Human-readable bytes: 1.50 GiB, 12.0 MiB, 512 KiB."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.{2 if shift == 30 else 1}f} {unit}"
    return f"{n} B"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvpool", description="Distributed KV-cache pool for LLM inference."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("server", help="run a storage node")
    _add_server_flags(p)
    p.set_defaults(func=_cmd_server)

    p = sub.add_parser(
        "local", help="start a local cluster (redis + 3 nodes) and two vLLM engines that share it"
    )
    p.add_argument("--memory", default="256MiB", help="pool size of each local node")
    p.add_argument("--tokens", type=int, default=8192, help="tokens of the shared prompt prefix")
    p.add_argument(
        "--engines",
        choices=("vllm", "synthetic"),
        default="vllm",
        help="vllm: two vLLM engines on a local model; synthetic: block traffic without vLLM",
    )
    p.add_argument("--model", help="a local model directory (default: a tiny model made here)")
    p.add_argument("--serve", action="store_true", help="keep serving after the demo until Ctrl-C")
    p.set_defaults(func=_cmd_local)

    p = sub.add_parser("status", help="members, capacity, usage and hit rates of a cluster")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis URL of the cluster")
    p.add_argument("--cluster", default="default", help="cluster name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("stats", help="print a node's counters")
    p.add_argument("address", help="host:port of the node")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds")
    p.set_defaults(func=_cmd_stats)

    p = sub.add_parser(
        "doctor", help="check Redis, the cluster's members, nodes and this host; say what to fix"
    )
    p.add_argument("addresses", nargs="*", metavar="ADDRESS", help="more nodes (host:port)")
    p.add_argument("--redis", help="Redis URL of the cluster (checks Redis and the members)")
    p.add_argument("--cluster", default="default", help="cluster name (with --redis)")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds per network check")
    p.add_argument("--json", action="store_true", help="print a JSON list of the checks")
    g = p.add_argument_group(
        "connector namespace", "with --model: the block-key namespace of an engine on this host"
    )
    g.add_argument("--model", help="the model as given to vllm serve (a local directory or name)")
    g.add_argument("--model-id", default="", help="the connector's model_id setting, if set")
    g.add_argument("--block-size", type=int, help="vllm serve --block-size")
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm serve -tp")
    g.add_argument("--dtype", default="auto", help="vllm serve --dtype")
    g.add_argument("--kv-cache-dtype", default="auto", help="vllm serve --kv-cache-dtype")
    p.set_defaults(func=_cmd_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KVPoolError as e:
        print(f"kvpool: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # a broken install: name the missing piece, no traceback
        print(f"kvpool: error: {describe_import_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
