"""What one model exports at one scrape: plain values, copied out of the aggregation state."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Upper bounds of the context-length histogram (tokens): 128 .. 1M, doubling.
CONTEXT_BUCKETS: tuple[float, ...] = tuple(float(2**k) for k in range(7, 21))

# Order of the `means` channels (same as exporter.window.CHANNELS).
ENTROPY, NORMALIZED_ENTROPY, SINK, RECENT, MIDDLE = range(5)


@dataclass(frozen=True)
class ModelSnapshot:
    """Per-head arrays are (layers, heads); per-KV-head arrays (layers, kv_heads)."""

    model_name: str
    model_key: str
    shape: tuple[int, int]
    num_kv_heads: int
    means: np.ndarray
    eviction_quantile: np.ndarray
    pattern: np.ndarray
    reference_pattern: np.ndarray | None
    window_samples: int
    valid_counts: np.ndarray
    reference_samples: int
    drift_threshold: float
    drifted: np.ndarray
    failing: np.ndarray
    drift_p_value: np.ndarray
    drift_distance: np.ndarray
    drift_since_seconds: np.ndarray
    kv_safe: np.ndarray
    # Whether the KV head's verdict rests on evidence, as of the last verdict: it is safe, or a
    # query head of it has the samples a verdict needs and an eviction error above the exit bound.
    # Where not, `kv_safe` is 0 for want of evidence (too few samples; or between the bounds with
    # no history, as after a restart), not because the head was measured unsafe.
    kv_ready: np.ndarray
    reclaimable_bytes: float
    messages_total: int
    context_counts: np.ndarray
    context_sum: float
    last_message_seconds: float
    # S and R of the newest message: the keep-set its eviction errors were measured for.
    sink_tokens: int
    recent_tokens: int

    @property
    def heads_pattern_changed(self) -> int:
        """Return the number of measured heads whose pattern differs from the reference's."""
        if self.reference_pattern is None:
            return 0
        measured = self.valid_counts > 0
        return int((measured & (self.pattern != self.reference_pattern)).sum())
