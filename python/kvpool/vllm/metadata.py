"""What the scheduler tells the workers each step (``KVConnectorMetadata``).

A request's prompt travels once, in the first step that has work for it (:class:`NewRequest`);
from then on a load or save names only the request, its first block and vLLM's block ids
(:class:`BlockOp`). Each worker derives the keys in its own rank's namespace and keeps each
request's key chain, extending it as later blocks are needed, until the request is in
``finished``. Nothing is hashed twice and no step carries more tokens than its new requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from kvpool.keys import Namespace

__all__ = ["BlockOp", "KVPoolMetadata", "NewRequest"]


@dataclass
class NewRequest:
    """A request the workers have not seen: the tokens of its full prompt blocks (the only
    blocks a worker ever loads or saves) and its salts (LoRA, cache salt)."""

    req_id: str
    tokens: list[int]
    salts: dict[str, str]


@dataclass
class BlockOp:
    """Load or save blocks ``[start, end)`` of a request's prompt into or out of vLLM's blocks
    ``block_ids`` (one per block of the range)."""

    req_id: str
    start: int
    block_ids: list[int]

    @property
    def end(self) -> int:
        return self.start + len(self.block_ids)


@dataclass
class KVPoolMetadata(KVConnectorMetadata):
    namespace: Namespace  # the engine's, rank 0 (each worker sets its own rank)
    new_requests: list[NewRequest] = field(default_factory=list)
    loads: list[BlockOp] = field(default_factory=list)
    saves: list[BlockOp] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)  # requests the workers can forget
