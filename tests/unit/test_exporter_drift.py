"""Drift: calibrated p-values, no drift on pure noise over many windows and heads, a real shift detected."""

from __future__ import annotations

import numpy as np
import pytest

from exporter.drift import DriftPolicy, DriftState, chi2_sf, drift_step, g_test, js_distance

HEADS = (8, 16)  # 128 heads


@pytest.mark.parametrize(
    ("x", "df", "expected"),
    [(3.841458820694124, 1, 0.05), (9.487729036781154, 4, 0.05), (10.0, 2, np.exp(-5)),
     (200.0, 2, np.exp(-100)), (0.5, 1, 0.4795001221869535), (21.665994333461924, 9, 0.01)],
)  # fmt: skip
def test_chi2_sf_known_values(x: float, df: int, expected: float) -> None:
    got = chi2_sf(np.array([x]), np.array([df]))[0]
    assert got == pytest.approx(expected, rel=1e-9)


def _mixes(rng: np.random.Generator, k: int) -> np.ndarray:
    """Per-head category distributions: a dominant category plus a spread, like real heads."""
    mixes = rng.dirichlet(np.full(k, 0.7), size=HEADS)
    mixes[..., rng.integers(0, k)] += 1.0
    return mixes / mixes.sum(axis=-1, keepdims=True)


def _draw(rng: np.random.Generator, probs: np.ndarray, n: int) -> np.ndarray:
    flat = probs.reshape(-1, probs.shape[-1])
    return np.stack([rng.multinomial(n, p) for p in flat]).reshape(probs.shape)


def _run(rng: np.random.Generator, pat: np.ndarray, ent: np.ndarray, shifted: tuple[np.ndarray, np.ndarray] | None,
         windows: int, policy: DriftPolicy) -> tuple[DriftState, list[np.ndarray]]:  # fmt: skip
    ref_p, ref_e = (
        _draw(rng, pat, policy.reference_samples),
        _draw(rng, ent, policy.reference_samples),
    )
    state = DriftState.empty(HEADS)
    p_values = []
    for w in range(windows):
        wp, we = (pat, ent) if shifted is None else shifted
        state = drift_step(state, _draw(rng, wp, policy.window_samples), _draw(rng, we, policy.window_samples),
                           ref_p, ref_e, policy, float(w))  # fmt: skip
        p_values.append(state.p_value.copy())
    return state, p_values


def test_pure_noise_raises_no_drift() -> None:
    rng = np.random.default_rng(2024)
    policy = DriftPolicy()
    pat, ent = _mixes(rng, 7), _mixes(rng, 10)
    state, p_values = _run(rng, pat, ent, None, windows=60, policy=policy)
    assert int(state.drifted.sum()) == 0
    assert int(state.fails.max()) < policy.consecutive_windows
    # 60 windows x 128 heads = 7,680 tests under the null: p-values are roughly uniform.
    small = float(np.mean(np.stack(p_values) < 0.05))
    assert 0.02 < small < 0.10


def test_a_real_shift_is_detected_and_only_where_it_happened() -> None:
    rng = np.random.default_rng(7)
    policy = DriftPolicy()
    pat, ent = _mixes(rng, 7), _mixes(rng, 10)
    moved = np.zeros(HEADS, dtype=bool)
    moved[2, :4] = True
    new_pat = pat.copy()
    new_pat[moved] = np.roll(pat[moved], 2, axis=-1) * 0.5 + pat[moved] * 0.5  # half the mass moves
    state, _ = _run(
        rng, pat, ent, (new_pat, ent), windows=policy.consecutive_windows, policy=policy
    )
    assert state.drifted[moved].all()
    assert not state.drifted[~moved].any()
    assert np.all(state.since_seconds[moved] == policy.consecutive_windows - 1)


def test_drift_needs_consecutive_windows() -> None:
    rng = np.random.default_rng(8)
    policy = DriftPolicy(consecutive_windows=3)
    pat, ent = _mixes(rng, 7), _mixes(rng, 10)
    shifted = np.roll(pat, 3, axis=-1)
    state, _ = _run(rng, pat, ent, (shifted, ent), windows=2, policy=policy)
    assert state.failing.any() and not state.drifted.any()


def test_significant_but_tiny_shift_stays_under_the_effect_floor() -> None:
    ref = np.array([[50_000, 50_000]])
    window = np.array([[48_500, 51_500]])  # p ~ 1e-6 at these counts, JS distance ~ 0.01
    p, distance = g_test(window, ref)
    assert p[0] < 1e-5 and distance[0] < DriftPolicy().min_distance


def test_js_distance_bounds() -> None:
    assert js_distance(np.array([[5, 0]]), np.array([[0, 5]]))[0] == pytest.approx(1.0)
    assert js_distance(np.array([[3, 4]]), np.array([[6, 8]]))[0] == pytest.approx(0.0, abs=1e-12)
