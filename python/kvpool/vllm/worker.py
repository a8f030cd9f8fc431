"""The connector's worker side (one per TP rank).

Copies blocks between vLLM's per-layer KV tensors and kvpool as opaque pages. A block's stored
object is its bytes in every layer of this rank, concatenated in layer order (see
``kvpool.copy``). Loads are synchronous in ``start_load_kv`` (the forward needs them), fetched
in chunks of ``load_chunk_bytes`` with the copy of each chunk into the cache overlapping the
fetch of the next; a block that cannot be read is reported through
``get_block_ids_with_load_errors`` and vLLM recomputes it. Saves are gathered into staging
memory in ``wait_for_save`` (a memcpy, so vLLM may reuse the blocks at once) and written by a
background thread off the critical path.

Each request's key chain is kept from its :class:`~kvpool.vllm.metadata.NewRequest` until it is
finished, and extended only as far as a load or save needs: every key is hashed once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from vllm.distributed.kv_events import MEDIUM_STORAGE, BlockRemoved, BlockStored

from kvpool import _core
from kvpool.cluster import Cluster
from kvpool.config import ConnectorConfig
from kvpool.copy import (
    CopyEngine,
    cpu_engine,
    cuda_engine,
    cuda_unavailable_reason,
    describe_layout,
)
from kvpool.errors import KVPoolError
from kvpool.keys import Namespace
from kvpool.staging import StagingArena
from kvpool.vllm.metadata import BlockOp, KVPoolMetadata
from kvpool.vllm.stats import Counters, KVPoolKVEvents

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent

__all__ = ["WorkerSide"]

log = logging.getLogger("kvpool.vllm.connector")


class StagingPool:
    """Staging memory that is reused instead of allocated per load and per save.

    Buffers come from the cluster's staging arena while it has room: same-host nodes copy
    straight between it and their pools (shared memory), so a load or save costs the worker one
    gather or scatter and nothing else. Arena buffers return to it when their last view is
    dropped. Past the arena, ordinary buffers are pooled as below (their bytes cross on sockets).

    A fresh allocation of tens of MiB is faulted in page by page by the first copy into it (twice
    the copy's time), and with transparent huge pages on ``madvise`` (numpy asks for them) a fault
    may stall in direct compaction for tens of ms: both on the forward's critical path. Buffers come
    back after the scatter (loads) or the put (saves); at most ``keep`` of them are kept.

    A buffer comes back only after a call that every node answered: Cluster gives up on a late
    node at its deadline while that node's thread still reads or writes the buffer, so after a
    miss or a failure the buffer is dropped (the late thread holds the last reference).
    """

    def __init__(self, arena: StagingArena | None = None, keep: int = 4) -> None:
        self._arena = arena
        self._free: list[np.ndarray] = []
        self._keep = keep
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        """A buffer of exactly ``nbytes`` (a view of a pooled one when one is large enough)."""
        if self._arena is not None:
            view = self._arena.try_buffer(nbytes)
            if view is not None:
                return np.frombuffer(view, dtype=np.uint8)
        with self._lock:
            # By index, never list.remove: == on arrays compares elements.
            fits = [i for i, b in enumerate(self._free) if b.nbytes >= nbytes]
            if fits:
                buf = self._free.pop(min(fits, key=lambda i: self._free[i].nbytes))
                return buf[:nbytes]
        return np.empty(nbytes, dtype=np.uint8)  # its first copy faults it in, once

    def give(self, buf: np.ndarray) -> None:
        whole = buf if buf.base is None else buf.base
        if not isinstance(whole, np.ndarray):
            return  # an arena buffer: back in the arena once the last view goes
        with self._lock:
            self._free.append(whole)
            if len(self._free) > self._keep:
                self._free.pop(min(range(len(self._free)), key=lambda i: self._free[i].nbytes))


@dataclass
class _Chain:
    """A request's prompt tokens (full blocks) and the keys of its blocks derived so far."""

    tokens: list[int]
    salts: dict[str, str]
    namespace: Namespace
    keys: list[bytes] = field(default_factory=list)

    def keys_for(self, op: BlockOp, block_tokens: int) -> list[bytes]:
        if op.end * block_tokens > len(self.tokens):
            raise KVPoolError(
                f"request {op.req_id}: blocks up to {op.end} asked for, but its prompt has "
                f"{len(self.tokens) // block_tokens} full blocks"
            )
        if len(self.keys) < op.end:
            seed = self.keys[-1] if self.keys else self.namespace.fingerprint()
            more = self.tokens[len(self.keys) * block_tokens : op.end * block_tokens]
            self.keys += _core.chain_block_keys(seed, more, block_tokens)
        return self.keys[op.start : op.end]


class WorkerSide:
    def __init__(
        self,
        config: ConnectorConfig,
        cluster: Cluster,
        namespace: Namespace,
        block_size: int,
        counters: Counters,
        vllm_config: VllmConfig,
        num_blocks: int,
        arena: StagingArena | None,
    ) -> None:
        self.config = config
        self.cluster = cluster
        self.namespace = namespace  # this rank's
        self.tp_rank = namespace.tp_rank
        self.block_size = block_size
        self._counters = counters
        self._count = counters.add
        self._vllm_config = vllm_config
        self._num_blocks = num_blocks
        self._engine: CopyEngine | None = None
        self._kv_caches: list[torch.Tensor] = []
        self._disabled = ""  # why this worker moves no bytes (empty: it does)
        self._verified = False
        self._chains: dict[str, _Chain] = {}
        self._load_errors: set[int] = set()
        self._events: list[KVCacheEvent] = []
        self._events_lock = threading.Lock()
        self._saves: queue.Queue[tuple[list[bytes], np.ndarray, list[int], str, int] | None] = (
            queue.Queue()
        )
        self._pending_bytes = 0
        self._pending_lock = threading.Lock()
        self._arena = arena
        self._cuda = False  # the engine copies between CUDA KV caches and host staging
        self._staging = StagingPool(arena)
        # Fetches the next chunk of a load while the current one is copied into the cache.
        self._fetcher = ThreadPoolExecutor(1, thread_name_prefix="kvpool-load")
        self._saver = threading.Thread(target=self._save_loop, name="kvpool-save", daemon=True)
        self._saver.start()

    # -- set-up ----------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        names = sorted(kv_caches, key=lambda n: (extract_layer_index(n), n))
        tensors = [kv_caches[n] for n in names]
        devices = {t.device for t in tensors}
        device = tensors[0].device
        shape = tuple(tensors[0].shape)
        if len(devices) != 1 or device.type not in ("cpu", "cuda"):
            self._disable(f"KV caches on {sorted(map(str, devices))}: one CPU or CUDA device only")
            return
        try:
            # vLLM's caches put blocks outermost or just inside the K/V pair: the first of the
            # two dimensions that has num_blocks entries (another dimension of that size, e.g.
            # the block size, is no candidate); describe_layout checks the strides.
            candidates = range(min(2, len(shape)))
            block_dim = next((d for d in candidates if shape[d] == self._num_blocks), None)
            if block_dim is None:
                raise ValueError(
                    f"no leading dimension of size num_blocks={self._num_blocks} in KV "
                    f"shape {shape}"
                )
            layout = describe_layout(tensors, block_dim)
            if device.type == "cuda":
                why = cuda_unavailable_reason()
                if why:
                    self._disable(f"KV cache on {device}: the CUDA copy engine cannot run: {why}")
                    return
                self._engine = cuda_engine(tensors, layout.block_dim, device=device.index or 0)
                self._cuda = True
                if self._arena is not None:  # page-locked: device copies at full speed
                    try:
                        _core.cuda_host_register(self._arena.address, self._arena.size)
                    except KVPoolError as e:  # slower copies, not none
                        log.warning("kvpool: staging arena not page-locked: %s", e)
            else:
                self._engine = cpu_engine(tensors, layout.block_dim)
        except (ValueError, KVPoolError) as e:
            self._disable(str(e))
            return
        # Keeps the tensors alive: the copy engine holds only their raw addresses.
        self._kv_caches = tensors
        log.info(
            "KVPoolConnector worker rank %d: %d layers, KV shape %s, %d blocks of %d bytes",
            self.tp_rank,
            len(tensors),
            shape,
            self._engine.num_blocks,
            self._engine.object_bytes,
        )

    def _disable(self, why: str) -> None:
        if not self._disabled:
            log.error("KVPoolConnector moves no KV on this worker: %s", why)
        self._disabled = why
        self._engine = None

    def _verify(self) -> None:
        """The scheduler derived the kernel layout from the config; the layers know for sure."""
        self._verified = True
        from vllm.config.vllm import get_layers_from_vllm_config
        from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

        try:
            layers = get_layers_from_vllm_config(
                self._vllm_config,
                AttentionLayerBase,  # type: ignore[type-abstract]
            )
        except Exception:  # noqa: BLE001 - the check is a safety net, not a requirement
            return
        isas = {str(getattr(layer, "isa", "")) for layer in layers.values()} - {"", "None"}
        want = self.namespace.kv_layout.split("/")[-1]
        if isas and isas != {want}:
            self._disable(
                f"the attention kernels use byte layout {sorted(isas)}, but keys were derived "
                f"for {want!r}: sharing blocks would corrupt KV"
            )

    # -- the step's metadata ---------------------------------------------------------------------

    def _admit(self, meta: KVPoolMetadata) -> None:
        """New requests' chains in, finished ones out (idempotent: both hooks call it)."""
        for req_id in meta.finished:
            self._chains.pop(req_id, None)
        for new in meta.new_requests:
            if new.req_id not in self._chains:
                ns = self.namespace.with_salts(**new.salts) if new.salts else self.namespace
                self._chains[new.req_id] = _Chain(new.tokens, new.salts, ns)
        if not self._verified:
            self._verify()

    def _keys(self, op: BlockOp) -> list[bytes] | None:
        chain = self._chains.get(op.req_id)
        try:
            if chain is None:
                raise KVPoolError(f"request {op.req_id} was never announced to this worker")
            return chain.keys_for(op, self.block_size)
        except KVPoolError as e:  # a scheduler/worker mismatch: skip the op, never fail the step
            log.error("kvpool: %s", e)
            return None

    # -- loads -----------------------------------------------------------------------------------

    def start_load_kv(self, meta: KVPoolMetadata) -> None:
        self._admit(meta)
        for op in meta.loads:
            self._load(op)

    def _load(self, op: BlockOp) -> None:
        engine = self._engine
        keys = self._keys(op) if engine is not None else None
        if engine is None or keys is None:
            self._load_errors.update(op.block_ids)
            self._count(load_errors=len(op.block_ids))
            return
        if not keys:
            return
        t0 = time.perf_counter()
        self._follow_compute_stream(engine)
        size = engine.object_bytes
        chunk = self.config.load_chunk_bytes
        per = max(1, chunk // size) if chunk else len(keys)
        spans = [(a, min(a + per, len(keys))) for a in range(0, len(keys), per)]
        # Double buffering: chunk c + 1 arrives (a thread of its own) while chunk c is copied
        # into the KV cache; each chunk has its own staging, so the two never share a byte.
        loaded = missed = 0
        pending = self._fetcher.submit(self._fetch, keys[spans[0][0] : spans[0][1]], size)
        try:
            for c, (a, b) in enumerate(spans):
                staging, found = pending.result()
                if c + 1 < len(spans):
                    na, nb = spans[c + 1]
                    pending = self._fetcher.submit(self._fetch, keys[na:nb], size)
                got, lost = self._place(engine, op.block_ids[a:b], keys[a:b], staging, found)
                loaded, missed = loaded + got, missed + lost
        finally:
            pending.result()  # never leave a fetch writing into staging behind (it cannot raise)
        seconds = time.perf_counter() - t0
        self._count(
            loaded_blocks=loaded,
            loaded_bytes=loaded * size,
            load_seconds=seconds,
            load_errors=missed,
            load_fetches=len(spans),
        )
        self._counters.observe_load(seconds)

    def _fetch(self, keys: list[bytes], size: int) -> tuple[np.ndarray, list[bool]]:
        """Reads ``keys`` into fresh staging: (the staging, which keys were found)."""
        staging = self._staging.take(len(keys) * size)
        views = [staging[i * size : (i + 1) * size] for i in range(len(keys))]
        try:
            found = self.cluster.get_into(keys, views)
        except Exception as e:  # noqa: BLE001 - a failed load is recomputed, never fatal
            log.warning("kvpool load of %d blocks failed: %s", len(keys), e)
            found = [False] * len(keys)
        return staging, list(found)

    def _place(
        self,
        engine: CopyEngine,
        block_ids: list[int],
        keys: list[bytes],
        staging: np.ndarray,
        found: list[bool],
    ) -> tuple[int, int]:
        """Copies the found blocks of one fetched chunk into the KV cache and reports the rest
        to vLLM (recomputed) and as removed; returns (loaded, missed)."""
        size = engine.object_bytes
        ok = [i for i, f in enumerate(found) if f]
        if len(ok) == len(keys):
            engine.scatter(block_ids, staging)
            self._staging.give(staging)  # every node answered: nothing writes into it any more
        elif ok:
            parts = [staging[i * size : (i + 1) * size] for i in ok]
            engine.scatter([block_ids[i] for i in ok], np.concatenate(parts))
        missed = [i for i, f in enumerate(found) if not f]
        if missed:
            self._load_errors.update(block_ids[i] for i in missed)
            with self._events_lock:
                self._events.append(
                    BlockRemoved(block_hashes=[keys[i] for i in missed], medium=MEDIUM_STORAGE)
                )
        return len(ok), len(missed)

    def _follow_compute_stream(self, engine: CopyEngine) -> None:
        """CUDA: copies start after the forward's queued work on torch's current stream."""
        if self._cuda:
            engine.set_compute_stream(torch.cuda.current_stream().cuda_stream)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    # -- saves -----------------------------------------------------------------------------------

    def wait_for_save(self, meta: KVPoolMetadata) -> None:
        self._admit(meta)
        engine = self._engine
        if not meta.saves or engine is None:
            return
        t0 = time.perf_counter()
        self._follow_compute_stream(engine)
        bs = self.block_size
        for op in meta.saves:
            n = len(op.block_ids)
            nbytes = n * engine.object_bytes
            keys = self._keys(op)
            if keys is None or self._pending_bytes + nbytes > self.config.max_pending_save:
                self._count(save_errors=n)  # the writer is behind: drop, never stall the engine
                continue
            staging = self._staging.take(nbytes)
            engine.gather(op.block_ids, staging)
            with self._pending_lock:
                self._pending_bytes += nbytes
            chain = self._chains[op.req_id]
            tokens = chain.tokens[op.start * bs : op.end * bs]  # for the BlockStored event
            self._saves.put(
                (keys, staging, tokens, chain.salts.get("lora", ""), engine.object_bytes)
            )
        self._count(save_gather_seconds=time.perf_counter() - t0)

    def _save_loop(self) -> None:
        while (job := self._saves.get()) is not None:
            keys, staging, tokens, lora, size = job
            t0 = time.perf_counter()
            views = [staging[i * size : (i + 1) * size] for i in range(len(keys))]
            try:
                stored = self.cluster.put(keys, views)
            except Exception as e:  # noqa: BLE001 - a failed save is a future miss
                log.warning("kvpool save of %d blocks failed: %s", len(keys), e)
                stored = 0
            with self._pending_lock:
                self._pending_bytes -= staging.nbytes
            if stored == len(keys) and not self.config.replicas:  # no node may still read it
                self._staging.give(staging)
            self._count(
                saved_blocks=stored,
                saved_bytes=stored * size,
                save_seconds=time.perf_counter() - t0,
                save_errors=len(keys) - stored,
            )
            if stored == len(keys):
                with self._events_lock:
                    self._events.append(
                        BlockStored(
                            block_hashes=list[bytes | int](keys),
                            parent_block_hash=None,
                            token_ids=tokens,
                            block_size=self.block_size,
                            lora_id=None,
                            medium=MEDIUM_STORAGE,
                            lora_name=lora or None,
                        )
                    )
            self._saves.task_done()

    def flush(self, timeout: float = 30.0) -> bool:
        """Waits until every queued save is written (or ``timeout``); True when none is left."""
        deadline = time.monotonic() + timeout
        while self._saves.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._saves.unfinished_tasks

    # -- events and shutdown ---------------------------------------------------------------------

    def take_events(self) -> KVPoolKVEvents | None:
        with self._events_lock:
            events, self._events = self._events, []
        if not events:
            return None
        out = KVPoolKVEvents(num_workers=1)
        out.add_events(events)
        return out

    def shutdown(self) -> None:
        self.flush(self.config.timeout * 4)
        self._saves.put(None)
        self._fetcher.shutdown(wait=True)
