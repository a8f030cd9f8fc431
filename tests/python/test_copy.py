"""The copy engine over real torch tensors laid out like vLLM's CPU KV cache."""

from __future__ import annotations

import pytest
import torch
from kvpool.copy import cpu_engine, kv_regions
from kvpool.errors import InvalidArgumentError

LAYERS, BLOCKS, HEADS, BLOCK_TOKENS, HEAD_DIM = 3, 10, 2, 32, 16


def vllm_cpu_cache(dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> list[torch.Tensor]:
    """Per-layer [2, num_blocks, heads, block_tokens, head_dim] tensors with distinct values."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(2, BLOCKS, HEADS, BLOCK_TOKENS, HEAD_DIM, generator=g).to(dtype)
        for _ in range(LAYERS)
    ]


def stored_object(cache: list[torch.Tensor], block: int) -> bytes:
    """The object layout, written out by hand: per layer, K then V of the block."""
    return b"".join(
        t[kv, block].contiguous().view(torch.uint8).numpy().tobytes()
        for t in cache
        for kv in (0, 1)
    )


def test_gather_matches_the_object_layout() -> None:
    cache = vllm_cpu_cache()
    engine = cpu_engine(cache, block_dim=1)
    per_plane = HEADS * BLOCK_TOKENS * HEAD_DIM * 2
    assert engine.object_bytes == LAYERS * 2 * per_plane
    assert engine.num_blocks == BLOCKS and engine.device == "cpu"
    assert len(engine.regions) == LAYERS * 2
    ids = [7, 0, 9, 3]
    staging = torch.empty(len(ids) * engine.object_bytes, dtype=torch.uint8)
    engine.gather(ids, staging)
    for i, b in enumerate(ids):
        got = staging[i * engine.object_bytes : (i + 1) * engine.object_bytes].numpy().tobytes()
        assert got == stored_object(cache, b), f"object {i} (block {b})"


def test_scatter_restores_blocks_bit_exactly_and_touches_nothing_else() -> None:
    source, target = vllm_cpu_cache(seed=1), vllm_cpu_cache(seed=2)
    untouched = [t.clone() for t in target]
    src, dst = cpu_engine(source, 1), cpu_engine(target, 1)
    staging = bytearray(3 * src.object_bytes)
    src.gather(torch.tensor([4, 5, 6], dtype=torch.int64).numpy(), staging)
    dst.scatter([1, 8, 2], bytes(staging))
    moved = {1: 4, 8: 5, 2: 6}
    for layer in range(LAYERS):
        for b in range(BLOCKS):
            want = source[layer][:, moved[b]] if b in moved else untouched[layer][:, b]
            assert torch.equal(target[layer][:, b], want), f"layer {layer} block {b}"


def test_block_major_layout_and_threads() -> None:
    # [num_blocks, 2, ...] (block_dim 0): one region per layer; threads split the copy.
    cache = [
        torch.arange(BLOCKS * 2 * 64, dtype=torch.float32).reshape(BLOCKS, 2, 64) + i
        for i in range(2)
    ]
    assert len(kv_regions(cache, 0)) == 2
    serial, threaded = cpu_engine(cache, 0), cpu_engine(cache, 0, threads=2, parallel_bytes=0)
    a = torch.empty(BLOCKS * serial.object_bytes, dtype=torch.uint8)
    b = torch.empty_like(a)
    order = list(reversed(range(BLOCKS)))
    serial.gather(order, a)
    threaded.gather(order, b)
    assert torch.equal(a, b)
    first = a[: serial.object_bytes].view(torch.float32)
    assert torch.equal(
        first, torch.cat([cache[0][BLOCKS - 1].flatten(), cache[1][BLOCKS - 1].flatten()])
    )


def test_bad_calls_raise_and_leave_the_cache_intact() -> None:
    cache = vllm_cpu_cache()
    before = [t.clone() for t in cache]
    engine = cpu_engine(cache, 1)
    staging = torch.zeros(2 * engine.object_bytes, dtype=torch.uint8)
    with pytest.raises(InvalidArgumentError, match=f"block id {BLOCKS} .* outside the cache's"):
        engine.scatter([0, BLOCKS], staging)
    with pytest.raises(InvalidArgumentError, match="block id 3 appears more than once"):
        engine.scatter([3, 3], staging)
    with pytest.raises(InvalidArgumentError, match="staging holds"):
        engine.scatter([0, 1, 2], staging)
    with pytest.raises(InvalidArgumentError, match="block 1 = -2 is outside"):
        engine.gather([0, -2], staging)
    with pytest.raises(
        InvalidArgumentError, match="staging .bytes. is not a C-contiguous writable"
    ):
        engine.gather([0], bytes(engine.object_bytes))
    assert all(torch.equal(a, b) for a, b in zip(cache, before, strict=True))


def test_layouts_that_are_not_one_run_per_block_are_refused() -> None:
    t = torch.zeros(2, HEADS, BLOCKS, BLOCK_TOKENS)  # blocks inside heads
    with pytest.raises(ValueError, match="KV tensor 0 .* not packed"):
        kv_regions([t.transpose(1, 2)], block_dim=1)
    with pytest.raises(ValueError, match="block_dim 5 outside"):
        kv_regions([t], block_dim=5)
    with pytest.raises(ValueError, match="at least one"):
        kv_regions([], block_dim=0)
