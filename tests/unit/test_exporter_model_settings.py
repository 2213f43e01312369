"""The exporter's per-model S and R gauges: the collector's keep-set as of the newest message."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from exporter.aggregate import Aggregator, Fold
from exporter.metrics import ExporterStats, HeadwatchCollector, SeriesLimits
from exporter.model_families import ModelFamilies
from exporter.model_state import AggregatePolicy
from tests.factories import MessageFactory

LAYERS, HEADS, KV = 2, 4, 2


def _fold(agg: Aggregator, factory: MessageFactory, timestamps: list[float]) -> None:
    for t in timestamps:
        outcome = agg.fold(
            factory.message(timestamp_seconds=t), partition=0, replay=False, now_wall=t
        )
        assert outcome is Fold.FOLDED


def _factory(model_name: str, sink: int, recent: int) -> MessageFactory:
    # A seed of its own per keep-set: equal seeds would draw equal message ids (duplicates).
    return MessageFactory(layers=LAYERS, heads=HEADS, kv_heads=KV, model_name=model_name,
                          sink_tokens=sink, recent_tokens=recent, seed=1000 * sink + recent)  # fmt: skip


def _registry(agg: Aggregator, limits: SeriesLimits | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        HeadwatchCollector(lambda: (agg.snapshot(), ExporterStats()), limits or SeriesLimits())
    )
    return registry


def _keep_set(registry: CollectorRegistry, model: str) -> tuple[float | None, float | None]:
    labels = {"model_name": model}
    return (
        registry.get_sample_value("headwatch_model_sink_tokens", labels),
        registry.get_sample_value("headwatch_model_recent_tokens", labels),
    )


def test_each_model_exports_its_own_sink_and_recent_tokens() -> None:
    agg = Aggregator(AggregatePolicy(window_samples=64))
    _fold(agg, _factory("a", 4, 64), [1000.0, 1001.0])
    _fold(agg, _factory("b", 0, 256), [1000.0, 1001.0])
    registry = _registry(agg)
    assert _keep_set(registry, "a") == (4.0, 64.0)
    assert _keep_set(registry, "b") == (0.0, 256.0)


def test_a_reconfigured_collector_changes_them_with_its_first_newer_message() -> None:
    agg = Aggregator(AggregatePolicy(window_samples=64))
    _fold(agg, _factory("m", 4, 64), [1000.0, 1001.0])
    _fold(agg, _factory("m", 8, 128), [1002.0])
    assert _keep_set(_registry(agg), "m") == (8.0, 128.0)


def test_an_older_message_arriving_late_does_not_change_them() -> None:
    agg = Aggregator(AggregatePolicy(window_samples=64))
    _fold(agg, _factory("m", 8, 128), [1002.0])
    _fold(agg, _factory("m", 4, 64), [1000.0])
    assert _keep_set(_registry(agg), "m") == (8.0, 128.0)


@pytest.mark.parametrize(("spare", "exported"), [(-1, False), (0, True)])
def test_they_count_against_the_hard_cap_with_the_other_model_series(
    spare: int, exported: bool
) -> None:
    agg = Aggregator(AggregatePolicy(window_samples=64))
    _fold(agg, _factory("m", 4, 64), [1000.0])
    # Room for exactly the model-level series (plus `spare`), none for per-head ones.
    limits = SeriesLimits(max_series=ModelFamilies.count(LAYERS) + spare)
    registry = _registry(agg, limits)
    sink, recent = _keep_set(registry, "m")
    assert (sink is not None, recent is not None) == (exported, exported)
    kv_heads = registry.get_sample_value("headwatch_model_kv_heads", {"model_name": "m"})
    assert (kv_heads is not None) == exported


def test_rows_of_two_keep_sets_never_pool_into_one_verdict() -> None:
    """Eviction errors measured with R=256 are smaller than with R=64: pooled, a verdict for the
    R=64 keep-set exported beside them would rest on errors it was never measured with."""
    agg = Aggregator(AggregatePolicy(window_samples=64))
    _fold(agg, _factory("m", 4, 64), [1000.0 + i for i in range(10)])
    _fold(agg, _factory("m", 4, 256), [1010.0 + i for i in range(3)])
    windows = {state.model_key: state.window.size for state in agg.models.values()}
    assert windows == {"m@0123456789abcdef/s4r64": 10,
                       "m@0123456789abcdef/s4r256": 3}  # fmt: skip
    (snapshot,) = agg.snapshot()
    assert (snapshot.recent_tokens, snapshot.window_samples) == (256, 3)
