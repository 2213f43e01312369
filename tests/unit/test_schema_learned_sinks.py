"""Messages of models with learned sink logits, and the top-k set every message needs."""

from __future__ import annotations

import json
import math
import struct
import uuid
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from collector.schema import (
    LEARNED_SINK_STAT,
    HeadStatsMessage,
    MessageHeader,
    SchemaError,
    core_stat_names,
)

VISIBLE = 64
_FRAME = struct.Struct(">3sBI")


def header(learned_sinks: bool, **fields: Any) -> MessageHeader:
    top_k = fields.pop("top_k", (1, 16, 256))
    return MessageHeader(
        message_id=uuid.uuid4().hex, model_name="gpt-oss", config_hash="0123456789abcdef",
        timestamp_seconds=1.0, phase="prefill", context_tokens=VISIBLE, query_position=VISIBLE - 1,
        sink_tokens=4, recent_tokens=8, num_layers=1, num_query_heads=2, num_kv_heads=1,
        head_dim=16, kv_dtype_bytes=2, sample_rate=1.0, visible_keys=(VISIBLE,), top_k=top_k,
        stat_names=core_stat_names(top_k, learned_sinks), **fields,
    )  # fmt: skip


def stats(learned_sinks: bool, **values: float) -> dict[str, np.ndarray]:
    """One layer of two heads: sink 0.2, recent 0.3, learned sink 0.1 (with one), entropy 2 nats."""
    table = {
        "entropy_nats": 2.0, "sink_mass": 0.2, "recent_mass": 0.3, LEARNED_SINK_STAT: 0.1,
        "top1_mass": 0.3, "top16_mass": 0.7, "top256_mass": 0.9, "keys_for_90pct": 30.0,
        "eviction_error": 0.25, **values,
    }  # fmt: skip
    if not learned_sinks:
        del table[LEARNED_SINK_STAT]
    return {name: np.full((1, 2), value) for name, value in table.items()}


def test_learned_sink_mass_travels_in_the_masses_rows_and_round_trips() -> None:
    names = core_stat_names((1, 16, 256), learned_sinks=True)
    assert names[:5] == (
        "entropy_nats", "sink_mass", "recent_mass", LEARNED_SINK_STAT, "top1_mass",
    )  # fmt: skip
    msg = HeadStatsMessage.build(header(True), stats(True))
    decoded = HeadStatsMessage.from_bytes(msg.to_bytes())
    assert decoded == msg
    assert decoded.learned_sinks and decoded.header.schema_version == "1.1"
    np.testing.assert_allclose(decoded.stat(LEARNED_SINK_STAT), 0.1, atol=2e-6)


@pytest.mark.parametrize(("learned_sinks", "middle"), [(True, 0.4), (False, 0.5)])
def test_middle_mass_leaves_out_the_learned_sink(learned_sinks: bool, middle: float) -> None:
    msg = HeadStatsMessage.build(header(learned_sinks), stats(learned_sinks))
    np.testing.assert_allclose(msg.stat("middle_mass"), middle, atol=1e-5)
    np.testing.assert_allclose(
        HeadStatsMessage.from_bytes(msg.to_bytes()).stat("middle_mass"), middle, atol=1e-5
    )


@pytest.mark.parametrize(
    ("learned_sinks", "entropy", "accepted"),
    [
        (True, math.log(VISIBLE + 1), True),  # a uniform distribution over the keys and the sink
        (True, math.log(VISIBLE + 1) + 2e-3, False),
        (False, math.log(VISIBLE + 1), False),  # without a learned sink: at most ln(visible)
        (False, math.log(VISIBLE), True),
    ],
)
def test_entropy_may_reach_ln_of_visible_keys_plus_the_learned_sink(
    learned_sinks: bool, entropy: float, accepted: bool
) -> None:
    def build() -> HeadStatsMessage:
        values = stats(learned_sinks, entropy_nats=entropy)
        return HeadStatsMessage.from_bytes(
            HeadStatsMessage.build(header(learned_sinks), values).to_bytes()
        )

    if accepted:
        outcomes = VISIBLE + int(learned_sinks)
        np.testing.assert_allclose(
            build().stat("normalized_entropy"), entropy / math.log(outcomes), atol=1e-5
        )
    else:  # `build` checks what decoding checks
        with pytest.raises(SchemaError, match="out_of_range: entropy_nats"):
            build()


def test_sink_recent_and_learned_sink_mass_may_not_exceed_one() -> None:
    with pytest.raises(SchemaError, match=r"out_of_range: sink \+ recent \(\+ learned sink\)"):
        HeadStatsMessage.build(header(True), stats(True, **{LEARNED_SINK_STAT: 0.6}))


def _rewrite_header(data: bytes, change: dict[str, Any]) -> bytes:
    _magic, major, length = _FRAME.unpack_from(data)
    fields = {**json.loads(data[_FRAME.size : _FRAME.size + length]), **change}
    raw = json.dumps(fields).encode()
    return _FRAME.pack(b"HWS", major, len(raw)) + raw + data[_FRAME.size + length :]


def test_learned_sink_mass_out_of_its_place_is_an_unknown_statistic() -> None:
    data = HeadStatsMessage.build(header(True), stats(True)).to_bytes()
    names = list(core_stat_names((1, 16, 256)))
    names.append(LEARNED_SINK_STAT)  # same payload size, wrong order
    with pytest.raises(SchemaError, match="unknown_stat"):
        HeadStatsMessage.from_bytes(_rewrite_header(data, {"stat_names": names}))


def test_a_header_without_a_top_k_is_refused() -> None:
    """The exporter's pattern classifier reads the top-k masses: a message has at least one."""
    with pytest.raises(ValidationError, match="top_k"):
        header(False, top_k=())
    # What an encoder without the check would send: five statistics, no top-k mass.
    fields = header(False).model_dump() | {"top_k": (), "stat_names": core_stat_names(())}
    unchecked = MessageHeader.model_construct(**fields)
    names = core_stat_names(())
    data = HeadStatsMessage.build(
        unchecked, {n: v for n, v in stats(False).items() if n in names}
    ).to_bytes()
    with pytest.raises(SchemaError, match="validation"):
        HeadStatsMessage.from_bytes(data)
