"""The main job's engines: two vLLM engines, one after the other in fresh processes, on a local
model. Engine A computes a long prompt and stores its KV blocks in the cluster; engine B sees the
same prefix with another question after it and loads the prefix instead of computing it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kvpool.errors import KVPoolError

__all__ = ["default_model_dir", "run_demo"]

_BLOCK = 32


def default_model_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "kvpool" / "models" / "tiny-llama"


def _prompts(model: Path, tokens: int) -> tuple[list[int], list[int]]:
    from transformers import AutoTokenizer

    from kvpool.vllm.tiny_model import sample_text

    tok = AutoTokenizer.from_pretrained(str(model))
    words = tokens  # a word is at least one token
    prefix = tok(sample_text(words, seed=1))["input_ids"][:tokens]
    if len(prefix) < tokens:
        raise KVPoolError(f"could not build a {tokens}-token prompt")
    q_a = tok(" question one: " + sample_text(40, seed=2))["input_ids"][:48]
    q_b = tok(" question two: " + sample_text(40, seed=3))["input_ids"][:48]
    return prefix + q_a, prefix + q_b


def _engine(
    label: str, model: Path, prompt: list[int], redis_url: str, cluster: str, work: Path
) -> dict[str, Any]:
    prompts, out, log = (work / f"{label}.{ext}" for ext in ("prompts.json", "json", "log"))
    prompts.write_text(json.dumps([prompt]))
    argv = [
        sys.executable, "-m", "kvpool.vllm.runner", "--model", str(model),
        "--prompts", str(prompts), "--out", str(out), "--redis-url", redis_url,
        "--cluster", cluster, "--block-size", str(_BLOCK), "--max-tokens", "8",
        "--max-model-len", str(len(prompt) + 64), "--kv-cache-bytes", str(256 << 20),
    ]  # fmt: skip
    t = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if rc.returncode != 0:
        raise KVPoolError(f"engine {label} exited with {rc.returncode}; its log: {log}")
    report: dict[str, Any] = json.loads(out.read_text())
    report["process_s"] = time.perf_counter() - t
    report["log"] = str(log)
    return report


def run_demo(redis_url: str, cluster: str, *, tokens: int, model: str | None = None) -> None:
    """Runs engine A then engine B against the cluster and prints what B reused."""
    from kvpool.vllm.tiny_model import make_model

    t = time.perf_counter()
    model_dir = Path(model) if model else make_model(default_model_dir(), "tiny")
    print(f"model: {model_dir} (ready in {time.perf_counter() - t:.1f} s)", flush=True)
    prompt_a, prompt_b = _prompts(model_dir, tokens)
    work = Path(tempfile.mkdtemp(prefix="kvpool-local-"))
    print(
        f"engine A: a fresh vLLM process, prompt of {len(prompt_a)} tokens "
        f"({tokens}-token shared prefix + its own question) ...",
        flush=True,
    )
    a = _engine("A", model_dir, prompt_a, redis_url, cluster, work)
    ra, ca = a["results"][0], a["connector"]["worker"]
    print(
        f"engine A: TTFT {ra['ttft_s'] * 1e3:.0f} ms, computed all {ra['prompt_tokens']} tokens, "
        f"stored {ca['saved_blocks']} blocks ({ca['saved_bytes'] / 2**20:.1f} MiB) in kvpool "
        f"(engine start {a['startup_s']:.0f} s)",
        flush=True,
    )
    print(f"engine B: a fresh vLLM process, prompt of {len(prompt_b)} tokens ...", flush=True)
    b = _engine("B", model_dir, prompt_b, redis_url, cluster, work)
    rb, cb = b["results"][0], b["connector"]["worker"]
    hit = b["connector"]["scheduler"]["hit_tokens"]
    load_ms = cb["load_seconds"] * 1e3
    print(
        f"engine B: loaded {hit} of {rb['prompt_tokens']} prompt tokens from kvpool instead of "
        f"computing them ({cb['loaded_blocks']} blocks, {cb['loaded_bytes'] / 2**20:.1f} MiB "
        f"in {load_ms:.0f} ms); TTFT {rb['ttft_s'] * 1e3:.0f} ms",
        flush=True,
    )
    print(
        f"TTFT: engine A {ra['ttft_s'] * 1e3:.0f} ms (cold), engine B {rb['ttft_s'] * 1e3:.0f} ms "
        f"(prefix from kvpool): {ra['ttft_s'] / max(rb['ttft_s'], 1e-9):.1f}x faster; "
        f"engine logs in {work}",
        flush=True,
    )
