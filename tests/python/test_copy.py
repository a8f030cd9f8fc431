"""The copy engine over real torch tensors laid out like vLLM's KV caches (CPU and GPU layouts)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from kvpool.copy import KVLayout, cpu_engine, describe_layout, detect_layout, kv_regions
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


# -- every vLLM layout, byte for byte -------------------------------------------------------------
#
# Sizes chosen so num_blocks equals no other dimension (detection is unambiguous) and heads !=
# block_size (NHD and HND differ in their sizes' order too).

NB, LAYERS_X, BS, KV_HEADS, HEAD = 11, 3, 16, 4, 32
MLA_DIM = 512 + 64  # kv_lora_rank + rope_dim
DTYPES = [torch.bfloat16, torch.float16, torch.float8_e4m3fn]
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32}


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """A contiguous tensor of random bytes viewed as dtype (NaN patterns included: we compare
    bytes, never values)."""
    n = math.prod(shape) * dtype.itemsize
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)


def raw(t: torch.Tensor) -> torch.Tensor:
    """t's bits as integers (same shape and strides), so torch.equal compares bytes."""
    return t.view(_INT_OF_SIZE[t.element_size()])


def to_bytes(t: torch.Tensor) -> bytes:
    """The bytes of t in row-major order of its shape."""
    return bytes(raw(t).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


@dataclass
class Layout:
    """A KV cache as vLLM lays it out, with the object bytes written out by hand per layout."""

    tensors: list[torch.Tensor]
    block_dim: int
    # A layer's share of block b's object, from torch's own indexing.
    layer_bytes: Callable[[torch.Tensor, int], bytes]
    # The whole object of block b read straight off the backing buffer, where there is one.
    whole: Callable[[int], bytes] | None = None


def kv_planes(t: torch.Tensor, b: int) -> bytes:
    """[2, num_blocks, ...] in row-major memory: K's block then V's."""
    return to_bytes(t[0, b]) + to_bytes(t[1, b])


def flash_attn_nhd(dtype: torch.dtype, g: torch.Generator) -> Layout:
    tensors = [random_bits((2, NB, BS, KV_HEADS, HEAD), dtype, g) for _ in range(LAYERS_X)]
    return Layout(tensors, 1, kv_planes)


def flash_attn_hnd(dtype: torch.dtype, g: torch.Generator) -> Layout:
    # Memory [2, NB, heads, bs, d]; the backend's logical view [2, NB, bs, heads, d].
    tensors = [
        random_bits((2, NB, KV_HEADS, BS, HEAD), dtype, g).permute(0, 1, 3, 2, 4)
        for _ in range(LAYERS_X)
    ]
    assert tuple(tensors[0].shape) == (2, NB, BS, KV_HEADS, HEAD)

    def layer_bytes(t: torch.Tensor, b: int) -> bytes:
        # Memory order of the K (V) block is [heads, bs, d]: the logical block transposed.
        return to_bytes(t[0, b].transpose(0, 1)) + to_bytes(t[1, b].transpose(0, 1))

    return Layout(tensors, 1, layer_bytes)


def flashinfer_nhd(dtype: torch.dtype, g: torch.Generator) -> Layout:
    tensors = [random_bits((NB, 2, BS, KV_HEADS, HEAD), dtype, g) for _ in range(LAYERS_X)]
    return Layout(tensors, 0, lambda t, b: to_bytes(t[b]))


def flashinfer_hnd(dtype: torch.dtype, g: torch.Generator) -> Layout:
    tensors = [
        random_bits((NB, 2, KV_HEADS, BS, HEAD), dtype, g).permute(0, 1, 3, 2, 4)
        for _ in range(LAYERS_X)
    ]
    assert tuple(tensors[0].shape) == (NB, 2, BS, KV_HEADS, HEAD)
    # [2, heads, bs, d]: K's heads then V's.
    return Layout(tensors, 0, lambda t, b: to_bytes(t[b].transpose(1, 2)))


def mla(dtype: torch.dtype, g: torch.Generator) -> Layout:
    tensors = [random_bits((NB, BS, MLA_DIM), dtype, g) for _ in range(LAYERS_X)]
    return Layout(tensors, 0, lambda t, b: to_bytes(t[b]))


def vllm_cpu(dtype: torch.dtype, g: torch.Generator) -> Layout:
    tensors = [random_bits((2, NB, KV_HEADS, BS, HEAD), dtype, g) for _ in range(LAYERS_X)]
    return Layout(tensors, 1, kv_planes)


def kv_packed_nhd(dtype: torch.dtype, g: torch.Generator) -> Layout:
    # K and V side by side in the last dimension: logical [NB, heads, bs, 2 * d], memory
    # [NB, bs, heads, 2 * d] (vLLM's stride order (0, 2, 1, 3)).
    tensors = [
        random_bits((NB, BS, KV_HEADS, 2 * HEAD), dtype, g).permute(0, 2, 1, 3)
        for _ in range(LAYERS_X)
    ]
    return Layout(tensors, 0, lambda t, b: to_bytes(t[b].transpose(0, 1)))


def cross_layer(dtype: torch.dtype, g: torch.Generator) -> Layout:
    # One buffer [NB, layers, 2, bs, heads, d]; layer l is buf[:, l] ([NB, 2, bs, heads, d]).
    buf = random_bits((NB, LAYERS_X, 2, BS, KV_HEADS, HEAD), dtype, g)
    tensors = [buf[:, layer] for layer in range(LAYERS_X)]
    return Layout(tensors, 0, lambda t, b: to_bytes(t[b]), lambda b: to_bytes(buf[b]))


def cross_layer_flash_attn(dtype: torch.dtype, g: torch.Generator) -> Layout:
    # The same buffer seen as FlashAttention's [2, NB, bs, heads, d] per layer: the K/V
    # dimension's stride is smaller than the block's.
    buf = random_bits((NB, LAYERS_X, 2, BS, KV_HEADS, HEAD), dtype, g)
    tensors = [buf[:, layer].transpose(0, 1) for layer in range(LAYERS_X)]
    assert tuple(tensors[0].shape) == (2, NB, BS, KV_HEADS, HEAD)
    return Layout(tensors, 1, kv_planes, lambda b: to_bytes(buf[b]))


def cross_layer_mla(dtype: torch.dtype, g: torch.Generator) -> Layout:
    buf = random_bits((NB, LAYERS_X, BS, MLA_DIM), dtype, g)
    tensors = [buf[:, layer] for layer in range(LAYERS_X)]
    return Layout(tensors, 0, lambda t, b: to_bytes(t[b]), lambda b: to_bytes(buf[b]))


LAYOUTS: dict[str, Callable[[torch.dtype, torch.Generator], Layout]] = {
    f.__name__: f
    for f in (
        flash_attn_nhd,
        flash_attn_hnd,
        flashinfer_nhd,
        flashinfer_hnd,
        mla,
        vllm_cpu,
        kv_packed_nhd,
        cross_layer,
        cross_layer_flash_attn,
        cross_layer_mla,
    )
}


def make(name: str, dtype: torch.dtype, seed: int) -> Layout:
    return LAYOUTS[name](dtype, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_gathers_and_scatters_byte_for_byte(name: str, dtype: torch.dtype) -> None:
    source, target = make(name, dtype, 1), make(name, dtype, 2)
    before = [raw(t).clone() for t in target.tensors]
    src = cpu_engine(source.tensors, num_blocks=NB)
    dst = cpu_engine(target.tensors, num_blocks=NB)
    assert src.layout is not None and src.layout.block_dim == source.block_dim
    assert src.num_blocks == NB

    rng = random.Random(f"{name}/{dtype}")
    ids = [rng.randrange(NB) for _ in range(6)]
    ids += [NB - 1, ids[0], NB - 1]  # the last block, and repeats (a gather may repeat)
    rng.shuffle(ids)
    staging = torch.empty(len(ids) * src.object_bytes, dtype=torch.uint8)
    staging.fill_(0xA5)
    src.gather(ids, staging)
    size = src.object_bytes
    for i, b in enumerate(ids):
        got = staging[i * size : (i + 1) * size].numpy().tobytes()
        want = b"".join(source.layer_bytes(t, b) for t in source.tensors)
        assert len(want) == size
        assert got == want, f"object {i} (block {b})"
        if source.whole is not None:
            assert got == source.whole(b), f"object {i} (block {b}) vs the buffer"

    # Scatter into distinct blocks of a second cache of the same layout.
    dst_ids = rng.sample(range(NB), len(ids))
    dst.scatter(dst_ids, staging)
    moved = dict(zip(dst_ids, ids, strict=True))
    bd = target.block_dim
    for layer, (t, old, s) in enumerate(zip(target.tensors, before, source.tensors, strict=True)):
        for b in range(NB):
            got = raw(t).select(bd, b)
            want = raw(s).select(bd, moved[b]) if b in moved else old.select(bd, b)
            assert torch.equal(got, want), f"layer {layer} block {b}"


def test_regions_of_permuted_and_cross_layer_views() -> None:
    g = torch.Generator().manual_seed(0)
    hnd = flashinfer_hnd(torch.bfloat16, g).tensors
    regions = kv_regions(hnd, 0)
    assert len(regions) == LAYERS_X  # one run per layer: [2, heads, bs, d]
    assert all(r.bytes == 2 * BS * KV_HEADS * HEAD * 2 == r.stride for r in regions)
    fa = cross_layer_flash_attn(torch.bfloat16, g).tensors
    regions = kv_regions(fa, 1)
    plane = BS * KV_HEADS * HEAD * 2
    assert len(regions) == 2 * LAYERS_X
    assert [r.base - regions[0].base for r in regions] == [k * plane for k in range(6)]
    assert all(r.bytes == plane and r.stride == LAYERS_X * 2 * plane for r in regions)


def test_detect_layout_finds_the_block_dim_and_describes_the_bytes() -> None:
    def describe(name: str, dtype: torch.dtype = torch.bfloat16) -> str:
        layout = detect_layout(make(name, dtype, 0).tensors, NB)
        assert layout.block_dim == make(name, dtype, 0).block_dim
        return layout.description

    assert describe("flash_attn_nhd") == "L3/2/a16.b4.c32/bfloat16"
    assert describe("flash_attn_hnd") == "L3/2/b4.a16.c32/bfloat16"
    assert describe("flashinfer_nhd") == "L3/-/a2.b16.c4.d32/bfloat16"
    assert describe("flashinfer_hnd") == "L3/-/a2.c4.b16.d32/bfloat16"
    assert describe("mla", torch.float8_e4m3fn) == "L3/-/a16.b576/float8_e4m3fn"
    assert describe("vllm_cpu", torch.float16) == "L3/2/a4.b16.c32/float16"
    assert describe("kv_packed_nhd") == "L3/-/b16.a4.c64/bfloat16"
    # The cross-layer views store the same bytes as per-layer tensors of their logical layout.
    assert describe("cross_layer") == describe("flashinfer_nhd")
    assert describe("cross_layer_flash_attn") == describe("flash_attn_nhd")
    assert describe("cross_layer_mla") == describe("mla")
    for name in LAYOUTS:
        assert len({describe(name, dtype) for dtype in DTYPES}) == len(DTYPES), name


def test_nhd_and_hnd_differ_even_when_heads_equal_block_size() -> None:
    g = torch.Generator().manual_seed(0)
    n = 16
    nhd = [random_bits((2, NB, n, n, HEAD), torch.bfloat16, g)]
    hnd = [random_bits((2, NB, n, n, HEAD), torch.bfloat16, g).permute(0, 1, 3, 2, 4)]
    a, b = detect_layout(nhd, NB), detect_layout(hnd, NB)
    assert a.block_dim == b.block_dim == 1
    assert a.description == "L1/2/a16.b16.c32/bfloat16"
    assert b.description == "L1/2/b16.a16.c32/bfloat16"


def test_detect_layout_refuses_to_guess() -> None:
    g = torch.Generator().manual_seed(0)
    # num_blocks == block_size: [2, 16, 16, heads, d] can be cut at dimension 1 or 2.
    same = [random_bits((2, BS, BS, KV_HEADS, HEAD), torch.float16, g)]
    with pytest.raises(ValueError, match=r"shape \(2, 16, 16, 4, 32\).*dimensions \[1, 2\]"):
        detect_layout(same, BS)
    assert describe_layout(same, 1).block_dim == 1  # the caller who knows says so
    # ...but a same-sized dimension whose inner dimensions are not packed is no candidate.
    hnd = [random_bits((BS, 2, KV_HEADS, BS, HEAD), torch.float16, g).permute(0, 1, 3, 2, 4)]
    assert detect_layout(hnd, BS).block_dim == 0
    with pytest.raises(ValueError, match="no dimension of size 7"):
        detect_layout(same, 7)
    with pytest.raises(ValueError, match="at least one"):
        detect_layout([], NB)
    # The only candidate does not fit: its own error.
    gappy = [torch.zeros(2, KV_HEADS, NB, BS).transpose(1, 2)]
    with pytest.raises(ValueError, match="KV tensor 0 .* not packed"):
        detect_layout(gappy, NB)


def test_layers_that_differ_are_named() -> None:
    nhd = make("flash_attn_nhd", torch.bfloat16, 0).tensors
    hnd = make("flash_attn_hnd", torch.bfloat16, 0).tensors
    with pytest.raises(ValueError, match="KV tensor 1 .*'2/b4.a16.c32/bfloat16'.*tensor 0"):
        detect_layout([nhd[0], hnd[1], nhd[2]], NB)
    with pytest.raises(ValueError, match="KV tensor 2 .*float16.*tensor 0"):
        detect_layout([nhd[0], nhd[1], nhd[2].to(torch.float16)], NB)
    with pytest.raises(ValueError, match="KV tensor 1 .* has 10 blocks .* tensor 0 has 11"):
        detect_layout([nhd[0], nhd[1][:, :10]], NB)
    with pytest.raises(ValueError, match="KV tensor 1 .*tensor 0"):
        cpu_engine([nhd[0], hnd[1]], num_blocks=NB)
    # Given block_dim, cpu_engine keeps accepting layers that differ (as before).
    assert cpu_engine([nhd[0], hnd[1]], 1).layout is None


def test_overlaps_and_gaps_are_refused() -> None:
    run = torch.zeros(1, 64).expand(NB, 64)  # every block the same bytes
    with pytest.raises(
        ValueError,
        match=r"KV tensor 0 \(shape \(11, 64\), strides \(0, 1\)\).*"
        "blocks would overlap",
    ):
        kv_regions([run], 0)
    kv = torch.zeros(NB * 64 + 32).as_strided((2, NB, 64), (32, 64, 1))  # K and V runs overlap
    with pytest.raises(ValueError, match="KV tensor 0 .* dimension 0 .* would overlap"):
        kv_regions([kv], 1)
    # vLLM's HND cross-layer buffer [NB, heads, layers, 2, bs, d]: a layer's view is one run per
    # head, not per K/V (refused), but the whole buffer is one run per block.
    buf = torch.zeros(NB, KV_HEADS, LAYERS_X, 2, BS, HEAD, dtype=torch.bfloat16)
    views = [buf[:, :, layer].permute(2, 0, 3, 1, 4) for layer in range(LAYERS_X)]
    assert tuple(views[0].shape) == (2, NB, BS, KV_HEADS, HEAD)
    with pytest.raises(ValueError, match="KV tensor 0 .* not packed"):
        detect_layout(views, NB)
    whole = detect_layout([buf], NB)
    assert (whole.block_dim, whole.description) == (0, "L1/-/a4.b3.c2.d16.e32/bfloat16")


def test_cpu_engine_takes_block_dim_or_num_blocks() -> None:
    cache = vllm_cpu_cache()
    by_dim, detected = cpu_engine(cache, 1), cpu_engine(cache, num_blocks=BLOCKS)
    assert by_dim.layout is None
    assert detected.layout == KVLayout(1, "L3/2/a2.b32.c16/bfloat16")
    assert [(r.base, r.stride, r.bytes, r.num_blocks) for r in by_dim.regions] == [
        (r.base, r.stride, r.bytes, r.num_blocks) for r in detected.regions
    ]
    with pytest.raises(TypeError, match="exactly one"):
        cpu_engine(cache)
    with pytest.raises(TypeError, match="exactly one"):
        cpu_engine(cache, 1, num_blocks=BLOCKS)


def test_without_a_usable_device_the_cuda_engine_says_why() -> None:
    """Where no CUDA device can be used (here, and in CI), the CUDA engine is refused with the
    same reason cuda_unavailable_reason() gives, and bad layouts are refused before that."""
    from kvpool import copy
    from kvpool.errors import ErrorCode, KVPoolError

    if copy.cuda_available():
        pytest.skip("a CUDA device is usable here: tests/python/test_gpu.py copies with it")
    why = copy.cuda_unavailable_reason()
    assert why
    assert copy.torch_cuda_unavailable_reason()  # torch sees no device, or kvpool's reason
    cache = vllm_cpu_cache()
    with pytest.raises(KVPoolError) as e:
        copy.cuda_engine(cache, num_blocks=BLOCKS)
    assert e.value.code == ErrorCode.UNSUPPORTED and why in str(e.value)
    with pytest.raises(TypeError, match="exactly one"):
        copy.cuda_engine(cache)


def test_started_copies_are_waited_for_once() -> None:
    """start_gather / start_scatter return tickets; wait finishes each once (the CPU engine has
    copied already), and a ticket not in flight is refused by number."""
    cache, target = vllm_cpu_cache(seed=3), vllm_cpu_cache(seed=4)
    src, dst = cpu_engine(cache, 1), cpu_engine(target, 1)
    staging = torch.empty(2 * src.object_bytes, dtype=torch.uint8)
    ticket = src.start_gather([5, 2], staging)
    src.wait(ticket)
    with pytest.raises(InvalidArgumentError, match=f"copy ticket {ticket} is not a copy in flight"):
        src.wait(ticket)
    back = dst.start_scatter([0, 9], staging)
    dst.wait(back)
    for layer in range(LAYERS):
        assert torch.equal(target[layer][:, 0], cache[layer][:, 5])
        assert torch.equal(target[layer][:, 9], cache[layer][:, 2])
    with pytest.raises(InvalidArgumentError, match="appears more than once"):
        dst.start_scatter([1, 1], staging)
