"""The connector's counters and KV events, as vLLM collects them from the workers and the
scheduler (``get_kv_connector_stats``, ``get_kv_connector_kv_cache_events``)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vllm.distributed.kv_events import KVConnectorKVEvents, KVEventAggregator
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from kvpool.vllm.prom import COUNTERS, LOAD_DURATIONS

if TYPE_CHECKING:
    from vllm.distributed.kv_events import KVCacheEvent

__all__ = ["Counters", "KVPoolConnectorStats", "KVPoolKVEvents"]

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


class Counters:
    """One side's counters: ``since`` what vLLM has not collected yet, ``totals`` since start
    (the runner's reports read these)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.since = KVPoolConnectorStats()
        self.totals = KVPoolConnectorStats()

    def add(self, **counts: float) -> None:
        with self._lock:
            self.since.add(**counts)
            self.totals.add(**counts)

    def observe_load(self, seconds: float) -> None:
        with self._lock:
            self.since.observe_load(seconds)

    def collect(self) -> KVPoolConnectorStats | None:
        """What vLLM has not collected yet (None: nothing), and a fresh interval."""
        with self._lock:
            if self.since.is_empty():
                return None
            out, self.since = self.since, KVPoolConnectorStats()
        return out
