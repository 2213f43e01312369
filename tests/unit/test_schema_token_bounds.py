"""Token counts beyond 2**31 - 1 are poison: rejected at decode with a reason, never an overflow."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from collector.schema import MAX_TOKENS, HeadStatsMessage, SchemaError
from exporter.patterns import PatternThresholds
from exporter.samples import to_samples
from tests.factories import MessageFactory, pattern_probs

_FRAME = struct.Struct(">3sBI")
_FACTORY = MessageFactory(
    layers=2, heads=4, kv_heads=2, probs=pattern_probs(2, 4, "recency"), seed=3
)


def _with_header(edit: dict[str, object]) -> bytes:
    data = _FACTORY.message(timestamp_seconds=1.0).to_bytes()
    _magic, major, n = _FRAME.unpack_from(data)
    header = json.loads(data[_FRAME.size : _FRAME.size + n])
    header.update(edit)
    raw = json.dumps(header).encode()
    return _FRAME.pack(b"HWS", major, len(raw)) + raw + data[_FRAME.size + n :]


@pytest.mark.parametrize(
    "edit",
    [
        {"visible_keys": [2**63, 64]},
        {"visible_keys": [10**400, 64]},
        {"visible_keys": [MAX_TOKENS + 1, 64]},
        {"context_tokens": 2**40},
        {"query_position": 2**63},
        {"recent_tokens": 2**33},
    ],
)
def test_token_counts_past_the_bound_are_schema_errors(edit: dict[str, object]) -> None:
    with pytest.raises(SchemaError):
        HeadStatsMessage.from_bytes(_with_header(edit))


def test_the_largest_allowed_count_decodes_and_folds() -> None:
    msg = HeadStatsMessage.from_bytes(_with_header({"visible_keys": [MAX_TOKENS, 64]}))
    (sample,) = to_samples([msg], PatternThresholds())
    assert msg.header.visible_keys[0] == MAX_TOKENS and sample is not None
    assert np.isfinite(msg.stat("entropy_nats")).any()
