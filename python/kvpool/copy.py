"""The copy engine: KV blocks between an engine's paged KV cache and contiguous staging memory.

A block's stored object is its bytes in every layer, concatenated in layer order; inside a layer
whose K and V are separate planes (``[2, num_blocks, ...]``), K then V. :func:`kv_regions`
describes per-layer tensors as the strided regions the C++ engine copies, and
:func:`cpu_engine` builds the CPU implementation over them::

    engine = cpu_engine(kv_caches, block_dim=1)       # vLLM CPU: [2, num_blocks, ...] per layer
    staging = torch.empty(len(ids) * engine.object_bytes, dtype=torch.uint8)
    engine.gather(ids, staging)                       # cache -> staging
    engine.scatter(ids, staging)                      # staging -> cache

The engine keeps raw addresses: the caller keeps the tensors alive (and unmoved) while it lives.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, Protocol

from kvpool import _core
from kvpool.client import _as_buffer

KVRegion = _core.KVRegion

__all__ = ["CopyEngine", "KVRegion", "TensorLike", "cpu_engine", "kv_regions"]


class TensorLike(Protocol):
    """What kv_regions reads of a tensor (a torch.Tensor has all of it)."""

    @property
    def shape(self) -> Any: ...
    def stride(self) -> Any: ...
    def element_size(self) -> int: ...
    def data_ptr(self) -> int: ...


def kv_regions(tensors: Sequence[TensorLike], block_dim: int) -> list[KVRegion]:
    """The regions of per-layer KV tensors whose dimension ``block_dim`` indexes blocks.

    Every dimension after ``block_dim`` must be packed (row-major, no gaps), so one block of one
    index of the leading dimensions is a single run of bytes; each index of the leading
    dimensions (e.g. K and V) becomes one region. Raises ValueError naming the tensor that does
    not fit.
    """
    if not tensors:
        raise ValueError("kv_regions needs at least one KV cache tensor")
    regions: list[KVRegion] = []
    for n, t in enumerate(tensors):
        shape, strides, elem = tuple(t.shape), tuple(t.stride()), t.element_size()
        if not 0 <= block_dim < len(shape):
            raise ValueError(f"KV tensor {n}: block_dim {block_dim} outside its shape {shape}")
        inner = shape[block_dim + 1 :]
        want = 1
        for size, stride in reversed(list(zip(inner, strides[block_dim + 1 :], strict=True))):
            if size > 1 and stride != want:
                raise ValueError(
                    f"KV tensor {n} (shape {shape}, strides {strides}): the dimensions after "
                    f"block_dim {block_dim} are not packed, so a block is not one run of bytes"
                )
            want *= size
        block_bytes = math.prod(inner) * elem
        for idx in itertools.product(*(range(s) for s in shape[:block_dim])):
            offset = sum(i * s for i, s in zip(idx, strides, strict=False)) * elem
            regions.append(
                KVRegion(
                    base=t.data_ptr() + offset,
                    stride=strides[block_dim] * elem,
                    bytes=block_bytes,
                    num_blocks=shape[block_dim],
                )
            )
    return regions


class CopyEngine:
    """Gathers KV blocks into contiguous staging memory and scatters them back.

    ``staging`` is any writable C-contiguous buffer (bytearray, numpy array) or a contiguous CPU
    torch tensor of any dtype, holding ``len(block_ids) * object_bytes`` bytes; object ``i`` of
    the staging is block ``block_ids[i]``. Bad calls (an id outside the cache, a repeated id in a
    scatter, a staging of the wrong size) raise InvalidArgumentError before any byte moves.
    """

    def __init__(self, core: Any) -> None:
        self._core = core

    @property
    def object_bytes(self) -> int:
        """Bytes of one block's stored object (all regions)."""
        return int(self._core.object_bytes)

    @property
    def num_blocks(self) -> int:
        return int(self._core.num_blocks)

    @property
    def regions(self) -> list[KVRegion]:
        return list(self._core.regions)

    @property
    def device(self) -> str:
        return str(self._core.device)

    def gather(self, block_ids: Sequence[int] | Any, staging: Any) -> None:
        """Cache -> staging. Releases the GIL while it copies."""
        self._core.gather(block_ids, _as_buffer(staging))

    def scatter(self, block_ids: Sequence[int] | Any, staging: Any) -> None:
        """Staging -> cache; the ids must be distinct. Releases the GIL while it copies."""
        self._core.scatter(block_ids, _as_buffer(staging))

    def __repr__(self) -> str:
        return (
            f"CopyEngine(device={self.device!r}, num_blocks={self.num_blocks}, "
            f"object_bytes={self.object_bytes}, regions={len(self._core.regions)})"
        )


def cpu_engine(
    tensors: Sequence[TensorLike],
    block_dim: int,
    *,
    threads: int = 1,
    parallel_bytes: int = 8 << 20,
) -> CopyEngine:
    """A CPU copy engine over host tensors (see :func:`kv_regions` for the layout rules)."""
    return CopyEngine(_core.CopyEngine.cpu(kv_regions(tensors, block_dim), threads, parallel_bytes))
