"""Per-head drift against a reference: a G-test calibrated to noise, an effect-size floor, persistence.

Usage:
    state = DriftState.empty((32, 32))
    state = drift_step(state, window_counts, reference_counts, DriftPolicy(), now_seconds)

Fixed cut-offs on a distance fire on pure noise at small windows, so each count window is
compared with the reference by a 2 x K G-test of homogeneity (Williams-corrected), once on the
per-row pattern labels and once on the normalised-entropy bins. A head fails a window only when a
test is significant after Bonferroni correction over heads and the two tests AND its
Jensen-Shannon distance is above a floor (significant but tiny shifts do not count). A head is
`drifted` after `consecutive_windows` failing windows in a row and recovers after as many passing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class DriftPolicy:
    """Drift test settings: windows of `window_samples` rows, family-wise `alpha` per model."""

    window_samples: int = 256
    min_head_samples: int = 100
    alpha: float = 0.01
    min_distance: float = 0.10
    consecutive_windows: int = 3
    reference_samples: int = 1024

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.consecutive_windows < 1:
            raise ValueError(f"consecutive_windows must be >= 1, got {self.consecutive_windows}")

    def threshold(self, heads: int) -> float:
        """Return the per-head threshold of the reported p-value: Bonferroni over the heads."""
        return self.alpha / max(heads, 1)


def _lgamma(a: np.ndarray) -> np.ndarray:
    return np.array([math.lgamma(float(v)) for v in a.ravel()]).reshape(a.shape)


def chi2_sf(x: np.ndarray, df: np.ndarray) -> np.ndarray:
    """Return P(X >= x) for X ~ chi-square(df), elementwise; 1 where df <= 0 or x <= 0.

    Regularised upper incomplete gamma Q(df/2, x/2): a series below a + 1, Lentz's continued
    fraction above (Numerical Recipes 6.2), so tiny p-values keep their relative precision.
    """
    x = np.asarray(x, dtype=np.float64)
    df = np.asarray(df, dtype=np.float64)
    out = np.ones(np.broadcast(x, df).shape)
    ok = (df > 0) & (x > 0)
    if not ok.any():
        return out
    a = np.broadcast_to(df / 2, out.shape)[ok]
    z = np.broadcast_to(x / 2, out.shape)[ok]
    log_prefix = a * np.log(z) - z - _lgamma(a)
    q = np.empty_like(z)
    low = z < a + 1
    if low.any():
        al, zl = a[low], z[low]
        term = 1.0 / al
        total = term.copy()
        for n in range(1, 500):
            term = term * zl / (al + n)
            total += term
            if np.all(term < total * 1e-15):
                break
        q[low] = np.clip(1.0 - total * np.exp(log_prefix[low]), 0.0, 1.0)
    high = ~low
    if high.any():
        ah, zh = a[high], z[high]
        tiny = 1e-300
        b = zh + 1 - ah
        c = np.full_like(zh, 1 / tiny)
        d = 1 / b
        h = d.copy()
        for i in range(1, 500):
            an = -i * (i - ah)
            b = b + 2
            d = an * d + b
            d = np.where(np.abs(d) < tiny, tiny, d)
            c = b + an / c
            c = np.where(np.abs(c) < tiny, tiny, c)
            d = 1 / d
            delta = d * c
            h = h * delta
            if np.all(np.abs(delta - 1) < 1e-15):
                break
        q[high] = np.exp(log_prefix[high]) * h
    out[ok] = q
    return out


def g_test(window: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (p-value, Jensen-Shannon distance) per head for counts (..., K) against (..., K).

    The 2 x K G-test of homogeneity with Williams' correction, over the categories seen in either
    sample; p = 1 where either sample is empty or only one category occurs.
    """
    w = window.astype(np.float64)
    r = reference.astype(np.float64)
    nw = w.sum(axis=-1, keepdims=True)
    nr = r.sum(axis=-1, keepdims=True)
    col = w + r
    total = nw + nr
    with np.errstate(divide="ignore", invalid="ignore"):
        ew = nw * col / total
        er = nr * col / total
        g = 2 * (
            np.where(w > 0, w * np.log(w / ew), 0.0).sum(axis=-1)
            + np.where(r > 0, r * np.log(r / er), 0.0).sum(axis=-1)
        )
        k = (col > 0).sum(axis=-1)
        df = k - 1.0
        big_n = total[..., 0]
        inv_cols = np.where(col > 0, 1 / col, 0.0).sum(axis=-1)
        inv_rows = 1 / nw[..., 0] + 1 / nr[..., 0]
        williams = 1 + (big_n * inv_rows - 1) * (big_n * inv_cols - 1) / (6 * big_n * df)
        stat = np.where(df > 0, g / williams, 0.0)
    testable = (nw[..., 0] > 0) & (nr[..., 0] > 0) & (df > 0)
    p = np.where(testable, chi2_sf(np.where(testable, stat, 0.0), np.where(testable, df, 0.0)), 1.0)
    return p, js_distance(w, r)


def js_distance(p_counts: np.ndarray, q_counts: np.ndarray) -> np.ndarray:
    """Return the Jensen-Shannon distance (base 2, in [0, 1]) between count vectors (..., K)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        p = p_counts / p_counts.sum(axis=-1, keepdims=True)
        q = q_counts / q_counts.sum(axis=-1, keepdims=True)
        m = (p + q) / 2
        kl_p = np.where(p > 0, p * np.log2(p / m), 0.0).sum(axis=-1)
        kl_q = np.where(q > 0, q * np.log2(q / m), 0.0).sum(axis=-1)
    js = np.clip((kl_p + kl_q) / 2, 0.0, 1.0)
    return np.where(np.isfinite(js), np.sqrt(js), 0.0)


@dataclass(frozen=True)
class DriftState:
    """Per-head drift state (layers, heads): last test, consecutive failures/passes, drifted flag."""

    p_value: np.ndarray
    distance: np.ndarray
    failing: np.ndarray
    fails: np.ndarray
    passes: np.ndarray
    drifted: np.ndarray
    since_seconds: np.ndarray
    windows_tested: int = 0

    @classmethod
    def empty(cls, shape: tuple[int, ...]) -> DriftState:
        """Return the state of heads never tested."""
        return cls(
            p_value=np.ones(shape),
            distance=np.zeros(shape),
            failing=np.zeros(shape, dtype=bool),
            fails=np.zeros(shape, dtype=np.int64),
            passes=np.zeros(shape, dtype=np.int64),
            drifted=np.zeros(shape, dtype=bool),
            since_seconds=np.full(shape, np.nan),
        )


def drift_step(
    state: DriftState,
    window_patterns: np.ndarray,
    window_entropy: np.ndarray,
    reference_patterns: np.ndarray,
    reference_entropy: np.ndarray,
    policy: DriftPolicy,
    now_seconds: float,
) -> DriftState:
    """Return the state after testing one count window against the reference.

    Heads with fewer than `min_head_samples` rows in the window keep their state untested.
    The p-value kept is the smaller of the two tests' times two (Bonferroni over the tests).
    """
    # Each of the two tests gets half of the per-head threshold (Bonferroni over the tests).
    per_test = policy.threshold(int(np.prod(state.drifted.shape))) / 2
    p_pat, d_pat = g_test(window_patterns, reference_patterns)
    p_ent, d_ent = g_test(window_entropy, reference_entropy)
    fail = ((p_pat < per_test) & (d_pat >= policy.min_distance)) | (
        (p_ent < per_test) & (d_ent >= policy.min_distance)
    )
    tested = window_patterns.sum(axis=-1) >= policy.min_head_samples
    fail &= tested
    fails = np.where(tested, np.where(fail, state.fails + 1, 0), state.fails)
    passes = np.where(tested, np.where(fail, 0, state.passes + 1), state.passes)
    enter = ~state.drifted & (fails >= policy.consecutive_windows)
    leave = state.drifted & (passes >= policy.consecutive_windows)
    drifted = (state.drifted | enter) & ~leave
    since = np.where(enter, now_seconds, np.where(drifted, state.since_seconds, np.nan))
    return replace(
        state,
        p_value=np.where(tested, np.minimum(1.0, 2 * np.minimum(p_pat, p_ent)), state.p_value),
        distance=np.where(tested, np.maximum(d_pat, d_ent), state.distance),
        failing=np.where(tested, fail, state.failing),
        fails=fails,
        passes=passes,
        drifted=drifted,
        since_seconds=since,
        windows_tested=state.windows_tested + 1,
    )
