"""Sampling decisions: rate, minimum context, decode cadence and cap, layers, pass budget."""

from __future__ import annotations

import random

from collector.sampling import Sampler, SamplingPolicy, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def sampler(clock: Clock | None = None, **policy: object) -> Sampler:
    return Sampler(SamplingPolicy(**policy), random.Random(7), clock or Clock())  # type: ignore[arg-type]


def test_rate_one_samples_every_sequence() -> None:
    assert sampler(sample_rate=1.0).new_request(4).sampled == [True] * 4


def test_rate_is_respected_on_average() -> None:
    s = sampler(sample_rate=0.1)
    drawn = sum(sum(s.new_request(10).sampled) for _ in range(2000))
    assert 1700 < drawn < 2300


def test_short_prompts_are_not_measured() -> None:
    s = sampler(sample_rate=1.0, min_context_tokens=100, max_passes_per_second=100.0)
    assert not s.prefill_rows(s.new_request(1), upper_bound_context=99)
    assert s.prefill_rows(s.new_request(1), upper_bound_context=100)
    assert s.long_enough([99, 100]) == [False, True]


def test_decode_every_k_th_step_up_to_the_cap() -> None:
    s = sampler(
        sample_rate=1.0,
        min_context_tokens=0,
        decode_every=2,
        max_decode_samples=3,
        max_passes_per_second=100.0,
    )
    state = s.new_request(1)
    measured = [s.decode_step(state, 50 + i) for i in range(1, 11)]
    assert measured == [False, True, False, True, False, True, False, False, False, False]


def test_decode_is_off_by_default() -> None:
    s = sampler(sample_rate=1.0, min_context_tokens=0)
    state = s.new_request(1)
    assert not any(s.decode_step(state, 100) for _ in range(10))


def test_budget_bounds_measured_passes_per_second() -> None:
    clock = Clock()
    s = sampler(clock, sample_rate=1.0, min_context_tokens=0, max_passes_per_second=2.0)
    measured = sum(s.prefill_rows(s.new_request(1), 10) for _ in range(100))
    assert measured == 2
    clock.now = 1.0
    assert sum(s.prefill_rows(s.new_request(1), 10) for _ in range(100)) == 2


def test_token_bucket_allows_one_below_one_per_second() -> None:
    clock = Clock()
    bucket = TokenBucket(0.5, clock)
    assert bucket.try_acquire() and not bucket.try_acquire()
    clock.now = 2.0
    assert bucket.try_acquire()


def test_layer_selection() -> None:
    s = sampler(layers=(0, 3))
    assert [s.is_layer_sampled(i) for i in range(4)] == [True, False, False, True]
