"""The CUDA copy engine on a real GPU: KV blocks between device caches and host staging.

Every test is marked ``gpu``; the module skips, with the reason, where torch sees no CUDA device
or kvpool's CUDA engine is not usable (not built, no runtime, no device). The reference for every
copy is torch's own indexing of the same cache (on byte views, so fp8 and NaN bit patterns are
plain bytes), copied to host. A block's object is, for each layer in order, for each index of
the dimensions before the block dimension (K then V), the block's bytes in memory order.

Layouts: FlashAttention ``[2, num_blocks, block_size, heads, head_size]`` (and its HND view),
FlashInfer ``[num_blocks, 2, block_size, heads, head_size]``, MLA ``[num_blocks, block_size,
576]`` and a cross-layer buffer ``[num_blocks, layers, 2, block_size, heads, head_size]`` whose
per-layer views ``buf[:, l]`` are the tensors; bf16, fp16 and fp8 (e4m3). Then blocks from a GPU
through a real ``kvpool server`` and back into another GPU cache, over TCP and shared memory.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import kvpool
import kvpool.copy
import numpy as np
import pytest
from conftest import ServerFactory, assert_nothing_held, random_keys
from kvpool.errors import InvalidArgumentError

torch = pytest.importorskip("torch", reason="torch is not installed")

pytestmark = pytest.mark.gpu


def _unavailable() -> str:
    """Why the CUDA engine cannot be used here ("" when it can)."""
    return kvpool.copy.torch_cuda_unavailable_reason()


_WHY = _unavailable()
if _WHY:
    pytest.skip(_WHY, allow_module_level=True)

DEV = torch.device("cuda")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}
LAYERS, NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_SIZE = 3, 97, 16, 4, 64
MLA_WIDTH = 576  # kv_lora_rank 512 + rope 64


@dataclass
class Cache:
    """A KV cache: the tensors the engine is given, and the same memory as memory-order tensors
    with the same block dimension (what the reference indexes)."""

    tensors: list[Any]
    memory: list[Any]
    block_dim: int
    keep: list[Any]  # what owns the memory


def _filled(shape: Sequence[int], dtype: Any, fill: str, gen: Any) -> Any:
    """A CUDA tensor of ``shape`` made as bytes (random: any bit pattern, NaNs and all; or
    zeros), viewed as ``dtype``, so no kernel of ``dtype`` (fp8 has few) is needed."""
    elem = torch.empty((), dtype=dtype).element_size()
    *outer, last = shape
    size = (*outer, last * elem)
    if fill == "random":
        raw = torch.randint(0, 256, size, dtype=torch.uint8, device=DEV, generator=gen)
    else:
        raw = torch.zeros(size, dtype=torch.uint8, device=DEV)
    return raw.view(dtype)


def flash_attn(dtype: Any, fill: str, gen: Any) -> Cache:
    ts = [
        _filled((2, NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_SIZE), dtype, fill, gen)
        for _ in range(LAYERS)
    ]
    return Cache(ts, ts, 1, ts)


def flash_attn_hnd(dtype: Any, fill: str, gen: Any) -> Cache:
    """The logical FlashAttention shape over memory laid out [2, num_blocks, heads, bs, d]."""
    mem = [
        _filled((2, NUM_BLOCKS, HEADS, BLOCK_SIZE, HEAD_SIZE), dtype, fill, gen)
        for _ in range(LAYERS)
    ]
    return Cache([m.transpose(2, 3) for m in mem], mem, 1, mem)


def flashinfer(dtype: Any, fill: str, gen: Any) -> Cache:
    ts = [
        _filled((NUM_BLOCKS, 2, BLOCK_SIZE, HEADS, HEAD_SIZE), dtype, fill, gen)
        for _ in range(LAYERS)
    ]
    return Cache(ts, ts, 0, ts)


def mla(dtype: Any, fill: str, gen: Any) -> Cache:
    ts = [_filled((NUM_BLOCKS, BLOCK_SIZE, MLA_WIDTH), dtype, fill, gen) for _ in range(LAYERS)]
    return Cache(ts, ts, 0, ts)


def cross_layer(dtype: Any, fill: str, gen: Any) -> Cache:
    """One buffer [num_blocks, layers, 2, bs, heads, d]; the layers are its views buf[:, l]."""
    buf = _filled((NUM_BLOCKS, LAYERS, 2, BLOCK_SIZE, HEADS, HEAD_SIZE), dtype, fill, gen)
    views = [buf[:, layer] for layer in range(LAYERS)]
    return Cache(views, views, 0, [buf])


LAYOUTS: dict[str, Callable[[Any, str, Any], Cache]] = {
    "flash_attn": flash_attn,
    "flash_attn_hnd": flash_attn_hnd,
    "flashinfer": flashinfer,
    "mla": mla,
    "cross_layer": cross_layer,
}


def _bytes(t: Any) -> Any:
    """A uint8 view of ``t`` (same dimensions, the last one times the element size)."""
    return t.view(torch.uint8)


def reference(cache: Cache, ids: Sequence[int]) -> Any:
    """[len(ids), object_bytes] uint8 on the host: each block's object by torch's indexing."""
    idx = torch.tensor(list(ids), dtype=torch.long, device=DEV)
    parts = []
    for m in cache.memory:
        sel = _bytes(m).index_select(cache.block_dim, idx)  # [lead..., n, inner...]
        parts.append(sel.movedim(cache.block_dim, 0).reshape(len(ids), -1))
    return torch.cat(parts, dim=1).cpu()


def blocks_of(cache: Cache, ids: Sequence[int]) -> list[Any]:
    """Per layer, the blocks ``ids`` of the cache's memory as uint8 (on the device)."""
    idx = torch.tensor(list(ids), dtype=torch.long, device=DEV)
    return [_bytes(m).index_select(cache.block_dim, idx) for m in cache.memory]


def assert_holds_exactly(dst: Cache, src: Cache, ids: Sequence[int]) -> None:
    """``dst`` has ``src``'s bytes in blocks ``ids`` and zeros in every other block."""
    torch.cuda.synchronize()
    for layer, (got, want) in enumerate(zip(blocks_of(dst, ids), blocks_of(src, ids), strict=True)):
        if not torch.equal(got, want):
            bad = [
                b
                for k, b in enumerate(ids)
                if not torch.equal(got.select(dst.block_dim, k), want.select(src.block_dim, k))
            ]
            raise AssertionError(f"layer {layer}: blocks {bad[:10]} differ from the source")
    others = sorted(set(range(NUM_BLOCKS)) - set(ids))
    for layer, rest in enumerate(blocks_of(dst, others)):
        nonzero = int(torch.count_nonzero(rest))
        assert nonzero == 0, f"layer {layer}: {nonzero} bytes written outside the scattered blocks"


def object_bytes(cache: Cache) -> int:
    per_block = 0
    for m in cache.memory:
        per_block += _bytes(m).numel() // m.shape[cache.block_dim]
    return per_block


def pinned(n: int, width: int) -> Any:
    return torch.empty((n, width), dtype=torch.uint8).pin_memory()


def gather_ids(rng: np.random.Generator) -> list[int]:
    """Random ids with repeats, the first and the last block among them."""
    ids = [int(i) for i in rng.integers(0, NUM_BLOCKS, size=40)]
    ids += [NUM_BLOCKS - 1, ids[3], 0, NUM_BLOCKS - 1]
    return ids


def scatter_ids(rng: np.random.Generator, n: int = 33) -> list[int]:
    """Distinct random ids in random order, the last block among them."""
    ids = [int(i) for i in rng.permutation(NUM_BLOCKS - 1)[: n - 1]]
    ids.insert(n // 2, NUM_BLOCKS - 1)
    return ids


@pytest.fixture
def gen() -> Any:
    return torch.Generator(device=DEV).manual_seed(1234)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gather_and_scatter_match_torch_indexing(layout: str, dtype: str, gen: Any) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{layout}/{dtype}".encode()))
    src = LAYOUTS[layout](DTYPES[dtype], "random", gen)
    engine = kvpool.copy.cuda_engine(src.tensors, src.block_dim)
    assert engine.device == "cuda"
    assert engine.num_blocks == NUM_BLOCKS
    assert engine.object_bytes == object_bytes(src)
    torch.cuda.synchronize()  # the random fill is on torch's stream; the engine's default is 0

    ids = gather_ids(rng)
    staging = pinned(len(ids), engine.object_bytes)
    staging.fill_(0xA5)
    engine.gather(ids, staging)
    want = reference(src, ids)
    for k, b in enumerate(ids):
        assert torch.equal(staging[k], want[k]), f"gathered object {k} (block {b}) differs"

    # Scatter torch's own bytes of distinct blocks into a zeroed cache of the same layout.
    dst = LAYOUTS[layout](DTYPES[dtype], "zeros", gen)
    out = kvpool.copy.cuda_engine(dst.tensors, dst.block_dim)
    sids = scatter_ids(rng)
    torch.cuda.synchronize()
    out.scatter(sids, reference(src, sids).pin_memory())
    assert_holds_exactly(dst, src, sids)


@pytest.mark.parametrize("staging_kind", ["bytearray", "numpy", "pageable_tensor"])
def test_pageable_host_staging(staging_kind: str, gen: Any) -> None:
    """Staging that is not page-locked (any writable host buffer) still copies exactly."""
    src = flash_attn(torch.bfloat16, "random", gen)
    engine = kvpool.copy.cuda_engine(src.tensors, src.block_dim)
    torch.cuda.synchronize()
    ids = [5, 0, NUM_BLOCKS - 1, 5, 17]
    n = len(ids) * engine.object_bytes
    staging: Any = {
        "bytearray": lambda: bytearray(n),
        "numpy": lambda: np.zeros(n, dtype=np.uint8),
        "pageable_tensor": lambda: torch.zeros(n, dtype=torch.uint8),
    }[staging_kind]()
    engine.gather(ids, staging)
    got = staging.numpy() if staging_kind == "pageable_tensor" else np.frombuffer(staging, np.uint8)
    want = reference(src, ids).numpy().reshape(-1)
    assert np.array_equal(got, want)

    dst = flash_attn(torch.bfloat16, "zeros", gen)
    out = kvpool.copy.cuda_engine(dst.tensors, dst.block_dim)
    sids = [NUM_BLOCKS - 1, 3, 40]
    back = bytearray(reference(src, sids).numpy().tobytes())
    torch.cuda.synchronize()
    out.scatter(sids, back)
    assert_holds_exactly(dst, src, sids)


def test_registered_host_memory(gen: Any) -> None:
    """cudaHostRegister'd numpy staging (what a caller does with memory it already has)."""
    from kvpool import _core

    src = mla(torch.float16, "random", gen)
    engine = kvpool.copy.cuda_engine(src.tensors, src.block_dim)
    torch.cuda.synchronize()
    ids = list(range(NUM_BLOCKS - 1, -1, -7))
    staging = np.zeros(len(ids) * engine.object_bytes, dtype=np.uint8)
    _core.cuda_host_register(staging.ctypes.data, staging.nbytes)
    try:
        engine.gather(ids, staging)
    finally:
        _core.cuda_host_unregister(staging.ctypes.data)
    assert np.array_equal(staging, reference(src, ids).numpy().reshape(-1))


def test_copies_wait_for_the_compute_stream(gen: Any) -> None:
    """With ``set_compute_stream``, a gather starts after the work already queued on that
    stream (here: a long spin, then the write of the blocks), without the caller syncing."""
    if not hasattr(torch.cuda, "_sleep"):
        pytest.skip("torch.cuda._sleep is not available in this torch")
    src = flash_attn(torch.float16, "zeros", gen)
    engine = kvpool.copy.cuda_engine(src.tensors, src.block_dim)
    stream = torch.cuda.Stream()
    engine.set_compute_stream(stream.cuda_stream)
    torch.cuda.synchronize()
    ids = [1, NUM_BLOCKS - 1, 2]
    staging = pinned(len(ids), engine.object_bytes)
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of spinning before the write
        for t in src.tensors:
            _bytes(t).fill_(0x3C)
    engine.gather(ids, staging)  # no synchronise in between
    assert int(torch.count_nonzero(staging != 0x3C)) == 0, "the gather ran before the write"
    torch.cuda.synchronize()


def test_bad_calls_are_refused_before_any_copy(gen: Any) -> None:
    src = flash_attn(torch.bfloat16, "random", gen)
    engine = kvpool.copy.cuda_engine(src.tensors, src.block_dim)
    staging = pinned(2, engine.object_bytes)
    with pytest.raises(InvalidArgumentError):
        engine.gather([0, NUM_BLOCKS], staging)  # an id outside the cache
    with pytest.raises(InvalidArgumentError):
        engine.gather([0], staging)  # staging of the wrong size
    with pytest.raises(InvalidArgumentError):
        engine.scatter([4, 4], staging)  # a repeated id in a scatter
    with pytest.raises(InvalidArgumentError):
        engine.gather([0, 1], torch.empty_like(staging, device=DEV))  # device "staging"
    # Regions in host memory are not a CUDA cache.
    host = [torch.zeros((2, 4, BLOCK_SIZE, HEADS, HEAD_SIZE), dtype=torch.bfloat16)]
    with pytest.raises(ValueError):  # InvalidArgumentError is one
        kvpool.copy.cuda_engine(host, 1)


def _round_trip(
    client: kvpool.Client,
    src: Cache,
    dst: Cache,
    ids: Sequence[int],
    put_staging: Any,
    get_staging: Any,
) -> None:
    """GPU ``src`` -> ``put_staging`` -> node -> ``get_staging`` -> GPU ``dst``, byte-exact."""
    engine = kvpool.copy.cuda_engine(src.tensors, src.block_dim)
    out = kvpool.copy.cuda_engine(dst.tensors, dst.block_dim)
    size = engine.object_bytes
    torch.cuda.synchronize()
    engine.gather(ids, put_staging)
    views = [put_staging[k * size : (k + 1) * size] for k in range(len(ids))]
    keys = random_keys(len(ids))
    assert client.put(keys, views) == len(ids)
    back = [get_staging[k * size : (k + 1) * size] for k in range(len(ids))]
    assert client.get_into(keys, back) == [True] * len(ids)
    out.scatter(ids, get_staging)
    want = reference(src, ids).numpy().reshape(-1)
    gathered = (
        np.frombuffer(put_staging, np.uint8)
        if isinstance(put_staging, memoryview)
        else put_staging.numpy()
    )
    assert np.array_equal(gathered, want), "the gathered staging differs from torch's bytes"
    assert_holds_exactly(dst, src, ids)
    assert_nothing_held(client)


def test_round_trip_through_a_node_over_tcp(start_node: ServerFactory, gen: Any) -> None:
    node = start_node(memory="64MiB")
    rng = np.random.default_rng(11)
    src = flash_attn(torch.bfloat16, "random", gen)
    dst = flash_attn(torch.bfloat16, "zeros", gen)
    ids = scatter_ids(rng, 48)
    size = object_bytes(src)
    put_staging = pinned(len(ids), size).reshape(-1)
    get_staging = pinned(len(ids), size).reshape(-1)
    with kvpool.Client(node.address, transport="tcp", timeout=30.0) as c:
        _round_trip(c, src, dst, ids, put_staging, get_staging)
        assert c.transport == "tcp"


def test_round_trip_through_a_node_over_shared_memory(start_node: ServerFactory, gen: Any) -> None:
    """Staging buffers in the client's arena: the node copies straight between its pool and the
    buffers the GPU engine filled / drains."""
    node = start_node(memory="64MiB")
    rng = np.random.default_rng(12)
    src = cross_layer(torch.float8_e4m3fn, "random", gen)
    dst = cross_layer(torch.float8_e4m3fn, "zeros", gen)
    ids = scatter_ids(rng, 40)
    size = object_bytes(src)
    arena = kvpool.StagingArena(2 * len(ids) * size + (1 << 20))
    with kvpool.Client(node.address, transport="shm", timeout=30.0, arena=arena) as c:
        put_staging = c.staging_buffer(len(ids) * size)
        get_staging = c.staging_buffer(len(ids) * size)
        before = c.stats()["transports"]["shm"]
        _round_trip(c, src, dst, ids, put_staging, get_staging)
        assert c.transport == "shm"
        after = c.stats()["transports"]["shm"]
        moved = len(ids) * size
        assert after["copied_in"] - before["copied_in"] == moved
        assert after["copied_out"] - before["copied_out"] == moved


def test_layout_regions_are_what_kv_regions_says(gen: Any) -> None:
    """The engine's regions are kv_regions': one per layer and index of the leading dimensions
    (FlashAttention: K and V), one per layer for the cross-layer views."""
    for name, make in LAYOUTS.items():
        cache = make(torch.bfloat16, "zeros", gen)
        engine = kvpool.copy.cuda_engine(cache.tensors, cache.block_dim)
        want = kvpool.copy.kv_regions(cache.tensors, cache.block_dim)
        got = engine.regions
        assert [(r.base, r.stride, r.bytes, r.num_blocks) for r in got] == [
            (r.base, r.stride, r.bytes, r.num_blocks) for r in want
        ], name
        lead = list(
            itertools.product(*(range(s) for s in cache.memory[0].shape[: cache.block_dim]))
        )
        assert len(got) == LAYERS * len(lead), name
