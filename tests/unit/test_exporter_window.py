"""Count window: exact order-independent sums, eviction by count and by time, bounded memory."""

from __future__ import annotations

import numpy as np

from exporter.patterns import PatternThresholds
from exporter.samples import to_sample
from exporter.window import CountWindow, Sample
from tests.factories import MessageFactory, pattern_probs


def _samples(n: int, seed: int = 0) -> list[Sample]:
    factory = MessageFactory(
        layers=2, heads=4, probs=pattern_probs(2, 4, [1, 2, 1, 1, 1, 1, 1]), seed=seed
    )
    return [
        to_sample(factory.message(timestamp_seconds=float(i)), PatternThresholds())
        for i in range(n)
    ]


def _fill(samples: list[Sample], capacity: int = 64, horizon: float = 1e9) -> CountWindow:
    window = CountWindow((2, 4), capacity, horizon)
    for s in samples:
        window.add(s)
    return window


def test_means_are_identical_whatever_the_fold_order() -> None:
    samples = _samples(50)
    shuffled = [samples[i] for i in np.random.default_rng(1).permutation(50)]
    a, b = _fill(samples), _fill(shuffled)
    assert np.array_equal(a.means(), b.means(), equal_nan=True)
    assert np.array_equal(a.counts, b.counts)


def test_a_window_that_evicted_equals_one_that_only_saw_the_rest() -> None:
    samples = _samples(100)
    long_lived = _fill(samples, capacity=30)
    fresh = _fill(samples[70:], capacity=30)
    assert np.array_equal(long_lived.sums, fresh.sums)
    assert np.array_equal(long_lived.counts, fresh.counts)
    assert long_lived.ids == fresh.ids


def test_means_match_numpy_on_the_decoded_values() -> None:
    factory = MessageFactory(layers=2, heads=4, seed=3)
    messages = [factory.message(timestamp_seconds=float(i)) for i in range(20)]
    window = CountWindow((2, 4), 64, 1e9)
    for m in messages:
        window.add(to_sample(m, PatternThresholds()))
    expected = np.mean([m.stat("sink_mass") for m in messages], axis=0)
    np.testing.assert_allclose(window.means()[2], expected, atol=1e-12)


def test_samples_older_than_the_horizon_leave() -> None:
    samples = _samples(10)
    window = _fill(samples, horizon=3.5)
    assert window.size == 4  # timestamps 6..9 are within 3.5 s of 9


def test_memory_does_not_grow_with_messages() -> None:
    window = CountWindow((2, 4), 16, 1e9)
    samples = _samples(20)
    sizes = []
    for round_ in range(5):
        for s in samples:
            window.add(
                Sample(
                    f"{round_}-{s.message_id}",
                    s.timestamp_seconds,
                    s.ints,
                    s.cells,
                    s.valid,
                    s.visible_keys,
                )
            )
        sizes.append((window.size, len(window.ids)))
    assert sizes == [(16, 16)] * 5
