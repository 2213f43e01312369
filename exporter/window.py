"""A count window of per-head samples with exact, order-independent running aggregates.

Usage:
    w = CountWindow((32, 32), capacity=512, horizon_seconds=3600.0)
    w.add(sample)  # evicts the oldest sample when full or older than the horizon

The window holds the last `capacity` samples of one model whose timestamp is within
`horizon_seconds` of the newest. Statistics are kept as the wire's fixed-point integers, so sums
are exact: the same set of samples gives the same means whatever order they were folded in (a
rebuilt replica exports the same numbers as one that never restarted). Per-head label counts and
the eviction-error histogram (a mergeable quantile sketch) are updated by adding the new sample
and subtracting the evicted one. State is O(capacity x layers x heads): memory does not grow with
the number of messages consumed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from exporter.patterns import NUM_PATTERNS

# Fixed-point channels and their quanta (those of collector.schema for the raw statistics).
CHANNELS: tuple[str, ...] = (
    "entropy_nats",
    "normalized_entropy",
    "sink_mass",
    "recent_mass",
    "middle_mass",
)
QUANTA = np.array([2.0**-16, 2.0**-16, 2.0**-17, 2.0**-17, 2.0**-17])

# Eviction-error histogram: [0, 1e-4), 126 geometric bins up to 1 (each 7.6% wide), [1, inf).
EVICTION_INNER_EDGES = np.geomspace(1e-4, 1.0, 127)
EVICTION_BINS = EVICTION_INNER_EDGES.size + 1
# The eviction error travels in 2**-13 steps: a lookup table maps its integer code to its bin.
_EVICTION_QUANTUM = 2.0**-13
_EVICTION_LUT = np.searchsorted(
    EVICTION_INNER_EDGES, np.arange(int(1 / _EVICTION_QUANTUM) + 1) * _EVICTION_QUANTUM, "right"
).astype(np.uint8)
# Normalised-entropy bins of width 0.1 for the drift test.
ENTROPY_BINS = 10

# All per-head label counts live in one (layers, heads, COUNT_COLUMNS) array: pattern labels,
# eviction-error bins and entropy bins, each followed by one column for "not measured", so that
# one fancy-index add per sample updates all three without masking.
_BLOCKS = (NUM_PATTERNS, EVICTION_BINS, ENTROPY_BINS)
_OFFSETS = np.cumsum((0, *tuple(k + 1 for k in _BLOCKS[:-1])))
COUNT_COLUMNS = int(sum(k + 1 for k in _BLOCKS))
PATTERN_COLUMNS = slice(int(_OFFSETS[0]), int(_OFFSETS[0]) + NUM_PATTERNS)
EVICTION_COLUMNS = slice(int(_OFFSETS[1]), int(_OFFSETS[1]) + EVICTION_BINS)
ENTROPY_COLUMNS = slice(int(_OFFSETS[2]), int(_OFFSETS[2]) + ENTROPY_BINS)


def eviction_bin(error: np.ndarray) -> np.ndarray:
    """Return the histogram bin of each eviction error (>= 0; NaN lands in bin 0: mask it)."""
    codes = np.rint(np.nan_to_num(error, nan=0.0, posinf=1.0) / _EVICTION_QUANTUM)
    np.minimum(codes, _EVICTION_LUT.size - 1, out=codes)
    return _EVICTION_LUT[codes.astype(np.intp)]


def entropy_bin(normalized_entropy: np.ndarray) -> np.ndarray:
    """Return the 0.1-wide bin (0..9) of each normalised entropy (>= 0; NaN lands in 0: mask it)."""
    scaled = np.nan_to_num(normalized_entropy, nan=0.0, posinf=1.0) * ENTROPY_BINS
    np.minimum(scaled, ENTROPY_BINS - 1, out=scaled)
    return scaled.astype(np.uint8)


def eviction_bin_of_codes(codes: np.ndarray) -> np.ndarray:
    """Return the histogram bin of eviction errors given as their wire codes (error / 2**-13)."""
    return _EVICTION_LUT[np.minimum(codes, _EVICTION_LUT.size - 1).astype(np.intp)]


def entropy_bin_of_codes(codes: np.ndarray) -> np.ndarray:
    """Return the 0.1-wide bin of normalised entropies given in 2**-16 steps (the window's channel)."""
    return np.minimum((codes.astype(np.int64) * ENTROPY_BINS) >> 16, ENTROPY_BINS - 1)


@functools.lru_cache(maxsize=64)
def _cell_base(shape: tuple[int, int]) -> np.ndarray:
    cells = np.arange(shape[0] * shape[1], dtype=np.int64).reshape(shape) * COUNT_COLUMNS
    base = cells[None] + _OFFSETS[:, None, None]
    base.flags.writeable = False
    return base


def count_cells(
    shape: tuple[int, int],
    pattern: np.ndarray,
    eviction: np.ndarray,
    entropy: np.ndarray,
    valid: np.ndarray,
) -> np.ndarray:
    """Return the flat indices (batch, 3, layers, heads) of samples' columns in a counts array.

    Inputs are (batch, layers, heads). Heads not measured point at each block's "not measured"
    column.
    """
    cells = np.empty((valid.shape[0], 3, *shape), dtype=np.int64)
    cells[:, 0] = pattern
    cells[:, 1] = eviction
    cells[:, 2] = entropy
    if not valid.all():
        np.copyto(cells, _SENTINELS, where=~valid[:, None])
    cells += _cell_base(shape)
    return cells


_SENTINELS = np.array(_BLOCKS, dtype=np.int64)[:, None, None]


def new_counts(shape: tuple[int, int]) -> np.ndarray:
    """Return a zeroed counts array (layers, heads, COUNT_COLUMNS) for count_cells indices."""
    return np.zeros((*shape, COUNT_COLUMNS), dtype=np.int64)


@dataclass(frozen=True)
class Sample:
    """One message reduced to what the window keeps.

    ints: (channels, layers, heads) uint32 fixed-point, 0 where not valid; cells: (3, layers,
    heads) flat indices of its pattern, eviction-bin and entropy-bin columns (see count_cells);
    valid: (layers, heads) bool; visible_keys: (layers,) int64.
    """

    message_id: str
    timestamp_seconds: float
    ints: np.ndarray
    cells: np.ndarray
    valid: np.ndarray
    visible_keys: np.ndarray


class CountWindow:
    """The last `capacity` samples of one model within a time horizon, with running aggregates."""

    def __init__(self, shape: tuple[int, int], capacity: int, horizon_seconds: float) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        layers, heads = shape
        self.shape = shape
        self.capacity = capacity
        self.horizon_seconds = horizon_seconds
        self._ints = np.zeros((capacity, len(CHANNELS), layers, heads), dtype=np.uint32)
        self._cells = np.zeros((capacity, 3, layers, heads), dtype=np.int64)
        self._valid = np.zeros((capacity, layers, heads), dtype=bool)
        self._visible = np.zeros((capacity, layers), dtype=np.int64)
        self._ts = np.zeros(capacity, dtype=np.float64)
        self._ids: list[str] = [""] * capacity
        self._start = 0
        self.size = 0
        self.newest_seconds = 0.0
        self.ids: set[str] = set()
        self.sums = np.zeros((len(CHANNELS), layers, heads), dtype=np.int64)
        self.valid_counts = np.zeros(shape, dtype=np.int64)
        self.visible_sum = np.zeros(layers, dtype=np.int64)
        self._signs = np.zeros(0, dtype=np.int64)
        self.counts = new_counts(shape)
        self._flat_counts = self.counts.reshape(-1)
        self.pattern_counts = self.counts[..., PATTERN_COLUMNS]
        self.eviction_hist = self.counts[..., EVICTION_COLUMNS]
        self.entropy_counts = self.counts[..., ENTROPY_COLUMNS]

    def __contains__(self, message_id: str) -> bool:
        return message_id in self.ids

    def add(self, s: Sample) -> None:
        """Fold a sample in, evicting the oldest when full and any older than the horizon."""
        self.newest_seconds = max(self.newest_seconds, s.timestamp_seconds)
        self.expire(self.newest_seconds - self.horizon_seconds)
        if self.size == self.capacity:
            self._replace_oldest(s)
            return
        slot = (self._start + self.size) % self.capacity
        self.size += 1
        self._store(slot, s)
        self._apply(slot, +1)

    def _replace_oldest(self, s: Sample) -> None:
        """The steady state: the new sample takes the oldest one's slot, in one update."""
        slot = self._start
        # One add.at for both (it handles the columns the two share): cheaper than two passes.
        cells = np.concatenate([s.cells.ravel(), self._cells[slot].ravel()])
        if self._signs.size != cells.size:
            self._signs = np.repeat(np.array([1, -1], dtype=np.int64), cells.size // 2)
        np.add.at(self._flat_counts, cells, self._signs)
        self.sums += s.ints
        self.sums -= self._ints[slot]
        self.valid_counts += s.valid
        self.valid_counts -= self._valid[slot]
        self.visible_sum += s.visible_keys - self._visible[slot]
        self.ids.discard(self._ids[slot])
        self._store(slot, s)
        self._start = (slot + 1) % self.capacity

    def _store(self, slot: int, s: Sample) -> None:
        self._ints[slot] = s.ints
        self._cells[slot] = s.cells
        self._valid[slot] = s.valid
        self._visible[slot] = s.visible_keys
        self._ts[slot] = s.timestamp_seconds
        self._ids[slot] = s.message_id
        self.ids.add(s.message_id)

    def expire(self, older_than_seconds: float) -> int:
        """Evict samples with a timestamp before `older_than_seconds`; return how many."""
        evicted = 0
        while self.size and self._ts[self._start] < older_than_seconds:
            self._evict_oldest()
            evicted += 1
        return evicted

    def _evict_oldest(self) -> None:
        slot = self._start
        self._apply(slot, -1)
        self.ids.discard(self._ids[slot])
        self._start = (self._start + 1) % self.capacity
        self.size -= 1

    def _apply(self, slot: int, sign: int) -> None:
        valid = self._valid[slot]
        if sign > 0:
            self.sums += self._ints[slot]
        else:
            self.sums -= self._ints[slot]
        self.valid_counts += sign * valid
        self.visible_sum += sign * self._visible[slot]
        # Indices are distinct, so fancy-index += adds exactly once per column.
        self._flat_counts[self._cells[slot]] += sign

    def means(self) -> np.ndarray:
        """Return the per-head mean of each channel, (channels, layers, heads); NaN without samples."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sums * QUANTA[:, None, None] / self.valid_counts

    def mean_visible_keys(self) -> np.ndarray:
        """Return the mean visible keys per layer over the window, (layers,); 0 when empty."""
        return self.visible_sum / max(self.size, 1)
