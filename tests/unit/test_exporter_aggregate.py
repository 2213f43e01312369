"""Aggregator: duplicates, replay, layout checks, references and re-baselining, counters."""

from __future__ import annotations

import numpy as np
import pytest

from collector.schema import SchemaError
from exporter.aggregate import Aggregator, Fold
from exporter.drift import DriftPolicy
from exporter.model_state import AggregatePolicy
from exporter.reference import RebaselineRequest, decode_record
from tests.factories import MessageFactory, pattern_probs

POLICY = AggregatePolicy(
    window_samples=64,
    drift=DriftPolicy(window_samples=32, min_head_samples=16, reference_samples=40),
)


def _factory(**kw: object) -> MessageFactory:
    return MessageFactory(layers=2, heads=4, kv_heads=2, seed=5, **kw)  # type: ignore[arg-type]


def test_redelivered_message_is_a_duplicate() -> None:
    agg, msg = Aggregator(POLICY), _factory().message(timestamp_seconds=1.0)
    assert agg.fold(msg, partition=0, replay=False, now_wall=0) is Fold.FOLDED
    assert agg.fold(msg, partition=0, replay=False, now_wall=0) is Fold.DUPLICATE
    agg.publish_counters()
    assert agg.snapshot()[0].messages_total == 1
    assert agg.snapshot()[0].window_samples == 1


def test_replayed_messages_rebuild_the_window_but_are_not_counted() -> None:
    agg, factory = Aggregator(POLICY), _factory()
    for i in range(10):
        agg.fold(factory.message(timestamp_seconds=float(i)), partition=0, replay=i < 7, now_wall=0)
    agg.publish_counters()
    snap = agg.snapshot()[0]
    assert (snap.window_samples, snap.messages_total) == (10, 3)


def test_counters_are_visible_only_once_published() -> None:
    agg = Aggregator(POLICY)
    agg.fold(_factory().message(timestamp_seconds=1.0), partition=0, replay=False, now_wall=0)
    assert agg.snapshot()[0].messages_total == 0
    agg.publish_counters()
    assert agg.snapshot()[0].messages_total == 1


def test_a_layout_change_without_a_new_config_hash_is_rejected() -> None:
    agg = Aggregator(POLICY)
    agg.fold(_factory().message(timestamp_seconds=1.0), partition=0, replay=False, now_wall=0)
    other = MessageFactory(layers=3, heads=4, kv_heads=2, seed=1).message(timestamp_seconds=2.0)
    with pytest.raises(SchemaError) as info:
        agg.fold(other, partition=0, replay=False, now_wall=0)
    assert info.value.reason == "shape"


def test_too_many_heads_is_oversized() -> None:
    agg = Aggregator(AggregatePolicy(max_heads_per_model=4))
    with pytest.raises(SchemaError) as info:
        agg.fold(_factory().message(), partition=0, replay=False, now_wall=0)
    assert info.value.reason == "oversized"


def test_reference_is_built_persisted_and_survives_a_restart() -> None:
    agg, factory = Aggregator(POLICY), _factory()
    for i in range(50):
        agg.fold(factory.message(timestamp_seconds=float(i)), partition=0, replay=False, now_wall=0)
    (ref,) = agg.take_new_references()
    assert ref.samples == 40 and ref.pattern_counts.sum() == 40 * 8
    restarted = Aggregator(POLICY)
    restarted.load(decode_record(ref.to_bytes()))
    restarted.fold(factory.message(timestamp_seconds=60.0), partition=0, replay=False, now_wall=0)
    assert restarted.snapshot()[0].reference_samples == 40
    assert restarted.take_new_references() == []


def test_rebaseline_replaces_the_reference_with_rows_after_the_request() -> None:
    agg = Aggregator(POLICY)
    before = _factory(probs=pattern_probs(2, 4, "v_shaped"))
    for i in range(45):
        agg.fold(before.message(timestamp_seconds=float(i)), partition=0, replay=False, now_wall=0)
    agg.take_new_references()
    agg.load(RebaselineRequest("tiny-llama@*", requested_seconds=100.0))
    assert agg.snapshot()[0].reference_samples == 0
    after = MessageFactory(
        layers=2, heads=4, kv_heads=2, seed=6, probs=pattern_probs(2, 4, "recency")
    )
    for i in range(40):
        agg.fold(after.message(timestamp_seconds=100.0 + i), partition=0, replay=False, now_wall=0)
    (ref,) = agg.take_new_references()
    assert ref.created_seconds >= 100.0
    assert agg.snapshot()[0].heads_pattern_changed == 0


def test_an_older_reference_does_not_override_a_newer_request() -> None:
    agg, factory = Aggregator(POLICY), _factory()
    for i in range(45):
        agg.fold(factory.message(timestamp_seconds=float(i)), partition=0, replay=False, now_wall=0)
    (ref,) = agg.take_new_references()
    fresh = Aggregator(POLICY)
    fresh.load(RebaselineRequest(ref.model_key, requested_seconds=1000.0))
    fresh.load(ref)
    fresh.fold(factory.message(timestamp_seconds=1001.0), partition=0, replay=False, now_wall=0)
    assert fresh.snapshot()[0].reference_samples == 0


def test_pattern_change_against_the_reference_is_counted() -> None:
    agg = Aggregator(POLICY)
    factories = {p: _factory(probs=pattern_probs(2, 4, p)) for p in ("v_shaped", "sink")}
    factories["sink"].rng = np.random.default_rng(99)  # distinct message ids
    for i, pattern in enumerate(["v_shaped"] * 64 + ["sink"] * 64):
        agg.fold(
            factories[pattern].message(timestamp_seconds=float(i)),
            partition=0,
            replay=False,
            now_wall=0,
        )
    assert agg.snapshot()[0].heads_pattern_changed == 8


def test_revoked_partitions_drop_their_models() -> None:
    agg = Aggregator(POLICY)
    agg.fold(_factory().message(), partition=3, replay=False, now_wall=0)
    agg.fold(_factory(model_name="other").message(), partition=1, replay=False, now_wall=0)
    assert agg.drop_partitions({3}) == ["tiny-llama@0123456789abcdef"]
    assert [s.model_name for s in agg.snapshot()] == ["other"]


def test_batch_fold_equals_folding_one_by_one() -> None:
    factories = [
        _factory(),
        MessageFactory(layers=2, heads=4, kv_heads=2, model_name="other", seed=8),
    ]
    values = [
        f.message(timestamp_seconds=float(i)).to_bytes() for i in range(150) for f in factories
    ]
    values[10] = values[3]  # a redelivery inside the batch
    values[20] = b"garbage"
    one, batch = Aggregator(POLICY), Aggregator(POLICY)
    singles = []
    for v in values:
        try:
            singles.append(one.fold_bytes(v, partition=0, replay=False, now_wall=0)[0])
        except SchemaError as exc:
            singles.append(exc.reason)
    outcomes = []
    for start in range(0, len(values), 64):
        chunk = values[start : start + 64]
        for outcome, _ in batch.fold_records(
            chunk, partition=0, replay=[False] * len(chunk), now_wall=0
        ):
            outcomes.append(outcome.reason if isinstance(outcome, SchemaError) else outcome)
    assert outcomes == singles
    one.publish_counters()
    batch.publish_counters()
    for a, b in zip(one.snapshot(), batch.snapshot(), strict=True):
        assert a.model_key == b.model_key and a.messages_total == b.messages_total
        assert np.array_equal(a.means, b.means, equal_nan=True)
        assert np.array_equal(a.pattern, b.pattern) and np.array_equal(a.kv_safe, b.kv_safe)
        assert np.array_equal(a.drift_p_value, b.drift_p_value)
