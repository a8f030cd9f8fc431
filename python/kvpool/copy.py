"""The copy engine: KV blocks between an engine's paged KV cache and contiguous staging memory.

A block's stored object is, for each layer in order, for each index of the dimensions before
the block dimension in order (K then V, where a layer's K and V are separate planes
``[2, num_blocks, ...]``), the block's run: its bytes in memory order. :func:`kv_regions`
describes per-layer tensors as the strided regions the C++ engine copies,
:func:`detect_layout` finds the block dimension from the tensors' shapes and strides and names
the object's byte layout, and :func:`cpu_engine` builds the CPU implementation over them::

    engine = cpu_engine(kv_caches, num_blocks=n)      # or cpu_engine(kv_caches, block_dim=1)
    staging = torch.empty(len(ids) * engine.object_bytes, dtype=torch.uint8)
    engine.gather(ids, staging)                       # cache -> staging
    engine.scatter(ids, staging)                      # staging -> cache

The layouts of vLLM's attention backends, all covered (per-layer tensors, logical shapes):

- FlashAttention ``[2, num_blocks, block_size, heads, head_size]`` (block_dim 1): the object is,
  per layer, K's block then V's block, each ``[block_size, heads, head_size]``;
- FlashInfer ``[num_blocks, 2, block_size, heads, head_size]`` (block_dim 0): per layer, the
  block ``[2, block_size, heads, head_size]`` (K then V: the same bytes as FlashAttention's);
- the HND variants of both (the same logical shapes, a view of memory laid out
  ``[..., heads, block_size, head_size]``): the runs are in memory order, so each of K and V is
  ``[heads, block_size, head_size]``;
- MLA ``[num_blocks, block_size, kv_lora_rank + rope_dim]`` (block_dim 0): the block;
- vLLM CPU ``[2, num_blocks, heads, block_size, head_size]`` (block_dim 1): K then V;
- cross-layer: one buffer ``[num_blocks, num_layers, ...]`` whose per-layer views
  ``buf[:, l]`` (or ``buf[:, l].transpose(0, 1)`` for FlashAttention's ``[2, num_blocks, ...]``)
  are the tensors; the object is still per layer, K then V, which here is ``buf[b]`` itself, and
  the C++ plan merges the back-to-back runs into one copy per block.

Not covered: a cross-layer buffer whose heads dimension lies outside its layers dimension
(vLLM's HND cross-layer orders, ``[num_blocks, heads, num_layers, 2, block_size, head_size]`` or
``[num_blocks, 2, heads, num_layers, block_size, head_size]``): a layer's block there is one run
per head, not one per K/V, and kv_regions refuses such gaps. Registering the whole buffer as
one tensor works (block_dim 0, the object is ``buf[b]`` in its own order).

The engine keeps raw addresses: the caller keeps the tensors alive (and unmoved) while it lives.
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kvpool import _core
from kvpool.client import _as_buffer

KVRegion = _core.KVRegion

__all__ = [
    "CopyEngine",
    "KVLayout",
    "KVRegion",
    "TensorLike",
    "cpu_engine",
    "cuda_available",
    "cuda_built",
    "cuda_engine",
    "cuda_unavailable_reason",
    "describe_layout",
    "detect_layout",
    "kv_regions",
    "torch_cuda_unavailable_reason",
]


class TensorLike(Protocol):
    """What kv_regions and detect_layout read of a tensor (a torch.Tensor has all of it)."""

    @property
    def shape(self) -> Any: ...
    @property
    def dtype(self) -> Any: ...
    def stride(self) -> Any: ...
    def element_size(self) -> int: ...
    def data_ptr(self) -> int: ...


@dataclass(frozen=True)
class KVLayout:
    """The layout of a KV cache: which dimension indexes blocks, and the stored object's bytes.

    ``description`` is ``L{layers}/{leading}/{inner}/{dtype}``, for example
    ``L32/2/a16.b8.c128/bfloat16`` (FlashAttention NHD) or ``L32/2/b8.a16.c128/bfloat16`` (HND):

    - ``layers``: the number of per-layer tensors;
    - ``leading``: the sizes of the dimensions before the block dimension, in order, joined by
      ``x`` (each index is one run of the object; ``-`` when there are none);
    - ``inner``: the dimensions after the block dimension in memory order (outermost first),
      joined by ``.``, each written as a letter and its size; the letters name the dimensions in
      their logical (shape) order, ``a`` the first after the block dimension, so a permuted
      view reads e.g. ``b8.a16.c128`` where the unpermuted tensor reads ``a16.b8.c128``;
    - ``dtype``: the element type (torch's name without ``torch.``).

    Dimensions of size 1 are left out (they change no byte). Equal descriptions on tensors of the
    same backend mean byte-identical objects; a description cannot know what a dimension means,
    so the caller's namespace should also name the attention backend when two backends order
    same-sized dimensions differently (vLLM CPU's ``[heads, block_size]`` against
    FlashAttention's ``[block_size, heads]`` when heads == block_size).
    """

    block_dim: int
    description: str


@dataclass(frozen=True)
class _Plan:
    """One tensor's block layout, checked: what kv_regions and describe_layout are built from."""

    offsets: tuple[int, ...]  # byte offset of each leading index's run, in index order
    block_stride: int  # bytes
    run_bytes: int
    num_blocks: int
    leading: str  # the description's parts
    inner: str
    dtype: str


def _plan(n: int, t: TensorLike, block_dim: int) -> _Plan:
    shape, strides, elem = tuple(t.shape), tuple(t.stride()), t.element_size()
    where = f"KV tensor {n} (shape {shape}, strides {strides})"
    if not 0 <= block_dim < len(shape):
        raise ValueError(f"KV tensor {n}: block_dim {block_dim} outside its shape {shape}")
    if 0 in shape:
        raise ValueError(f"{where}: a dimension of size 0 leaves no bytes to copy")
    # The dimensions after block_dim, innermost (smallest stride) first, must be packed: then a
    # block of one leading index is a single run of bytes, in this memory order.
    inner = [d for d in range(block_dim + 1, len(shape)) if shape[d] > 1]
    by_stride = sorted(inner, key=lambda d: (strides[d], -d))
    run = 1
    for d in by_stride:
        if strides[d] != run:
            raise ValueError(
                f"{where}: the dimensions after block_dim {block_dim} are not packed (dimension "
                f"{d} of size {shape[d]} has stride {strides[d]} where {run} would pack it), so "
                f"a block is not one run of bytes"
            )
        run *= shape[d]
    # The block dimension and the leading ones, smallest stride first, must each step past
    # everything inside them: no two (leading index, block) runs share a byte.
    extent = run
    outer = [d for d in range(block_dim + 1) if shape[d] > 1]
    for d in sorted(outer, key=lambda d: (strides[d], -d)):
        if strides[d] < extent:
            what = "blocks" if d == block_dim else f"indices of dimension {d}"
            raise ValueError(
                f"{where}: dimension {d} (size {shape[d]}, stride {strides[d]}) steps less than "
                f"the {extent} elements inside it, so its {what} would overlap"
            )
        extent += strides[d] * (shape[d] - 1)
    offsets = tuple(
        sum(i * s for i, s in zip(idx, strides, strict=False)) * elem
        for idx in itertools.product(*(range(s) for s in shape[:block_dim]))
    )
    letters = {d: string.ascii_letters[k] for k, d in enumerate(inner)}
    leading = [str(shape[d]) for d in range(block_dim) if shape[d] > 1]
    return _Plan(
        offsets=offsets,
        block_stride=strides[block_dim] * elem,
        run_bytes=run * elem,
        num_blocks=shape[block_dim],
        leading="x".join(leading) or "-",
        inner=".".join(f"{letters[d]}{shape[d]}" for d in reversed(by_stride)) or "-",
        dtype=str(t.dtype).removeprefix("torch."),
    )


def kv_regions(tensors: Sequence[TensorLike], block_dim: int) -> list[KVRegion]:
    """The regions of per-layer KV tensors whose dimension ``block_dim`` indexes blocks.

    The dimensions after ``block_dim``, ordered by stride, must be packed (no gaps; any order,
    so a permuted view such as an HND layout is fine), so one block of one index of the leading
    dimensions is a single run of bytes, in memory order; each index of the leading dimensions
    (e.g. K and V) becomes one region, in index order, whatever their strides. Raises
    ValueError naming the tensor whose blocks are not one run each or would overlap.
    """
    if not tensors:
        raise ValueError("kv_regions needs at least one KV cache tensor")
    regions: list[KVRegion] = []
    for n, t in enumerate(tensors):
        p = _plan(n, t, block_dim)
        base = t.data_ptr()
        regions.extend(
            KVRegion(
                base=base + offset,
                stride=p.block_stride,
                bytes=p.run_bytes,
                num_blocks=p.num_blocks,
            )
            for offset in p.offsets
        )
    return regions


def describe_layout(tensors: Sequence[TensorLike], block_dim: int) -> KVLayout:
    """The :class:`KVLayout` of per-layer tensors with a known block dimension.

    Every layer must fit :func:`kv_regions` and agree with the first on the number of blocks and
    the description; ValueError names the first that does not.
    """
    if not tensors:
        raise ValueError("describe_layout needs at least one KV cache tensor")
    plans = [_plan(n, t, block_dim) for n, t in enumerate(tensors)]
    first = plans[0]

    def part(p: _Plan) -> str:
        return f"{p.leading}/{p.inner}/{p.dtype}"

    for n, p in enumerate(plans[1:], start=1):
        t = tensors[n]
        where = f"KV tensor {n} (shape {tuple(t.shape)}, strides {tuple(t.stride())})"
        if p.num_blocks != first.num_blocks:
            raise ValueError(
                f"{where} has {p.num_blocks} blocks in dimension {block_dim}, "
                f"KV tensor 0 has {first.num_blocks}"
            )
        if part(p) != part(first):
            raise ValueError(
                f"{where} has the layout {part(p)!r}, KV tensor 0 has {part(first)!r}: "
                f"every layer must store its blocks alike"
            )
    return KVLayout(block_dim=block_dim, description=f"L{len(plans)}/{part(first)}")


def detect_layout(tensors: Sequence[TensorLike], num_blocks: int) -> KVLayout:
    """The :class:`KVLayout` of per-layer tensors holding ``num_blocks`` blocks each.

    The block dimension is the dimension of size ``num_blocks`` that :func:`kv_regions` accepts
    as one; found from shapes and strides only. ValueError when none is, or when more than one
    is (it names them: pass block_dim to :func:`describe_layout` instead), or when the layers
    differ (see :func:`describe_layout`).
    """
    if not tensors:
        raise ValueError("detect_layout needs at least one KV cache tensor")
    t = tensors[0]
    shape, strides = tuple(t.shape), tuple(t.stride())
    sized = [d for d, size in enumerate(shape) if size == num_blocks]
    if not sized:
        raise ValueError(f"KV tensor 0 (shape {shape}): no dimension of size {num_blocks}")
    fits: list[int] = []
    errors: list[ValueError] = []
    for d in sized:
        try:
            _plan(0, t, d)
        except ValueError as e:
            errors.append(e)
        else:
            fits.append(d)
    if not fits:
        if len(errors) == 1:
            raise errors[0]
        raise ValueError(
            f"KV tensor 0 (shape {shape}, strides {strides}): none of the dimensions {sized} of "
            f"size {num_blocks} can be the block dimension: " + "; ".join(map(str, errors))
        )
    if len(fits) > 1:
        raise ValueError(
            f"KV tensor 0 (shape {shape}, strides {strides}): the dimensions {fits} all have "
            f"size {num_blocks} and could each be the block dimension; pass block_dim"
        )
    return describe_layout(tensors, fits[0])


class CopyEngine:
    """Gathers KV blocks into contiguous staging memory and scatters them back.

    ``staging`` is any writable C-contiguous buffer (bytearray, numpy array) or a contiguous CPU
    torch tensor of any dtype, holding ``len(block_ids) * object_bytes`` bytes; object ``i`` of
    the staging is block ``block_ids[i]``. Bad calls (an id outside the cache, a repeated id in a
    scatter, a staging of the wrong size) raise InvalidArgumentError before any byte moves.
    """

    def __init__(self, core: Any, layout: KVLayout | None = None) -> None:
        self._core = core
        self._layout = layout
        self._held: dict[int, Any] = {}  # ticket -> its staging, alive until waited for

    @property
    def layout(self) -> KVLayout | None:
        """The detected layout when the engine was built from num_blocks, else None."""
        return self._layout

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

    def start_gather(self, block_ids: Sequence[int] | Any, staging: Any) -> int:
        """Starts cache -> staging and returns its ticket; :meth:`wait` finishes it. The engine
        holds ``staging`` until then (the CPU engine has copied when this returns)."""
        buf = _as_buffer(staging)
        ticket = int(self._core.start_gather(block_ids, buf))
        self._held[ticket] = buf
        return ticket

    def start_scatter(self, block_ids: Sequence[int] | Any, staging: Any) -> int:
        """Starts staging -> cache (distinct ids); ``staging`` must not change until
        :meth:`wait` returns for the ticket."""
        buf = _as_buffer(staging)
        ticket = int(self._core.start_scatter(block_ids, buf))
        self._held[ticket] = buf
        return ticket

    def wait(self, ticket: int) -> None:
        """Blocks until the copy of ``ticket`` finished; raises its error if it failed, and
        InvalidArgumentError for a ticket not in flight. Releases the GIL while it waits."""
        try:
            self._core.wait(ticket)
        finally:
            self._held.pop(ticket, None)

    def set_compute_stream(self, stream: int) -> None:
        """CUDA: later copies start after the work queued on ``stream`` (a ``cudaStream_t``,
        e.g. ``torch.cuda.current_stream().cuda_stream``; 0, the default, is the legacy default
        stream) and wait only for the engine's own stream. A no-op on the CPU engine."""
        self._core.set_compute_stream(int(stream))

    def __repr__(self) -> str:
        layout = f", layout={self._layout.description!r}" if self._layout else ""
        return (
            f"CopyEngine(device={self.device!r}, num_blocks={self.num_blocks}, "
            f"object_bytes={self.object_bytes}, regions={len(self._core.regions)}{layout})"
        )


def cpu_engine(
    tensors: Sequence[TensorLike],
    block_dim: int | None = None,
    *,
    num_blocks: int | None = None,
    threads: int = 1,
    parallel_bytes: int = 8 << 20,
) -> CopyEngine:
    """A CPU copy engine over host tensors (see :func:`kv_regions` for the layout rules).

    Pass either ``block_dim`` or ``num_blocks``: with ``num_blocks`` the block dimension is
    found by :func:`detect_layout`, which also checks that the layers agree, and the engine's
    ``layout`` holds the result.
    """
    layout, dim = _layout_and_dim(tensors, block_dim, num_blocks, "cpu_engine")
    core = _core.CopyEngine.cpu(kv_regions(tensors, dim), threads, parallel_bytes)
    return CopyEngine(core, layout)


def _layout_and_dim(
    tensors: Sequence[TensorLike], block_dim: int | None, num_blocks: int | None, what: str
) -> tuple[KVLayout | None, int]:
    if (block_dim is None) == (num_blocks is None):
        raise TypeError(f"{what} takes block_dim or num_blocks (exactly one)")
    if num_blocks is None:
        assert block_dim is not None
        return None, block_dim
    layout = detect_layout(tensors, num_blocks)
    return layout, layout.block_dim


def cuda_built() -> bool:
    """Whether this build of kvpool has the CUDA copy engine."""
    return bool(_core.cuda_built())


def cuda_unavailable_reason() -> str:
    """Why the CUDA copy engine cannot be used now ("" when it can): not built, no CUDA runtime
    (libcudart.so.13), no driver, or no device."""
    return str(_core.cuda_available())


def torch_cuda_unavailable_reason() -> str:
    """Why CUDA KV caches cannot be copied in this process ("" when they can): torch does not
    import or sees no CUDA device, or :func:`cuda_unavailable_reason` says why."""
    try:
        import torch
    except ImportError as e:
        return f"torch does not import ({e})"
    if not torch.cuda.is_available():
        return (
            f"torch.cuda.is_available() is False (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'})"
        )
    why = cuda_unavailable_reason()
    return f"kvpool.copy.cuda_available() is False: {why}" if why else ""


def cuda_available() -> bool:
    """Whether the CUDA copy engine can be used now (built, and a device is present)."""
    return not cuda_unavailable_reason()


def cuda_engine(
    tensors: Sequence[TensorLike],
    block_dim: int | None = None,
    *,
    num_blocks: int | None = None,
    device: int = -1,
) -> CopyEngine:
    """A CUDA copy engine over device tensors (the layout rules of :func:`kv_regions`), with host
    staging: gather is device -> host, scatter host -> device, each on the engine's own stream.
    Staging in page-locked memory (``torch.empty(..., pin_memory=True)``, or a buffer passed to
    ``kvpool._core.cuda_host_register``) copies at full speed. ``device`` -1: the current device.
    Raises KVPoolError (code UNSUPPORTED) with the reason where CUDA cannot be used."""
    layout, dim = _layout_and_dim(tensors, block_dim, num_blocks, "cuda_engine")
    return CopyEngine(_core.CopyEngine.cuda(kv_regions(tensors, dim), device), layout)
