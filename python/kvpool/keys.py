"""Block keys: the namespace fingerprint and the chained 128-bit block hash.

The byte format is specified in README.md ("Key format") so that other engines can produce the
same keys; ``tests/python/test_keys.py`` pins it with known answers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from kvpool import _core

__all__ = ["KEY_BYTES", "Namespace", "block_keys"]

#: Bytes of one block key (XXH3-128, see the README's key format).
KEY_BYTES = 16


@dataclass(frozen=True)
class Namespace:
    """Everything besides the tokens that decides a KV block's bytes.

    Two engines share blocks exactly when their namespaces and tokens agree, so every field that
    changes the bytes must be set: the model and its revision, the KV dtype and layout, the
    attention backend family, the block size in tokens, the tensor-parallel size and rank, the
    layer range, and request-level salts (LoRA name, cache salt) in ``salts``.
    """

    model: str
    revision: str = ""
    dtype: str = ""
    kv_layout: str = ""
    attention_backend: str = ""
    block_tokens: int = 16
    tp_size: int = 1
    tp_rank: int = 0
    layer_begin: int = 0
    layer_end: int = -1
    salts: Mapping[str, str] = field(default_factory=dict)

    def _core_namespace(self) -> Any:
        ns = _core.Namespace()
        for name in ("model", "revision", "dtype", "kv_layout", "attention_backend"):
            setattr(ns, name, str(getattr(self, name)))
        for name in ("block_tokens", "tp_size", "tp_rank", "layer_begin", "layer_end"):
            setattr(ns, name, int(getattr(self, name)))
        ns.salts = {str(k): str(v) for k, v in self.salts.items()}
        return ns

    def canonical(self) -> bytes:
        """The exact bytes hashed into :meth:`fingerprint` (README "Key format")."""
        return bytes(self._core_namespace().canonical())

    @cached_property
    def _fingerprint(self) -> bytes:
        return bytes(self._core_namespace().fingerprint())

    def fingerprint(self) -> bytes:
        """k_{-1}: XXH3-128 of :meth:`canonical`, 16 bytes."""
        return self._fingerprint

    def with_salts(self, **salts: str) -> Namespace:
        """A copy with extra request-level salts (e.g. ``lora="name"``, ``cache_salt="..."``)."""
        merged = dict(self.salts)
        merged.update(salts)
        return dataclasses.replace(self, salts=merged)

    def __hash__(self) -> int:  # salts is a dict; the canonical bytes identify the namespace
        return hash(self.canonical())


def block_keys(token_ids: Sequence[int] | Any, namespace: Namespace) -> list[bytes]:
    """Keys of the full blocks of ``token_ids`` (a trailing partial block gets none).

    ``token_ids`` is a list of ints or a 1-D buffer of 32/64-bit integers (numpy array,
    ``array.array``); every id must fit in 32 bits unsigned. Key ``i`` chains key ``i - 1``, so a
    key identifies its whole prefix.
    """
    return list(
        _core.chain_block_keys(namespace.fingerprint(), token_ids, int(namespace.block_tokens))
    )
