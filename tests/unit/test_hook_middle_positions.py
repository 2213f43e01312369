"""Opt-in positions of the largest middle keys: equal to the eager kernel's, off by default, validated."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from collector import MemorySink, attach
from collector.errors import SettingsError
from collector.schema import HeadStatsMessage, SchemaError
from collector.stats import StatsSpec, layer_pass
from tests.factories import MessageFactory
from tests.unit.test_hook_matrix import MODELS, RECENT, SINK, Call, build, capture, generate, inputs
from tests.unit.test_stats_layers import MIXED, make_rows

COUNT = 5


def expected_middle(call: Call, b: int, slots_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (heads, keys) probabilities of the middle keys (0 elsewhere) and each key's position."""
    p = call.probs[b, :, -1, :]
    keys, total = p.shape[-1], slots_mask.shape[0]
    offset = total - keys if keys < total else 0
    real = slots_mask.astype(bool)
    positions = np.where(real, np.cumsum(real) - 1, -1)[offset : offset + keys]
    qpos = int(real.sum()) - 1
    keep = (positions >= 0) & (
        (positions < SINK) | ((positions > qpos - RECENT) & (positions <= qpos))
    )
    return np.where(keep | (positions < 0), 0.0, p), positions


@pytest.mark.usefixtures("stats_path")
@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2"])
def test_positions_are_the_largest_middle_keys_of_the_eager_probabilities(name: str) -> None:
    """Prefill and decode rows, left padding; mistral and gemma2 add sliding windows, gemma2 soft-capping."""
    steps, lengths = 3, (40, 31)
    ids, mask = inputs(lengths)
    eager = build(name, "eager")
    with capture(eager) as calls:
        generate(eager, ids, mask, steps)
    model = build(name, MODELS[name][1])
    sink = MemorySink()
    with attach(
        model, sink=sink, sample_rate=1.0, min_context_tokens=0, sink_tokens=SINK, recent_tokens=RECENT,
        decode_every=1, max_decode_samples=steps, max_sampled_passes_per_second=1000.0,
        top_middle_positions=COUNT,
    ) as handle:  # fmt: skip
        generate(model, ids, mask, steps)
    assert handle.errors == 0
    assert len(sink.messages) == steps * len(lengths)
    for i, message in enumerate(sink.messages):
        step, b = divmod(i, len(lengths))
        slots = np.concatenate([mask[b].numpy(), np.ones(step, dtype=np.int64)])
        got = message.top_middle_positions
        assert got is not None and len(got) == 2
        for layer in range(2):
            probs, positions = expected_middle(calls[step * 2 + layer], b, slots)
            for head, reported in enumerate(got[layer]):
                want = np.sort(probs[head][probs[head] > 0])[::-1][:COUNT]
                assert len(reported) == len(want), (name, i, layer, head)
                # Looked up by position: equal probabilities, largest first (ties may swap).
                by_position = dict(zip(positions.tolist(), probs[head].tolist(), strict=True))
                np.testing.assert_allclose(
                    [by_position[p] for p in reported], want, atol=1e-6, rtol=0
                )
                assert all(by_position[p] > 0 for p in reported)  # middle, visible keys only


def test_off_by_default_and_round_trips_when_on() -> None:
    ids, mask = inputs((40,))
    model = build("llama", "sdpa")
    for count in (0, 3):
        sink = MemorySink()
        with attach(
            model, sink=sink, sample_rate=1.0, min_context_tokens=0, recent_tokens=8,
            top_middle_positions=count,
        ), torch.no_grad():  # fmt: skip
            model(ids, attention_mask=mask)
        (message,) = sink.messages
        decoded = HeadStatsMessage.from_bytes(message.to_bytes())
        assert decoded == message
        if count == 0:
            assert decoded.top_middle_positions is None
        else:
            heads = decoded.top_middle_positions or ()
            assert [len(h) for layer in heads for h in layer] == [3] * (2 * 4)


@pytest.mark.parametrize("value", [-1, 65])
def test_bad_counts_are_refused_at_attach(value: int) -> None:
    with pytest.raises(SettingsError, match="top_middle_positions"):
        attach(build("llama", "sdpa"), sink=MemorySink(), top_middle_positions=value)


def test_positions_of_the_wrong_shape_or_in_the_future_are_schema_errors() -> None:
    message = MessageFactory(layers=2, heads=4, kv_heads=2).message(context_tokens=100)
    arrays = message.arrays()
    stats = dict(zip(arrays.names, arrays.values, strict=True))
    good = tuple(tuple((10, 20) for _ in range(4)) for _ in range(2))
    header = message.header.model_copy(update={"top_middle_positions": good})
    ok = HeadStatsMessage.from_bytes(HeadStatsMessage.build(header, stats).to_bytes())
    assert ok.top_middle_positions == good
    for positions, reason in (
        (good[:1], "shape"),
        (tuple(tuple((10,) for _ in range(3)) for _ in range(2)), "shape"),
        (tuple(tuple((100,) for _ in range(4)) for _ in range(2)), "out_of_range"),
    ):
        bad = message.header.model_copy(update={"top_middle_positions": positions})
        with pytest.raises(SchemaError) as caught:
            HeadStatsMessage.build(bad, stats)
        assert caught.value.reason == reason


@pytest.mark.usefixtures("stats_path")
@pytest.mark.parametrize("chunk_keys", [300, 65536], ids=["chunks", "one"])
def test_largest_middle_keys_merge_across_chunks(chunk_keys: int) -> None:
    """Key indices from layer_pass equal a direct ranking of the middle keys' logits."""
    rows = make_rows(2600, MIXED)
    spec = StatsSpec(chunk_keys=chunk_keys, middle_keys=COUNT)
    index = layer_pass(rows, 0.25, spec).middle_index
    assert index is not None
    n = rows.query.shape[0]
    for i in range(n):
        logits = (
            torch.einsum(
                "kgd,kjd->kgj", rows.query[i].double(), rows.key[int(rows.batch_index[i])].double()
            )
            * 0.25
            + rows.bias[i].double()
        )
        logits[..., rows.keep_index[i]] = -torch.inf
        want = logits.topk(COUNT, dim=-1).indices
        got = index[i]
        assert torch.equal(logits.gather(-1, got.long()), logits.gather(-1, want)), (i, got, want)
