"""Runs one offline vLLM engine over a list of prompts and reports what happened, as JSON.

The main job, the end-to-end tests and bench/ttft.py start each engine with this module in a
fresh process (a real engine that shares nothing with the one before it but the cluster)::

    python -m kvpool.vllm.runner --model DIR --prompts prompts.json --out result.json \\
        [--redis-url redis://127.0.0.1:6379/0 --cluster NAME]

``prompts.json`` holds a list of prompts, each a list of token ids. Prompts run one at a time
(so each time-to-first-token is its own); outputs are greedy. Without ``--redis-url`` the engine
runs without kvpool (the reference).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["kv_transfer_config", "run_engine"]


def kv_transfer_config(redis_url: str, cluster: str, **extra: Any) -> dict[str, Any]:
    """The ``--kv-transfer-config`` value that loads KVPoolConnector."""
    return {
        "kv_connector": "KVPoolConnector",
        "kv_connector_module_path": "kvpool.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"redis_url": redis_url, "cluster": cluster, **extra},
    }


def run_engine(
    model: str,
    prompts: list[list[int]],
    *,
    kv_config: dict[str, Any] | None,
    max_tokens: int = 16,
    block_size: int = 32,
    kv_cache_bytes: int = 256 << 20,
    max_model_len: int = 16384,
    enable_prefix_caching: bool = True,
    eager: bool = False,
    tp: int = 1,
    dtype: str = "auto",
) -> dict[str, Any]:
    """Starts an engine in this process, runs ``prompts`` one by one, returns the report."""
    # One process: the connector's worker side is reachable for flush() and stats below.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(
        model=model,
        tokenizer=model,
        dtype=dtype,  # type: ignore[arg-type]
        block_size=block_size,
        max_model_len=max_model_len,
        max_num_batched_tokens=max_model_len,
        kv_cache_memory_bytes=kv_cache_bytes,
        enable_prefix_caching=enable_prefix_caching,
        kv_transfer_config=KVTransferConfig(**kv_config) if kv_config else None,
        disable_log_stats=False,
        enforce_eager=eager,
        tensor_parallel_size=tp,
        seed=0,
    )
    startup = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    results = []
    before = _counters(llm) if kv_config else {}
    for tokens in prompts:
        t = time.perf_counter()
        (out,) = llm.generate([TokensPrompt(prompt_token_ids=tokens)], params, use_tqdm=False)
        wall = time.perf_counter() - t
        metrics = out.metrics
        ttft = getattr(metrics, "first_token_latency", 0.0) if metrics is not None else 0.0
        results.append(
            {
                "prompt_tokens": len(tokens),
                "output": list(out.outputs[0].token_ids),
                "cached_tokens": int(out.num_cached_tokens or 0),
                "ttft_s": float(ttft) or wall,
                "wall_s": wall,
            }
        )
        if kv_config:  # this prompt's share of the counters (read after the timed call)
            after = _counters(llm)
            results[-1]["connector"] = {k: v - before.get(k, 0) for k, v in after.items()}
            before = after
    report: dict[str, Any] = {"startup_s": startup, "results": results}
    if kv_config:
        report["connector"] = _connector_report(llm)
    return report


def _count(worker: Any) -> dict[str, Any]:
    """Runs in each worker: its counters so far (saves may still be in flight)."""
    from vllm.distributed.kv_transfer.kv_transfer_state import get_kv_transfer_group

    return dict(get_kv_transfer_group().totals.reduce())  # type: ignore[attr-defined]


def _counters(llm: Any) -> dict[str, float]:
    """The workers' counters summed over ranks, and the scheduler's lookup counters."""
    out: dict[str, float] = {}
    for rank in llm.collective_rpc(_count):
        for k, v in rank.items():
            if not k.endswith("GBps"):
                out[k] = out.get(k, 0) + v
    scheduler = _scheduler_connector(llm)
    if scheduler is not None:
        for k in ("lookups", "lookup_tokens", "hit_tokens", "lookup_errors", "lookup_seconds"):
            out[k] = scheduler.totals.data.get(k, 0)
    return out


def _scheduler_connector(llm: Any) -> Any:
    """The scheduler-side connector when the engine core runs in this process, else None."""
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)
    return getattr(getattr(core, "scheduler", None), "connector", None)


def _flush_and_count(worker: Any) -> dict[str, Any]:
    """Runs in each worker (``LLM.collective_rpc``): waits for its background saves, returns
    its counters."""
    from vllm.distributed.kv_transfer.kv_transfer_state import get_kv_transfer_group

    from kvpool.vllm.connector import KVPoolConnector

    connector = get_kv_transfer_group()
    assert isinstance(connector, KVPoolConnector)
    flushed = connector.flush()
    return {"flushed": flushed, **connector.totals.reduce()}


def _connector_report(llm: Any) -> dict[str, Any]:
    """Both sides' counters; the workers' summed over TP ranks (``ranks`` has each one)."""
    from kvpool.vllm.connector import KVPoolConnectorStats

    ranks = llm.collective_rpc(_flush_and_count)
    summed = KVPoolConnectorStats()
    for r in ranks:  # counters add up over ranks; rates (GBps) are derived again from the sums
        summed.add(**{k: v for k, v in r.items() if k != "flushed" and not k.endswith("GBps")})
    out: dict[str, Any] = {
        "flushed": all(r["flushed"] for r in ranks),
        "worker": summed.reduce(),
        "ranks": ranks,
    }
    scheduler = _scheduler_connector(llm)
    if scheduler is not None:
        out["scheduler"] = scheduler.totals.reduce()
        out["namespace"] = dataclasses.asdict(scheduler.namespace)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True, help="JSON file: a list of token-id lists")
    p.add_argument("--out", required=True, help="where the JSON report goes")
    p.add_argument("--redis-url", default="", help="the cluster's Redis; empty: no kvpool")
    p.add_argument("--cluster", default="default")
    p.add_argument("--extra", default="{}", help="more kv_connector_extra_config, as JSON")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--kv-cache-bytes", type=int, default=256 << 20)
    p.add_argument("--max-model-len", type=int, default=16384)
    p.add_argument("--eager", action="store_true", help="no torch.compile: starts faster")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument(
        "--dtype", default="auto", help="model dtype (auto: vLLM's choice, bfloat16 on CPU)"
    )
    args = p.parse_args(argv)
    prompts = json.loads(Path(args.prompts).read_text())
    kv_config = (
        kv_transfer_config(args.redis_url, args.cluster, **json.loads(args.extra))
        if args.redis_url
        else None
    )
    report = run_engine(
        args.model,
        prompts,
        kv_config=kv_config,
        max_tokens=args.max_tokens,
        block_size=args.block_size,
        kv_cache_bytes=args.kv_cache_bytes,
        max_model_len=args.max_model_len,
        eager=args.eager,
        tp=args.tp,
        dtype=args.dtype,
    )
    Path(args.out).write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
