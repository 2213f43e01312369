"""What a layer's statistics are computed from (`RowInputs`) and what a layer leaves (`LayerPartial`).

Also the constants every path shares: how masked keys and float32 rounding are treated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from collector.schema import DEFAULT_TOP_K

if TYPE_CHECKING:
    from collector.stats.device import DeviceBatch
    from collector.stats.host import HostSelection

# Float32 probabilities carry ~1e-7 relative error each: a cumulative mass within this fraction of
# the target counts as reaching it, so exact ties (e.g. 900 of 1000 equal keys) count exactly.
MASS_SLACK = 1e-6


# Masked keys get this finite logit instead of -inf: exp gives exactly 0 and 0 * logit stays 0,
# so the entropy sum needs no NaN guard. Fully masked rows are flagged from the bias instead.
MASKED_LOGIT = -1e30


# Shifted logits are clamped here before exp: float32 exp of inputs below about -87.3 takes a slow
# path for subnormal results (10x slower on CPU), and a weight of exp(-87) <= 1.7e-38 next to
# the maximum's 1 is zero at float32 precision for every statistic.
EXP_FLOOR = -87.0


@dataclass(frozen=True)
class StatsSpec:
    """What to compute: the top-k set, the mass target of `keys_for_90pct`, chunking of keys."""

    top_k: tuple[int, ...] = DEFAULT_TOP_K
    mass_target: float = 0.9
    # 128K-token contexts in one chunk (the sync-free device path); see collector.settings
    chunk_keys: int = 131072
    # How many of the largest middle keys (visible, outside the sink+recent keep-set) to report
    # by index; 0 (the default) computes nothing for them.
    middle_keys: int = 0
    # On a device, the logits of about this many bytes of one-chunk layers (the nearest whole
    # number of layers) wait to be finished together (`collector.stats.device.DeviceBatch`: one
    # log-softmax, one sort and so on for them all); a flush holds about eight times its logits
    # meanwhile. At 16 MiB the 32 layers of an 8B model (32 query heads) take 1 batch at 4K
    # keys, 4 at 16K and 16 at 64K, where the GPU's work, not the launches, sets the pace.
    device_batch_bytes: int = 16 << 20
    # On the CPU, the shifted logits and weights of up to this many bytes of one-chunk layers
    # wait to be selected together (`collector.stats.host.HostSelection`): the 4 layers of a
    # small model at 4K keys (256 KiB each) share one selection, where per-call costs dominate;
    # from 16K keys a layer goes alone, and its rows are not copied into a batch (with 16 MiB,
    # 5 of 18 runs at 16K keys were page-fault bound, the batch's copies among the
    # megabytes mapped afresh).
    host_batch_bytes: int = 1 << 20


@dataclass(frozen=True)
class RowInputs:
    """The sampled rows of one attention call.

    query: (n, kv_heads, group, d) post-RoPE queries of the sampled rows.
    key, value: (batch, kv_heads, keys, d) what the kernel received (cache included).
    batch_index: (n,) long, the batch entry each row reads.
    bias: (n, keys) float32 additive mask: 0 (or the model's additive value) where visible, -inf where not.
    keep_index: (n, J) long key indices of the sink+recent keep-set (padded; see keep_valid).
    keep_is_sink: (n, J) bool, keep_valid: (n, J) bool.
    sinks: (kv_heads * group,) learned sink logits (gpt-oss `s_aux`) or None.
    visible: (n,) number of visible keys (the finite entries of bias), or None to count them here.
    bias_is_zero: True when bias is 0 everywhere (nothing masked, no additive term): skipped.
    keep_all_valid: True when every keep_valid entry is True (no padding in the keep-set).
    scratch: buffers the layers of one pass share (`padded_buffer`), or None for buffers of this call.
    output: (n, kv_heads, group, d) float32 attention output of the rows as the kernel computed
        it, or None to compute p.V here.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    batch_index: torch.Tensor
    bias: torch.Tensor
    keep_index: torch.Tensor
    keep_is_sink: torch.Tensor
    keep_valid: torch.Tensor
    sinks: torch.Tensor | None = None
    visible: torch.Tensor | None = None
    bias_is_zero: bool = False
    output: torch.Tensor | None = None
    keep_all_valid: bool = False
    scratch: dict[tuple[object, ...], Any] | None = None


@dataclass(frozen=True)
class LayerPartial:
    """What the passes over one layer's keys leave for `finish`: small tensors, no key-sized ones.

    Shapes: (n, kv_heads, group, 1) for high, total, entropy_sum, atom, keys_needed, solved;
    out (n, kv_heads, group, d); top (n, kv_heads, group, k) logits, unsorted; keep_logits
    (n, kv_heads, group, J) keep-set logits (-inf where masked); keep_values (n, kv_heads, J, d);
    keep_is_sink (n, J); visible (n,).
    """

    high: torch.Tensor
    total: torch.Tensor
    entropy_sum: torch.Tensor
    atom: torch.Tensor | None  # learned sink weight relative to `high`; None without sinks
    out: torch.Tensor
    top: torch.Tensor
    keep_logits: torch.Tensor
    keep_values: torch.Tensor
    keep_is_sink: torch.Tensor
    visible: torch.Tensor
    solved: torch.Tensor | None  # rows whose count the top-k gives; None: keys_needed has all
    keys_needed: torch.Tensor | None  # rows not `solved` by the top-k; None when all are
    out_is_output: bool = False  # `out` is the attention output itself, not the unnormalised sum
    # From `sorted_counts`: `top` holds weights relative to `high`, and `keys_needed` the keys
    # before the one that reaches the target (one less than the count).
    counted_by_sort: bool = False
    # The batch that fills `entropy_sum`, `out` (without the kernel's output), `top`,
    # `keep_logits` and `keys_needed` (`collector.stats.device.DeviceBatch`), or `top`,
    # `solved` and `keys_needed` (`collector.stats.host.HostSelection`, on the CPU): they hold
    # nothing until it is flushed, which `finish` does first. None: already filled.
    batch: DeviceBatch | HostSelection | None = None
    # (n, kv_heads, group, spec.middle_keys) key indices of the largest middle keys, largest
    # first, -1 past the last visible one; None unless spec.middle_keys > 0.
    middle_index: torch.Tensor | None = None


def visible_keys(rows: RowInputs) -> torch.Tensor:
    """(n,) visible keys of each row: given by the caller, or the finite entries of the bias."""
    return (rows.bias > -math.inf).sum(-1) if rows.visible is None else rows.visible


def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """`torch.stack(tensors)`, without a copy where they are consecutive slots of one buffer.

    The layers of a `DeviceBatch` leave views of its tensors, slot after slot: their stack is a
    view of the batch's own tensor (on a device, a kernel less per statistic). The result may
    share memory with the tensors: never write to it in place.
    """
    first = tensors[0]
    if len(tensors) > 1 and first.is_contiguous() and first.numel():
        storage = first.untyped_storage().data_ptr()
        step, offset = first.numel(), first.storage_offset()
        if all(
            t.untyped_storage().data_ptr() == storage
            and t.dtype == first.dtype
            and t.shape == first.shape
            and t.is_contiguous()
            and t.storage_offset() == offset + i * step
            for i, t in enumerate(tensors)
        ):
            return first.as_strided((len(tensors), *first.shape), (step, *first.stride()), offset)
    return torch.stack(tensors)


def pad_stack(tensors: list[torch.Tensor], value: float | bool, dim: int = -1) -> torch.Tensor:
    """Stack along a new first dim, padding `dim` to the widest with `value` (see `stack`)."""
    width = max(t.shape[dim] for t in tensors)
    if any(t.shape[dim] != width for t in tensors):
        tensors = [
            torch.cat(
                [t, t.new_full((*t.shape[:dim], width - t.shape[dim], *t.shape[dim:][1:]), value)],
                dim,
            )
            for t in tensors
        ]
    return stack(tensors)
