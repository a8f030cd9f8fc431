"""The ``kvpool`` command line: ``kvpool server``, ``kvpool local``, ``kvpool stats``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from kvpool.config import ServerConfig
from kvpool.errors import KVPoolError

log = logging.getLogger("kvpool")


def _add_server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file with server settings (also KVPOOL_CONFIG)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default 7070; 0 picks a free one)")
    p.add_argument("--memory", help="pool size, e.g. 4GiB (default 1GiB)")
    p.add_argument("--eviction", choices=["s3fifo", "lru"], help="eviction policy (default s3fifo)")
    p.add_argument(
        "--high-watermark",
        type=float,
        dest="high_watermark",
        help="fraction of the pool kept in use at most (default 0.95)",
    )
    p.add_argument("--hugepages", choices=["auto", "on", "off"], help="back the pool by hugepages")
    p.add_argument("--log-level", dest="log_level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--redis", help="Redis URL of the cluster metadata (enables membership)")
    p.add_argument("--cluster", help="cluster name (default 'default')")
    p.add_argument("--node-id", dest="node_id", help="node id (default: from the address)")
    p.add_argument("--advertise", help="host:port clients reach this node at (default host:port)")
    p.add_argument("--lease-ttl", dest="lease_ttl", type=float, help="seconds (default 3)")


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
    return run_local(serve_forever=args.serve, memory=args.memory, prompt_tokens=args.tokens)


def _cmd_stats(args: argparse.Namespace) -> int:
    from kvpool.client import Client

    with Client(args.address, timeout=args.timeout) as client:
        stats = client.stats()
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
    else:
        width = max(len(k) for k in stats)
        for key in sorted(stats):
            print(f"{key:<{width}}  {stats[key]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvpool", description="Distributed KV-cache pool for LLM inference."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("server", help="run a storage node")
    _add_server_flags(p)
    p.set_defaults(func=_cmd_server)

    p = sub.add_parser("local", help="start a local node and run a demo workload against it")
    p.add_argument("--memory", default="512MiB", help="pool size of the local node")
    p.add_argument("--tokens", type=int, default=16384, help="tokens of the demo prompt")
    p.add_argument("--serve", action="store_true", help="keep serving after the demo until Ctrl-C")
    p.set_defaults(func=_cmd_local)

    p = sub.add_parser("stats", help="print a node's counters")
    p.add_argument("address", help="host:port of the node")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds")
    p.set_defaults(func=_cmd_stats)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KVPoolError as e:
        print(f"kvpool: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
