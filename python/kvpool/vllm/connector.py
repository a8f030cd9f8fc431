"""``KVPoolConnector``: vLLM's KV connector (v1) over a kvpool cluster.

Scheduler side (one per engine): asks the cluster how many full prompt blocks beyond the local
prefix-cache hit it holds (never the block of the last prompt token, which vLLM must compute to
sample), and tells the workers, step by step, which blocks to load before the forward pass and
which newly computed full prompt blocks to save after it.

Worker side (one per TP rank): copies blocks between vLLM's per-layer KV tensors and kvpool as
opaque pages. A block's stored object is its bytes in every layer of this rank, concatenated in
layer order (see ``kvpool.copy``). Loads are synchronous in ``start_load_kv`` (the forward needs
them); a block that cannot be read is reported through ``get_block_ids_with_load_errors`` and
vLLM recomputes it. Saves are gathered into staging memory in ``wait_for_save`` (a memcpy, so
vLLM may reuse the blocks at once) and written by a background thread off the critical path.
Nothing the cluster does (dead nodes, an unreachable Redis) fails a request: it only costs hits.

Block keys: ``kvpool.block_keys`` over the prompt tokens in a namespace of everything that decides
the bytes (model, revision, KV dtype, block size, TP size and rank, attention backend and its CPU
kernel's byte layout, LoRA name, cache salt), so engines share blocks exactly when their bytes
would be identical.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.distributed.kv_events import (
    MEDIUM_STORAGE,
    BlockRemoved,
    BlockStored,
    KVConnectorKVEvents,
    KVEventAggregator,
)
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from kvpool.cluster import Cluster
from kvpool.config import ConnectorConfig
from kvpool.copy import CopyEngine, cpu_engine
from kvpool.errors import ConfigError, KVPoolError
from kvpool.keys import Namespace, block_keys
from kvpool.staging import StagingArena
from kvpool.vllm.prom import COUNTERS, LOAD_DURATIONS, KVPoolPromMetrics

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import PromMetric, PromMetricT
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["KVPoolConnector", "KVPoolConnectorStats", "connector_namespace"]

log = logging.getLogger(__name__)


# -- what travels from the scheduler to the workers ---------------------------------------------


@dataclass
class BlockOp:
    """Load or save blocks ``[start, end)`` of a request's prompt into/from vLLM blocks
    ``block_ids`` (one per block of the range). ``tokens`` is the prompt up to ``end`` blocks:
    each worker derives the keys in its own (rank's) namespace."""

    req_id: str
    tokens: list[int]
    salts: dict[str, str]
    start: int
    block_ids: list[int]

    @property
    def end(self) -> int:
        return self.start + len(self.block_ids)


@dataclass
class KVPoolMetadata(KVConnectorMetadata):
    namespace: Namespace
    loads: list[BlockOp] = field(default_factory=list)
    saves: list[BlockOp] = field(default_factory=list)


# -- stats and events ------------------------------------------------------------------------


_STAT_KEYS = tuple(COUNTERS)  # what the connector counts: kvpool.vllm.prom says what each is
_MAX_DURATIONS = 4096  # load durations kept per interval


@dataclass
class KVPoolConnectorStats(KVConnectorStats):
    """Counters since the last report; sums across workers and intervals. ``load_durations``
    (each request load's seconds, for vLLM's histogram) is a list, joined by ``aggregate``."""

    def __post_init__(self) -> None:
        for k in _STAT_KEYS:
            self.data.setdefault(k, 0)

    def add(self, **counts: float) -> None:
        for k, v in counts.items():
            self.data[k] = self.data.get(k, 0) + v

    def observe_load(self, seconds: float) -> None:
        durations = self.data.setdefault(LOAD_DURATIONS, [])
        if len(durations) < _MAX_DURATIONS:  # nobody collecting: the counters still count
            durations.append(seconds)

    def reset(self) -> None:
        self.data = dict.fromkeys(_STAT_KEYS, 0)

    def aggregate(self, other: KVConnectorStats) -> KVPoolConnectorStats:
        for k, v in other.data.items():
            if isinstance(v, list):
                self.data[k] = [*self.data.get(k, []), *v]
            else:
                self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        out: dict[str, int | float] = {k: d.get(k, 0) for k in _STAT_KEYS}
        if d.get("load_seconds"):
            out["load_GBps"] = round(d["loaded_bytes"] / d["load_seconds"] / 1e9, 3)
        if d.get("save_seconds"):
            out["save_GBps"] = round(d["saved_bytes"] / d["save_seconds"] / 1e9, 3)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in _STAT_KEYS) and not self.data.get(LOAD_DURATIONS)


class KVPoolKVEvents(KVConnectorKVEvents):
    """KV events of the workers: a block counts as stored once every TP rank stored it."""

    def __init__(self, num_workers: int = 1) -> None:
        self._agg = KVEventAggregator(num_workers)

    def add_events(self, events: list[KVCacheEvent]) -> None:
        self._agg.add_events(events)

    def aggregate(self) -> KVPoolKVEvents:
        common = self._agg.get_common_events()
        self._agg.clear_events()
        self._agg.add_events(common)
        self._agg.reset_workers()
        return self

    def increment_workers(self, count: int = 1) -> None:
        self._agg.increment_workers(count)

    def get_all_events(self) -> list[KVCacheEvent]:
        return self._agg.get_all_events()

    def get_number_of_workers(self) -> int:
        return self._agg.get_number_of_workers()

    def clear_events(self) -> None:
        self._agg.clear_events()
        self._agg.reset_workers()


# -- the namespace -----------------------------------------------------------------------------


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _cpu_kernel_layout(vllm_config: VllmConfig, dtype: Any) -> str:
    """The CPU attention kernel's byte layout inside a block ("amx", "vec", "vec16", ...): vLLM
    picks it per machine, and the same tokens give different bytes under different kernels."""
    from vllm.v1.attention.backends import cpu_attn

    pick = getattr(cpu_attn, "_get_attn_isa", None)
    if pick is None:
        return "unknown"
    return str(
        pick(
            dtype,
            vllm_config.cache_config.block_size,
            vllm_config.model_config.get_head_size(),
            vllm_config.cache_config.cache_dtype,
        )
    )


def connector_namespace(vllm_config: VllmConfig, model_id: str = "", tp_rank: int = 0) -> Namespace:
    """The block-key namespace of an engine (rank ``tp_rank``), from its vLLM config."""
    from vllm.platforms import current_platform

    model = vllm_config.model_config
    cache = vllm_config.cache_config
    kv_dtype = model.dtype if cache.cache_dtype == "auto" else cache.cache_dtype
    if current_platform.is_cpu():
        backend, layout = "CPU_ATTN", _cpu_kernel_layout(vllm_config, model.dtype)
    else:
        backend = str(getattr(vllm_config.attention_config, "backend", None) or "auto")
        layout = "default"
    return Namespace(
        model=model_id or str(model.model),
        revision=str(model.revision or ""),
        dtype=_dtype_name(kv_dtype),
        kv_layout=f"paged/{layout}",
        attention_backend=backend,
        block_tokens=int(cache.block_size),
        tp_size=int(vllm_config.parallel_config.tensor_parallel_size),
        tp_rank=tp_rank,
    )


def _request_salts(lora_name: str | None, cache_salt: str | None) -> dict[str, str]:
    salts = {}
    if lora_name:
        salts["lora"] = lora_name
    if cache_salt:
        salts["cache_salt"] = cache_salt
    return salts


def load_config(vllm_config: VllmConfig) -> ConnectorConfig:
    """Defaults < TOML file (``KVPOOL_CONFIG``) < ``KVPOOL_*`` < ``kv_connector_extra_config``."""
    assert vllm_config.kv_transfer_config is not None
    extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
    config = ConnectorConfig.load(overrides=extra, overrides_source="kv_connector_extra_config")
    if not config.redis_url:
        raise ConfigError(
            "KVPoolConnector needs the cluster's Redis: set kv_connector_extra_config.redis_url "
            "or KVPOOL_REDIS_URL (e.g. redis://127.0.0.1:6379/0)"
        )
    return config


def _rdma_gpu(vllm_config: VllmConfig, configured: int, role: KVConnectorRole) -> int:
    """The GPU whose nearest RDMA device a worker uses: ``rdma_gpu`` when set, else the
    worker's own CUDA device on a GPU engine; none for the scheduler and on CPU."""
    if configured >= 0 or role == KVConnectorRole.SCHEDULER:
        return configured
    device = getattr(vllm_config.device_config, "device_type", "cpu")
    if device != "cuda" or not torch.cuda.is_available():
        return -1
    return int(torch.cuda.current_device())


# -- the connector -------------------------------------------------------------------------------


class _StagingPool:
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
class _ReqState:
    """Scheduler-side state of one request."""

    tokens: list[int]
    salts: dict[str, str]
    block_ids: list[int] = field(default_factory=list)
    hit_blocks: int = 0  # full blocks the cluster holds (from the last lookup)
    load: tuple[int, list[int]] | None = None  # (first block, vLLM block ids) not yet sent
    saved_upto: int = 0  # blocks [0, saved_upto) are stored or were not ours to store


class KVPoolConnector(KVConnectorBase_V1):
    """A shared prefix cache for vLLM in a kvpool cluster. See the module docstring."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self.config = load_config(vllm_config)
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise ConfigError("KVPoolConnector does not support pipeline parallelism yet")
        self.block_size = int(vllm_config.cache_config.block_size)
        self.namespace = connector_namespace(vllm_config, self.config.model_id)
        # The worker's staging memory: one arena that every same-host node maps (shared memory).
        arena = (
            None
            if role == KVConnectorRole.SCHEDULER or self.config.transport == "tcp"
            else StagingArena(self.config.staging_bytes)
        )
        self.cluster = Cluster(
            self.config.redis_url,
            self.config.cluster,
            timeout=self.config.timeout,
            replicas=self.config.replicas,
            transport=self.config.transport,
            arena=arena,
            rdma_devices=self.config.rdma_devices,
            rdma_link_type=self.config.rdma_link_type,
            rdma_port=self.config.rdma_port,
            rdma_gpu=_rdma_gpu(vllm_config, self.config.rdma_gpu, role),
            auth_token=self.config.token(),
        )
        self._stats = KVPoolConnectorStats()  # since vLLM last asked
        self.totals = KVPoolConnectorStats()  # since start (never reset)
        self._stats_lock = threading.Lock()
        if role == KVConnectorRole.SCHEDULER:
            self._reqs: dict[str, _ReqState] = {}
            self._events: KVPoolKVEvents | None = None
            tp = self.namespace.tp_size
            self._rank_namespaces = [
                dataclasses.replace(self.namespace, tp_rank=r) for r in range(tp)
            ]
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self.tp_rank = get_tensor_model_parallel_rank()
            self.rank_namespace = dataclasses.replace(self.namespace, tp_rank=self.tp_rank)
            self._engine: CopyEngine | None = None
            self._kv_caches: list[torch.Tensor] = []
            self._disabled = ""  # why this worker moves no bytes (empty: it does)
            self._verified = False
            self._load_errors: set[int] = set()
            self._worker_events: list[KVCacheEvent] = []
            self._events_lock = threading.Lock()
            self._saves: queue.Queue[tuple[list[bytes], np.ndarray, BlockOp, int] | None] = (
                queue.Queue()
            )
            self._pending_bytes = 0
            self._staging = _StagingPool(arena)
            self._saver = threading.Thread(target=self._save_loop, name="kvpool-save", daemon=True)
            self._saver.start()
        log.info(
            "KVPoolConnector (%s): cluster %r at %s, namespace %s",
            role.name.lower(),
            self.config.cluster,
            self.config.redis_url.split("@")[-1],
            self.namespace,
        )

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a dropped save is a future miss, never a lost result

    def _count(self, **counts: float) -> None:
        with self._stats_lock:
            self._stats.add(**counts)
            self.totals.add(**counts)

    # == scheduler side ==========================================================================

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        if not self.config.load_blocks:
            return 0, False
        state = self._state(request)
        if state is None:
            return 0, False
        # Never the block holding the last prompt token: vLLM computes it to sample.
        lookable = (len(state.tokens) - 1) // self.block_size
        if lookable * self.block_size <= num_computed_tokens:
            return 0, False
        tokens = state.tokens[: lookable * self.block_size]
        t0 = time.perf_counter()
        try:
            hits = lookable
            for ns in self._rank_namespaces:  # a block counts once every rank holds its shard
                keys = block_keys(tokens, ns.with_salts(**state.salts) if state.salts else ns)
                hits = min(hits, self.cluster.match_prefix(keys[:hits]))
                if hits * self.block_size <= num_computed_tokens:
                    break
        except Exception as e:  # noqa: BLE001 - a failed lookup is a miss, never a failed request
            log.warning("kvpool lookup for request %s failed: %s", request.request_id, e)
            self._count(
                lookups=1,
                lookup_tokens=len(tokens),
                lookup_errors=1,
                lookup_seconds=time.perf_counter() - t0,
            )
            return 0, False
        state.hit_blocks = hits
        external = max(0, hits * self.block_size - num_computed_tokens)
        self._count(
            lookups=1,
            lookup_tokens=len(tokens),
            hit_tokens=external,
            lookup_seconds=time.perf_counter() - t0,
        )
        return external, False

    def _state(self, request: Request) -> _ReqState | None:
        state = self._reqs.get(request.request_id)
        if state is None:
            tokens = request.prompt_token_ids
            # Token ids do not identify the bytes of multimodal or embedding inputs.
            if tokens is None or getattr(request, "mm_features", None):
                return None
            lora = request.lora_request.lora_name if request.lora_request else None
            state = _ReqState(list(tokens), _request_salts(lora, request.cache_salt))
            self._reqs[request.request_id] = state
        return state

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        state = self._reqs.get(request.request_id)
        if state is None or num_external_tokens <= 0:
            return
        block_ids = blocks.get_block_ids()[0]
        end = state.hit_blocks
        start = end - num_external_tokens // self.block_size
        state.load = (start, list(block_ids[start:end]))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KVPoolMetadata(self.namespace)
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            state = self._reqs.get(new.req_id)
            if state is None:
                continue
            state.block_ids = list(new.block_ids[0])
            self._plan(
                meta, new.req_id, state, new.num_computed_tokens, scheduled.get(new.req_id, 0)
            )
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._reqs.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                if req_id in cached.resumed_req_ids:
                    state.block_ids = list(new_ids[0])
                else:
                    state.block_ids.extend(new_ids[0])
            computed = cached.num_computed_tokens[i]
            self._plan(meta, req_id, state, computed, scheduled.get(req_id, 0))
        for req_id in scheduler_output.finished_req_ids:
            self._reqs.pop(req_id, None)
        return meta

    def _plan(
        self, meta: KVPoolMetadata, req_id: str, state: _ReqState, computed: int, scheduled: int
    ) -> None:
        bs = self.block_size
        if state.load is not None:
            start, ids = state.load
            state.load = None
            end = start + len(ids)
            meta.loads.append(BlockOp(req_id, state.tokens[: end * bs], state.salts, start, ids))
        # Blocks computed before this step were local or loaded hits: not ours to store again.
        state.saved_upto = max(state.saved_upto, computed // bs)
        if not self.config.save_blocks:
            return
        full = min(computed + scheduled, len(state.tokens)) // bs
        if full > state.saved_upto and len(state.block_ids) >= full:
            start = state.saved_upto
            meta.saves.append(
                BlockOp(
                    req_id,
                    state.tokens[: full * bs],
                    state.salts,
                    start,
                    state.block_ids[start:full],
                )
            )
            state.saved_upto = full

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._reqs.pop(request.request_id, None)
        return False, None  # saves never hold vLLM's blocks: they copy to staging first

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        events = connector_output.kv_cache_events
        if isinstance(events, KVPoolKVEvents):
            if self._events is None:
                self._events = events
            else:
                self._events.add_events(events.get_all_events())
                self._events.increment_workers(events.get_number_of_workers())

    def take_events(self) -> Iterable[KVCacheEvent]:
        if self._events is None:
            return ()
        events = self._events.aggregate().get_all_events()
        self._events = None
        return events

    # == worker side =============================================================================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        names = sorted(kv_caches, key=lambda n: (extract_layer_index(n), n))
        tensors = [kv_caches[n] for n in names]
        if any(t.device.type != "cpu" for t in tensors):
            self._disable(f"KV cache on {tensors[0].device}: only the CPU copy engine exists yet")
            return
        num_blocks = int(self._kv_cache_config.num_blocks)
        shape = tuple(tensors[0].shape)
        block_dim = next((d for d, n in enumerate(shape) if n == num_blocks), None)
        if block_dim is None:
            self._disable(f"no dimension of size num_blocks={num_blocks} in KV shape {shape}")
            return
        try:
            self._engine = cpu_engine(tensors, block_dim)
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
        want = self.rank_namespace.kv_layout.split("/")[-1]
        if isas and isas != {want}:
            self._disable(
                f"the attention kernels use byte layout {sorted(isas)}, but keys were derived "
                f"for {want!r}: sharing blocks would corrupt KV"
            )

    def _keys(self, op: BlockOp, ns: Namespace) -> list[bytes]:
        ns = ns.with_salts(**op.salts) if op.salts else ns
        return block_keys(op.tokens, ns)[op.start : op.end]

    def _ns(self, meta: KVPoolMetadata) -> Namespace:
        return dataclasses.replace(meta.namespace, tp_rank=self.tp_rank)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVPoolMetadata)
        if not self._verified:
            self._verify()
        for op in meta.loads:
            self._load(op, self._ns(meta))

    def _load(self, op: BlockOp, ns: Namespace) -> None:
        engine = self._engine
        if engine is None:
            self._load_errors.update(op.block_ids)
            self._count(load_errors=len(op.block_ids))
            return
        t0 = time.perf_counter()
        keys = self._keys(op, ns)
        size = engine.object_bytes
        staging = self._staging.take(len(keys) * size)
        views = [staging[i * size : (i + 1) * size] for i in range(len(keys))]
        try:
            found = self.cluster.get_into(keys, views)
        except Exception as e:  # noqa: BLE001 - a failed load is recomputed, never fatal
            log.warning("kvpool load of %d blocks failed: %s", len(keys), e)
            found = [False] * len(keys)
        ok = [i for i, f in enumerate(found) if f]
        if len(ok) == len(keys):
            engine.scatter(op.block_ids, staging)
            self._staging.give(staging)
        elif ok:
            engine.scatter([op.block_ids[i] for i in ok], np.concatenate([views[i] for i in ok]))
        missed = [i for i, f in enumerate(found) if not f]
        if missed:
            self._load_errors.update(op.block_ids[i] for i in missed)
            with self._events_lock:
                self._worker_events.append(
                    BlockRemoved(block_hashes=[keys[i] for i in missed], medium=MEDIUM_STORAGE)
                )
        seconds = time.perf_counter() - t0
        self._count(
            loaded_blocks=len(ok),
            loaded_bytes=len(ok) * size,
            load_seconds=seconds,
            load_errors=len(missed),
        )
        with self._stats_lock:
            self._stats.observe_load(seconds)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete in start_load_kv: a stored object spans every layer

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return  # saved whole in wait_for_save, once every layer is computed

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVPoolMetadata)
        engine = self._engine
        if not meta.saves or engine is None:
            return
        if not self._verified:
            self._verify()
            engine = self._engine
            if engine is None:
                return
        ns = self._ns(meta)
        t0 = time.perf_counter()
        for op in meta.saves:
            n = len(op.block_ids)
            nbytes = n * engine.object_bytes
            if self._pending_bytes + nbytes > self.config.max_pending_save:
                self._count(save_errors=n)  # the writer is behind: drop, never stall the engine
                continue
            staging = self._staging.take(nbytes)
            engine.gather(op.block_ids, staging)
            with self._stats_lock:
                self._pending_bytes += nbytes
            self._saves.put((self._keys(op, ns), staging, op, engine.object_bytes))
        self._count(save_gather_seconds=time.perf_counter() - t0)

    def _save_loop(self) -> None:
        while (job := self._saves.get()) is not None:
            keys, staging, op, size = job
            t0 = time.perf_counter()
            views = [staging[i * size : (i + 1) * size] for i in range(len(keys))]
            try:
                stored = self.cluster.put(keys, views)
            except Exception as e:  # noqa: BLE001 - a failed save is a future miss
                log.warning("kvpool save of %d blocks failed: %s", len(keys), e)
                stored = 0
            with self._stats_lock:
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
                bs = self.block_size
                with self._events_lock:
                    self._worker_events.append(
                        BlockStored(
                            block_hashes=list[bytes | int](keys),
                            parent_block_hash=None,
                            token_ids=op.tokens[op.start * bs : op.end * bs],
                            block_size=bs,
                            lora_id=None,
                            medium=MEDIUM_STORAGE,
                            lora_name=op.salts.get("lora"),
                        )
                    )
            self._saves.task_done()

    def flush(self, timeout: float = 30.0) -> bool:
        """Waits until every queued save is written (or ``timeout``); True when none is left."""
        deadline = time.monotonic() + timeout
        while self._saves.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._saves.unfinished_tasks

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def get_kv_connector_kv_cache_events(self) -> KVPoolKVEvents | None:
        with self._events_lock:
            events, self._worker_events = self._worker_events, []
        if not events:
            return None
        out = KVPoolKVEvents(num_workers=1)
        out.add_events(events)
        return out

    def shutdown(self) -> None:
        if self.role == KVConnectorRole.WORKER:
            self.flush(self.config.timeout * 4)
            self._saves.put(None)
        self.cluster.close()

    # == both sides ==============================================================================

    def get_kv_connector_stats(self) -> KVPoolConnectorStats | None:
        with self._stats_lock:
            if self._stats.is_empty():
                return None
            stats, self._stats = self._stats, KVPoolConnectorStats()
        return stats

    @classmethod
    def build_kv_connector_stats(
        cls, data: dict[str, Any] | None = None
    ) -> KVPoolConnectorStats | None:
        return KVPoolConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVPoolPromMetrics:
        """vLLM's hook: the connector's counters in ``vllm serve``'s ``/metrics``."""
        return KVPoolPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
