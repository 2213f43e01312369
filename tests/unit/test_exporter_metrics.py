"""Prometheus collector: names, budget, hard cap, untrusted names, TTL, renderer parity."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.aggregate import Aggregator
from exporter.drift import DriftState
from exporter.exposition import render
from exporter.labels import safe_label
from exporter.metrics import ExporterStats, HeadwatchCollector, SeriesLimits
from exporter.model_state import AggregatePolicy
from tests.factories import MessageFactory, pattern_probs


def _aggregator(model_name: str = "tiny-llama", messages: int = 150, layers: int = 2, heads: int = 4,
                pattern: str = "v_shaped") -> Aggregator:  # fmt: skip
    agg = Aggregator(AggregatePolicy(window_samples=128))
    factory = MessageFactory(layers=layers, heads=heads, kv_heads=2, probs=pattern_probs(layers, heads, pattern),
                             model_name=model_name, seed=1)  # fmt: skip
    for i in range(messages):
        agg.fold(
            factory.message(timestamp_seconds=1000.0 + i),
            partition=0,
            replay=False,
            now_wall=1000.0 + i,
        )
    agg.publish_counters()
    return agg


def _registry(
    agg: Aggregator, limits: SeriesLimits | None = None
) -> tuple[CollectorRegistry, HeadwatchCollector]:
    registry = CollectorRegistry(auto_describe=False)
    collector = HeadwatchCollector(
        lambda: (agg.snapshot(), ExporterStats(messages_total=7)), limits or SeriesLimits()
    )
    registry.register(collector)
    return registry, collector


def test_required_metrics_are_exported() -> None:
    registry, _ = _registry(_aggregator())
    head = {"model_name": "tiny-llama", "layer": "1", "head": "3", "kv_head": "1"}
    get = registry.get_sample_value
    assert get("headwatch_head_pattern", {**head, "pattern": "v_shaped"}) == 1.0
    assert 2.0 < get("headwatch_head_entropy_nats", head) < 3.0
    assert 0.45 < get("headwatch_head_mass_ratio", {**head, "region": "sink"}) < 0.62
    assert get("headwatch_head_eviction_error_ratio", head) < 0.04
    assert get("headwatch_head_drift_detected", head) == 0.0
    assert (
        get(
            "headwatch_kv_head_safe_to_compress",
            {"model_name": "tiny-llama", "layer": "1", "kv_head": "1"},
        )
        == 1.0
    )
    assert get("headwatch_model_heads_drifted", {"model_name": "tiny-llama"}) == 0.0
    # every KV head safe: (4096 visible - 4 sink - 64 recent) x 64 dims x 2 (K, V) x 2 bytes x 4 KV heads
    assert (
        get("headwatch_model_kv_reclaimable_bytes", {"model_name": "tiny-llama"})
        == (4096 - 68) * 64 * 2 * 2 * 4
    )
    assert get("headwatch_model_messages_total", {"model_name": "tiny-llama"}) == 150
    assert get("headwatch_exporter_messages_total") == 7
    assert get("headwatch_exporter_invalid_messages_total", {"reason": "decode"}) == 0


@pytest.mark.parametrize(("messages", "ready"), [(99, 0.0), (110, 0.0), (128, 1.0)])
def test_a_kv_head_is_verdict_ready_once_its_verdict_rests_on_min_samples(
    messages: int, ready: float
) -> None:
    """Below VERDICTS__MIN_SAMPLES (100) a head reads unsafe for want of evidence: ready says so,
    and it changes with the verdict (every 64 folds here), not before it (110)."""
    registry, _ = _registry(_aggregator(messages=messages))
    kv = {"model_name": "tiny-llama", "layer": "1", "kv_head": "1"}
    assert registry.get_sample_value("headwatch_kv_head_verdict_ready", kv) == ready
    assert registry.get_sample_value("headwatch_kv_head_safe_to_compress", kv) == ready


def test_a_quiet_head_uses_exactly_the_default_budget() -> None:
    registry, collector = _registry(_aggregator())
    assert registry.get_sample_value("headwatch_exporter_series_dropped_total") == 0
    assert collector.active_series == 2 * 4 * 8


def _dropped_per_scrape(registry: CollectorRegistry) -> float:
    """The counter grows by the series left out at each scrape: the difference of two scrapes."""
    first = registry.get_sample_value("headwatch_exporter_series_dropped_total") or 0.0
    return (registry.get_sample_value("headwatch_exporter_series_dropped_total") or 0.0) - first


def _with_drift(agg: Aggregator) -> Aggregator:
    state = next(iter(agg.models.values()))
    drifted = np.zeros(state.shape, dtype=bool)
    drifted[0, 0] = True
    state.drift = DriftState.empty(state.shape)
    object.__setattr__(state.drift, "drifted", drifted)
    object.__setattr__(state.drift, "failing", drifted.copy())
    object.__setattr__(state.drift, "since_seconds", np.where(drifted, 1234.0, np.nan))
    return agg


def test_drifted_heads_stay_within_the_budget_and_count_what_they_drop() -> None:
    registry, collector = _registry(_with_drift(_aggregator()))
    head = {"model_name": "tiny-llama", "layer": "0", "head": "0", "kv_head": "0"}
    assert registry.get_sample_value("headwatch_head_drift_p_value", head) is not None
    assert registry.get_sample_value("headwatch_head_drift_distance", head) is not None
    # 11 candidate series for the drifted head, budget 8: 3 dropped, the middle mass among them
    assert (
        registry.get_sample_value("headwatch_head_mass_ratio", {**head, "region": "middle"}) is None
    )
    assert _dropped_per_scrape(registry) == 3
    assert collector.active_series == 2 * 4 * 8


def test_a_larger_budget_exports_everything() -> None:
    registry, _ = _registry(_with_drift(_aggregator()), SeriesLimits(head_series_budget=11))
    head = {"model_name": "tiny-llama", "layer": "0", "head": "0", "kv_head": "0"}
    assert (
        registry.get_sample_value("headwatch_head_drift_since_timestamp_seconds", head) is not None
    )
    assert _dropped_per_scrape(registry) == 0


def test_the_hard_cap_drops_and_counts() -> None:
    agg = _aggregator()
    registry, collector = _registry(agg, SeriesLimits(max_series=100))
    text = generate_latest(registry).decode()
    assert collector.active_series < 2 * 4 * 8
    dropped = registry.get_sample_value("headwatch_exporter_series_dropped_total")
    assert dropped is not None and dropped > 0
    assert "headwatch_model_kv_heads{" in text


@pytest.mark.parametrize(
    "name",
    [
        'quote"name',
        "new\nline",
        "back\\slash",
        "ctl\x00\r\t",
        "x" * 256,
        "emoji-🦙",
        "lone\ud800surrogate",
    ],
    ids=["quote", "newline", "backslash", "control", "long", "emoji", "surrogate"],
)
def test_untrusted_model_names_never_break_the_exposition(name: str) -> None:
    agg = _aggregator(model_name="placeholder", messages=20)
    state = next(iter(agg.models.values()))
    state.model_name = name  # the schema caps names at 256 chars; labels are bounded anyway
    registry, _ = _registry(agg, SeriesLimits(max_label_chars=64))
    for body in (render(registry.collect()), generate_latest(registry)):
        families = list(text_string_to_metric_families(body.decode()))
        names = {
            s.labels["model_name"] for f in families for s in f.samples if "model_name" in s.labels
        }
        assert len(names) == 1
        label = names.pop()
        assert len(label) <= 64 and "\n" not in label and "\r" not in label and "\x00" not in label


def test_names_that_differ_only_in_what_labels_replace_stay_two_series() -> None:
    names = ["llama\n", "llama\r", "llama\x00", "lone\ud800", "lone\udfff", "llama"]
    labels = [safe_label(name, 64) for name in names]
    assert len(set(labels)) == len(names)
    assert labels[-1] == "llama"  # a clean name is left as it is
    assert all(label.startswith("llama\ufffd~") for label in labels[:3])


def test_fast_renderer_matches_generate_latest() -> None:
    registry, _ = _registry(_with_drift(_aggregator(layers=3, heads=8)))

    def samples(body: bytes) -> list[tuple[str, tuple[tuple[str, str], ...], float]]:
        return sorted(
            (s.name, tuple(sorted(s.labels.items())), s.value)
            for f in text_string_to_metric_families(body.decode())
            for s in f.samples
            if s.name != "headwatch_exporter_series_dropped_total"  # grows at every scrape
        )

    assert samples(render(registry.collect())) == samples(generate_latest(registry))


def test_silent_models_expire_after_the_ttl() -> None:
    agg = _aggregator(messages=150)
    agg.policy = AggregatePolicy(model_ttl_seconds=60)
    last_fold = 1000.0 + 149
    assert agg.expire(now_wall=last_fold + 59) == []
    assert agg.expire(now_wall=last_fold + 61) == ["tiny-llama@0123456789abcdef/s4r64"]
    assert agg.snapshot() == []


def test_one_model_name_with_two_identities_exports_the_newest() -> None:
    agg = _aggregator(messages=10)
    newer = MessageFactory(layers=2, heads=4, kv_heads=2, config_hash="fedcba9876543210", seed=3)
    agg.fold(newer.message(timestamp_seconds=5000.0), partition=0, replay=False, now_wall=5000.0)
    registry, _ = _registry(agg)
    assert [s.model_key for s in agg.snapshot()] == ["tiny-llama@fedcba9876543210/s4r64"]
    text = generate_latest(registry).decode()
    assert text.count('headwatch_model_kv_heads{model_name="tiny-llama"}') == 1


def test_emits_exactly_the_names_of_docs_metrics_md() -> None:
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"\| `(headwatch_(?:head|kv|model|layer|exporter)_[a-z_]+)`", doc))
    agg = _with_drift(_aggregator())
    registry = CollectorRegistry(auto_describe=False)
    stats = ExporterStats(lag={("headwatch.head-stats.v1", 0): 3})
    registry.register(
        HeadwatchCollector(lambda: (agg.snapshot(), stats), SeriesLimits(head_series_budget=11))
    )
    emitted = set(re.findall(r"^# TYPE (\S+)", render(registry.collect()).decode(), re.MULTILINE))
    assert emitted == documented


def test_the_two_kv_head_families_are_kept_or_dropped_together_under_any_cap() -> None:
    """The unsafe alert joins them: one without the other would silence it."""
    agg = _aggregator(messages=128)
    for cap in range(0, 200, 3):
        registry, _ = _registry(agg, SeriesLimits(max_series=cap))
        kv = {"model_name": "tiny-llama", "layer": "1", "kv_head": "1"}
        safe = registry.get_sample_value("headwatch_kv_head_safe_to_compress", kv)
        ready = registry.get_sample_value("headwatch_kv_head_verdict_ready", kv)
        assert (safe is None) == (ready is None), cap


def test_every_head_gauge_carries_its_own_channel_of_the_window() -> None:
    """Each per-head series is the snapshot's value for that head, channel by channel."""
    from exporter.snapshot import ENTROPY, MIDDLE, NORMALIZED_ENTROPY, RECENT, SINK

    agg = _aggregator(messages=128)
    (snap,) = agg.snapshot()
    registry, _ = _registry(agg)
    get = registry.get_sample_value
    layers, heads = snap.shape
    assert len({snap.means[c].tobytes() for c in (SINK, RECENT, MIDDLE)}) == 3  # distinguishable
    for layer in range(layers):
        for head in range(heads):
            labels = {"model_name": "tiny-llama", "layer": str(layer), "head": str(head),
                      "kv_head": str(head // 2)}  # fmt: skip
            assert get("headwatch_head_entropy_nats", labels) == snap.means[ENTROPY, layer, head]
            assert (
                get("headwatch_head_normalized_entropy_ratio", labels)
                == snap.means[NORMALIZED_ENTROPY, layer, head]
            )
            for region, channel in (("sink", SINK), ("recent", RECENT), ("middle", MIDDLE)):
                value = get("headwatch_head_mass_ratio", {**labels, "region": region})
                assert value == snap.means[channel, layer, head], region
            assert (
                get("headwatch_head_eviction_error_ratio", labels)
                == snap.eviction_quantile[layer, head]
            )
