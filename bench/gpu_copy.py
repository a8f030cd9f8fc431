#!/usr/bin/env python3
"""The CUDA copy engine against one contiguous cudaMemcpy of the same bytes (GPU only).

A KV cache shaped like Llama-3-8B's under vLLM's FlashAttention backend: 32 per-layer tensors
``[2, num_blocks, 16, 8, 128]`` bf16 (16-token blocks, 8 KV heads of 128; 128 KiB per token,
2 MiB per block object in 64 runs of 32 KiB). For each size (1k .. 32k tokens of blocks chosen
at random over the cache, all distinct) every round moves:

- gather: ``kvpool.copy.cuda_engine(...).gather(ids, staging)``, cache -> pinned host staging;
- memcpy D2H: ``staging.copy_(contiguous, non_blocking=True)`` of the same bytes from one
  contiguous CUDA tensor (one cudaMemcpyAsync), then a synchronise;
- scatter: ``engine.scatter(ids, staging)``, pinned staging -> cache;
- memcpy H2D: ``contiguous.copy_(staging, non_blocking=True)``, then a synchronise.

Each measurement is host wall time (perf_counter) from a synchronised device to the call's
return (the engine's calls return once their copies are done; the memcpys are followed by
``torch.cuda.synchronize()``). One warm-up round, then ``--rounds`` measured rounds; a cell is
the median round. Targets: gather >= 0.8x memcpy D2H and scatter >= 0.8x memcpy H2D (PASS or
MISS per row). After every round two gathered objects (the last, and a random one) are compared
with torch's own indexing of the cache, and two objects of the staging are overwritten with
fresh bytes before the scatter and read back from the cache with torch afterwards, so a broken
path cannot report a fast number.

Without a GPU (torch sees none, or kvpool's CUDA engine is unavailable) it prints
``no GPU: <reason>``, writes ``{"available": false, "reason": ...}`` and exits 0.

Usage:  python bench/gpu_copy.py [--quick] [--tokens 1024,4096] [--rounds 15]
            [--num-blocks N] [--json-out PATH]
Results: a table on stdout, progress on stderr, everything in bench/results/gpu_copy.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _util import log, run_main, run_meta

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_JSON = BENCH_DIR / "results" / "gpu_copy.json"
TOKENS = (1024, 2048, 4096, 8192, 16384, 32768)
QUICK_TOKENS = (1024, 4096, 32768)
TARGET = 0.8
SEED = 0x6B7670
GiB = 1 << 30


@dataclass(frozen=True)
class Plan:
    layers: int
    kv_heads: int
    head_size: int
    block_size: int
    dtype: str
    num_blocks: int
    tokens: tuple[int, ...]
    rounds: int
    target: float

    @property
    def run_bytes(self) -> int:  # one K or V block of one layer
        return self.block_size * self.kv_heads * self.head_size * 2  # bf16

    @property
    def object_bytes(self) -> int:
        return self.layers * 2 * self.run_bytes

    @property
    def cache_bytes(self) -> int:
        return self.num_blocks * self.object_bytes

    def blocks(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)


class BenchError(RuntimeError):
    """A copy moved the wrong bytes: its numbers are void."""


def unavailable_reason() -> str:
    """Why the CUDA engine cannot be used here ("" when it can)."""
    import kvpool.copy

    return kvpool.copy.torch_cuda_unavailable_reason()


def meta(plan: Plan, tools: Sequence[str] = ()) -> dict[str, Any]:
    """run_meta, also where git is not installed (a lent GPU machine may lack it)."""
    try:
        return run_meta(("kvpool", "torch", "numpy"), tools, plan)
    except OSError as e:
        return {"plan": dataclasses.asdict(plan), "meta_error": str(e), "command": sys.argv}


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else math.nan


class Bench:
    def __init__(self, plan: Plan) -> None:
        import kvpool.copy
        import numpy as np
        import torch

        self.torch, self.np, self.plan = torch, np, plan
        self.dev = torch.device("cuda")
        p = plan
        gen = torch.Generator(device=self.dev).manual_seed(SEED)
        shape = (2, p.num_blocks, p.block_size, p.kv_heads, p.head_size)
        self.layers = []
        for _ in range(p.layers):
            t = torch.empty(shape, dtype=torch.bfloat16, device=self.dev)
            t.view(torch.uint8).random_(0, 256, generator=gen)
            self.layers.append(t)
        max_bytes = p.blocks(max(p.tokens)) * p.object_bytes
        self.contiguous = torch.empty(max_bytes, dtype=torch.uint8, device=self.dev)
        self.contiguous.random_(0, 256, generator=gen)
        t0 = time.perf_counter()
        self.staging = torch.empty(max_bytes, dtype=torch.uint8, pin_memory=True)
        self.staging.fill_(0)  # resident before any timed copy
        log(f"pinned staging of {max_bytes / GiB:.2f} GiB in {time.perf_counter() - t0:.1f}s")
        self.engine = kvpool.copy.cuda_engine(self.layers, 1)
        if self.engine.object_bytes != p.object_bytes:
            raise BenchError(f"engine object {self.engine.object_bytes} B, want {p.object_bytes}")
        # The engine's copies start after the work queued on torch's stream (the cache fill).
        self.engine.set_compute_stream(torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        self.rng = np.random.default_rng(SEED)

    def block_bytes(self, block: int) -> Any:
        """Block ``block``'s object by torch's indexing, on the host (uint8)."""
        t = self.torch
        parts = [layer[:, block].reshape(-1).view(t.uint8) for layer in self.layers]
        return t.cat(parts).cpu()

    def timed(self, fn: Any) -> float:
        self.torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        self.torch.cuda.synchronize()
        return time.perf_counter() - t0

    def round(self, ids: list[int]) -> dict[str, float]:
        """One round of the four copies; checks one gathered and one scattered object."""
        t, p = self.torch, self.plan
        n, size = len(ids), p.object_bytes
        nbytes = n * size
        staging = self.staging[:nbytes]
        contig = self.contiguous[:nbytes]
        out: dict[str, float] = {}
        out["memcpy_d2h"] = self.timed(lambda: staging.copy_(contig, non_blocking=True))
        checked = sorted({int(self.rng.integers(n)), n - 1})  # a random object and the last
        for k in checked:  # only the gather can make these right
            staging[k * size : (k + 1) * size].fill_(0xA5)
        out["gather"] = self.timed(lambda: self.engine.gather(ids, staging))
        for k in checked:
            if not t.equal(staging[k * size : (k + 1) * size], self.block_bytes(ids[k])):
                raise BenchError(f"gather: object {k} (block {ids[k]}) differs from torch's bytes")
        out["memcpy_h2d"] = self.timed(lambda: contig.copy_(staging, non_blocking=True))
        checked = sorted({int(self.rng.integers(n)), n - 1})
        fresh = {}
        for k in checked:  # new bytes, so a scatter that moved nothing cannot pass
            fresh[k] = t.from_numpy(self.rng.integers(0, 256, size, dtype=self.np.uint8))
            staging[k * size : (k + 1) * size].copy_(fresh[k])
        out["scatter"] = self.timed(lambda: self.engine.scatter(ids, staging))
        for k in checked:
            if not t.equal(self.block_bytes(ids[k]), fresh[k]):
                raise BenchError(f"scatter: block {ids[k]} (object {k}) lacks the new bytes")
        return out

    def cell(self, tokens: int) -> dict[str, Any]:
        p = self.plan
        n = p.blocks(tokens)
        ids = [int(b) for b in self.rng.choice(p.num_blocks, size=n, replace=False)]
        nbytes = n * p.object_bytes
        self.round(ids)  # warm-up
        rounds = [self.round(ids) for _ in range(p.rounds)]
        med = {op: statistics.median(r[op] for r in rounds) for op in rounds[0]}
        row: dict[str, Any] = {
            "tokens": tokens,
            "blocks": n,
            "bytes": nbytes,
            "runs": n * p.layers * 2,
            "seconds": {op: [r[op] for r in rounds] for op in rounds[0]},
        }
        for op, s in med.items():
            row[f"{op}_gbps"] = gbps(nbytes, s)
            row[f"{op}_ms"] = s * 1e3
        row["gather_ratio"] = row["gather_gbps"] / row["memcpy_d2h_gbps"]
        row["scatter_ratio"] = row["scatter_gbps"] / row["memcpy_h2d_gbps"]
        row["gather_pass"] = row["gather_ratio"] >= p.target
        row["scatter_pass"] = row["scatter_ratio"] >= p.target
        return row


def device_info() -> dict[str, Any]:
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info()
    return {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_bytes": total,
        "free_bytes": free,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }


def fit_num_blocks(wanted: int, tokens: Sequence[int], object_bytes: int, block_size: int) -> int:
    """``wanted`` blocks, fewer when the GPU's free memory cannot hold them beside the
    contiguous buffer and 2 GiB of headroom; at least 1.5x the largest size's blocks."""
    import torch

    free, _ = torch.cuda.mem_get_info()
    largest = math.ceil(max(tokens) / block_size)
    room = (free - largest * object_bytes - 2 * GiB) // object_bytes
    least = math.ceil(1.5 * largest)
    if room < least:
        raise BenchError(
            f"the GPU has {free / GiB:.1f} GiB free: too little for a cache of {least} blocks "
            f"of {object_bytes >> 20} MiB and {largest} blocks of contiguous memory"
        )
    return int(min(wanted, room))


def print_table(report: dict[str, Any]) -> None:
    dev = report["device"]
    p = report["meta"]["plan"]
    print(
        f"CUDA copy engine vs one contiguous memcpy, {dev['name']} (torch {dev['torch']}, "
        f"CUDA {dev['torch_cuda']}); Llama-3-8B KV cache, {p['layers']} layers "
        f"[2, {p['num_blocks']}, {p['block_size']}, {p['kv_heads']}, {p['head_size']}] bf16, "
        f"{report['cache_gib']:.1f} GiB; median of {p['rounds']} rounds; GB = 1e9 bytes"
    )
    head = (
        f"{'tokens':>7} {'blocks':>6} {'MiB':>6} | {'gather':>7} {'D2H':>7} {'ratio':>6} "
        f"{'':4} | {'scatter':>7} {'H2D':>7} {'ratio':>6} {'':4}"
    )
    print("GB/s: the engine's gather / scatter, and one contiguous memcpy (D2H / H2D)")
    print(head)
    print("-" * len(head))
    for r in report["rows"]:
        print(
            f"{r['tokens']:>7} {r['blocks']:>6} {r['bytes'] / (1 << 20):>6.0f} | "
            f"{r['gather_gbps']:>7.2f} {r['memcpy_d2h_gbps']:>7.2f} {r['gather_ratio']:>5.2f}x "
            f"{'PASS' if r['gather_pass'] else 'MISS':4} | "
            f"{r['scatter_gbps']:>7.2f} {r['memcpy_h2d_gbps']:>7.2f} {r['scatter_ratio']:>5.2f}x "
            f"{'PASS' if r['scatter_pass'] else 'MISS':4}"
        )
    rows = report["rows"]
    passed = sum(r["gather_pass"] + r["scatter_pass"] for r in rows)
    print(f"Targets: >= {TARGET}x memcpy both directions: {passed}/{2 * len(rows)} PASS")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"tokens {QUICK_TOKENS}, 5 rounds")
    p.add_argument("--tokens", help="comma-separated token counts (default: 1k..32k)")
    p.add_argument("--rounds", type=int, help="measured rounds per size (default 15; quick 5)")
    p.add_argument(
        "--num-blocks",
        type=int,
        default=4096,
        help="cache blocks of 2 MiB (default %(default)s: 8 GiB; fewer if the GPU lacks room)",
    )
    p.add_argument("--json-out", default=str(DEFAULT_JSON), help="default: %(default)s")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tokens = (
        tuple(int(x) for x in args.tokens.split(",") if x.strip())
        if args.tokens
        else (QUICK_TOKENS if args.quick else TOKENS)
    )
    rounds = args.rounds or (5 if args.quick else 15)
    if not tokens or min(tokens) < 1 or rounds < 1 or args.num_blocks < 1:
        raise SystemExit("--tokens, --rounds and --num-blocks must be positive")
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plan = Plan(32, 8, 128, 16, "bfloat16", args.num_blocks, tokens, rounds, TARGET)
    started = time.time()

    why = unavailable_reason()
    if why:
        report: dict[str, Any] = {
            "available": False,
            "reason": why,
            "meta": meta(plan),
        }
        out.write_text(json.dumps(report, indent=1))
        print(f"no GPU: {why}")
        print(f"JSON: {out}")
        return 0

    try:
        num_blocks = fit_num_blocks(plan.num_blocks, tokens, plan.object_bytes, plan.block_size)
        if num_blocks < math.ceil(max(tokens) / plan.block_size):
            raise BenchError(f"{num_blocks} blocks cannot hold {max(tokens)} tokens")
        if num_blocks != plan.num_blocks:
            log(f"the GPU holds {num_blocks} cache blocks, not {plan.num_blocks}")
            plan = dataclasses.replace(plan, num_blocks=num_blocks)
        report = {
            "available": True,
            "meta": {
                **meta(plan, ("nvidia-smi",)),
                "units": "GB/s with GB = 1e9 bytes; ms per call (median)",
                "timing": "perf_counter from a synchronised device to the call's return "
                "(memcpy: after torch.cuda.synchronize())",
            },
            "device": device_info(),
            "cache_gib": plan.cache_bytes / GiB,
            "target": TARGET,
        }
        log(
            f"{report['device']['name']}: cache {plan.layers} x [2, {plan.num_blocks}, "
            f"{plan.block_size}, {plan.kv_heads}, {plan.head_size}] bf16 "
            f"({plan.cache_bytes / GiB:.1f} GiB), tokens {list(tokens)}, {rounds} rounds"
        )
        bench = Bench(plan)
        rows = []
        for n in tokens:
            t0 = time.perf_counter()
            row = bench.cell(n)
            rows.append(row)
            log(
                f"  {n:>6} tokens: gather {row['gather_gbps']:.2f} / D2H "
                f"{row['memcpy_d2h_gbps']:.2f} GB/s ({row['gather_ratio']:.2f}x), scatter "
                f"{row['scatter_gbps']:.2f} / H2D {row['memcpy_h2d_gbps']:.2f} GB/s "
                f"({row['scatter_ratio']:.2f}x) [{time.perf_counter() - t0:.1f}s]"
            )
        report["rows"] = rows
        report["all_pass"] = all(r["gather_pass"] and r["scatter_pass"] for r in rows)
    except BenchError as e:
        report = {
            "available": True,
            "error": str(e),
            "meta": meta(plan),
        }
        out.write_text(json.dumps(report, indent=1))
        print(f"gpu_copy.py: {e}", file=sys.stderr)
        return 1
    report["meta"]["duration_s"] = round(time.time() - started, 1)
    out.write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"JSON: {out}  ({report['meta']['duration_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    run_main(main)
