"""The decoder's fast path: the arrays accessor, the wire bytes of before, the old decoder's verdicts.

`_reference` below is the decoder as it was before the fast path (stdlib json and zlib, one
statistic at a time, nanmax range checks). Every message, valid or poisoned, must get the same
outcome from both: the same header and arrays, or the same rejection reason.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from collector.schema import (
    MASS_TOLERANCE,
    MAX_MESSAGE_BYTES,
    HeadStatsMessage,
    MessageHeader,
    SchemaError,
    core_stat_names,
    quantum_of,
)
from tests.factories import MessageFactory, pattern_probs

# A 2 x 4 message written by the encoder before the fast path; head (0, 3) is not measured.
GOLDEN = base64.b64decode(
    "SFdTAQAAAj97InNjaGVtYV92ZXJzaW9uIjoiMS4wIiwibWVzc2FnZV9pZCI6IjAxMjM0NTY3ODlhYmNkZWYwMTIz"
    "NDU2Nzg5YWJjZGVmIiwibW9kZWxfbmFtZSI6ImdvbGRlbiIsIm1vZGVsX3JldmlzaW9uIjoiIiwiY29uZmlnX2hh"
    "c2giOiJmZWRjYmE5ODc2NTQzMjEwIiwic2VydmVyX2lkIjoiIiwidGltZXN0YW1wX3NlY29uZHMiOjE3MDAwMDAw"
    "MDAuNSwicGhhc2UiOiJkZWNvZGUiLCJjb250ZXh0X3Rva2VucyI6MzAwLCJxdWVyeV9wb3NpdGlvbiI6Mjk5LCJz"
    "aW5rX3Rva2VucyI6NCwicmVjZW50X3Rva2VucyI6MTYsIm51bV9sYXllcnMiOjIsIm51bV9xdWVyeV9oZWFkcyI6"
    "NCwibnVtX2t2X2hlYWRzIjoyLCJoZWFkX2RpbSI6OCwia3ZfZHR5cGVfYnl0ZXMiOjIsInNhbXBsZV9yYXRlIjow"
    "LjI1LCJ0b3BfayI6WzEsMTYsMjU2XSwidmlzaWJsZV9rZXlzIjpbMzAwLDY0XSwiZmxhZ3MiOltdLCJzdGF0X25h"
    "bWVzIjpbImVudHJvcHlfbmF0cyIsInNpbmtfbWFzcyIsInJlY2VudF9tYXNzIiwidG9wMV9tYXNzIiwidG9wMTZf"
    "bWFzcyIsInRvcDI1Nl9tYXNzIiwia2V5c19mb3JfOTBwY3QiLCJldmljdGlvbl9lcnJvciJdfXice88AA0ysDAyM"
    "LMwNDQwMDgyYgJERRDAwnGEwZpA0Zph5FkjPAiIUNUAoeSaN4cxMhpmzzqYxnJ2FKg8CZ3yYGG6msUqePdvPMCtN"
    "HkP+8zNJhh+ffRqM02YxBBmfRXMDI+PfvzPB7MJCDK0ogInrBAMzh4YcpowYEHMacCxJY2AJmsUAAPplIrY="
)
_FRAME = struct.Struct(">3sBI")
_FACTORY = MessageFactory(
    layers=2, heads=4, kv_heads=2, probs=pattern_probs(2, 4, [1, 1, 1, 1, 1, 1, 1]), seed=5
)


def _with_learned_sinks(msg: HeadStatsMessage) -> bytes:
    """Return `msg` as a model with learned sink logits would send it (schema 1.1)."""
    names = core_stat_names(msg.header.top_k, learned_sinks=True)
    header = msg.header.model_copy(update={"schema_version": "1.1", "stat_names": names})
    values = {n: msg.stat(n) for n in msg.header.stat_names}
    values["learned_sink_mass"] = msg.stat("middle_mass") / 2
    return HeadStatsMessage.build(header, values).to_bytes()


BASES = [
    GOLDEN,
    *(_FACTORY.message(timestamp_seconds=float(i)).to_bytes() for i in range(4)),
    _with_learned_sinks(_FACTORY.message(timestamp_seconds=5.0)),
]


def _split(data: bytes) -> tuple[str, bytes]:
    _magic, _major, n = _FRAME.unpack_from(data)
    return data[_FRAME.size : _FRAME.size + n].decode(), data[_FRAME.size + n :]


def _join(header: bytes, payload: bytes) -> bytes:
    return _FRAME.pack(b"HWS", 1, len(header)) + header + payload


def _reference_decode(data: bytes) -> tuple[MessageHeader, np.ndarray, np.ndarray]:
    if len(data) > MAX_MESSAGE_BYTES:
        raise SchemaError("oversized", "")
    if len(data) < _FRAME.size:
        raise SchemaError("decode", "")
    magic, major, n = _FRAME.unpack_from(data)
    if magic != b"HWS":
        raise SchemaError("decode", "")
    if major != 1:
        raise SchemaError("schema_version", "")
    try:
        fields = json.loads(data[_FRAME.size : _FRAME.size + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SchemaError("decode", "") from exc
    if not isinstance(fields, dict):
        raise SchemaError("decode", "")
    if str(fields.get("schema_version", "")).split(".")[0] != "1":
        raise SchemaError("schema_version", "")
    try:
        header = MessageHeader.model_validate(fields)
    except ValidationError as exc:
        finite = any("finite" in str(e.get("msg", "")) for e in exc.errors())
        raise SchemaError("non_finite" if finite else "validation", "") from exc
    inflater = zlib.decompressobj()
    try:
        payload = inflater.decompress(data[_FRAME.size + n :], 8 << 20)
    except zlib.error as exc:
        raise SchemaError("decode", "") from exc
    if inflater.unconsumed_tail:
        raise SchemaError("oversized", "")
    layers, heads, names = header.num_layers, header.num_query_heads, header.stat_names
    cells = layers * heads
    mask = (cells + 7) // 8
    if len(payload) != mask + 4 * cells * len(names):
        raise SchemaError("shape", "")
    valid = np.unpackbits(np.frombuffer(payload, np.uint8, mask))[:cells]
    valid = valid.reshape(layers, heads).astype(bool)
    if heads % header.num_kv_heads or len(header.visible_keys) != layers:
        raise SchemaError("shape", "")
    for name in names:
        quantum_of(name)
    learned = "learned_sink_mass" in names
    if names != core_stat_names(header.top_k, learned):
        raise SchemaError("unknown_stat", "")
    stats = {}
    for i, name in enumerate(names):
        raw = np.frombuffer(payload, np.uint8, 4 * cells, mask + 4 * cells * i).reshape(4, cells)
        codes = raw.T.copy().view(">u4").reshape(layers, heads).astype(np.float64)
        stats[name] = np.where(valid, codes * quantum_of(name), np.nan)
    if valid.any():
        visible = np.asarray(header.visible_keys, dtype=np.float64)[:, None]
        regions = stats["sink_mass"] + stats["recent_mass"]
        if learned:  # schema 1.1: one more outcome, with a mass of its own
            regions = regions + stats["learned_sink_mass"]
        if (
            max(np.nanmax(stats[n]) for n in names if n.endswith("_mass")) > 1 + MASS_TOLERANCE
            or np.nanmax(regions) > 1 + MASS_TOLERANCE
            or np.nanmax(stats["keys_for_90pct"] - visible) > 0
            or np.nanmax(stats["entropy_nats"] - np.log(np.maximum(visible + learned, 1))) > 1e-3
        ):
            raise SchemaError("out_of_range", "")
    return header, valid, np.stack([stats[n] for n in names])


def _reference(data: bytes) -> tuple[object, ...]:
    try:
        return ("ok", *_reference_decode(data))
    except SchemaError as exc:
        return ("rejected", exc.reason)


def _fast(data: bytes) -> tuple[object, ...]:
    try:
        msg = HeadStatsMessage.from_bytes(data)
    except SchemaError as exc:
        return ("rejected", exc.reason)
    return ("ok", msg.header, msg.valid, msg.arrays().values)


def _assert_same_outcome(data: bytes) -> None:
    ref, fast = _reference(data), _fast(data)
    assert fast[:2] == ref[:2]
    if ref[0] == "ok":
        np.testing.assert_array_equal(fast[2], ref[2])
        np.testing.assert_array_equal(fast[3], ref[3])


def test_a_message_written_before_the_fast_path_decodes_to_its_values_and_the_same_bytes() -> None:
    msg = HeadStatsMessage.from_bytes(GOLDEN)
    assert msg.to_bytes() == GOLDEN
    assert msg.valid.tolist() == [[True, True, True, False], [True] * 4]
    keys = msg.stat("keys_for_90pct")
    np.testing.assert_array_equal(keys, [[2, 10, 200, np.nan], [3, 8, 40, 30]])
    np.testing.assert_allclose(msg.stat("sink_mass")[0, :3], [0.9, 0.5, 0.1], atol=2.0**-18)
    np.testing.assert_allclose(msg.stat("eviction_error")[1, 3], 1.5, atol=2.0**-14)


def test_arrays_share_the_stored_statistics_and_mask_without_copies() -> None:
    msg = HeadStatsMessage.from_bytes(GOLDEN)
    arrays = msg.arrays()
    assert arrays.names == msg.header.stat_names
    assert arrays.values.shape == (len(arrays.names), 2, 4)
    assert arrays.valid is msg.valid
    for name in arrays.names:
        assert np.shares_memory(arrays[name], arrays.values)
        np.testing.assert_array_equal(arrays[name], msg.stat(name))
        assert np.shares_memory(msg.stat(name), arrays.values)


def test_arrays_are_read_only() -> None:
    arrays = HeadStatsMessage.from_bytes(GOLDEN).arrays()
    with pytest.raises(ValueError, match="read-only"):
        arrays.values[0, 0, 0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        arrays.valid[0, 0] = False


def test_arrays_of_a_derived_statistic_is_a_key_error() -> None:
    with pytest.raises(KeyError, match="middle_mass"):
        HeadStatsMessage.from_bytes(GOLDEN).arrays()["middle_mass"]


def test_a_built_message_has_the_same_arrays_as_its_decoded_copy() -> None:
    msg = _FACTORY.message(timestamp_seconds=1.0)
    decoded = HeadStatsMessage.from_bytes(msg.to_bytes())
    np.testing.assert_array_equal(decoded.arrays().values, msg.arrays().values)
    assert decoded == msg


@pytest.mark.parametrize(
    ("version", "outcome"),
    [
        (None, ("rejected", "schema_version")),  # pydantic alone would fill in the default
        ("2.0", ("rejected", "schema_version")),
        ("1.7", ("ok",)),
    ],
)
def test_the_header_fast_path_still_requires_an_explicit_major_version(
    version: str | None, outcome: tuple[str, ...]
) -> None:
    header, payload = _split(GOLDEN)
    edited = header.replace(
        '"schema_version":"1.0",', "" if version is None else f'"schema_version":"{version}",'
    )
    data = _join(edited.encode(), payload)
    assert _fast(data)[: len(outcome)] == _reference(data)[: len(outcome)] == outcome


_HEADER_EDITS = [
    ('"model_name":"golden"', '"model_name":"golden","model_name":"other"'),
    ('"model_name":"golden"', '"model_name":"gol\\ud800den"'),
    ('"model_name":"golden"', '"model_name":"gol\nden"'),
    ('"model_name":"golden"', '"model_name":"gol\\u0000den"'),
    ('"context_tokens":300', '"context_tokens":300.0'),
    ('"context_tokens":300', '"context_tokens":"300"'),
    ('"context_tokens":300', '"context_tokens":3e2'),
    ('"context_tokens":300', '"context_tokens":1e400'),
    ('"context_tokens":300', '"context_tokens":true'),
    ('"sample_rate":0.25', '"sample_rate":NaN'),
    ('"sample_rate":0.25', '"sample_rate":Infinity'),
    ('"phase":"decode"', '"phase":"DECODE"'),
    ('"top_k":[1,16,256]', '"top_k":[1,16,255]'),
    ('"visible_keys":[300,64]', '"visible_keys":[300,4]'),
    ('"visible_keys":[300,64]', '"visible_keys":[300]'),
]


@pytest.mark.parametrize(("old", "new"), _HEADER_EDITS)
@pytest.mark.parametrize("encoding", ["utf-8", "utf-16"])
def test_edited_headers_get_the_reference_outcome(old: str, new: str, encoding: str) -> None:
    header, payload = _split(GOLDEN)
    assert old in header
    _assert_same_outcome(_join(header.replace(old, new).encode(encoding, "surrogatepass"), payload))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(BASES),
    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=6),
)
def test_mutated_payloads_get_the_reference_outcome(
    base: bytes, flips: list[tuple[int, int]]
) -> None:
    header, payload = _split(base)
    raw = bytearray(zlib.decompress(payload))
    for position, value in flips:
        raw[position % len(raw)] = value
    _assert_same_outcome(_join(header.encode(), zlib.compress(bytes(raw))))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(BASES),
    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(0, 1 << 16),
)
def test_mutated_bytes_get_the_reference_outcome(
    base: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(base)
    header_end = _FRAME.size + _FRAME.unpack_from(base)[2]
    for position, value in flips:  # mostly in the compressed payload, which zlib must judge
        data[header_end + position % (len(data) - header_end)] = value
    _assert_same_outcome(bytes(data))
    _assert_same_outcome(bytes(data[: cut % (len(data) + 1)]))


_JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(1 << 40), 1 << 40), st.floats(), st.text(max_size=40),
    st.lists(st.integers(-5, 1 << 20), max_size=8), st.just("1.0"), st.just([1, 16, 256]),
)  # fmt: skip


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(BASES),
    st.dictionaries(
        st.sampled_from([*MessageHeader.model_fields, "unknown"]), _JSON_VALUES, max_size=3
    ),
    st.sets(st.sampled_from(sorted(MessageHeader.model_fields)), max_size=2),
)
def test_mutated_headers_get_the_reference_outcome(
    base: bytes, changes: dict[str, object], dropped: set[str]
) -> None:
    header, payload = _split(base)
    fields = {k: v for k, v in {**json.loads(header), **changes}.items() if k not in dropped}
    _assert_same_outcome(_join(json.dumps(fields).encode(), payload))


def _with_codes(codes: dict[str, int]) -> bytes:
    """Return GOLDEN with the wire codes of head (1, 0) (64 visible keys) set to `codes`."""
    header, payload = _split(GOLDEN)
    raw = bytearray(zlib.decompress(payload))
    names = json.loads(header)["stat_names"]
    cells, cell = 8, 4  # 2 x 4 heads; head (1, 0) is cell 4
    for name, code in codes.items():
        start = 1 + 4 * cells * names.index(name)  # after the one byte of validity bits
        for plane, byte in enumerate(code.to_bytes(4, "big")):
            raw[start + plane * cells + cell] = byte
    return _join(header.encode(), zlib.compress(bytes(raw)))


_ENTROPY_LIMIT = math.floor((math.log(64) + 1e-3) * 2**16)
_MASS_LIMIT = math.floor((1 + MASS_TOLERANCE) * 2**16)
_SUM_LIMIT = math.floor((1 + MASS_TOLERANCE) * 2**17)


@pytest.mark.parametrize(
    ("codes", "accepted"),
    [
        ({"keys_for_90pct": 64}, True),
        ({"keys_for_90pct": 65}, False),
        ({"top1_mass": _MASS_LIMIT, "top16_mass": _MASS_LIMIT, "top256_mass": _MASS_LIMIT}, True),
        ({"top1_mass": _MASS_LIMIT + 1}, False),
        ({"sink_mass": 65601, "recent_mass": _SUM_LIMIT - 65601}, True),
        ({"sink_mass": 65601, "recent_mass": _SUM_LIMIT - 65600}, False),
        ({"entropy_nats": _ENTROPY_LIMIT}, True),
        ({"entropy_nats": _ENTROPY_LIMIT + 1}, False),
    ],
)
def test_range_checks_cut_at_the_same_code_as_the_reference(
    codes: dict[str, int], accepted: bool
) -> None:
    data = _with_codes(codes)
    expected = ("ok",) if accepted else ("rejected", "out_of_range")
    assert _fast(data)[: len(expected)] == expected
    _assert_same_outcome(data)
