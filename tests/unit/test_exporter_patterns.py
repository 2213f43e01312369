"""Pattern classification: the study's examples, the factory's patterns, dominance and overrides."""

from __future__ import annotations

import numpy as np
import pytest

from exporter.patterns import MIXED, PATTERNS, PatternInputs, PatternThresholds, classify, dominant
from tests.factories import MessageFactory, pattern_probs


def _inputs(h: float, hn: float, s: float, r: float, top: dict[int, float]) -> PatternInputs:
    a = lambda v: np.array([[v]], dtype=np.float64)  # noqa: E731
    return PatternInputs(
        a(h), a(hn), a(s), a(r), a(max(0.0, 1 - s - r)), {k: a(v) for k, v in top.items()}
    )


# The study's examples (seed/, LLaMA-2-7B-80K at ~50K tokens, ln 50K = 10.82).
STUDY = [
    ("uniform", _inputs(10.6, 10.6 / 10.82, 0.0001, 0.001, {1: 0.0002, 16: 0.001, 256: 0.01})),
    ("v_shaped", _inputs(2.53, 2.53 / 10.82, 0.632, 0.337, {1: 0.5, 16: 0.9, 256: 0.97})),
    ("sink", _inputs(0.98, 0.98 / 10.82, 0.969, 0.0308, {1: 0.9, 16: 0.99, 256: 0.999})),
    ("recency", _inputs(0.09, 0.09 / 10.82, 0.001, 0.996, {1: 0.98, 16: 0.999, 256: 1.0})),
    ("scattered_middle", _inputs(6.43, 6.43 / 10.82, 0.06, 0.075, {1: 0.01, 16: 0.1, 256: 0.555})),
    ("concentrated_middle", _inputs(1.32, 1.32 / 10.82, 0.05, 0.05, {1: 0.4, 16: 0.85, 256: 0.9})),
]


@pytest.mark.parametrize(("expected", "inputs"), STUDY, ids=[name for name, _ in STUDY])
def test_study_examples_get_the_study_label(expected: str, inputs: PatternInputs) -> None:
    assert PATTERNS[classify(inputs, PatternThresholds())[0, 0]] == expected


def test_nothing_fitting_is_mixed() -> None:
    inputs = _inputs(2.5, 0.3, 0.3, 0.3, {1: 0.1, 16: 0.3, 256: 0.6})
    assert classify(inputs, PatternThresholds())[0, 0] == MIXED


def test_not_measured_heads_are_mixed() -> None:
    inputs = _inputs(
        float("nan"), float("nan"), float("nan"), float("nan"), {1: 0.1, 16: 0.3, 256: 0.6}
    )
    assert classify(inputs, PatternThresholds())[0, 0] == MIXED


@pytest.mark.parametrize("pattern", PATTERNS)
def test_factory_patterns_classify_as_themselves(pattern: str) -> None:
    from exporter.samples import to_sample
    from exporter.window import CountWindow

    factory = MessageFactory(layers=3, heads=4, probs=pattern_probs(3, 4, pattern), seed=7)
    window = CountWindow((3, 4), 64, 1e9)
    for i in range(40):
        window.add(to_sample(factory.message(timestamp_seconds=float(i)), PatternThresholds()))
    counts = window.pattern_counts.sum(axis=(0, 1))
    assert counts[PATTERNS.index(pattern)] == 40 * 12


def test_thresholds_are_overridable() -> None:
    inputs = STUDY[2][1]  # the sink example, 96.9% on the sink
    assert PATTERNS[classify(inputs, PatternThresholds(sink_min_mass=0.98))[0, 0]] != "sink"


def test_dominant_needs_the_share() -> None:
    counts = np.array([[[6, 4, 0, 0, 0, 0, 0], [4, 3, 3, 0, 0, 0, 0], [0] * 7]])
    assert dominant(counts, 0.5).tolist() == [[0, MIXED, MIXED]]
