"""Bad input: random bytes and mutated valid messages never crash decoding and folding."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.schema import MAX_MESSAGE_BYTES, SchemaError
from exporter.aggregate import Aggregator, Fold
from exporter.metrics import INVALID_REASONS
from exporter.model_state import AggregatePolicy
from tests.factories import MessageFactory, pattern_probs

_FACTORY = MessageFactory(
    layers=2, heads=4, kv_heads=2, probs=pattern_probs(2, 4, [1, 1, 1, 1, 1, 1, 1]), seed=11
)
VALID = [_FACTORY.message(timestamp_seconds=float(i)).to_bytes() for i in range(8)]
_FRAME = struct.Struct(">3sBI")


def _fold(agg: Aggregator, value: bytes) -> str:
    """Return 'folded'/'duplicate'/'stale' or the rejection reason; fail on any other exception."""
    try:
        result, _ = agg.fold_bytes(value, partition=0, replay=False, now_wall=0.0)
    except SchemaError as exc:
        assert exc.reason in INVALID_REASONS, exc
        return exc.reason
    assert isinstance(result, Fold)
    return result.value


def _split(data: bytes) -> tuple[bytes, dict, bytes]:  # type: ignore[type-arg]
    _magic, _major, n = _FRAME.unpack_from(data)
    return (
        data[: _FRAME.size],
        json.loads(data[_FRAME.size : _FRAME.size + n]),
        data[_FRAME.size + n :],
    )


def _join(header: dict, payload: bytes, major: int = 1) -> bytes:  # type: ignore[type-arg]
    raw = json.dumps(header).encode()
    return _FRAME.pack(b"HWS", major, len(raw)) + raw + payload


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes_are_rejected_with_a_reason(data: bytes) -> None:
    assert _fold(Aggregator(AggregatePolicy()), data) in INVALID_REASONS


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, 1 << 16),
)
def test_mutated_messages_never_crash(base: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(base)
    for position, value in flips:
        data[position % len(data)] = value
    agg = Aggregator(AggregatePolicy())
    _fold(agg, bytes(data))
    _fold(agg, bytes(data[: cut % (len(data) + 1)]))


_JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=300), st.lists(st.integers(-5, 1 << 20), max_size=40),
)  # fmt: skip


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(VALID),
    st.dictionaries(
        st.sampled_from(sorted(_split(VALID[0])[1])), _JSON_VALUES, min_size=1, max_size=4
    ),
)
def test_mutated_headers_never_crash(base: bytes, changes: dict) -> None:  # type: ignore[type-arg]
    _, header, payload = _split(base)
    _fold(Aggregator(AggregatePolicy()), _join({**header, **changes}, payload))


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(VALID), st.binary(min_size=0, max_size=600))
def test_random_payloads_never_crash(base: bytes, noise: bytes) -> None:
    _, header, payload = _split(base)
    raw = bytearray(zlib.decompress(payload))
    for i, b in enumerate(noise):
        raw[(i * 7919) % len(raw)] = b
    _fold(Aggregator(AggregatePolicy()), _join(header, zlib.compress(bytes(raw))))


def _edit(field: str, value: object) -> bytes:
    _, header, payload = _split(VALID[0])
    return _join({**header, field: value}, payload)


def _with_payload(edit: object) -> bytes:
    _, header, payload = _split(VALID[0])
    raw = np.frombuffer(zlib.decompress(payload), np.uint8).copy()
    edit(raw)  # type: ignore[operator]
    return _join(header, zlib.compress(raw.tobytes()))


def _all_ones(raw: np.ndarray) -> None:
    raw[1:] = 0xFF  # after the validity mask byte: every statistic at its largest code


CASES = {
    "decode": b"not a headwatch message at all",
    "bad-magic": b"XYZ" + VALID[0][3:],
    "schema_version": _join(_split(VALID[0])[1], _split(VALID[0])[2], major=2),
    "minor-ok-major-bad": _edit("schema_version", "2.0"),
    "non_finite": _edit("timestamp_seconds", float("nan")),
    "validation": _edit("context_tokens", -5),
    "long-name": _edit("model_name", "x" * 10_000),
    "unknown_stat": _edit("stat_names", ["bogus_stat", *_split(VALID[0])[1]["stat_names"][1:]]),
    "shape": _edit("num_layers", 3),
    "out_of_range": _with_payload(_all_ones),
    "oversized": b"HWS" + b"\x00" * MAX_MESSAGE_BYTES,
}
EXPECTED = {
    "bad-magic": "decode", "minor-ok-major-bad": "schema_version", "long-name": "validation",
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_kind_of_poison_gets_its_reason(case: str) -> None:
    assert _fold(Aggregator(AggregatePolicy()), CASES[case]) == EXPECTED.get(case, case)


def test_the_valid_message_folds() -> None:
    assert _fold(Aggregator(AggregatePolicy()), VALID[0]) == "folded"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.sampled_from(VALID),
            st.binary(max_size=512),
            st.sampled_from(list(CASES.values())[:-1]),
        ),
        max_size=20,
    )
)
def test_batches_of_mixed_records_never_crash(values: list[bytes]) -> None:
    outcomes = Aggregator(AggregatePolicy()).fold_records(
        values, partition=0, replay=[False] * len(values), now_wall=0.0
    )
    assert len(outcomes) == len(values)
    for outcome, _ in outcomes:
        assert isinstance(outcome, Fold) or outcome.reason in INVALID_REASONS
