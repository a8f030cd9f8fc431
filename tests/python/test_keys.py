"""Block keys: the README "Key format", checked against an independent implementation built on
the ``xxhash`` package, plus literal known answers that pin the canonical byte format."""

from __future__ import annotations

import array
import dataclasses
import json
import random
import struct
import subprocess
import sys

import kvpool
import numpy as np
import pytest
import xxhash
from conftest import child_env
from kvpool import Namespace, block_keys

# --- An independent implementation of README "Key format" -------------------------------------


def ref_canonical(ns: Namespace) -> bytes:
    def field(name: str, value: object) -> bytes:
        v = str(value).encode()
        return name.encode() + b"=" + str(len(v)).encode() + b":" + v + b";"

    out = b"kvpool-namespace-v1;"
    for name in ("model", "revision", "dtype", "kv_layout", "attention_backend"):
        out += field(name, getattr(ns, name))
    for name in ("block_tokens", "tp_size", "tp_rank", "layer_begin", "layer_end"):
        out += field(name, int(getattr(ns, name)))
    for salt in sorted(ns.salts, key=lambda s: s.encode()):
        out += field(f"salt.{salt}", ns.salts[salt])
    return out


def ref_keys(tokens: list[int], ns: Namespace) -> list[bytes]:
    prev = xxhash.xxh3_128_digest(ref_canonical(ns))  # canonical (big-endian) 16 bytes
    bt = ns.block_tokens
    keys = []
    for i in range(len(tokens) // bt):
        block = tokens[i * bt : (i + 1) * bt]
        prev = xxhash.xxh3_128_digest(prev + struct.pack(f"<{bt}I", *block))
        keys.append(prev)
    return keys


# --- Literal known answers (README "Key format"); a change here breaks every stored key -------

EXAMPLE_CANONICAL = (
    b"kvpool-namespace-v1;model=1:m;revision=0:;dtype=0:;kv_layout=0:;attention_backend=0:;"
    b"block_tokens=2:16;tp_size=1:1;tp_rank=1:0;layer_begin=1:0;layer_end=2:-1;"
)
EXAMPLE_FINGERPRINT = "ece020d6b3a4aa0a355360d56b3f92c7"
EXAMPLE_KEYS_0_TO_39 = ["bf18b3a1ab69a09309f7fa34be51ac4e", "d723c43c012cd2dff2cd8d29036f7abd"]

FULL_NS = Namespace(
    model="meta-llama/Llama-3.1-8B-Instruct",
    revision="0e9e39f",
    dtype="bfloat16",
    kv_layout="NHD",
    attention_backend="flash",
    block_tokens=16,
    tp_size=4,
    tp_rank=3,
    layer_begin=0,
    layer_end=32,
    salts={"lora": "adapter-7", "cache_salt": "tenant-42"},
)


def test_readme_example_is_pinned() -> None:
    ns = Namespace(model="m")
    assert ns.canonical() == EXAMPLE_CANONICAL
    assert ns.fingerprint().hex() == EXAMPLE_FINGERPRINT
    assert [k.hex() for k in block_keys(list(range(40)), ns)] == EXAMPLE_KEYS_0_TO_39


def test_full_namespace_literal_canonical() -> None:
    assert FULL_NS.canonical() == (
        b"kvpool-namespace-v1;model=32:meta-llama/Llama-3.1-8B-Instruct;revision=7:0e9e39f;"
        b"dtype=8:bfloat16;kv_layout=3:NHD;attention_backend=5:flash;block_tokens=2:16;"
        b"tp_size=1:4;tp_rank=1:3;layer_begin=1:0;layer_end=2:32;"
        b"salt.cache_salt=9:tenant-42;salt.lora=9:adapter-7;"
    )


def test_literal_hashes_from_the_xxhash_reference() -> None:
    # The same values must come out of kvpool and out of the xxhash package (hex pinned here).
    fp = xxhash.xxh3_128_digest(EXAMPLE_CANONICAL)
    assert fp.hex() == EXAMPLE_FINGERPRINT
    k0 = xxhash.xxh3_128_digest(fp + struct.pack("<16I", *range(16)))
    assert k0.hex() == EXAMPLE_KEYS_0_TO_39[0]


@pytest.mark.parametrize(
    "ns",
    [
        Namespace(model="m"),
        FULL_NS,
        Namespace(model="模型-ü", dtype="fp8_e4m3", block_tokens=1),
        Namespace(model="x;y=1:z", revision=";", salts={"a;b": "c=d", "é": "", "Z": "1"}),
        Namespace(model="m", block_tokens=256, layer_begin=8, layer_end=16),
    ],
    ids=["minimal", "full", "unicode", "separators-in-values", "big-blocks"],
)
def test_matches_independent_reference(ns: Namespace) -> None:
    rng = random.Random(1234)
    tokens = [rng.randrange(0, 2**32) for _ in range(ns.block_tokens * 37 + 5)]
    tokens[:3] = [0, 2**32 - 1, 1]  # the extremes of the range
    assert ns.canonical() == ref_canonical(ns)
    assert ns.fingerprint() == xxhash.xxh3_128_digest(ref_canonical(ns))
    keys = block_keys(tokens, ns)
    assert keys == ref_keys(tokens, ns)
    assert len(keys) == len(tokens) // ns.block_tokens
    assert all(isinstance(k, bytes) and len(k) == 16 for k in keys)


def test_partial_trailing_block_gets_no_key() -> None:
    ns = Namespace(model="m", block_tokens=16)
    tokens = list(range(1000, 1000 + 16 * 5))
    full = block_keys(tokens, ns)
    assert len(full) == 5
    for extra in range(1, 16):
        assert block_keys(tokens[: 16 * 4 + extra], ns) == full[:4]
    assert block_keys(tokens[:15], ns) == []
    assert block_keys([], ns) == []


def test_each_key_names_its_whole_prefix() -> None:
    ns = Namespace(model="m", block_tokens=4)
    tokens = list(range(40))
    keys = block_keys(tokens, ns)
    # Changing a token in block 5 changes keys 5.. and nothing before.
    changed = tokens.copy()
    changed[5 * 4 + 2] += 1
    keys2 = block_keys(changed, ns)
    assert keys2[:5] == keys[:5]
    assert all(a != b for a, b in zip(keys[5:], keys2[5:], strict=True))
    # The same block contents at another position get another key.
    assert block_keys([7] * 8, ns)[0] != block_keys([7] * 8, ns)[1]
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize(
    "make",
    [
        lambda t: t,
        lambda t: np.asarray(t, dtype=np.int32),
        lambda t: np.asarray(t, dtype=np.int64),
        lambda t: np.asarray(t, dtype=np.uint32),
        lambda t: np.asarray(t, dtype=np.uint64),
        lambda t: array.array("I", t),
        lambda t: array.array("q", t),
        lambda t: tuple(t),
        lambda t: np.asarray(t, dtype=np.int64)[::1],
    ],
    ids=["list", "int32", "int64", "uint32", "uint64", "array-I", "array-q", "tuple", "view"],
)
def test_token_containers_give_identical_keys(make) -> None:  # type: ignore[no-untyped-def]
    ns = Namespace(model="m", block_tokens=16)
    tokens = list(np.random.default_rng(7).integers(0, 2**31 - 1, size=16 * 20 + 3))
    tokens = [int(t) for t in tokens]
    expected = ref_keys(tokens, ns)
    assert block_keys(make(tokens), ns) == expected


def test_non_contiguous_array_is_read_by_value() -> None:
    ns = Namespace(model="m", block_tokens=4)
    base = np.arange(64, dtype=np.int64)
    strided = base[::2]
    assert block_keys(strided, ns) == ref_keys([int(t) for t in strided], ns)


@pytest.mark.parametrize(
    "tokens",
    [
        [0, 1, -1, 3],
        [0, 1, 2**32, 3],
        [2**64],
        [-(2**63) - 1],
        np.array([1, -5, 3, 4], dtype=np.int32),
        np.array([1, 2, 2**32 + 1, 4], dtype=np.int64),
        np.array([2**40], dtype=np.uint64),
        [0, 1.5, 2, 3],
        ["1", "2", "3", "4"],
    ],
    ids=[
        "neg-list",
        "2^32-list",
        "2^64-list",
        "huge-neg",
        "neg-int32",
        "big-int64",
        "big-uint64",
        "float",
        "str",
    ],
)
def test_bad_tokens_raise(tokens: object) -> None:
    with pytest.raises(kvpool.InvalidArgumentError):
        block_keys(tokens, Namespace(model="m", block_tokens=4))  # type: ignore[arg-type]


def test_bad_token_error_names_the_index() -> None:
    with pytest.raises(kvpool.InvalidArgumentError, match="token 2"):
        block_keys([0, 1, -1, 3], Namespace(model="m", block_tokens=4))


def test_largest_token_is_accepted() -> None:
    ns = Namespace(model="m", block_tokens=2)
    assert block_keys([2**32 - 1, 0], ns) == ref_keys([2**32 - 1, 0], ns)


@pytest.mark.parametrize(
    "ns",
    [Namespace(model="m", block_tokens=0), Namespace(model="m", tp_size=2, tp_rank=2)],
    ids=["block_tokens=0", "tp_rank>=tp_size"],
)
def test_invalid_namespace_raises(ns: Namespace) -> None:
    with pytest.raises(kvpool.InvalidArgumentError):
        block_keys(list(range(32)), ns)


BASE = Namespace(
    model="m",
    revision="r",
    dtype="bf16",
    kv_layout="NHD",
    attention_backend="flash",
    block_tokens=8,
    tp_size=2,
    tp_rank=0,
    layer_begin=0,
    layer_end=32,
    salts={"lora": "a"},
)
CHANGES = {
    "model": "m2",
    "revision": "r2",
    "dtype": "fp16",
    "kv_layout": "HND",
    "attention_backend": "flashinfer",
    "block_tokens": 4,
    "tp_size": 4,
    "tp_rank": 1,
    "layer_begin": 1,
    "layer_end": 31,
    "salts": {"lora": "b"},
}


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(Namespace)])
def test_every_namespace_field_changes_the_keys(field: str) -> None:
    assert field in CHANGES, f"new Namespace field {field!r}: add it to CHANGES"
    other = dataclasses.replace(BASE, **{field: CHANGES[field]})
    tokens = list(range(64))
    assert other.canonical() != BASE.canonical()
    assert other.fingerprint() != BASE.fingerprint()
    a, b = block_keys(tokens, BASE), block_keys(tokens, other)
    assert a and b
    assert not set(a) & set(b)
    assert b == ref_keys(tokens, other)


def test_salts_change_keys_and_their_order_does_not() -> None:
    tokens = list(range(32))
    plain = Namespace(model="m")
    one = Namespace(model="m", salts={"lora": "x"})
    two = Namespace(model="m", salts={"lora": "x", "cache_salt": "y"})
    two_reordered = Namespace(model="m", salts={"cache_salt": "y", "lora": "x"})
    empty_value = Namespace(model="m", salts={"lora": ""})
    keys = [block_keys(tokens, ns) for ns in (plain, one, two, empty_value)]
    assert len({tuple(k) for k in keys}) == 4
    assert block_keys(tokens, two_reordered) == keys[2]
    # A salt cannot be confused with another field or salt that renders to similar text.
    assert (
        Namespace(model="m", salts={"a": "b;salt.c=1:d"}).fingerprint()
        != Namespace(model="m", salts={"a": "b", "c": "d"}).fingerprint()
    )


def test_with_salts_adds_salts() -> None:
    ns = Namespace(model="m", salts={"lora": "x"})
    salted = ns.with_salts(cache_salt="y")
    assert salted.salts == {"lora": "x", "cache_salt": "y"}
    assert salted == Namespace(model="m", salts={"lora": "x", "cache_salt": "y"})
    assert ns.salts == {"lora": "x"}


def test_with_salts_after_keys_were_computed() -> None:
    """A namespace that already produced keys (its fingerprint is cached) can still be salted,
    and the salted copy gets its own fingerprint."""
    ns = Namespace(model="m")
    before = block_keys(list(range(16)), ns)
    salted = ns.with_salts(lora="x")
    assert salted.fingerprint() == xxhash.xxh3_128_digest(ref_canonical(salted))
    assert block_keys(list(range(16)), salted) != before


_SUBPROCESS = """
import json, sys
import kvpool
ns = kvpool.Namespace(model="m", dtype="bf16", salts={"lora": "x", "cache_salt": "y", "z": "w"})
print(json.dumps([k.hex() for k in kvpool.block_keys(list(range(200)), ns)]))
"""


def test_keys_are_identical_in_fresh_processes() -> None:
    ns = Namespace(model="m", dtype="bf16", salts={"lora": "x", "cache_salt": "y", "z": "w"})
    expected = [k.hex() for k in block_keys(list(range(200)), ns)]
    assert len(expected) == 12
    for seed in ("0", "12345"):
        env = child_env({"PYTHONHASHSEED": seed})
        out = subprocess.run(
            [sys.executable, "-c", _SUBPROCESS],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert json.loads(out.stdout.strip().splitlines()[-1]) == expected, out.stderr
