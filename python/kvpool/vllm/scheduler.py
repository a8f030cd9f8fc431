"""The connector's scheduler side (one per engine).

Asks the cluster how many full prompt blocks beyond the local prefix-cache hit it holds (never
the block of the last prompt token, which vLLM must compute to sample), and tells the workers,
step by step, which blocks to load before the forward pass and which newly computed full prompt
blocks to save after it (:mod:`kvpool.vllm.metadata`). With TP > 1 a block counts as a hit only
when every rank's shard is held, and the lookup of all ranks is one Redis round trip.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvpool.cluster import Cluster
from kvpool.config import ConnectorConfig
from kvpool.keys import Namespace, block_keys
from kvpool.vllm.metadata import BlockOp, KVPoolMetadata, NewRequest
from kvpool.vllm.stats import Counters, KVPoolKVEvents

if TYPE_CHECKING:
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["SchedulerSide"]

log = logging.getLogger("kvpool.vllm.connector")


def request_salts(lora_name: str | None, cache_salt: str | None) -> dict[str, str]:
    salts = {}
    if lora_name:
        salts["lora"] = lora_name
    if cache_salt:
        salts["cache_salt"] = cache_salt
    return salts


@dataclass
class _ReqState:
    """Scheduler-side state of one request."""

    tokens: list[int]
    salts: dict[str, str]
    block_ids: list[int] = field(default_factory=list)
    rank_keys: list[list[bytes]] | None = None  # per rank, keys of the lookable blocks (once)
    hit_blocks: int = 0  # full blocks the cluster holds (from the last lookup)
    load: tuple[int, list[int]] | None = None  # (first block, vLLM block ids) not yet sent
    saved_upto: int = 0  # blocks [0, saved_upto) are stored or were not ours to store


class SchedulerSide:
    def __init__(
        self,
        config: ConnectorConfig,
        cluster: Cluster,
        namespace: Namespace,
        block_size: int,
        counters: Counters,
    ) -> None:
        self.config = config
        self.cluster = cluster
        self.namespace = namespace
        self.block_size = block_size
        self._count = counters.add
        self._rank_namespaces = [
            dataclasses.replace(namespace, tp_rank=r) for r in range(namespace.tp_size)
        ]
        self._reqs: dict[str, _ReqState] = {}
        self._known: set[str] = set()  # requests the workers hold tokens of
        self._events: KVPoolKVEvents | None = None

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
        t0 = time.perf_counter()
        try:
            if state.rank_keys is None:  # hashed once, however often vLLM asks again
                tokens = state.tokens[: lookable * self.block_size]
                state.rank_keys = [
                    block_keys(tokens, ns.with_salts(**state.salts) if state.salts else ns)
                    for ns in self._rank_namespaces
                ]
            # A block counts once every rank holds its shard: one Redis round trip for all.
            hits = min(self.cluster.match_prefixes(state.rank_keys))
        except Exception as e:  # noqa: BLE001 - a failed lookup is a miss, never a failed request
            log.warning("kvpool lookup for request %s failed: %s", request.request_id, e)
            self._count(
                lookups=1,
                lookup_tokens=len(state.tokens),
                lookup_errors=1,
                lookup_seconds=time.perf_counter() - t0,
            )
            return 0, False
        state.hit_blocks = hits
        external = max(0, hits * self.block_size - num_computed_tokens)
        self._count(
            lookups=1,
            lookup_tokens=len(state.tokens),
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
            state = _ReqState(list(tokens), request_salts(lora, request.cache_salt))
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

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVPoolMetadata:
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
            if req_id in self._known:
                self._known.discard(req_id)
                meta.finished.append(req_id)
        return meta

    def _plan(
        self, meta: KVPoolMetadata, req_id: str, state: _ReqState, computed: int, scheduled: int
    ) -> None:
        bs = self.block_size
        ops: list[BlockOp] = []
        if state.load is not None:
            start, ids = state.load
            state.load = None
            ops.append(BlockOp(req_id, start, ids))
            meta.loads.append(ops[-1])
        # Blocks computed before this step were local or loaded hits: not ours to store again.
        state.saved_upto = max(state.saved_upto, computed // bs)
        if self.config.save_blocks:
            full = min(computed + scheduled, len(state.tokens)) // bs
            if full > state.saved_upto and len(state.block_ids) >= full:
                start = state.saved_upto
                ops.append(BlockOp(req_id, start, state.block_ids[start:full]))
                meta.saves.append(ops[-1])
                state.saved_upto = full
        if ops and req_id not in self._known:
            full_blocks = len(state.tokens) // bs
            meta.new_requests.append(
                NewRequest(req_id, state.tokens[: full_blocks * bs], state.salts)
            )
            self._known.add(req_id)

    def request_finished(self, request: Request) -> None:
        self._reqs.pop(request.request_id, None)

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
