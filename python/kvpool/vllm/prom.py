"""The connector's counters in vLLM's own Prometheus metrics (``vllm serve``'s ``/metrics``).

vLLM sums each step's :class:`~kvpool.vllm.connector.KVPoolConnectorStats` over the workers and
the scheduler and hands the sum to :class:`KVPoolPromMetrics.observe` in the process that serves
``/metrics``; every stats key becomes a counter ``vllm:kvpool_<key>_total`` with vLLM's own
labels (model name, engine), and the duration of each request's load a histogram.
"""

from __future__ import annotations

from typing import Any

from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    PromMetric,
    PromMetricT,
)

# Stats key -> help. Every key the connector counts is here (tests check the two agree).
COUNTERS = {
    "lookups": "Requests the scheduler looked up in kvpool.",
    "lookup_tokens": "Prompt tokens those lookups covered.",
    "hit_tokens": "Prompt tokens reported to vLLM as kvpool hits.",
    "lookup_errors": "Lookups that failed (counted as misses).",
    "lookup_seconds": "Time the scheduler spent in lookups.",
    "loaded_blocks": "Blocks loaded from kvpool into the KV cache.",
    "loaded_bytes": "Bytes loaded from kvpool into the KV cache.",
    "load_seconds": "Time the workers spent loading (on the forward pass's critical path).",
    "load_errors": "Blocks that could not be loaded (vLLM recomputed them).",
    "load_fetches": "Cluster reads of the loads (one per chunk of load_chunk_bytes).",
    "saved_blocks": "Blocks written to kvpool.",
    "saved_bytes": "Bytes written to kvpool.",
    "save_seconds": "Time the background writers spent writing.",
    "save_gather_seconds": "Time copying saved blocks to staging memory (on the forward pass).",
    "save_errors": "Blocks whose save failed or was dropped.",
}
LOAD_DURATIONS = "load_durations"  # stats key: one entry per request load, in seconds
LOAD_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0,
                2.5, 5.0, 10.0)  # fmt: skip


class KVPoolPromMetrics(KVConnectorPromMetrics):
    """Registers the counters once per process; :meth:`observe` adds one interval's sums."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {
            key: self._counter_cls(
                name=f"vllm:kvpool_{key}", documentation=doc, labelnames=labelnames
            )
            for key, doc in COUNTERS.items()
        }
        histogram: Any = self._histogram_cls  # typed by vLLM as any of its metric classes
        self._load_time = histogram(
            name="vllm:kvpool_load_duration_seconds",
            documentation="Time to load one request's kvpool hits into the KV cache.",
            buckets=LOAD_BUCKETS,
            labelnames=labelnames,
        )
        self._bound: dict[int, tuple[dict[str, Any], Any]] = {}

    def _children(self, engine_idx: int) -> tuple[dict[str, Any], Any]:
        if engine_idx not in self._bound:
            values = self.per_engine_labelvalues[engine_idx]
            self._bound[engine_idx] = (
                {k: c.labels(*values) for k, c in self._counters.items()},
                self._load_time.labels(*values),
            )
        return self._bound[engine_idx]

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        if not transfer_stats_data:
            return
        counters, load_time = self._children(engine_idx)
        for key, value in transfer_stats_data.items():
            if key in counters and value:
                counters[key].inc(value)
        for seconds in transfer_stats_data.get(LOAD_DURATIONS, ()):
            load_time.observe(seconds)
