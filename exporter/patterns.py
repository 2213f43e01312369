"""Pattern classification of attention heads, vectorised over (layers, heads).

Usage:
    codes = classify(PatternInputs.from_message(msg), PatternThresholds())  # int8 (layers, heads)
    PATTERNS[codes[0, 0]]  # e.g. "v_shaped"

Each sampled query row of each head gets one label; the window keeps the count of each label per
head, and a head's current pattern is the label holding at least `dominance` of its window (else
`mixed`). The defaults come from the study in seed/ (Yao Fu, 2024; LLaMA-2-7B-80K, 50K tokens):

| pattern | study's example | rule (first match wins, in this order) |
| --- | --- | --- |
| uniform | layer 0 head 5: entropy 10.6 of ln 50K = 10.8 (0.98) | normalised entropy >= 0.90 |
| sink | layer 12 head 23: 96.9% on the sink, entropy 0.98 | sink mass >= 0.80 |
| recency | layer 5 head 15: 99.6% on recent tokens, entropy 0.09 | recent mass >= 0.80 |
| v_shaped | layer 5 head 20: 63.2% sink + 33.7% recent, middle 3.1% | sink + recent >= 0.80, each >= 0.10 |
| concentrated_middle | layer 11 head 14: < 10 middle tokens, entropy 1.32 | middle >= 0.50, top-16 >= 0.50, entropy <= 2.0 nats |
| scattered_middle | layer 11 head 2: middle 86.5%, top-256 55.5%, entropy 6.43 | middle >= 0.50, top-256 >= 0.30, entropy in [3, 8] nats |
| mixed | none of the above | |

Entropy reads as "uniform over exp(H) tokens" (2.0 nats ~ 7 tokens, 3 ~ 20, 8 ~ 3,000), which is
why the middle patterns use absolute nats, as the study's table does, while `uniform` uses the
normalised entropy so that it does not depend on the context length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PATTERNS: tuple[str, ...] = (
    "uniform",
    "v_shaped",
    "sink",
    "recency",
    "scattered_middle",
    "concentrated_middle",
    "mixed",
)
NUM_PATTERNS = len(PATTERNS)
MIXED = PATTERNS.index("mixed")
_CODE = {name: np.int8(i) for i, name in enumerate(PATTERNS)}


@dataclass(frozen=True)
class PatternThresholds:
    """Cut-offs of the per-row classification; see the module docstring for their origin."""

    uniform_min_normalized_entropy: float = 0.90
    sink_min_mass: float = 0.80
    recency_min_mass: float = 0.80
    v_shaped_min_mass: float = 0.80
    v_shaped_min_each: float = 0.10
    middle_min_mass: float = 0.50
    concentrated_top_k: int = 16
    concentrated_min_top_mass: float = 0.50
    concentrated_max_entropy_nats: float = 2.0
    scattered_top_k: int = 256
    scattered_min_top_mass: float = 0.30
    scattered_min_entropy_nats: float = 3.0
    scattered_max_entropy_nats: float = 8.0
    dominance: float = 0.5


@dataclass(frozen=True)
class PatternInputs:
    """The statistics classification reads, each (layers, heads); NaN where not measured."""

    entropy_nats: np.ndarray
    normalized_entropy: np.ndarray
    sink_mass: np.ndarray
    recent_mass: np.ndarray
    middle_mass: np.ndarray
    top_mass: dict[int, np.ndarray]

    def top(self, k: int) -> np.ndarray:
        """Return the top-k mass for k, or for the nearest k the message carries."""
        if k in self.top_mass:
            return self.top_mass[k]
        nearest = min(self.top_mass, key=lambda have: (abs(have - k), have))
        return self.top_mass[nearest]


def classify(x: PatternInputs, t: PatternThresholds) -> np.ndarray:
    """Return the pattern code of every (layer, head) as int8 (layers, heads); `mixed` where NaN."""
    s, r, m, h = x.sink_mass, x.recent_mass, x.middle_mass, x.entropy_nats
    shape = s.shape
    # One row per rule, in priority order.
    hits = np.empty((len(_RULE_ORDER), *shape), dtype=bool)
    with np.errstate(invalid="ignore"):
        np.greater_equal(x.normalized_entropy, t.uniform_min_normalized_entropy, out=hits[0])
        np.greater_equal(s, t.sink_min_mass, out=hits[1])
        np.greater_equal(r, t.recency_min_mass, out=hits[2])
        np.greater_equal(s + r, t.v_shaped_min_mass, out=hits[3])
        hits[3] &= (s >= t.v_shaped_min_each) & (r >= t.v_shaped_min_each)
        middle = m >= t.middle_min_mass
        np.less_equal(h, t.concentrated_max_entropy_nats, out=hits[4])
        hits[4] &= middle & (x.top(t.concentrated_top_k) >= t.concentrated_min_top_mass)
        np.greater_equal(h, t.scattered_min_entropy_nats, out=hits[5])
        hits[5] &= middle & (h <= t.scattered_max_entropy_nats)
        hits[5] &= x.top(t.scattered_top_k) >= t.scattered_min_top_mass
    codes = np.full(shape, _CODE["mixed"], dtype=np.int8)
    for row in range(len(_RULE_ORDER) - 1, -1, -1):  # reversed: the first matching rule sticks
        np.copyto(codes, _RULE_CODES[row], where=hits[row])
    return codes


# Rule order of classify (first match wins) and the pattern code each row maps to.
_RULE_ORDER = ("uniform", "sink", "recency", "v_shaped", "concentrated_middle", "scattered_middle")
_RULE_CODES = np.array([_CODE[n] for n in _RULE_ORDER], dtype=np.int8)


def dominant(counts: np.ndarray, dominance: float) -> np.ndarray:
    """Return each head's current pattern code from label counts (..., NUM_PATTERNS).

    The most frequent label wins if it holds at least `dominance` of the head's samples;
    otherwise, and for heads without samples, the head is `mixed`.
    """
    total = counts.sum(axis=-1)
    best = counts.argmax(axis=-1)
    top = np.take_along_axis(counts, best[..., None], axis=-1)[..., 0]
    ok = (total > 0) & (top >= dominance * np.maximum(total, 1))
    return np.where(ok, best, MIXED).astype(np.int8)
