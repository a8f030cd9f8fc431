"""``KVPoolConnector``: vLLM's KV connector (v1) over a kvpool cluster.

A thin facade: vLLM makes one connector per role, and each delegates to its side,
:class:`~kvpool.vllm.scheduler.SchedulerSide` (one per engine: lookups, and the step's plan of
loads and saves, :mod:`kvpool.vllm.metadata`) or :class:`~kvpool.vllm.worker.WorkerSide` (one
per TP rank: the copies between vLLM's KV tensors and the cluster). Counters and events are in
:mod:`kvpool.vllm.stats`, their Prometheus form in :mod:`kvpool.vllm.prom`. Nothing the cluster
does (dead nodes, an unreachable Redis) fails a request: it only costs hits.

Block keys: ``kvpool.block_keys`` over the prompt tokens in a namespace of everything that decides
the bytes (model, revision, KV dtype, block size, TP size and rank, attention backend and its CPU
kernel's byte layout, LoRA name, cache salt), so engines share blocks exactly when their bytes
would be identical.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvpool.cluster import Cluster
from kvpool.config import ConnectorConfig
from kvpool.errors import ConfigError
from kvpool.keys import Namespace
from kvpool.staging import StagingArena
from kvpool.vllm.metadata import KVPoolMetadata
from kvpool.vllm.prom import KVPoolPromMetrics
from kvpool.vllm.scheduler import SchedulerSide
from kvpool.vllm.stats import Counters, KVPoolConnectorStats, KVPoolKVEvents
from kvpool.vllm.worker import WorkerSide

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

__all__ = [
    "KVPoolConnector",
    "KVPoolConnectorStats",
    "KVPoolKVEvents",
    "connector_namespace",
    "load_config",
]

log = logging.getLogger(__name__)


# -- the namespace and the settings ------------------------------------------------------------


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
        self._counters = Counters()
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(
                self.config, self.cluster, self.namespace, self.block_size, self._counters
            )
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self.tp_rank = get_tensor_model_parallel_rank()
            self._worker = WorkerSide(
                self.config,
                self.cluster,
                dataclasses.replace(self.namespace, tp_rank=self.tp_rank),
                self.block_size,
                self._counters,
                vllm_config,
                int(kv_cache_config.num_blocks),
                arena,
            )
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

    @property
    def totals(self) -> KVPoolConnectorStats:
        """This side's counters since start (never reset)."""
        return self._counters.totals

    def _sched(self) -> SchedulerSide:
        assert self._scheduler is not None, "a scheduler-side call on a worker connector"
        return self._scheduler

    def _work(self) -> WorkerSide:
        assert self._worker is not None, "a worker-side call on the scheduler's connector"
        return self._worker

    def _meta(self) -> KVPoolMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVPoolMetadata)
        return meta

    # == scheduler side ==========================================================================

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self._sched().get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        self._sched().update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._sched().build_connector_meta(scheduler_output)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._sched().request_finished(request)
        return False, None  # saves never hold vLLM's blocks: they copy to staging first

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self._sched().update_connector_output(connector_output)

    def take_events(self) -> Iterable[KVCacheEvent]:
        return self._sched().take_events()

    # == worker side =============================================================================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._work().register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self._work().start_load_kv(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete in start_load_kv: a stored object spans every layer

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return  # saved whole in wait_for_save, once every layer is computed

    def wait_for_save(self) -> None:
        self._work().wait_for_save(self._meta())

    def flush(self, timeout: float = 30.0) -> bool:
        """Waits until every queued save is written (or ``timeout``); True when none is left."""
        return self._work().flush(timeout)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._work().get_block_ids_with_load_errors()

    def get_kv_connector_kv_cache_events(self) -> KVPoolKVEvents | None:
        return self._work().take_events()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        self.cluster.close()

    # == both sides ==============================================================================

    def get_kv_connector_stats(self) -> KVPoolConnectorStats | None:
        return self._counters.collect()

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
