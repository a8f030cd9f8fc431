"""Property-based tests (hypothesis) of configuration and address parsing: sizes, host:port,
typed settings and unknown keys, transports, RDMA device lists, auth token files and Redis URLs.

The contract checked throughout: a value either parses to what it says, or raises the
project's documented error (:class:`kvpool.errors.ConfigError` for settings,
:class:`kvpool.errors.InvalidArgumentError` for addresses) whose message names the bad value;
never any other exception. Nothing is mocked: real files, the real core's RDMA validation, and
redis-py's URL parser without a connection.
"""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import fields
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from kvpool.client import parse_address
from kvpool.config import (
    SERVER_TRANSPORTS,
    ConnectorConfig,
    ServerConfig,
    parse_size,
    read_auth_tokens,
)
from kvpool.errors import ConfigError, InvalidArgumentError
from kvpool.metadata import ClusterKeys, _index_reader

# 150 examples per property keep the whole file around 10 s on a 2-core machine. No example
# database (a failure prints its example and how to replay it).
_COMMON = {"deadline": None, "database": None, "suppress_health_check": [HealthCheck.too_slow]}
PROPS = settings(max_examples=150, **_COMMON)
FEW = settings(max_examples=60, **_COMMON)

SETTINGS = (ServerConfig, ConnectorConfig)
BINARY = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
DECIMAL = {"kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}
SHORT = {"k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}
UNITS = {"": 1, "b": 1, **BINARY, **DECIMAL, **SHORT}
SIZE_KEYS = {
    ServerConfig: ("memory", "max_frame_bytes", "max_block_bytes", "shm_max_arena_bytes"),
    ConnectorConfig: ("max_pending_save", "staging_bytes", "load_chunk_bytes"),
}


def any_case(word: str) -> st.SearchStrategy[str]:
    """``word`` with each letter in either case."""
    letters = [st.sampled_from(sorted({c.lower(), c.upper()})) for c in word]
    return st.tuples(*letters).map("".join)


spaces = st.text(alphabet=" \t", max_size=2)
# Strings that look like sizes often (digits, a dot, unit letters), plus anything at all.
size_like = st.one_of(
    st.text(alphabet="0123456789.kKmMgGtTiIbB -+eE_", max_size=12),
    st.integers(min_value=0, max_value=10**400).map(str),  # beyond a float's range, too
    st.text(max_size=12),
)
anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    size_like,
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=1),
)


def expect_config_error(cls: type[Any], values: dict[str, Any]) -> ConfigError | None:
    """Applies ``values``; the ConfigError it raised, or None when it was accepted. Any other
    exception fails the test (it propagates)."""
    try:
        cls().update(values, source="test")
    except ConfigError as e:
        return e
    return None


def shown(value: Any) -> str:
    """How an error message quotes a value (its repr), for asserting the value is named."""
    return repr(value)


def fields_of(cls: type[Any], kind: type) -> list[str]:
    """Settings of ``cls`` of type ``kind`` (sizes and choices have their own tests)."""
    out = []
    for f in fields(cls):
        if f.metadata.get("size") or f.metadata.get("choices"):
            continue
        if f.type in (kind, kind.__name__):
            out.append(f.name)
    return out


def setting_pairs(kind: type) -> list[tuple[type[Any], str]]:
    return [(cls, key) for cls in SETTINGS for key in fields_of(cls, kind)]


# ---------------------------------------------------------------------------------------------
# Sizes


def render_exact(n: int, units: dict[str, int]) -> str:
    """``n`` in the largest unit of ``units`` that divides it exactly (else plain bytes)."""
    for unit, mult in sorted(units.items(), key=lambda u: -u[1]):
        if n and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


@PROPS
@given(
    n=st.integers(min_value=0, max_value=2**64),
    units=st.sampled_from([BINARY, DECIMAL, SHORT, {"": 1}, {"b": 1}]),
    before=spaces,
    between=spaces,
    after=spaces,
    upper=st.booleans(),
)
def test_every_size_renders_and_parses_back_to_its_bytes(
    n: int, units: dict[str, int], before: str, between: str, after: str, upper: bool
) -> None:
    text = render_exact(n, units)
    number = text.rstrip("kmgtib")
    unit = text[len(number) :]
    unit = unit.upper() if upper else unit
    assert parse_size(f"{before}{number}{between}{unit}{after}") == n
    assert parse_size(n) == n
    # Through the settings, as a TOML string or a KVPOOL_* variable would give it.
    for cls, keys in SIZE_KEYS.items():
        for key in keys:
            error = expect_config_error(cls, {key: text})
            if error is None:
                assert getattr(cls().update({key: text}, source="t"), key) == n
            else:  # a bound of the setting (memory >= 1 MiB, > 0): named
                assert key in str(error) and n < 1 << 20


@PROPS
@given(
    whole=st.integers(min_value=0, max_value=10**6),
    frac=st.text(alphabet="0123456789", min_size=1, max_size=6),
    unit=st.sampled_from(sorted(UNITS)),
    unit_case=st.booleans(),
)
@example(whole=4, frac="35", unit="kb", unit_case=False)  # 4.35 * 1000 in floating point
def test_fractional_sizes_are_exact(whole: int, frac: str, unit: str, unit_case: bool) -> None:
    text = f"{whole}.{frac}{unit.upper() if unit_case else unit}"
    exact = Fraction(f"{whole}.{frac}") * UNITS[unit]
    assert parse_size(text) == math.floor(exact), text


@PROPS
@given(value=size_like)
@example(value="9" * 400)  # overflows a float
@example(value="1e3")
@example(value="-1")
def test_any_size_string_parses_or_raises_config_error_naming_it(value: str) -> None:
    try:
        n = parse_size(value, name="memory")
    except ConfigError as e:
        assert shown(value) in str(e) and "memory" in str(e)
        return
    assert isinstance(n, int) and n >= 0
    assert re.search(r"\d", value)


@PROPS
@given(value=st.one_of(st.integers(max_value=-1), st.booleans(), st.none(), st.floats()))
def test_non_sizes_are_refused_by_name(value: Any) -> None:
    try:
        n = parse_size(value, name="staging_bytes")
    except ConfigError as e:
        assert "staging_bytes" in str(e)
        return
    assert isinstance(value, float) and isinstance(n, int) and n >= 0


# ---------------------------------------------------------------------------------------------
# host:port

hosts = st.one_of(
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),  # colons inside: the port is after the last one
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
    st.text(min_size=1, max_size=20),
)


@PROPS
@given(host=hosts, port=st.integers(min_value=1, max_value=65535))
def test_host_port_round_trips(host: str, port: int) -> None:
    assert parse_address(f"{host}:{port}") == (host, port)


@PROPS
@given(
    address=st.one_of(
        st.text(max_size=24),
        st.builds(lambda h, p: f"{h}:{p}", hosts, st.text(max_size=7)),
        st.builds(lambda h, p: f"{h}:{p}", hosts, st.integers(min_value=-5, max_value=10**6)),
    )
)
@example(address="host:²")  # a digit to str.isdigit(), not to int()
@example(address="host:٣")  # an Arabic-Indic three
@example(address="host:0")
@example(address=":7070")
def test_any_address_parses_or_raises_invalid_argument_naming_it(address: str) -> None:
    try:
        host, port = parse_address(address)
    except InvalidArgumentError as e:
        assert shown(address) in str(e)
        return
    assert host and 0 < port < 65536
    assert address == f"{host}:{address.rpartition(':')[2]}"
    assert re.fullmatch(r"[0-9]+", address.rpartition(":")[2])


# ---------------------------------------------------------------------------------------------
# Typed settings, unknown keys


def section_names() -> set[str]:
    return {cls._section for cls in SETTINGS}


@PROPS
@given(cls=st.sampled_from(SETTINGS), key=st.text(max_size=20), value=anything)
def test_unknown_keys_are_refused_by_name(cls: type[Any], key: str, value: Any) -> None:
    assume(key not in cls.field_names() and value is not None)
    error = expect_config_error(cls, {key: value})
    assert error is not None and f"unknown key {key!r}" in str(error)


def toml_string(s: str) -> str:
    """``s`` as a TOML basic string (every control character and DEL escaped)."""
    out = []
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


@FEW
@given(
    cls=st.sampled_from(SETTINGS),
    key=st.text(min_size=1, max_size=12),
    in_section=st.booleans(),
)
def test_unknown_keys_in_a_file_are_refused_by_name(
    cls: type[Any], key: str, in_section: bool
) -> None:
    assume(key not in cls.field_names() and key not in section_names())
    table = f"[{cls._section}]\n" if in_section else ""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "kvpool.toml"
        path.write_text(f"{table}{toml_string(key)} = 1\n", encoding="utf-8")
        with pytest.raises(ConfigError) as e:
            cls.load(file=path, env={})
    assert f"unknown key {key!r}" in str(e.value) and str(path) in str(e.value)


@PROPS
@given(cls=st.sampled_from(SETTINGS), data=st.data())
def test_any_value_of_a_known_key_is_taken_or_refused_by_name(cls: type[Any], data: Any) -> None:
    key = data.draw(st.sampled_from(cls.field_names()), label="key")
    if key.endswith("_file"):
        value = data.draw(st.one_of(st.text(max_size=12), st.just("a\0b")), label="value")
    else:
        value = data.draw(anything, label="value")
    error = expect_config_error(cls, {key: value})
    if error is None:
        return
    message = str(error)
    # The message names the key or the value (validation messages name the setting).
    assert key in message or shown(value) in message or str(value) in message, message


@PROPS
@given(
    setting=st.sampled_from(setting_pairs(bool)),
    data=st.data(),
    word=st.sampled_from(["1", "true", "yes", "on", "0", "false", "no", "off"]),
)
def test_booleans_take_their_words_in_any_case(
    setting: tuple[type[Any], str], data: Any, word: str
) -> None:
    cls, key = setting
    text = data.draw(any_case(word)) + data.draw(spaces)
    config = cls().update({key: text}, source="test")
    assert getattr(config, key) is (word in ("1", "true", "yes", "on"))
    other = data.draw(st.text(max_size=8))
    assume(other.strip().lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"))
    error = expect_config_error(cls, {key: other})
    assert error is not None and shown(other) in str(error)


@PROPS
@given(cls=st.sampled_from(SETTINGS), data=st.data())
def test_choices_take_exactly_their_values(cls: type[Any], data: Any) -> None:
    keys = [f.name for f in fields(cls) if f.metadata.get("choices")]
    key = data.draw(st.sampled_from(keys))
    choices = cls.choices(key)
    value = data.draw(st.one_of(st.sampled_from(choices), st.text(max_size=8)))
    error = expect_config_error(cls, {key: value})
    if value in choices:
        assert error is None
    else:
        assert error is not None and shown(value) in str(error)
        assert all(c in str(error) for c in choices)


@PROPS
@given(
    setting=st.sampled_from(setting_pairs(float)),
    value=st.floats(allow_nan=True, allow_infinity=True),
    as_text=st.booleans(),
)
@example(setting=(ServerConfig, "io_timeout"), value=math.nan, as_text=True)
@example(setting=(ServerConfig, "io_timeout"), value=math.inf, as_text=False)
@example(setting=(ConnectorConfig, "timeout"), value=math.nan, as_text=False)
def test_accepted_durations_and_fractions_are_finite(
    setting: tuple[type[Any], str], value: float, as_text: bool
) -> None:
    cls, key = setting
    raw = repr(value) if as_text else value
    error = expect_config_error(cls, {key: raw})
    if error is None:
        taken = getattr(cls().update({key: raw}, source="test"), key)
        assert math.isfinite(taken) and taken == value
    else:
        assert key in str(error)


@PROPS
@given(setting=st.sampled_from(setting_pairs(int)), value=st.integers(-(2**80), 2**80))
def test_integer_settings_round_trip_through_text_or_are_refused(
    setting: tuple[type[Any], str], value: int
) -> None:
    cls, key = setting
    for raw in (value, str(value), f" {value} "):
        error = expect_config_error(cls, {key: raw})
        if error is None:
            assert getattr(cls().update({key: raw}, source="test"), key) == value
        else:
            assert key in str(error), str(error)


@PROPS
@given(
    cls=st.sampled_from(SETTINGS),
    values=st.dictionaries(st.sampled_from(ServerConfig.field_names()), st.text(max_size=10)),
)
def test_environment_values_are_taken_or_refused_by_name(
    cls: type[Any], values: dict[str, str]
) -> None:
    env = {f"KVPOOL_{k.upper()}": v for k, v in values.items() if not k.endswith("_file")}
    env["KVPOOL_NO_SUCH_SETTING"] = "ignored"  # only known names are read from the environment
    try:
        config = cls.load(env=env)
    except ConfigError as e:
        assert "environment" in str(e) or any(k in str(e) for k in values), str(e)
        return
    for key, value in values.items():
        if key in cls.field_names() and not key.endswith("_file") and isinstance(value, str):
            taken = getattr(config, key)
            if isinstance(taken, str):
                assert taken == value


# ---------------------------------------------------------------------------------------------
# Transports, id lists


@PROPS
@given(
    items=st.lists(
        st.one_of(st.sampled_from(SERVER_TRANSPORTS), st.text(max_size=5)), min_size=0, max_size=5
    ),
    pads=st.lists(spaces, min_size=10, max_size=10),
)
def test_transports_are_a_comma_list_with_tcp(items: list[str], pads: list[str]) -> None:
    text = ",".join(f"{pads[i]}{t}{pads[-1 - i]}" for i, t in enumerate(items))
    error = expect_config_error(ServerConfig, {"transports": text})
    served = [t.strip() for t in text.split(",") if t.strip()]
    if "tcp" in served and all(t in SERVER_TRANSPORTS for t in served):
        assert error is None
        assert ServerConfig().update({"transports": text}, source="t").transport_list() == served
    else:
        assert error is not None and shown(text) in str(error)


@PROPS
@given(
    key=st.sampled_from(["shm_allow_uids", "shm_allow_gids"]),
    ids=st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=4),
    junk=st.text(max_size=6),
)
def test_id_lists_round_trip_and_junk_is_refused(key: str, ids: list[int], junk: str) -> None:
    text = ",".join(str(i) for i in ids)
    assert ServerConfig().update({key: text}, source="t").allowed_ids(key) == ids
    error = expect_config_error(ServerConfig, {key: junk})
    if error is not None:
        assert shown(junk) in str(error)
    else:
        assert all(
            0 <= i < 2**32 for i in ServerConfig().update({key: junk}, source="t").allowed_ids(key)
        )


# ---------------------------------------------------------------------------------------------
# RDMA device lists (checked by the core)

device_names = st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True)


@PROPS
@given(
    cls=st.sampled_from(SETTINGS),
    names=st.lists(device_names, min_size=1, max_size=4, unique=True),
    gids=st.lists(st.one_of(st.none(), st.integers(min_value=0, max_value=255)), min_size=4),
    pad=spaces,
)
def test_valid_device_lists_are_taken(
    cls: type[Any], names: list[str], gids: list[int | None], pad: str
) -> None:
    entries = [n if g is None else f"{n}{pad}:{pad}{g}" for n, g in zip(names, gids, strict=False)]
    text = f",{pad}".join(entries)
    assert cls().update({"rdma_devices": text}, source="t").rdma_devices == text


@PROPS
@given(
    cls=st.sampled_from(SETTINGS),
    value=st.one_of(
        st.text(max_size=16),
        st.builds(lambda n, g: f"{n}:{g}", device_names, st.integers(-(2**40), 2**40)),
        st.builds(lambda n: f"{n},{n}", device_names),
    ),
)
def test_any_device_list_is_taken_or_refused_by_name(cls: type[Any], value: str) -> None:
    error = expect_config_error(cls, {"rdma_devices": value})
    if error is not None:
        assert str(error).startswith(f"rdma_devices = {value!r}")


@PROPS
@given(
    cls=st.sampled_from(SETTINGS),
    key=st.sampled_from(["rdma_port", "rdma_gpu"]),
    value=st.integers(-(2**70), 2**70),
)
@example(cls=ServerConfig, key="rdma_port", value=2**40)
def test_rdma_numbers_are_taken_or_refused_by_name(cls: type[Any], key: str, value: int) -> None:
    assume(key in cls.field_names())
    error = expect_config_error(cls, {key: value})
    if error is None:
        assert (1 <= value <= 255) if key == "rdma_port" else value >= -1
    else:
        assert str(error).startswith(f"{key} = {value!r}")


# ---------------------------------------------------------------------------------------------
# Auth token files

token_text = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40
)


@PROPS
@given(
    token=st.one_of(st.just(""), token_text),
    lines=st.lists(token_text, min_size=1, max_size=4),
    blanks=st.lists(st.sampled_from(["", " ", "\t", "  \t "]), min_size=5, max_size=5),
    newline=st.sampled_from(["\n", "\r\n"]),
)
def test_token_files_read_back_one_token_per_line(
    token: str, lines: list[str], blanks: list[str], newline: str
) -> None:
    body = newline.join(
        f"{blanks[i % 5]}{line}{blanks[(i + 1) % 5]}" for i, line in enumerate(lines)
    )
    text = blanks[2] + newline + body + newline + blanks[3]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tokens"
        path.write_bytes(text.encode())
        expected = ([token] if token else []) + lines
        assert read_auth_tokens(token, str(path), warn=False) == expected
        config = ServerConfig().update(
            {"auth_token": token, "auth_token_file": str(path)}, source="t"
        )
        assert config.auth_tokens(warn=False) == expected
        connector = ConnectorConfig().update({"auth_token_file": str(path)}, source="t")
        assert connector.token(warn=False) == lines[0]


@PROPS
@given(content=st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode)))
@example(content=b"\xff\xfe token")  # not UTF-8
@example(content=b"")
@example(content=b" \n\t\n")
def test_any_token_file_is_read_or_refused_naming_it(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tokens"
        path.write_bytes(content)
        try:
            tokens = read_auth_tokens("", str(path), warn=False)
        except ConfigError as e:
            assert "auth_token" in str(e)
            return
    assert tokens and all(t == t.strip() and t for t in tokens)


@PROPS
@given(name=st.text(max_size=12).filter(lambda n: ".." not in n))
@example(name="a\0b")
def test_any_token_file_path_is_read_or_refused_naming_it(name: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/{name}"
        error = expect_config_error(ServerConfig, {"auth_token_file": path})
    assert error is not None and "auth_token_file" in str(error)  # no such file: refused


# ---------------------------------------------------------------------------------------------
# Redis URLs

secrets = st.text(max_size=12).filter(lambda s: not any(0xD800 <= ord(c) <= 0xDFFF for c in s))


@PROPS
@given(
    scheme=st.sampled_from(["redis", "rediss"]),
    user=secrets,
    password=secrets,
    host=st.one_of(
        st.from_regex(r"[a-z0-9]([a-z0-9-]{0,15}[a-z0-9])?(\.[a-z0-9]{1,8}){0,2}", fullmatch=True),
        st.ip_addresses(v=4).map(str),
        st.ip_addresses(v=6).map(str),
    ),
    port=st.one_of(st.none(), st.integers(min_value=1, max_value=65535)),
    db=st.one_of(st.none(), st.integers(min_value=0, max_value=10**4)),
    db_in_query=st.booleans(),
)
def test_redis_urls_round_trip(
    scheme: str,
    user: str,
    password: str,
    host: str,
    port: int | None,
    db: int | None,
    db_in_query: bool,
) -> None:
    userinfo = ""
    if user or password:
        userinfo = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
        userinfo += "@"
    netloc = userinfo + (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
    path = "" if db is None else (f"/?db={db}" if db_in_query else f"/{db}")
    url = f"{scheme}://{netloc}{path}"
    # Both settings take it, unchanged.
    assert ServerConfig().update({"redis": url}, source="t").redis == url
    assert ConnectorConfig().update({"redis_url": url}, source="t").redis_url == url
    # What kvpool hands redis-py comes back as the parts it was made of (no connection made).
    r = redis.Redis.from_url(url)
    kw = r.connection_pool.connection_kwargs
    assert kw.get("host", "localhost") == host
    assert kw.get("port", 6379) == (port or 6379)
    assert (kw.get("username") or "") == user
    assert (kw.get("password") or "") == password
    assert int(kw.get("db", 0) or 0) == (db or 0)
    # The core's index reader is made for plain TCP only (TLS goes through redis-py).
    reader = _index_reader(r, ClusterKeys("c"))
    assert (reader is not None) == (scheme == "redis")


@PROPS
@given(
    cls=st.sampled_from(SETTINGS),
    url=st.one_of(
        st.text(max_size=20),
        st.builds(
            lambda s, rest: s + rest,
            st.sampled_from(["redis://", "rediss://", "unix://", "http://", "REDIS://", ""]),
            st.text(max_size=20),
        ),
    ),
)
@example(cls=ServerConfig, url="redis://h:99999")  # port out of range
@example(cls=ServerConfig, url="redis://[::1")  # unterminated IPv6 literal
@example(cls=ServerConfig, url="redis://h/?db=x")
def test_any_redis_url_is_usable_or_refused_by_name(cls: type[Any], url: str) -> None:
    key = "redis" if cls is ServerConfig else "redis_url"
    error = expect_config_error(cls, {key: url})
    if error is not None:
        assert str(error).startswith(f"{key} = {url!r}")
        return
    if url:
        assert url.startswith(("redis://", "rediss://", "unix://"))
        redis.Redis.from_url(url)  # redis-py parses every URL the config accepts
