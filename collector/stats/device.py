"""`device_pass`: a device's one-chunk layers, batched, so that per layer only its products run.

A layer computes its logits (q.k) and queues them in the pass's `DeviceBatch` for its shape.
The batch does the rest for all its layers at once (scaling, log-softmax, probabilities, entropy,
the keep-set's logits, the sort that gives the top-k and `keys_for_90pct`), then p.V layer by
layer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from collector.stats.batch import PassBatch
from collector.stats.inputs import MASS_SLACK, LayerPartial, RowInputs, StatsSpec, visible_keys
from collector.stats.keepset import (
    gather_keep_values,
    largest_middle,
    mask_keep_logits,
    middle_indices,
)
from collector.stats.products import SPLIT_KEYS, Logits, gather_keys, padded_buffer, split_parts


def device_pass(rows: RowInputs, logits_of: Logits, spec: StatsSpec) -> LayerPartial:
    """`layer_pass` of one chunk on a device, without learned sinks: no host sync.

    A serving process launches kernels one by one from Python, so their number sets the cost
    (on an H100 the launch, not the arithmetic, is most of a layer's time up to 16K keys). Here
    a layer launches its q.k (16-bit keys multiplied as they are into float32); later, in its
    batch, the float32 copy of its values, its p.V and the gather of its keep-set's values from
    that copy: 4 kernels (with a bias or soft-capping, their own few more). Everything else is
    one set of kernels per `DeviceBatch`.

    Log-probabilities come from one fused log-softmax, so that everything is relative to the
    log-sum-exp: `high` is 0 and `total` is 1 (their sum differs from 1 by float32 rounding,
    1e-7; a row whose logits are not finite has a NaN entropy, and `finish` flags it). The
    partial's entropy, p.V, top-k, count and keep-set logits are views that the batch fills
    (`finish` flushes it first).
    """
    keys = rows.key.shape[2]
    scratch = {} if rows.scratch is None else rows.scratch
    # Plain logits are scaled in the batch, for all its layers at once (the largest middle keys
    # are the same before the scaling).
    logits = logits_of.unscaled(0, keys) if logits_of.plain else logits_of(0, keys)
    middle = largest_middle(logits, rows, 0, spec.middle_keys, None) if spec.middle_keys else None
    # layers of one shape share a batch (keep-set width and value width included)
    name = (
        "device batch",
        *logits.shape,
        rows.keep_index.shape[-1],
        rows.value.shape[-1],
        logits.device,
    )
    batch = scratch.get(name)
    if batch is None or batch.full:
        batch = scratch[name] = DeviceBatch(rows, logits, scratch, spec)
    slot = batch.add(rows, logits, logits_of.scaling if logits_of.plain else None)
    if _keep_values_from_copy(rows):
        keep_values = batch.keep_values[slot]
    else:
        keep_values = gather_keep_values(rows, rows.value)
    out = rows.output if rows.output is not None else batch.out[slot]
    return LayerPartial(
        batch.zero, batch.one, batch.entropy[slot], None, out, batch.top[slot], batch.keep[slot],
        keep_values, rows.keep_is_sink, visible_keys(rows), None, batch.before[slot],
        rows.output is not None, counted_by_sort=True, middle_index=middle_indices(middle),
        batch=batch,
    )  # fmt: skip


class _Queued(NamedTuple):
    """One layer waiting in a `DeviceBatch`."""

    rows: RowInputs
    logits: torch.Tensor  # (n, kv_heads, group, keys) float32, masked keys at MASKED_LOGIT
    scaling: float | None  # what the logits are still to be multiplied by; None: nothing


class DeviceBatch(PassBatch):
    """The one-chunk layers of one shape in a pass, on a device: all but their products at once.

    Each kernel launch costs a few microseconds of host time whatever its size, and a sort a
    few hundred (in the H100 profile: torch's segmented radix sort, its set-up and four passes).
    Layers queue their logits and get views of where their statistics will be; the batch
    fills them (`flush`) when its slots are taken (about `StatsSpec.device_batch_bytes` of
    logits), or when `finish` flushes it: one scaling, one log-softmax, one exp, one entropy
    product, one keep-set gather and one sort for all its layers, then p.V per layer (it needs
    the layer's values) and one sum of p.V's blocks. Memory: the queued logits, then about
    eight times that while they are flushed (their stack, the log-probabilities, the
    probabilities padded to whole blocks of keys, the sort's values, its int64 indices and
    float64 running sum), plus one float32 copy of a layer's values at a time.

    Usage:
        slot = batch.add(rows, logits)   # batch.entropy[slot], .out, .top, .before, .keep: views
        batch.flush()                    # before reading them
    """

    def __init__(
        self,
        rows: RowInputs,
        like: torch.Tensor,
        scratch: dict[tuple[object, ...], object],
        spec: StatsSpec,
    ) -> None:
        n, kv_heads, group, keys = like.shape
        keep_index = rows.keep_index
        # whole layers, the nearest count to the budget: a decode step's key counts are one past a
        # round number (4097), and a floor would leave a layer of an 8B model to a batch alone
        layer_bytes = max(1, like.numel() * like.element_size())
        self.capacity = max(1, min(256, round(spec.device_batch_bytes / layer_bytes)))
        lead = (self.capacity, n, kv_heads, group)
        self.keep_index = keep_index
        self.scratch = scratch
        self.goal = spec.mass_target * (1 - MASS_SLACK)
        # filled by `flush` (`out`: p.V, of layers without the kernel's float32 output)
        self.entropy = like.new_empty((*lead, 1))
        self.out = like.new_empty((*lead, rows.value.shape[-1]))
        self.keep = like.new_empty((*lead, keep_index.shape[-1]))
        # the keep-set's values, of layers that take them from the float32 copy made for p.V
        self.keep_values = like.new_empty((*lead[:-1], keep_index.shape[-1], rows.value.shape[-1]))
        self.top = like.new_empty((*lead, min(max(spec.top_k), keys)))
        self.before = torch.empty((*lead, 1), dtype=torch.int64, device=like.device)
        # a maximum of 0 and a total of 1 for every layer
        self.zero = like.new_zeros((n, kv_heads, group, 1))
        self.one = like.new_ones((n, kv_heads, group, 1))
        self.used = 0
        self.pending: list[_Queued] = []

    @property
    def full(self) -> bool:
        """Whether every slot has been handed out (a new batch takes the next layers)."""
        return self.used == self.capacity

    def add(self, rows: RowInputs, logits: torch.Tensor, scaling: float | None = None) -> int:
        """Queue one layer's logits, still to be multiplied by `scaling` unless it is None;
        return the layer's slot in the batch's tensors (filled by `flush`)."""
        slot = self.used
        self.used += 1
        self.pending.append(_Queued(rows, logits, scaling))
        if self.full:
            self.flush()
        return slot

    def _flush(self) -> None:
        """Compute what the queued layers wait for; nothing to do when nothing is queued."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        taken = slice(self.used - len(pending), self.used)
        count, (n, kv_heads, group, keys) = len(pending), pending[0].logits.shape
        log_p = torch.log_softmax(self._scaled(pending), dim=-1)
        # the probabilities, padded with zeros to whole blocks of keys for the split p.V
        padded = padded_buffer(
            self.scratch, "probabilities", log_p.device, log_p.shape[:-1], keys, None
        )
        weights = torch.exp(log_p, out=padded[..., :keys])
        torch.linalg.vecdot(weights, log_p, out=self.entropy[taken].squeeze(-1))
        if all(queued.rows.keep_index is self.keep_index for queued in pending):
            # one keep-set for all (the layers of a pass with one key count share it)
            index = self.keep_index.reshape(1, n, 1, 1, -1).expand(count, n, kv_heads, group, -1)
            torch.gather(log_p, -1, index, out=self.keep[taken])
        else:
            for queued, layer_log_p, keep in zip(pending, log_p, self.keep[taken], strict=True):
                index = queued.rows.keep_index.reshape(n, 1, 1, -1).expand(n, kv_heads, group, -1)
                torch.gather(layer_log_p, -1, index, out=keep)
        del log_p
        for queued, keep in zip(pending, self.keep[taken], strict=True):
            mask_keep_logits(queued.rows, keep)  # in place, where anything is masked
        sorted_counts(weights, self.goal, self.top[taken], self.before[taken])
        # p.V, per layer (it reads the layer's values), summed over key blocks for all at once
        wanted = [i for i, queued in enumerate(pending) if queued.rows.output is None]
        if not wanted:
            return
        d = self.out.shape[-1]
        parts = padded.new_empty((count, n, kv_heads, padded.shape[-1] // SPLIT_KEYS, group, d))
        for i in wanted:
            self._weighted_values(pending[i].rows, padded[i], parts[i], taken.start + i)
        if len(wanted) == count:
            torch.sum(parts, -3, out=self.out[taken])
        else:
            for i in wanted:
                torch.sum(parts[i], -3, out=self.out[taken.start + i])

    @staticmethod
    def _scaled(pending: list[_Queued]) -> torch.Tensor:
        """The queued layers' logits, stacked and scaled: one multiplication when they share it."""
        stacked = torch.stack([queued.logits for queued in pending])
        scalings = {queued.scaling for queued in pending}
        if len(scalings) == 1:
            (scaling,) = scalings
            return stacked if scaling is None else stacked.mul_(scaling)
        for queued, logits in zip(pending, stacked, strict=True):
            if queued.scaling is not None:
                logits.mul_(queued.scaling)
        return stacked

    def _weighted_values(
        self, rows: RowInputs, probabilities: torch.Tensor, parts: torch.Tensor, slot: int
    ) -> None:
        """Write the per-block products of p.V of one layer into `parts`.

        probabilities: (n, kv_heads, group, keys padded to whole blocks), zero past the last key.
        The values are upcast into a buffer of the same padding (zeros past the last key), shared
        by the layers of a pass, so that the split product needs no further copy; the keep-set's
        values are taken from it where `_keep_values_from_copy`.
        """
        keys = rows.key.shape[2]
        value = gather_keys(rows.value, rows.batch_index, 0, keys)
        upcast = padded_buffer(
            self.scratch, "values", probabilities.device, value.shape[:2], keys, value.shape[-1]
        )
        upcast[..., :keys, :].copy_(value)
        split_parts(probabilities, upcast, out=parts)
        if _keep_values_from_copy(rows):
            index = rows.keep_index[0]
            torch.index_select(upcast[..., :keys, :], 2, index, out=self.keep_values[slot])


def _keep_values_from_copy(rows: RowInputs) -> bool:
    """Whether a layer's keep-set values come from the float32 copy of its values made for p.V
    (one row of a one-entry cache: one gather, no upcast of its own)."""
    return rows.output is None and rows.keep_index.shape[0] == 1 and rows.value.shape[0] == 1


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
