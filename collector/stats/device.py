"""`device_pass`: one layer's statistics on a device, keys in one chunk: about 14 kernels, no host sync.

The probabilities of the layers of a pass are sorted in batches (`SortBatch`): one sort for
several layers.
"""

from __future__ import annotations

import torch

from collector.stats.inputs import MASS_SLACK, LayerPartial, RowInputs, StatsSpec, visible_keys
from collector.stats.keepset import (
    gather_keep_values,
    largest_middle,
    mask_keep_logits,
    middle_indices,
)
from collector.stats.products import Logits, gather_keys, padded_buffer, split_product


def device_pass(rows: RowInputs, logits_of: Logits, spec: StatsSpec) -> LayerPartial:
    """`layer_pass` of one chunk on a device, without learned sinks: about 14 kernels, no host sync.

    A serving process launches these kernels one by one from Python, so their number sets the
    cost (on an H100 the launch, not the arithmetic, is most of a layer's time up to 16K keys).
    Log-probabilities come from one fused log-softmax, so that everything is relative to the
    log-sum-exp: `high` is 0 and `total` is 1 (their sum differs from 1 by float32 rounding,
    1e-7; a row whose logits are not finite has a NaN entropy, and `finish` flags it). A sort
    of the probabilities gives the top-k and `keys_for_90pct` (`sorted_counts`); it waits in a
    `SortBatch`, which sorts several layers at once. Buffers padded to whole blocks of keys,
    constants, index views and sort batches are shared by the layers of a pass
    (`RowInputs.scratch`). Extra memory, as on the general path with one chunk: a few (n, h,
    keys) tensors (log-probabilities, probabilities, their sort and float64 running sum) and the
    float32 copy of the values, (kv_heads, keys, d), the only one the size of the cache; plus
    the probabilities waiting in the batch, at most `spec.sort_batch_bytes`.
    """
    n, kv_heads, group, _ = rows.query.shape
    keys = rows.key.shape[2]
    scratch = {} if rows.scratch is None else rows.scratch
    logits = logits_of(0, keys)
    middle = largest_middle(logits, rows, 0, spec.middle_keys, None) if spec.middle_keys else None
    log_p = torch.log_softmax(logits, dim=-1)
    # the keep-set's index per head (one per key count in a pass), a maximum of 0, a total of 1
    name = ("shared", keys, log_p.device, n, kv_heads, group)
    shared = scratch.get(name)
    if shared is None:
        shared = scratch[name] = (
            rows.keep_index.reshape(n, 1, 1, -1).expand(n, kv_heads, group, -1),
            log_p.new_zeros((n, kv_heads, group, 1)),
            log_p.new_ones((n, kv_heads, group, 1)),
        )
    index, zero, one = shared
    keep_logits = mask_keep_logits(rows, log_p.gather(-1, index))
    values = rows.value
    if rows.output is not None:  # the kernel's output: no p.V
        weights = torch.exp(log_p)
        out = rows.output
    else:
        # the layer's own buffer (its probabilities wait in the sort batch), padded for p.V
        padded = padded_buffer({}, "probabilities", log_p.device, (n, kv_heads, group), keys, None)
        weights = torch.exp(log_p, out=padded[..., :keys])
        value = gather_keys(rows.value, rows.batch_index, 0, keys)
        upcast = padded_buffer(
            scratch, "values", log_p.device, value.shape[:2], keys, value.shape[-1]
        )
        values = upcast[..., :keys, :].copy_(value)
        out = split_product(padded, upcast)
        if rows.value.shape[0] > 1:
            values = rows.value  # the copy holds the rows' entries, not the batch's
    entropy_sum = torch.linalg.vecdot(weights, log_p)[..., None]
    batch_name = ("sort batch", *weights.shape, weights.device)
    batch = scratch.get(batch_name)
    if batch is None or batch.full:
        k = min(max(spec.top_k), keys)
        goal = spec.mass_target * (1 - MASS_SLACK)
        batch = scratch[batch_name] = SortBatch(weights, k, goal, spec.sort_batch_bytes)
    top, keys_needed = batch.add(weights)
    visible = visible_keys(rows)
    return LayerPartial(
        zero, one, entropy_sum, None, out, top, keep_logits, gather_keep_values(rows, values),
        rows.keep_is_sink, visible, None, keys_needed, rows.output is not None,
        counted_by_sort=True, middle_index=middle_indices(middle), batch=batch,
    )  # fmt: skip


class SortBatch:
    """The probabilities of several `device_pass` layers of one shape, sorted together.

    A sort on a device costs a few hundred microseconds of host time whatever its size (in the
    H100 profile: torch's segmented radix sort, its set-up and four passes), the largest host
    cost of a layer there. Layers add their probabilities and get views of where their
    top-k and count will be; the batch sorts them at once (`sorted_counts`) when it holds
    `budget` bytes, or when `finish` flushes it. Memory: the waiting probabilities, at most
    `budget` bytes, then about six times that while they are sorted (their copy, the sorted
    values and their int64 indices, the float64 running sum).

    Usage:
        top, before = batch.add(probabilities)  # (n, kv, group, keys) in, views out
        batch.flush()                           # before reading top and before
    """

    def __init__(self, like: torch.Tensor, k: int, goal: float, budget: int) -> None:
        self.capacity = max(1, min(256, budget // max(1, like.numel() * like.element_size())))
        lead = like.shape[:-1]
        self.top = like.new_empty((self.capacity, *lead, k))
        self.before = torch.empty((self.capacity, *lead, 1), dtype=torch.int64, device=like.device)
        self.goal = goal
        self.used = 0
        self.pending: list[torch.Tensor] = []

    @property
    def full(self) -> bool:
        """Whether every slot has been handed out (a new batch takes the next layers)."""
        return self.used == self.capacity

    def add(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queue one layer's probabilities; return views of its top-k and count, filled by `flush`."""
        slot = self.used
        self.used += 1
        self.pending.append(weights)
        if self.full:
            self.flush()
        return self.top[slot], self.before[slot]

    def flush(self) -> None:
        """Sort what is queued into the slots; nothing to do when nothing is queued."""
        if not self.pending:
            return
        first = self.used - len(self.pending)
        stacked = torch.stack(self.pending)  # whole rows without the padding of split products
        self.pending = []
        sorted_counts(
            stacked, self.goal, self.top[first : self.used], self.before[first : self.used]
        )


def sorted_counts(
    weights: torch.Tensor, goal: float, top: torch.Tensor, before: torch.Tensor
) -> None:
    """Write the k largest weights of each row into `top`, and into `before` how many keys come
    before the one reaching `goal` of the row's mass.

    weights: (..., keys) probabilities, on a device; top: (..., k); before: (..., 1) int64. A
    device sorts rows of 64K keys in a fraction of a millisecond with no host sync, where the
    histogram passes of `keys_for_target` take tens of small operations and several syncs. The
    running sum is float64 and the target is taken from its own last entry (times `goal` < 1),
    so exact ties (e.g. 900 of 1000 equal keys) count exactly and the count never passes the
    last key. NaN sorts first; such rows are flagged. Writing into `top` (a copy) frees the
    sorted rows.
    """
    ordered = weights.sort(dim=-1, descending=True).values
    cumulative = ordered.cumsum(-1, dtype=torch.float64)
    # the keys before the first running sum that reaches the target
    torch.searchsorted(cumulative, cumulative[..., -1:] * goal, out=before)
    top.copy_(ordered[..., : top.shape[-1]])
