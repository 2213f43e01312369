"""Valid head-stats messages from numpy alone: realistic statistics for each of the study's patterns.

Usage:
    factory = MessageFactory(layers=4, heads=8, seed=0)
    msg = factory.message(timestamp_seconds=1.0)  # HeadStatsMessage; .to_bytes() for Kafka

Each head draws, per message, one pattern from its row of `probs` (layers, heads, 7), then
statistics typical of that pattern (ranges from the study's examples, with noise), consistent with
the wire contract: masses in [0, 1], sink + recent <= 1, top-k masses non-decreasing in k,
entropy <= ln(visible keys), keys for 90% <= visible keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from collector.schema import HeadStatsMessage, MessageHeader, core_stat_names
from exporter.patterns import NUM_PATTERNS, PATTERNS

# Per pattern: ranges (low, high) of sink, recent, entropy (nats; None: from normalised entropy),
# normalised entropy, top-1, top-16, top-256 masses and eviction error.
_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "uniform": {"hn": (0.93, 0.99), "evict": (0.3, 0.9)},
    "sink": {"s": (0.85, 0.99), "rf": (0.3, 0.9), "h": (0.3, 1.2), "evict": (0.001, 0.03)},
    "recency": {"r": (0.85, 0.995), "sf": (0.1, 0.6), "h": (0.05, 1.0), "evict": (0.001, 0.03)},
    "v_shaped": {"s": (0.45, 0.62), "sr": (0.86, 0.98), "h": (2.0, 3.0), "evict": (0.005, 0.035)},
    "scattered_middle": {
        "m": (0.75, 0.92),
        "h": (4.5, 6.5),
        "t1": (0.01, 0.05),
        "t16": (0.1, 0.3),
        "t256": (0.4, 0.7),
        "evict": (0.2, 0.6),
    },
    "concentrated_middle": {
        "m": (0.7, 0.95),
        "h": (0.8, 1.8),
        "t1": (0.3, 0.7),
        "t16": (0.8, 0.97),
        "t256": (0.9, 0.99),
        "evict": (0.5, 0.95),
    },
    "mixed": {"s": (0.2, 0.35), "r": (0.2, 0.35), "h": (2.2, 2.8), "evict": (0.1, 0.4)},
}


def pattern_probs(layers: int, heads: int, pattern: str | Sequence[float]) -> np.ndarray:
    """Return (layers, heads, 7) probabilities: every head follows one pattern or one mix."""
    if isinstance(pattern, str):
        row = np.zeros(NUM_PATTERNS)
        row[PATTERNS.index(pattern)] = 1.0
    else:
        row = np.asarray(pattern, dtype=np.float64)
        row = row / row.sum()
    return np.broadcast_to(row, (layers, heads, NUM_PATTERNS)).copy()


class MessageFactory:
    """Builds messages of one model identity; `probs` sets each head's pattern mix."""

    def __init__(
        self,
        *,
        layers: int = 4,
        heads: int = 8,
        kv_heads: int | None = None,
        probs: np.ndarray | None = None,
        model_name: str = "tiny-llama",
        config_hash: str = "0123456789abcdef",
        context_tokens: int = 4096,
        sink_tokens: int = 4,
        recent_tokens: int = 64,
        head_dim: int = 64,
        seed: int = 0,
    ) -> None:
        self.layers, self.heads = layers, heads
        self.kv_heads = kv_heads or heads
        self.probs = pattern_probs(layers, heads, "v_shaped") if probs is None else probs
        self.model_name, self.config_hash = model_name, config_hash
        self.context_tokens, self.head_dim = context_tokens, head_dim
        self.sink_tokens, self.recent_tokens = sink_tokens, recent_tokens
        self.rng = np.random.default_rng(seed)

    def draw_patterns(self) -> np.ndarray:
        """Return one pattern code per head (layers, heads), drawn from `probs`."""
        cumulative = np.cumsum(self.probs, axis=-1)
        u = self.rng.random((self.layers, self.heads, 1))
        return np.minimum((u > cumulative).sum(axis=-1), NUM_PATTERNS - 1)

    def stats(self, codes: np.ndarray, visible: int) -> dict[str, np.ndarray]:
        """Return the statistic arrays for per-head pattern codes at `visible` keys."""
        shape = codes.shape
        ln_n = math.log(visible)
        out = {k: np.zeros(shape) for k in ("s", "r", "h", "t1", "t16", "t256", "evict")}

        def u(name: str, key: str, mask: np.ndarray) -> np.ndarray:
            low, high = _RANGES[name][key]
            return self.rng.uniform(low, high, int(mask.sum()))

        for code, name in enumerate(PATTERNS):
            m = codes == code
            if not m.any():
                continue
            spec = _RANGES[name]
            if name == "uniform":
                out["h"][m] = u(name, "hn", m) * ln_n
                out["s"][m] = self.sink_tokens / visible
                out["r"][m] = self.recent_tokens / visible
            elif "m" in spec:
                middle = u(name, "m", m)
                split = self.rng.uniform(0.2, 0.8, middle.size)
                out["s"][m], out["r"][m] = (1 - middle) * split, (1 - middle) * (1 - split)
                out["h"][m] = u(name, "h", m)
                for t in ("t1", "t16", "t256"):
                    out[t][m] = u(name, t, m)
            elif name == "v_shaped":
                out["s"][m] = u(name, "s", m)
                out["r"][m] = u(name, "sr", m) - out["s"][m]
                out["h"][m] = u(name, "h", m)
            elif name == "sink":
                out["s"][m] = u(name, "s", m)
                out["r"][m] = (1 - out["s"][m]) * u(name, "rf", m)
                out["h"][m] = u(name, "h", m)
            elif name == "recency":
                out["r"][m] = u(name, "r", m)
                out["s"][m] = (1 - out["r"][m]) * u(name, "sf", m)
                out["h"][m] = u(name, "h", m)
            else:
                out["s"][m], out["r"][m], out["h"][m] = (
                    u(name, "s", m),
                    u(name, "r", m),
                    u(name, "h", m),
                )
            out["evict"][m] = u(name, "evict", m)
        h = np.minimum(out["h"], ln_n)
        # Top-k masses where the pattern did not set them: roughly what exp(H) effective keys hold.
        span = np.exp(h)
        for key, k in (("t1", 1), ("t16", 16), ("t256", 256)):
            unset = out[key] == 0
            out[key][unset] = np.minimum(1.0, 0.9 * k / span[unset] + 0.05)
        tops = np.maximum.accumulate(np.stack([out["t1"], out["t16"], out["t256"]]), axis=0)
        return {
            "entropy_nats": h,
            "sink_mass": out["s"],
            "recent_mass": np.minimum(out["r"], 1 - out["s"]),
            "top1_mass": np.minimum(tops[0], 1.0),
            "top16_mass": np.minimum(tops[1], 1.0),
            "top256_mass": np.minimum(tops[2], 1.0),
            "keys_for_90pct": np.minimum(np.ceil(np.exp(h) * 0.9), visible),
            "eviction_error": out["evict"],
        }

    def message(
        self,
        *,
        timestamp_seconds: float = 1.0,
        codes: np.ndarray | None = None,
        message_id: str | None = None,
        context_tokens: int | None = None,
    ) -> HeadStatsMessage:
        """Return one message; `codes` (layers, heads) forces each head's pattern."""
        ctx = context_tokens or self.context_tokens
        codes = self.draw_patterns() if codes is None else codes
        header = MessageHeader(
            message_id=message_id or self.rng.bytes(16).hex(),
            model_name=self.model_name,
            config_hash=self.config_hash,
            timestamp_seconds=timestamp_seconds,
            phase="decode",
            context_tokens=ctx,
            query_position=ctx - 1,
            sink_tokens=self.sink_tokens,
            recent_tokens=self.recent_tokens,
            num_layers=self.layers,
            num_query_heads=self.heads,
            num_kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            kv_dtype_bytes=2,
            sample_rate=0.01,
            visible_keys=(ctx,) * self.layers,
            stat_names=core_stat_names(),
        )
        return HeadStatsMessage.build(header, self.stats(codes, ctx))
