"""Safe-to-compress verdicts: per query head with hysteresis, per KV head, and bytes reclaimable.

Usage:
    q, ucb = eviction_quantiles(window.eviction_hist, VerdictPolicy())
    safe = update_safe(safe, ucb, window.valid_counts, VerdictPolicy())

A query head is safe for the sink+recent policy when an upper confidence bound of a high quantile
(p95 by default) of its value-aware eviction error over the window is under a bound. The bound to
enter the safe state is stricter than the bound to stay in it (hysteresis), so a head whose error
hovers near the bound does not flap. The quantile comes from the window's eviction-error
histogram (exact counts in 7.6%-wide geometric bins), read at the bin's upper edge, so it errs on
the side of "not safe". A KV head is safe only if every query head that reads it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from exporter.window import EVICTION_INNER_EDGES

# Value reported for each histogram bin: its upper edge; the overflow bin [1, inf) reports 1.0,
# which is above every allowed bound, so such heads are never safe.
_BIN_VALUE = np.append(EVICTION_INNER_EDGES, 1.0)


@dataclass(frozen=True)
class VerdictPolicy:
    """When a query head counts as safe; bounds are on the eviction error (a ratio, 0..1)."""

    quantile: float = 0.95
    enter_bound: float = 0.05
    exit_bound: float = 0.08
    min_samples: int = 100
    # One-sided normal quantile of the confidence in the upper bound (1.645: 95%).
    confidence_z: float = 1.645

    def __post_init__(self) -> None:
        if not 0 < self.quantile < 1:
            raise ValueError(f"quantile must be in (0, 1), got {self.quantile}")
        if not 0 < self.enter_bound <= self.exit_bound < 1:
            raise ValueError(
                "expected 0 < enter_bound <= exit_bound < 1, "
                f"got enter_bound={self.enter_bound}, exit_bound={self.exit_bound}"
            )


def _rank_values(hist: np.ndarray, ranks: list[np.ndarray]) -> list[np.ndarray]:
    """Return, per rank array, the value of the bin holding that rank in each head's histogram."""
    cumulative = np.cumsum(hist, axis=-1)
    out = []
    for rank in ranks:
        index = np.count_nonzero(cumulative < rank[..., None], axis=-1)
        out.append(_BIN_VALUE[np.minimum(index, _BIN_VALUE.size - 1)])
    return out


def eviction_quantiles(hist: np.ndarray, policy: VerdictPolicy) -> tuple[np.ndarray, np.ndarray]:
    """Return (quantile, upper confidence bound of the quantile) per head from (..., bins) counts.

    The bound is the order statistic of rank ceil(nq + z sqrt(nq(1-q))) (normal approximation to
    the binomial count of samples below the true quantile). Both are NaN for heads without samples.
    """
    n = hist.sum(axis=-1).astype(np.float64)
    q = policy.quantile
    rank = np.maximum(np.ceil(q * n), 1)
    ucb_rank = np.minimum(np.ceil(q * n + policy.confidence_z * np.sqrt(n * q * (1 - q))), n)
    point, upper = _rank_values(hist, [rank, np.maximum(ucb_rank, 1)])
    empty = n == 0
    return np.where(empty, np.nan, point), np.where(empty, np.nan, upper)


def update_safe(
    previous: np.ndarray, upper: np.ndarray, samples: np.ndarray, policy: VerdictPolicy
) -> np.ndarray:
    """Return the new safe mask (layers, heads): enter under enter_bound, stay under exit_bound."""
    enough = samples >= policy.min_samples
    with np.errstate(invalid="ignore"):
        enter = upper <= policy.enter_bound
        stay = upper <= policy.exit_bound
    return enough & np.where(previous, stay, enter)


def measured_unsafe(upper: np.ndarray, samples: np.ndarray, policy: VerdictPolicy) -> np.ndarray:
    """Return (layers, heads): unsafe on evidence, with the samples a verdict needs and the upper
    bound of the eviction error's quantile above the bound a safe head leaves at (exit_bound)."""
    with np.errstate(invalid="ignore"):
        return (samples >= policy.min_samples) & (upper > policy.exit_bound)


def kv_head_any(query_flags: np.ndarray, num_kv_heads: int) -> np.ndarray:
    """Return (layers, kv_heads): true when any query head of the group is (query h reads h // group)."""
    return ~kv_head_safe(~query_flags, num_kv_heads)


def kv_head_safe(query_safe: np.ndarray, num_kv_heads: int) -> np.ndarray:
    """Return (layers, kv_heads): safe when all query heads of the group are (query h reads h // group)."""
    layers, heads = query_safe.shape
    if heads % num_kv_heads:
        raise ValueError(f"expected query heads divisible by {num_kv_heads} KV heads, got {heads}")
    grouped = query_safe.reshape(layers, num_kv_heads, heads // num_kv_heads)
    return np.asarray(grouped.all(axis=-1))


def reclaimable_bytes(
    kv_safe: np.ndarray,
    mean_visible_keys: np.ndarray,
    sink_tokens: int,
    recent_tokens: int,
    head_dim: int,
    kv_dtype_bytes: int,
) -> float:
    """Return the KV bytes per sequence freed if every safe KV head kept only sink + recent tokens.

    Per layer: safe KV heads x max(0, mean visible keys - sink - recent) x head_dim x 2 (K and V)
    x bytes per element. The mean of the window's visible keys is used, so the figure is the
    saving for an average sampled sequence and adds up across sequences.
    """
    evictable = np.maximum(mean_visible_keys - sink_tokens - recent_tokens, 0.0)
    per_layer = kv_safe.sum(axis=-1) * evictable
    return float(math.fsum(per_layer.tolist()) * head_dim * 2 * kv_dtype_bytes)
