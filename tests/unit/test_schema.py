"""Wire contract: round trip, the committed JSON Schema, size of a 32 x 32 message."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from collector.schema import (
    HeadStatsMessage,
    MessageHeader,
    SchemaError,
    core_stat_names,
    json_schema,
)

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "collector" / "head_stats.schema.json"


def message(layers: int = 2, heads: int = 4, seed: int = 0) -> HeadStatsMessage:
    rng = np.random.default_rng(seed)
    names = core_stat_names()
    header = MessageHeader(
        message_id=uuid.uuid4().hex, model_name="m", config_hash="0123456789abcdef", timestamp_seconds=1.0,
        phase="prefill", context_tokens=1000, query_position=999, sink_tokens=4, recent_tokens=256,
        num_layers=layers, num_query_heads=heads, num_kv_heads=2, head_dim=64, kv_dtype_bytes=2,
        sample_rate=0.5, visible_keys=(1000,) * layers, stat_names=names,
    )  # fmt: skip
    sink = rng.uniform(0, 0.5, (layers, heads))
    stats = {
        "entropy_nats": rng.uniform(0, np.log(1000), (layers, heads)),
        "sink_mass": sink,
        "recent_mass": rng.uniform(0, 0.5, (layers, heads)),
        "top1_mass": rng.uniform(0, 0.2, (layers, heads)),
        "top16_mass": rng.uniform(0.2, 0.5, (layers, heads)),
        "top256_mass": rng.uniform(0.5, 1, (layers, heads)),
        "keys_for_90pct": rng.integers(1, 1000, (layers, heads)).astype(float),
        "eviction_error": rng.uniform(0, 2, (layers, heads)),
    }
    return HeadStatsMessage.build(header, stats)


def test_round_trip() -> None:
    original = message()
    assert HeadStatsMessage.from_bytes(original.to_bytes()) == original
    assert original.stat("middle_mass").shape == (2, 4)


def test_a_message_from_one_table_equals_one_built_from_named_arrays() -> None:
    built = message()
    values = np.stack([built.stat(name) for name in built.header.stat_names])
    assert HeadStatsMessage.from_table(built.header, values) == built
    with pytest.raises(SchemaError, match=r"shape \(8, 2, 4\), got \(7, 2, 4\)"):
        HeadStatsMessage.from_table(built.header, values[1:])


def test_committed_json_schema_is_up_to_date() -> None:
    assert json.loads(SCHEMA_FILE.read_text()) == json_schema(), (
        "regenerate with: python -m collector.write_schema"
    )


def test_uniform_random_statistics_of_32_x_32_heads_still_encode_under_the_size_limit() -> None:
    # Incompressible noise is the worst case; measured attention is in test_hook_wire_size.
    size = len(message(32, 32).to_bytes())
    assert size < 24 * 1024


@pytest.mark.parametrize("data", [b"", b"XXXX" * 4, b"HWS\x01\x00\x00\x00\x02{}"])
def test_garbage_is_a_schema_error(data: bytes) -> None:
    with pytest.raises(SchemaError):
        HeadStatsMessage.from_bytes(data)
