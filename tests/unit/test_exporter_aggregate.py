"""Aggregator: duplicates, replay, layout checks, references and re-baselining, counters."""

from __future__ import annotations

import numpy as np
import pytest

from collector.schema import SchemaError
from exporter.aggregate import Aggregator, Fold
from exporter.drift import DriftPolicy
from exporter.model_state import AggregatePolicy
from exporter.reference import RebaselineRequest, decode_record
from exporter.snapshot import MIDDLE, NORMALIZED_ENTROPY
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
    fresh.fold(factory.message(timestamp_seconds=1001.0), partition=0, replay=False, now_wall=1001)
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
    assert agg.drop_partitions({3}) == ["tiny-llama@0123456789abcdef/s4r64"]
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


def test_a_message_from_a_clock_far_ahead_is_rejected_and_honest_ones_still_fold() -> None:
    agg, factory = Aggregator(POLICY), _factory()
    now = 10_000.0
    for i in range(5):
        agg.fold(factory.message(timestamp_seconds=now - 5 + i), partition=0, replay=False,
                 now_wall=now)  # fmt: skip
    ahead = factory.message(timestamp_seconds=now + POLICY.horizon_seconds + 1)
    with pytest.raises(SchemaError, match="ahead of this replica's clock") as caught:
        agg.fold(ahead, partition=0, replay=False, now_wall=now)
    assert caught.value.reason == "out_of_range"
    ((outcome, _),) = agg.fold_records(
        [ahead.to_bytes()], partition=0, replay=[False], now_wall=now
    )
    assert isinstance(outcome, SchemaError) and outcome.reason == "out_of_range"
    late = factory.message(timestamp_seconds=now + 1)
    assert agg.fold(late, partition=0, replay=False, now_wall=now) is Fold.FOLDED
    assert agg.snapshot()[0].window_samples == 6
    slightly_ahead = factory.message(timestamp_seconds=now + POLICY.max_future_seconds - 1)
    assert agg.fold(slightly_ahead, partition=0, replay=False, now_wall=now) is Fold.FOLDED


def test_only_folded_messages_keep_a_model_alive() -> None:
    """Duplicates, stale messages and layout rejections do not hold off the TTL."""
    policy = AggregatePolicy(window_samples=64, horizon_seconds=100.0, model_ttl_seconds=60.0)
    agg, factory = Aggregator(policy), _factory()
    first = factory.message(timestamp_seconds=1000.0)
    agg.fold(first, partition=0, replay=False, now_wall=1000.0)
    stale = factory.message(timestamp_seconds=850.0)
    changed = MessageFactory(layers=3, heads=4, kv_heads=2, seed=6).message(timestamp_seconds=1001)
    outcomes = agg.fold_records(
        [first.to_bytes(), stale.to_bytes(), changed.to_bytes()],
        partition=0, replay=[False] * 3, now_wall=1050.0,
    )  # fmt: skip
    assert [o for o, _ in outcomes][:2] == [Fold.DUPLICATE, Fold.STALE]
    rejected = outcomes[2][0]
    assert isinstance(rejected, SchemaError) and rejected.reason == "shape"
    assert agg.fold(first, partition=0, replay=False, now_wall=1055.0) is Fold.DUPLICATE
    assert agg.expire(now_wall=1061.0) == ["tiny-llama@0123456789abcdef/s4r64"]


def test_a_message_whose_samples_fail_is_rejected_alone_and_nothing_folds_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import exporter.aggregate as aggregate

    good, other = _factory(), MessageFactory(layers=2, heads=4, kv_heads=2, model_name="other",
                                             seed=8)  # fmt: skip
    values = [good.message(timestamp_seconds=float(i)).to_bytes() for i in range(3)]
    values += [other.message(timestamp_seconds=float(i)).to_bytes() for i in range(3)]
    poisoned = other.message(timestamp_seconds=9.0)
    values.insert(4, poisoned.to_bytes())
    real_one, real_batch = aggregate.to_sample, aggregate.to_samples

    def one(msg: object, patterns: object) -> object:
        if msg.header.message_id == poisoned.header.message_id:  # type: ignore[attr-defined]
            raise ValueError("a bug this message triggers")
        return real_one(msg, patterns)  # type: ignore[arg-type]

    def batch(msgs: list[object], patterns: object) -> object:
        return [one(m, patterns) for m in msgs]

    monkeypatch.setattr(aggregate, "to_sample", one)
    monkeypatch.setattr(aggregate, "to_samples", batch)
    agg = Aggregator(POLICY)
    outcomes = [o for o, _ in agg.fold_records(values, partition=0, replay=[False] * 7,
                                               now_wall=10.0)]  # fmt: skip
    rejected = outcomes.pop(4)
    assert isinstance(rejected, SchemaError) and rejected.reason == "validation"
    assert "a bug this message triggers" in rejected.detail
    assert outcomes == [Fold.FOLDED] * 6
    assert {s.model_name: s.window_samples for s in agg.snapshot()} == {"other": 3, "tiny-llama": 3}
    monkeypatch.setattr(aggregate, "to_samples", real_batch)
    again = agg.fold_records(values[:2], partition=0, replay=[False] * 2, now_wall=10.0)
    assert [o for o, _ in again] == [Fold.DUPLICATE] * 2


def test_a_replayed_model_that_had_gone_quiet_expires_at_once() -> None:
    """After a restart the window is rebuilt from Kafka; a model silent for longer than the TTL
    must not come back for another TTL because its old messages were folded again now."""
    policy = AggregatePolicy(window_samples=64, horizon_seconds=3600.0, model_ttl_seconds=900.0)
    agg, factory = Aggregator(policy), _factory()
    now = 10_000.0
    quiet = [factory.message(timestamp_seconds=now - 2000 + i).to_bytes() for i in range(5)]
    agg.fold_records(quiet, partition=0, replay=[True] * 5, now_wall=now)
    assert agg.snapshot()[0].window_samples == 5
    assert agg.expire(now_wall=now) == ["tiny-llama@0123456789abcdef/s4r64"]
    recent = [factory.message(timestamp_seconds=now - 60 + i).to_bytes() for i in range(5)]
    agg.fold_records(recent, partition=0, replay=[True] * 5, now_wall=now)
    assert agg.expire(now_wall=now) == []
    assert agg.expire(now_wall=now - 60 + 4 + 901) == ["tiny-llama@0123456789abcdef/s4r64"]


@pytest.mark.parametrize("learned_sinks", [False, True], ids=["plain", "learned-sinks"])
def test_window_means_follow_the_messages_middle_mass_and_normalized_entropy(
    learned_sinks: bool,
) -> None:
    """A learned sink is no key's mass, and one more outcome for the entropy (collector.schema)."""
    from collector.schema import HeadStatsMessage
    from tests.unit.test_schema_learned_sinks import header, stats

    msg = HeadStatsMessage.build(header(learned_sinks), stats(learned_sinks))
    agg = Aggregator(POLICY)
    agg.fold(msg, partition=0, replay=False, now_wall=1.0)
    means = agg.snapshot()[0].means
    for channel, name in ((NORMALIZED_ENTROPY, "normalized_entropy"), (MIDDLE, "middle_mass")):
        np.testing.assert_allclose(means[channel], msg.stat(name), atol=2e-5)
    assert np.allclose(means[MIDDLE], 0.4 if learned_sinks else 0.5, atol=2e-5)
