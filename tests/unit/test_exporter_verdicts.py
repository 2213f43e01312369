"""Verdicts: histogram quantiles, confidence bound, hysteresis, KV grouping, reclaimable bytes."""

from __future__ import annotations

import numpy as np
import pytest

from exporter.verdicts import (
    VerdictPolicy,
    eviction_quantiles,
    kv_head_any,
    kv_head_safe,
    measured_unsafe,
    reclaimable_bytes,
    update_safe,
)
from exporter.window import EVICTION_BINS, eviction_bin


def _hist(values: np.ndarray) -> np.ndarray:
    """(heads, n) values -> (heads, bins) histogram."""
    bins = eviction_bin(values)
    return np.stack([np.bincount(row, minlength=EVICTION_BINS) for row in bins])


def test_quantile_is_within_one_bin_above_numpy() -> None:
    rng = np.random.default_rng(0)
    # Eviction errors travel in 2**-13 steps; the histogram bins those values.
    values = np.rint(rng.lognormal(mean=-4, sigma=1, size=(50, 500)).clip(0, 0.99) * 8192) / 8192
    point, upper = eviction_quantiles(_hist(values), VerdictPolicy())
    exact = np.quantile(values, 0.95, axis=1, method="inverted_cdf")
    assert np.all(point >= exact)
    assert np.all(point <= exact * 1.08)
    assert np.all(upper >= point)


def test_upper_bound_tightens_with_more_samples() -> None:
    rng = np.random.default_rng(1)
    few, many = rng.uniform(0, 0.1, (1, 120)), rng.uniform(0, 0.1, (1, 5000))
    policy = VerdictPolicy()
    gap_few = np.subtract(*eviction_quantiles(_hist(few), policy)[::-1])
    gap_many = np.subtract(*eviction_quantiles(_hist(many), policy)[::-1])
    assert gap_many[0] < gap_few[0]


@pytest.mark.parametrize(
    ("previous", "upper", "expected"),
    [(False, 0.04, True), (False, 0.06, False), (True, 0.06, True), (True, 0.09, False)],
    ids=["enters-below-enter", "stays-out-between", "stays-in-between", "leaves-above-exit"],
)
def test_hysteresis(previous: bool, upper: float, expected: bool) -> None:
    policy = VerdictPolicy(enter_bound=0.05, exit_bound=0.08, min_samples=10)
    got = update_safe(np.array([previous]), np.array([upper]), np.array([100]), policy)
    assert bool(got[0]) is expected


def test_too_few_samples_is_never_safe() -> None:
    policy = VerdictPolicy(min_samples=100)
    assert not update_safe(np.array([True]), np.array([0.001]), np.array([99]), policy)[0]


def test_kv_head_is_safe_only_if_all_its_query_heads_are() -> None:
    query = np.array([[True, True, True, False, False, False]])  # group of 3: kv 0 safe, kv 1 not
    assert kv_head_safe(query, 2).tolist() == [[True, False]]
    assert kv_head_safe(np.array([[True, True, False, True]]), 2).tolist() == [[True, False]]


@pytest.mark.parametrize(
    ("upper", "samples", "expected"),
    [(0.09, 100, True), (0.06, 100, False), (0.09, 99, False), (np.nan, 0, False)],
    ids=["above-exit", "between-bounds", "too-few-samples", "no-samples"],
)
def test_unsafe_on_evidence_needs_samples_and_an_error_above_the_exit_bound(
    upper: float, samples: int, expected: bool
) -> None:
    """A head between the bounds is unsafe only for want of history (after a restart, say)."""
    policy = VerdictPolicy(enter_bound=0.05, exit_bound=0.08, min_samples=100)
    got = measured_unsafe(np.array([upper]), np.array([samples]), policy)
    assert bool(got[0]) is expected


def test_kv_head_is_unsafe_on_evidence_if_any_of_its_query_heads_is() -> None:
    assert kv_head_any(np.array([[False, True, False, False]]), 2).tolist() == [[True, False]]


def test_reclaimable_bytes_formula() -> None:
    kv_safe = np.array([[True, False], [True, True]])
    visible = np.array([1000.0, 500.0])
    got = reclaimable_bytes(
        kv_safe, visible, sink_tokens=4, recent_tokens=96, head_dim=128, kv_dtype_bytes=2
    )
    assert got == (1 * 900 + 2 * 400) * 128 * 2 * 2


def test_policy_rejects_exit_stricter_than_enter() -> None:
    with pytest.raises(ValueError, match="enter_bound <= exit_bound"):
        VerdictPolicy(enter_bound=0.1, exit_bound=0.05)
