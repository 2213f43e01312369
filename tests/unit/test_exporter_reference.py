"""Reference records: round trip, corrupt records, request matching."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from exporter.errors import ReferenceRecordError
from exporter.reference import RebaselineRequest, Reference, decode_record


def test_reference_round_trip() -> None:
    rng = np.random.default_rng(0)
    ref = Reference(
        "m@0123456789abcdef",
        "m",
        100,
        12.5,
        rng.integers(0, 9, (2, 3, 7)),
        rng.integers(0, 9, (2, 3, 10)),
    )
    back = decode_record(ref.to_bytes())
    assert isinstance(back, Reference)
    assert back.model_key == ref.model_key and back.samples == 100
    assert np.array_equal(back.pattern_counts, ref.pattern_counts) and np.array_equal(
        back.entropy_counts, ref.entropy_counts
    )


def test_request_round_trip_and_matching() -> None:
    back = decode_record(RebaselineRequest("m@*", 5.0).to_bytes())
    assert back == RebaselineRequest("m@*", 5.0)
    assert back.matches("m@0123456789abcdef/s4r64") and not back.matches(
        "mm@0123456789abcdef/s4r64"
    )
    exact = RebaselineRequest("org/m@0123456789abcdef", 5.0)
    assert exact.matches("org/m@0123456789abcdef/s4r64") and exact.matches(
        "org/m@0123456789abcdef/s0r256"
    )
    assert not exact.matches("org/m@fedcba9876543210/s4r64") and not exact.matches(
        "m@0123456789abcdef/s4r64"
    )


@pytest.mark.parametrize(
    "value",
    [b"garbage", zlib.compress(b"[1, 2]"), zlib.compress(b'{"format": 1, "kind": "other"}'),
     zlib.compress(b'{"format": 1, "kind": "reference", "layers": 2, "heads": 2, "model_key": "k",'
                   b' "model_name": "m", "samples": 1, "created_seconds": 0, "pattern_counts": [1],'
                   b' "entropy_counts": [1]}')],
    ids=["not-zlib", "not-object", "unknown-kind", "wrong-count"],
)  # fmt: skip
def test_corrupt_records_raise_a_value_error(value: bytes) -> None:
    with pytest.raises(ReferenceRecordError, match="expected"):
        decode_record(value)
