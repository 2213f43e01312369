"""The largest keys of attention rows: the top-k logits and the fewest keys holding a mass target.

Usage:
    top = top_values(logits, 256)  # (..., 256) the largest logits of each row, unsorted
    needed = keys_for_target(shifted_of, bounds, target, last, solved, 0.9 * (1 - 1e-6))

No I/O; `collector.stats` calls both from its pass over the keys. On a GPU everything stays in
torch on the device. On the CPU the selections and sorts go through numpy, whose introselect,
vectorised sort and bincount cost a fraction of torch's CPU kernels (and per-operation overhead)
at a few thousand keys per row; `collector.stats.host.HostSelection` calls `top_values_host` and
`select_host` once for the one-chunk layers of a pass.

`keys_for_90pct` is read from the top-k when the largest k already holds 90% of the mass (peaked
heads: no extra work, done in `collector.stats`). Otherwise `keys_for_target` builds a 512-bin
histogram of the mass over the band of logits that must hold the crossing, finds the bin where the
cumulative mass crosses the target, and sorts only that bin's keys. Near-ties (more than
`_MAX_SORTED` keys in the crossing bin) are counted as equal keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

# Histogram of keys_for_90pct: 512 bins over the band [max - span, max] that must hold the 90%
# crossing; all keys below it share the last bin (see `_span`).
_BINS = 512
_MAX_SORTED = 16384
_BLOCK = 32
# On the CPU, rows of at least this many times k keys fold to a bound (`top_values_host`): on
# the rows of a pass's layers selected together (`collector.stats.host`), 32 rows of 4,096 keys
# took 0.4x the time of the plain partition, 2,048 keys 0.4-0.5x; at 1,024 keys the extra calls
# cost more than they save on one layer's 8 rows.
_FOLD_FROM = 8


def on_host(t: torch.Tensor) -> bool:
    """Whether the numpy paths apply: the tensor is in CPU memory."""
    return t.device.type == "cpu"


def host_view(t: torch.Tensor) -> np.ndarray:
    """Return a numpy view of a CPU tensor."""
    return t.detach().numpy()


def top_values(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Return (..., k) the k largest logits of each row, unsorted.

    On the CPU `top_values_host` bounds the k-th largest from below by folding the row, and
    selects among the few keys above the bound with numpy. On a device, below 64 k keys, torch's
    top-k. From 64 k keys on, torch's top-k switches from std::nth_element to std::partial_sort,
    which is several times slower on unordered data (this matters where a test runs the device
    path on the CPU). There the k-th largest of the 32-key block maxima (k distinct keys reach
    it) bounds the k-th largest logit from below: only keys at or above it are gathered and ranked.
    """
    keys = logits.shape[-1]
    if on_host(logits) and keys > k:
        top = top_values_host(host_view(logits).reshape(-1, keys), k)
        return torch.from_numpy(np.ascontiguousarray(top)).reshape(*logits.shape[:-1], k)
    if keys < 64 * k:
        return logits.topk(k, dim=-1, sorted=False).values
    whole = keys // _BLOCK * _BLOCK
    block_max = logits[..., :whole].unflatten(-1, (whole // _BLOCK, _BLOCK)).amax(-1)
    bound = block_max.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    above = logits >= bound
    counts = above.sum(-1).reshape(-1)
    if int(counts.max()) >= 64 * k:  # ties or masked keys at the bound: no gain
        return logits.topk(k, dim=-1, sorted=False).values
    table = _rows_table([(logits[above], counts)], counts, -math.inf)
    return table.topk(k, dim=-1, sorted=False).values.reshape(*logits.shape[:-1], k)


def top_values_host(rows: np.ndarray, k: int) -> np.ndarray:
    """`top_values` of (rows, keys) in numpy: a lower bound of the k-th largest by folding, then a
    small partition.

    Folding a row in halves (the elementwise maximum of its two halves, repeated) leaves the
    maxima of disjoint groups that cover every key; the k-th largest of at least 2k such maxima
    has k distinct keys at or above it, so every key of the top k is too. On near-uniform rows
    about 1.4k keys pass (at any length), and partitioning those costs far less than introselect
    over the row: in a serving process, top_values took 0.54x the time of `np.partition` at 16K
    keys and 0.65x at 64K (for shorter rows see `_FOLD_FROM`).
    Rows where the bound lets too many keys through (ties, masked keys) or holding NaN (it
    reaches the folded maxima) take the plain partition.
    """
    keys = rows.shape[1]
    if keys < _FOLD_FROM * k:
        return _partition_top(rows, k)
    folded = rows
    while folded.shape[1] >= 4 * k:
        half = folded.shape[1] // 2
        halves = np.maximum(folded[:, :half], folded[:, half : 2 * half])
        if folded.shape[1] % 2:  # the odd last key joins the first group
            np.maximum(halves[:, 0], folded[:, -1], out=halves[:, 0])
        folded = halves
    if np.isnan(folded).any():  # the bound would drop the NaN from its row
        return _partition_top(rows, k)
    width = folded.shape[1]
    bound = np.partition(folded, width - k, axis=1)[:, width - k, None]
    flat = np.flatnonzero(rows >= bound)  # row-major: grouped by row
    counts = np.diff(np.searchsorted(flat, np.arange(1, rows.shape[0] + 1) * keys), prepend=0)
    widest = int(counts.max())
    if widest > keys // 2:  # ties or masked keys at the bound: no gain
        return _partition_top(rows, k)
    table = np.full((rows.shape[0], widest), -np.inf, dtype=rows.dtype)
    # Boolean assignment fills in row-major order, the order of `flat`.
    table[np.arange(widest) < counts[:, None]] = rows.reshape(-1)[flat]
    # A vectorised sort of a few hundred values is faster than introselect on them.
    return np.sort(table, axis=1)[:, widest - k :]


def _partition_top(rows: np.ndarray, k: int) -> np.ndarray:
    """Return (rows, k) the k largest of each row, unsorted (numpy's introselect on a copy).

    numpy's introselect is up to 13x slower on rows where many keys equal their minimum (masked
    keys: left padding, sliding windows); torch's top-k is not, and takes the rows with an
    eighth of their keys or more at their minimum. NaN sorts last in numpy, largest in torch:
    both leave the row NaN.
    """
    width = rows.shape[1]
    # a row holding NaN has a NaN minimum, which equals nothing
    tied = (rows == rows.min(1, keepdims=True)).sum(1) > width // 8
    if not tied.any():
        return np.partition(rows, width - k, axis=1)[:, width - k :]
    top = np.empty((rows.shape[0], k), dtype=rows.dtype)
    index = np.flatnonzero(tied)
    top[index] = torch.from_numpy(rows[index]).topk(k, dim=1, sorted=False).values.numpy()
    if index.size < rows.shape[0]:
        index = np.flatnonzero(~tied)
        top[index] = np.partition(rows[index], width - k, axis=1)[:, width - k :]
    return top


def sorted_descending(values: torch.Tensor) -> torch.Tensor:
    """Return `values` sorted along the last dim, largest first.

    On the CPU numpy's vectorised sort is 10-25x faster than torch's for the few hundred
    values per row sorted here. NaN goes last (numpy) or first (torch); rows holding one come
    out NaN either way.
    """
    if on_host(values):
        return torch.from_numpy(np.negative(np.sort(np.negative(host_view(values)), axis=-1)))
    return values.sort(dim=-1, descending=True).values


def keys_for_target(
    shifted_of: Callable[[int, int], torch.Tensor],
    bounds: list[tuple[int, int]],
    target: torch.Tensor,
    last: tuple[torch.Tensor, torch.Tensor],
    solved: torch.Tensor,
    goal: float,
) -> torch.Tensor:
    """Return (n, kv_heads, group, 1): the fewest keys (largest first) whose weight reaches `target`.

    Rows `solved` by the top-k come out as 0 (on the CPU only the others are counted).
    `shifted_of(start, stop)` returns (n, kv_heads, group, stop - start) logits of a key range
    minus the row maximum, clamped as in pass 1; `last` holds the shifted logits and weights of
    pass 1's last chunk, which need no recompute.
    """
    if on_host(solved):
        return _keys_for_target_host(shifted_of, bounds, target, last, solved, goal)
    rows = solved.numel()
    # Every row goes through the histogram passes: selecting the unsolved ones would cost a host
    # sync and four gathers, more than counting the solved ones on the device and dropping them.

    def shifted_weights(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i == len(bounds) - 1:
            return last[0].reshape(rows, -1), last[1].reshape(rows, -1)
        shifted = shifted_of(*bounds[i]).reshape(rows, -1)
        return shifted, torch.exp(shifted)

    counted = _select(shifted_weights, len(bounds), target.reshape(rows, 1), bounds[-1][1], goal)
    return counted.masked_fill_(solved.reshape(rows, 1), 0.0).reshape(solved.shape)


def _keys_for_target_host(
    shifted_of: Callable[[int, int], torch.Tensor],
    bounds: list[tuple[int, int]],
    target: torch.Tensor,
    last: tuple[torch.Tensor, torch.Tensor],
    solved: torch.Tensor,
    goal: float,
) -> torch.Tensor:
    """`keys_for_target` on the CPU, in numpy: the same histogram and crossing-bin sort as `_select`.

    On a few thousand keys per row torch's per-operation cost (and its boolean indexing) is most
    of the time; numpy does the same steps 2-3x faster. The weights are the ones pass 1 computed
    (torch's exp), so the two paths count the same keys.
    """
    rows = solved.numel()
    todo = np.flatnonzero(~host_view(solved).reshape(rows))
    last_subset = (
        host_view(last[0]).reshape(rows, -1)[todo],
        host_view(last[1]).reshape(rows, -1)[todo],
    )

    def shifted_weights(i: int) -> tuple[np.ndarray, np.ndarray]:
        if i == len(bounds) - 1:
            return last_subset
        shifted = shifted_of(*bounds[i])
        weights = torch.exp(shifted)
        return host_view(shifted).reshape(rows, -1)[todo], host_view(weights).reshape(rows, -1)[
            todo
        ]

    subset_target = host_view(target).reshape(rows)[todo].astype(np.float64)
    counted = select_host(shifted_weights, len(bounds), subset_target, bounds[-1][1], goal)
    result = np.zeros(rows, dtype=np.float32)
    result[todo] = counted
    return torch.from_numpy(result).reshape(solved.shape)


def select_host(
    shifted_weights: Callable[[int], tuple[np.ndarray, np.ndarray]],
    chunk_count: int,
    target: np.ndarray,
    keys: int,
    goal: float,
) -> np.ndarray:
    """`_select` in numpy: (rows,) float64 target in, (rows,) key counts out.

    Pass 1 also counts the keys of each bin, so the keys above the crossing bin and those in it
    are read from the histogram; pass 2 only gathers the crossing bin's keys.
    """
    rows = target.shape[0]
    span = _span(keys, goal)
    has_nan = bool(np.isnan(target).any())
    offsets = np.arange(rows) * _BINS

    def bins_of(shifted: np.ndarray) -> np.ndarray:
        """Return (rows, width) bin ids, each row's offset included (one bincount for all rows)."""
        raw = np.minimum(shifted * np.float32(-_BINS / span), np.float32(_BINS - 1))
        if has_nan:  # NaN rows come out as NaN anyway; their keys only need a valid bin
            np.nan_to_num(raw, copy=False, nan=_BINS - 1)
        return raw.astype(np.intp) + offsets[:, None]  # non-negative: truncation is floor

    mass = np.zeros(rows * _BINS)
    count = np.zeros(rows * _BINS, dtype=np.intp)
    last_bins = np.empty(0, dtype=np.intp)
    for i in range(chunk_count):
        shifted, weights = shifted_weights(i)
        last_bins = bins_of(shifted)
        mass += np.bincount(last_bins.ravel(), weights=weights.ravel(), minlength=rows * _BINS)
        count += np.bincount(last_bins.ravel(), minlength=rows * _BINS)
    mass, count = mass.reshape(rows, _BINS), count.reshape(rows, _BINS)
    cum_mass = mass.cumsum(1)
    crossing = np.minimum((cum_mass < target[:, None]).sum(1), _BINS - 1)
    everyone = np.arange(rows)
    before = np.maximum(crossing - 1, 0)
    mass_above = np.where(crossing > 0, cum_mass[everyone, before], 0.0)
    count_above = np.where(crossing > 0, count.cumsum(1)[everyone, before], 0)
    bin_count = count[everyone, crossing]
    # Near-ties (a crossing bin this full) are counted as equal keys below: nothing to gather.
    wide = bin_count > _MAX_SORTED
    wanted = np.where(wide, -1, crossing + offsets)[:, None]
    picked_rows: list[np.ndarray] = []
    picked_weights: list[np.ndarray] = []
    for i in range(chunk_count):
        weights = shifted_weights(i)[1]
        bins = last_bins if i == chunk_count - 1 else bins_of(shifted_weights(i)[0])
        # flatnonzero: several times faster than a 2-D nonzero on a sparse mask
        flat = np.flatnonzero(bins == wanted)
        picked_rows.append(flat // bins.shape[1])
        picked_weights.append(weights.reshape(-1)[flat])
    row = np.concatenate(picked_rows)
    exact = count_above + 1
    if row.size:
        picked = np.concatenate(picked_weights).astype(np.float64)
        if chunk_count > 1:  # regroup the chunks' pieces by row
            picked = picked[np.argsort(row, kind="stable")]
        picked_count = np.bincount(row, minlength=rows)
        widest = int(picked_count.max())
        # Each row's picked weights in a table padded with zeros, largest first.
        table = np.zeros((rows, widest))
        table[np.arange(widest) < picked_count[:, None]] = picked
        cum_inside = np.sort(table, axis=1)[:, ::-1].cumsum(1) + mass_above[:, None]
        needed = (cum_inside < target[:, None]).sum(1) + 1
        exact = count_above + np.minimum(needed, np.maximum(picked_count, 1))
    if wide.any():
        # The keys of a bin this full are counted as equal: their logits differ by less than
        # the bin width.
        per_key = mass[everyone, crossing] / np.maximum(bin_count, 1)
        needed = np.ceil((target - mass_above) / np.maximum(per_key, 1e-300) * (1 - 1e-9))
        approximate = count_above + np.minimum(np.maximum(needed, 1), bin_count)
        exact = np.where(wide, approximate, exact)
    return exact.astype(np.float64)


def _span(keys: int, goal: float) -> float:
    """Return the width in nats of the band below the maximum that holds the `goal` crossing.

    Weights are relative to the maximum key (weight 1), so the keys more than `span` below it
    weigh at most keys * exp(-span) in all, less than the (1 - goal) of the mass the target
    leaves out: the cumulative mass reaches the target inside the band.
    """
    return math.log(max(keys, 1) / (1 - goal)) + 1.0


def _bins(shifted: torch.Tensor, span: float) -> torch.Tensor:
    """Return the bin of each shifted logit (<= 0): 0 for the largest, the last for all below the band."""
    # NaN rows come out as NaN anyway; their keys only need a valid bin (no host sync to check).
    raw = shifted.mul(-_BINS / span).clamp_(max=_BINS - 1).nan_to_num_(nan=_BINS - 1)
    return raw.long()  # non-negative: truncation is floor


def _select(
    shifted_weights: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    chunk_count: int,
    target: torch.Tensor,
    keys: int,
    goal: float,
) -> torch.Tensor:
    """Count the largest keys reaching `target` (in weight units): a histogram, then the crossing bin sorted.

    Pass 1: float64 histograms of weight and of key count over logits in [max - span, max]
    (`_span`: 11 nats at 4K keys, 15 at 128K). Pass 2 takes the keys of the bin where the
    cumulative weight crosses the target, sorts their weights
    and counts within it. When that bin holds more than `_MAX_SORTED` keys (near-ties), its keys
    are counted as equal: their logits differ by less than the bin width (span / 512 nats).
    """
    span = _span(keys, goal)
    target = target.double()
    mass = target.new_zeros((*target.shape[:-1], _BINS))
    last_bins = torch.empty(0)
    for i in range(chunk_count):
        shifted, weights = shifted_weights(i)
        last_bins = _bins(shifted, span)
        mass.scatter_add_(-1, last_bins, weights.double())
    cum_mass = mass.cumsum(-1)
    crossing = (cum_mass < target).sum(-1, keepdim=True).clamp_(max=_BINS - 1)
    mass_above = cum_mass.gather(-1, (crossing - 1).clamp_(min=0)).masked_fill_(crossing == 0, 0.0)
    count_above = torch.zeros_like(crossing)
    bin_count = torch.zeros_like(crossing)
    picked_count = torch.zeros_like(crossing)
    picked: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i in range(chunk_count):
        if i == chunk_count - 1:
            weights, bins = shifted_weights(i)[1], last_bins
        else:
            shifted, weights = shifted_weights(i)
            bins = _bins(shifted, span)
        # int32 sums: a bool sum to int64 would first copy the mask to int64.
        count_above += (bins < crossing).sum(-1, keepdim=True, dtype=torch.int32)
        inside = bins == crossing
        counts = inside.sum(-1, keepdim=True, dtype=torch.int32)
        bin_count += counts
        if int(bin_count.max()) > _MAX_SORTED:  # near-ties: stop gathering those rows' keys
            inside &= bin_count <= _MAX_SORTED
            counts = inside.sum(-1, keepdim=True, dtype=torch.int32)
        picked_count += counts
        # A masked top-k would be slow here (std::partial_sort over many equal fill values).
        picked.append((weights[inside], counts.reshape(-1)))
    exact = _cumulative_count(picked, picked_count, count_above, mass_above, target)
    wide = bin_count > _MAX_SORTED
    if bool(wide.any()):
        # The keys of a bin this full are counted as equal: their logits differ by less than
        # the bin width.
        per_key = mass.gather(-1, crossing) / bin_count.clamp(min=1)
        needed = torch.ceil((target - mass_above) / per_key.clamp(min=1e-300) * (1 - 1e-9))
        approximate = count_above + needed.clamp(min=1).minimum(bin_count)
        exact = torch.where(wide, approximate, exact)
    return exact.float()


def _cumulative_count(
    picked: list[tuple[torch.Tensor, torch.Tensor]],
    picked_count: torch.Tensor,
    count_above: torch.Tensor,
    mass_above: torch.Tensor,
    target: torch.Tensor,
) -> torch.Tensor:
    """Return keys above the crossing bin plus those of it (largest first) that reach `target`."""
    if int(picked_count.max()) == 0:
        return count_above + 1
    table = _rows_table(picked, picked_count.reshape(-1), 0.0).double()
    cum_inside = sorted_descending(table).cumsum(-1)
    cum_inside = cum_inside.reshape(*target.shape[:-1], -1).add_(mass_above)
    needed = (cum_inside < target).sum(-1, keepdim=True).add_(1)
    return count_above + needed.minimum(picked_count.clamp(min=1))


def _rows_table(
    picked: list[tuple[torch.Tensor, torch.Tensor]], counts: torch.Tensor, fill: float
) -> torch.Tensor:
    """Return (rows, widest): each row's picked values (in their order), padded with `fill`.

    picked: per chunk, the selected values (grouped by row, in row order) and the count per row.
    """
    counts = counts.long()
    rows = torch.arange(counts.shape[0], device=counts.device)
    values = torch.cat([v for v, _ in picked])
    row = torch.cat([torch.repeat_interleave(rows, c.long()) for _, c in picked])
    if len(picked) > 1:  # regroup the chunks' pieces by row
        order = torch.argsort(row, stable=True)
        values, row = values[order], row[order]
    starts = counts.cumsum(0) - counts
    position = torch.arange(values.shape[0], device=values.device) - starts[row]
    table = values.new_full((counts.shape[0], max(1, int(counts.max()))), fill)
    table[row, position] = values
    return table
