"""Exact per-head attention statistics of a few query rows, recomputed from query, keys and values.

Usage:
    rows = RowInputs(query=q, key=k, value=v, batch_index=b, bias=bias, keep_index=ki, keep_is_sink=ks, keep_valid=kv)
    stats = row_statistics(rows, scaling=0.125, spec=StatsSpec())  # {"entropy_nats": (n, heads), ...}

No I/O. On a GPU everything stays in torch on the device; host syncs happen on measured rows
only. On the CPU the selections, sorts and `finish` run in numpy (`collector.topk.on_host`): on
arrays of a few thousand values its per-operation cost is a fraction of torch's. Both paths are
tested against the same float64 reference.

On a device, a layer whose keys fit one chunk (up to 72K keys by default) and that has no learned
sink logits takes `_device_pass`: a serving process launches the kernels one by one from Python,
so their number is the cost. It is about 17 kernels and no host sync: q.k with 16-bit keys
multiplied as they are into float32, one fused log-softmax, p.V split over blocks of keys, and
one sort of the probabilities for the top-k and `keys_for_90pct`. Everything else (more chunks,
learned sinks, the CPU) takes the general path below.

Cost and memory of the general path (K visible keys, n rows, h query heads, C = `chunk_keys`, up
to 1.125 C per chunk):
- pass 1 reads every key once: one q.k matmul per KV group (no `repeat_kv` copies), one exp
  reused for the log-sum-exp, the entropy and p.V, one unsorted top-k of the largest k (the
  smaller k are prefix sums of it); extra memory O(n x h x C). The values are read for p.V
  unless the kernel's float32 output of the rows is given (it is the attention output);
- the sink+recent keep-set is gathered by index (S + R keys): its masses and the value-aware
  eviction error cost O(S + R);
- `keys_for_90pct` is read from the top-k when the largest k already holds 90% of the mass (peaked
  heads: no extra work). Otherwise `collector.topk.keys_for_target` counts it from a histogram
  of the mass and a sort of the crossing bin's keys. The chunk of pass 1 that is still in memory
  is reused; chunks are laid out remainder first so that it is a full one, and only the other
  chunks recompute q.k (keys only);
- `finish` does everything that needs no key for all layers of the pass at once (one set of small
  ops per pass instead of per layer);
- optionally (`StatsSpec.middle_keys`), the indices of the largest middle keys: one more top-k
  per chunk, merged across chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional

from collector import topk
from collector.schema import DEFAULT_TOP_K, core_stat_names
from collector.topk import host_view, keys_for_target, sorted_descending, top_values

# Float32 probabilities carry ~1e-7 relative error each: a cumulative mass within this fraction of
# the target counts as reaching it, so exact ties (e.g. 900 of 1000 equal keys) count exactly.
_MASS_SLACK = 1e-6
# Masked keys get this finite logit instead of -inf: exp gives exactly 0 and 0 * logit stays 0,
# so the entropy sum needs no NaN guard. Fully masked rows are flagged from the bias instead.
_MASKED = -1e30
# Shifted logits are clamped here before exp: float32 exp of inputs below about -87.3 takes a slow
# path for subnormal results (10x slower on CPU), and a weight of exp(-87) <= 1.7e-38 next to
# the maximum's 1 is zero at float32 precision for every statistic.
_FLOOR = -87.0


@dataclass(frozen=True)
class StatsSpec:
    """What to compute: the top-k set, the mass target of `keys_for_90pct`, chunking of keys."""

    top_k: tuple[int, ...] = DEFAULT_TOP_K
    mass_target: float = 0.9
    chunk_keys: int = 65536
    # How many of the largest middle keys (visible, outside the sink+recent keep-set) to report
    # by index; 0 (the default) computes nothing for them.
    middle_keys: int = 0


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
    scratch: buffers the layers of one pass share (`_padded`), or None for buffers of this call.
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


# Whether this torch multiplies 16-bit matrices into float32 (`torch.bmm(..., out_dtype=)`, CUDA).
_BMM_TO_FLOAT32 = "dtype" in torch.ops.aten.bmm.overloads()


class _Logits:
    """What computes the logits of a key range: queries, keys, bias (masked keys at `_MASKED`).

    16-bit keys on a device are multiplied as they are, into float32 (`_mixed_logits`): an
    upcast copy of the keys would cost more than the product (at 64K keys on an H100, 0.39 ms
    against 0.07 ms per layer). Otherwise the float32 query, times the scaling, meets the keys
    upcast to float32.
    """

    def __init__(
        self, rows: RowInputs, scaling: float, bias: torch.Tensor | None, softcap: float | None
    ) -> None:
        self.rows = rows
        self.scaling = scaling
        self.bias = bias  # (n, 1, 1, keys), None when it is zero
        self.softcap = softcap
        self.mixed = (
            _BMM_TO_FLOAT32
            and not topk.on_host(rows.key)
            and rows.key.dtype in (torch.bfloat16, torch.float16)
            and rows.query.dtype == rows.key.dtype
        )
        self._query: torch.Tensor | None = None

    @property
    def query(self) -> torch.Tensor:
        """(n, kv_heads, group, d) float32 queries times the scaling (computed once, on first use)."""
        if self._query is None:
            # Scaling the few query rows instead of the logits saves a pass over the keys.
            self._query = self.rows.query.float() * self.scaling
        return self._query

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        """Return (n, kv_heads, group, stop - start) float32 logits as the kernel computes them."""
        key = _gather(self.rows.key, self.rows.batch_index, start, stop)
        if self.mixed:
            logits = _mixed_logits(self.rows.query, key).mul_(self.scaling)
        else:
            logits = torch.matmul(self.query, key.float().transpose(-1, -2))
        if self.softcap is not None:
            logits = torch.tanh(logits.div_(self.softcap)).mul_(self.softcap)
        return logits if self.bias is None else logits.add_(self.bias[..., start:stop])


def _mixed_logits(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Return (n, kv_heads, group, keys) float32 q.k of 16-bit query rows and keys, keys not copied.

    query: (n, kv_heads, group, d); key: (n or 1, kv_heads, keys, d). The keys are the left
    operand (keys x d times d x rows): cuBLAS runs that shape several times faster than rows x
    keys. The result is a transposed view.
    """
    n, kv_heads, group, d = query.shape
    keys = key.shape[2]
    if key.shape[0] == 1:  # every row reads the one batch entry: rows join the group
        # (a view for one row: the dimension of size 1 drops out)
        right = query.permute(1, 3, 0, 2).reshape(kv_heads, d, n * group)
        product = _bmm_float32(key[0], right)  # (kv_heads, keys, n * group)
        return product.view(kv_heads, keys, n, group).permute(2, 0, 3, 1)
    right = query.reshape(n * kv_heads, group, d).transpose(1, 2)
    product = _bmm_float32(key.reshape(n * kv_heads, keys, d), right)
    return product.view(n, kv_heads, keys, group).transpose(-1, -2)


def _bmm_float32(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Batched product of 16-bit matrices in float32; on the CPU (tests) through float32 copies."""
    if left.is_cuda:
        return torch.bmm(left, right, out_dtype=torch.float32)
    return torch.bmm(left.float(), right.float())


def _gather(t: torch.Tensor, batch_index: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Return (n, kv_heads, stop - start, d): a view when the cache holds one batch entry."""
    if t.shape[0] == 1:
        return t if start == 0 and stop == t.shape[2] else t[:, :, start:stop]
    return t[batch_index, :, start:stop]


def chunk_bounds(keys: int, chunk_keys: int) -> list[tuple[int, int]]:
    """Return [start, stop) ranges of `chunk_keys` keys, the remainder first.

    A remainder of less than an eighth of a chunk joins the first chunk instead (which then holds
    up to 1.125 x `chunk_keys` keys): a chunk costs the same fixed number of operations whatever
    its length, so a 64K context plus the decoded token is one chunk, not two.
    """
    count = max(1, -(-keys // chunk_keys))
    if count > 1 and keys - (count - 1) * chunk_keys < chunk_keys // 8:
        count -= 1
    first = keys - (count - 1) * chunk_keys
    return [(0, first)] + [
        (first + i * chunk_keys, first + (i + 1) * chunk_keys) for i in range(count - 1)
    ]


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
    # From `_sorted_counts`: `top` holds weights relative to `high`, and `keys_needed` the keys
    # before the one that reaches the target (one less than the count).
    counted_by_sort: bool = False
    # (n, kv_heads, group, spec.middle_keys) key indices of the largest middle keys, largest
    # first, -1 past the last visible one; None unless spec.middle_keys > 0.
    middle_index: torch.Tensor | None = None


def row_statistics(
    rows: RowInputs, scaling: float, spec: StatsSpec, softcap: float | None = None
) -> dict[str, torch.Tensor]:
    """Return per-(row, query head) statistics as float32 tensors (n, heads), plus `visible_keys` (n,).

    Rows with no visible key, or with non-finite logits, come out as NaN (flagged upstream).
    """
    return finish([layer_pass(rows, scaling, spec, softcap)], spec)[0]


def layer_pass(
    rows: RowInputs, scaling: float, spec: StatsSpec, softcap: float | None = None
) -> LayerPartial:
    """Read one layer's keys and values (the expensive part); `finish` does the rest for all layers at once."""
    n, kv_heads, group, _ = rows.query.shape
    total_keys = rows.key.shape[2]
    kmax = min(max(spec.top_k), total_keys)
    bias = None if rows.bias_is_zero else rows.bias.float().clamp(min=_MASKED)[:, None, None, :]
    logits_of = _Logits(rows, scaling, bias, softcap)
    bounds = chunk_bounds(total_keys, spec.chunk_keys)
    if len(bounds) == 1 and rows.sinks is None and not topk.on_host(rows.query):
        return _device_pass(rows, logits_of, spec)
    high = total = entropy_sum = out = top = shifted = weights = rows.query  # set by chunk 0
    values = rows.value
    keep_raw = None
    middle: tuple[torch.Tensor, torch.Tensor] | None = None
    for i, (start, stop) in enumerate(bounds):
        logits = logits_of(start, stop)
        if spec.middle_keys:
            middle = _largest_middle(logits, rows, start, spec.middle_keys, middle)
        if len(bounds) == 1:  # the keep-set's logits, read before they are shifted in place
            index = rows.keep_index.reshape(n, 1, 1, -1).expand(n, kv_heads, group, -1)
            keep_raw = logits.gather(-1, index)
        chunk_top = top_values(logits, min(kmax, stop - start))
        chunk_max = logits.amax(-1, keepdim=True)
        new_high = chunk_max if i == 0 else torch.maximum(high, chunk_max)
        # In place: the raw logits are not needed again.
        shifted = logits.sub_(new_high).clamp_(min=_FLOOR)
        weights = torch.exp(shifted)
        chunk_sum = weights.sum(-1, keepdim=True)
        chunk_entropy = torch.linalg.vecdot(weights, shifted)[..., None]
        chunk_out = out  # the kernel's output, when given, stands in for p.V (set after the loop)
        if rows.output is None:
            values = _gather(rows.value, rows.batch_index, start, stop)
            chunk_out, values = _weighted_values(weights, values)
        if i == 0:
            total, entropy_sum, out, top = chunk_sum, chunk_entropy, chunk_out, chunk_top
        else:
            # Rescale to the new maximum: e' = e * r, e' log e' = r (e log e + d e), d = log r.
            shift = high - new_high
            rescale = torch.exp(shift)
            entropy_sum = rescale * (entropy_sum + shift * total) + chunk_entropy
            total = rescale * total + chunk_sum
            if rows.output is None:
                out = rescale * out + chunk_out
            merged = torch.cat([top, chunk_top], dim=-1)
            top = merged.topk(min(kmax, merged.shape[-1]), dim=-1, sorted=False).values
        high = new_high
    atom = None
    if rows.sinks is not None:
        atom = torch.exp(rows.sinks.float().reshape(1, kv_heads, group, 1) - high)
        total = total + atom
        entropy_sum = entropy_sum + torch.special.xlogy(atom, atom)
    visible = _visible(rows)
    goal = spec.mass_target * (1 - _MASS_SLACK)
    # Does the top-k hold the mass target? (a host sync, on measured rows only)
    target = total * goal if atom is None else (total - atom).mul_(goal)
    held = torch.exp(top - high).sum(-1, keepdim=True)
    # Rows with NaN weights are not solved and get a meaningless count: they come out as NaN.
    solved = held >= target
    keys_needed = None
    if not bool(solved.all()):
        # Recomputed chunks are shifted and clamped exactly as above.
        keys_needed = keys_for_target(
            lambda start, stop: logits_of(start, stop).sub_(high).clamp_(min=_FLOOR),
            bounds, target, (shifted, weights), solved, goal,
        )  # fmt: skip
    if keep_raw is None:
        keep_logits = _keep_logits(rows, logits_of)
    else:
        keep_logits = _masked_keep(rows, keep_raw)
    if len(bounds) > 1 or rows.output is not None or rows.value.shape[0] > 1:
        values = rows.value  # else: the one chunk's float32 values, all batch entries
    if rows.output is not None:  # the kernel's output: already divided by the total
        out = rows.output
    return LayerPartial(
        high, total, entropy_sum, atom, out, top, keep_logits, _keep_values(rows, values),
        rows.keep_is_sink, visible, solved, keys_needed, rows.output is not None,
        middle_index=_middle_index(middle),
    )  # fmt: skip


def _device_pass(rows: RowInputs, logits_of: _Logits, spec: StatsSpec) -> LayerPartial:
    """`layer_pass` of one chunk on a device, without learned sinks: about 17 kernels, no host sync.

    A serving process launches these kernels one by one from Python, so their number sets the
    cost (on an H100 the launch, not the arithmetic, is most of a layer's time up to 16K keys).
    Log-probabilities come from one fused log-softmax, so that everything is relative to the
    log-sum-exp: `high` is 0 and `total` is 1 (their sum differs from 1 by float32 rounding,
    1e-7; a row whose logits are not finite has a NaN entropy, and `finish` flags it). One sort
    of the probabilities gives the top-k and `keys_for_90pct` (`_sorted_counts`). Buffers
    padded to whole blocks of keys, constants and index views are shared by the layers of a
    pass (`RowInputs.scratch`). Extra memory, as on the general path with one chunk: a few
    (n, h, keys) tensors (log-probabilities, probabilities, their sort and float64 running sum)
    and the float32 copy of the values, (kv_heads, keys, d), the only one the size of the cache.
    """
    n, kv_heads, group, _ = rows.query.shape
    keys = rows.key.shape[2]
    scratch = {} if rows.scratch is None else rows.scratch
    logits = logits_of(0, keys)
    middle = _largest_middle(logits, rows, 0, spec.middle_keys, None) if spec.middle_keys else None
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
    keep_logits = _masked_keep(rows, log_p.gather(-1, index))
    padded = _padded(scratch, "probabilities", log_p.device, (n, kv_heads, group), keys, None)
    weights = torch.exp(log_p, out=padded[..., :keys])
    entropy_sum = torch.linalg.vecdot(weights, log_p)[..., None]
    values = rows.value
    if rows.output is not None:
        out = rows.output
    else:
        value = _gather(rows.value, rows.batch_index, 0, keys)
        upcast = _padded(scratch, "values", log_p.device, value.shape[:2], keys, value.shape[-1])
        values = upcast[..., :keys, :].copy_(value)
        out = _split_product(padded, upcast)
        if rows.value.shape[0] > 1:
            values = rows.value  # the copy holds the rows' entries, not the batch's
    goal = spec.mass_target * (1 - _MASS_SLACK)
    top, keys_needed = _sorted_counts(weights, min(max(spec.top_k), keys), goal)
    visible = _visible(rows)
    return LayerPartial(
        zero, one, entropy_sum, None, out, top, keep_logits, _keep_values(rows, values),
        rows.keep_is_sink, visible, None, keys_needed, rows.output is not None,
        counted_by_sort=True, middle_index=_middle_index(middle),
    )  # fmt: skip


def _visible(rows: RowInputs) -> torch.Tensor:
    """(n,) visible keys of each row: given by the caller, or the finite entries of the bias."""
    return (rows.bias > -math.inf).sum(-1) if rows.visible is None else rows.visible


def _masked_keep(rows: RowInputs, keep: torch.Tensor) -> torch.Tensor:
    """Return the keep-set's logits with masked keys (finite `_MASKED` logits) and padding at -inf."""
    if rows.bias_is_zero and rows.keep_all_valid:
        return keep  # nothing masked, no padding
    hidden = ~rows.keep_valid.reshape(keep.shape[0], 1, 1, -1)
    if not rows.bias_is_zero:
        # after a log-softmax a masked logit is still about _MASKED
        hidden = hidden | (keep <= _MASKED / 2)
    return keep.masked_fill_(hidden, -math.inf)


def _keep_values(rows: RowInputs, values: torch.Tensor) -> torch.Tensor:
    """Return (n, kv_heads, J, d) float32 values of the keep-set; `values` is rows.value or its float32 copy."""
    if rows.keep_index.shape[0] == 1 and values.shape[0] == 1:  # one index op
        keep_values = values[:, :, rows.keep_index[0]]
    else:
        batch = rows.batch_index[:, None].expand_as(rows.keep_index)
        keep_values = values[batch, :, rows.keep_index].transpose(1, 2)
    return keep_values if keep_values.dtype == torch.float32 else keep_values.float()


def _middle_index(middle: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor | None:
    """Indices of the largest middle keys, -1 where masked (those, and the -inf fill, are not middle keys)."""
    if middle is None:
        return None
    return middle[1].masked_fill_(middle[0] <= _MASKED / 2, -1)


def _padded(
    scratch: dict[tuple[object, ...], Any],
    name: str,
    device: torch.device,
    lead: tuple[int, ...] | torch.Size,
    keys: int,
    width: int | None,
) -> torch.Tensor:
    """Return a float32 buffer (*lead, keys rounded up to whole `_SPLIT_KEYS` blocks[, width]).

    Zero past `keys`; what is before is the caller's to fill. Kept in `scratch` under its name
    and shape, so that the layers of a pass allocate and zero it once.
    """
    padded = -(-keys // _SPLIT_KEYS) * _SPLIT_KEYS
    shape = (*lead, padded) if width is None else (*lead, padded, width)
    key = (name, keys, device, *shape)
    buffer = scratch.get(key)
    if buffer is None:
        buffer = torch.empty(shape, dtype=torch.float32, device=device)
        (buffer[..., keys:] if width is None else buffer[..., keys:, :]).zero_()
        scratch[key] = buffer
    return buffer


def _sorted_counts(weights: torch.Tensor, k: int, goal: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the k largest weights and how many keys come before the one reaching `goal` of the mass.

    weights: (n, kv_heads, group, keys) probabilities of one chunk, on a device. A device sorts a
    few rows of 64K keys in a fraction of a millisecond with no host sync, where the histogram
    passes of `keys_for_target` take tens of small operations and several syncs. The running sum
    is float64 and the target is taken from its own last entry (times `goal` < 1), so exact ties
    (e.g. 900 of 1000 equal keys) count exactly and the count never passes the last key. NaN
    sorts first; such rows are flagged. Both results are copies (a view would keep the sorted
    rows alive until `finish`, which turns them into logits and counts for all layers at once:
    `LayerPartial.counted_by_sort`).
    """
    ordered = weights.sort(dim=-1, descending=True).values
    cumulative = ordered.cumsum(-1, dtype=torch.float64)
    # the keys before the first running sum that reaches the target
    before = torch.searchsorted(cumulative, cumulative[..., -1:] * goal)
    return ordered[..., :k].clone(), before


# Keys per block of the split p.V product on a device (see `_weighted_values`).
_SPLIT_KEYS = 1024


def _weighted_values(
    weights: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return weights @ values (n, kv_heads, group, d) and the values in float32.

    weights: (n, kv_heads, group, keys) float32; values: (n, kv_heads, keys, d), any float dtype.
    On a device the product has a few rows and tens of thousands of keys to sum over: cuBLAS
    runs it on a handful of thread blocks (0.5 ms per layer at 16K keys on an H100, more than
    the rest of the layer). Splitting the keys into blocks of `_SPLIT_KEYS` gives it one small
    product per block, summed afterwards. The float32 copy of the values is made with room for
    whole blocks (zeros past the last key), so that the blocks are a view of it. The CPU keeps
    the plain product.
    """
    keys = weights.shape[-1]
    if topk.on_host(weights) or keys < 4 * _SPLIT_KEYS:
        values = values.float()
        return torch.matmul(weights, values), values
    padded = -(-keys // _SPLIT_KEYS) * _SPLIT_KEYS
    upcast = _padded({}, "values", values.device, values.shape[:-2], keys, values.shape[-1])
    upcast[..., :keys, :].copy_(values)
    out = _split_product(functional.pad(weights, (0, padded - keys)), upcast)
    return out, upcast[..., :keys, :]


def _split_product(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Return weights @ values summed over blocks of `_SPLIT_KEYS` keys (padded to whole blocks).

    weights: (n, kv_heads, group, keys); values: (n or 1, kv_heads, keys, d), both float32.
    """
    blocks = weights.shape[-1] // _SPLIT_KEYS
    parts = torch.matmul(
        weights.unflatten(-1, (blocks, _SPLIT_KEYS)).transpose(-2, -3),
        values.unflatten(-2, (blocks, _SPLIT_KEYS)),
    )  # (n, kv_heads, blocks, group, d)
    return parts.sum(-3)


def _largest_middle(
    logits: torch.Tensor,
    rows: RowInputs,
    start: int,
    count: int,
    previous: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (logits, key indices), each (n, kv_heads, group, <= count), of the largest middle keys so far.

    logits: (n, kv_heads, group, width) of keys start..start + width, before any in-place shift.
    Middle keys are those outside the sink+recent keep-set; masked ones are dropped by the caller.
    """
    width = logits.shape[-1]
    local = rows.keep_index - start
    inside = rows.keep_valid & (local >= 0) & (local < width)
    # A count per key: padding entries of the keep-set add 0 wherever they point.
    kept = torch.zeros(local.shape[0], width, dtype=torch.int32, device=logits.device)
    kept.scatter_add_(1, local.clamp(0, width - 1), inside.to(torch.int32))
    candidates = logits.masked_fill(kept.bool()[:, None, None, :], -math.inf)
    values, index = candidates.topk(min(count, width), dim=-1)
    index = index + start
    if previous is not None:
        merged = torch.cat([previous[0], values], -1)
        values, order = merged.topk(min(count, merged.shape[-1]), dim=-1)
        index = torch.cat([previous[1], index], -1).gather(-1, order)
    return values, index


def _pad(tensors: list[torch.Tensor], value: float | bool, dim: int = -1) -> torch.Tensor:
    """Stack along a new first dim, padding `dim` to the widest with `value`."""
    width = max(t.shape[dim] for t in tensors)
    if any(t.shape[dim] != width for t in tensors):
        tensors = [
            torch.cat(
                [t, t.new_full((*t.shape[:dim], width - t.shape[dim], *t.shape[dim:][1:]), value)],
                dim,
            )
            for t in tensors
        ]
    return torch.stack(tensors)


def finish(partials: list[LayerPartial], spec: StatsSpec) -> list[dict[str, torch.Tensor]]:
    """Return the statistics of each layer's partial, computed for all layers at once.

    All partials come from one measured pass (same rows and heads); top-k widths and keep-set
    sizes may differ between layers and are padded (zero weight), which changes no sum.
    """
    stacked = finish_stacked(partials, spec)
    if stacked is None:
        return [finish([p], spec)[0] for p in partials]
    values, visible = stacked
    names = core_stat_names(spec.top_k)
    return [
        {**dict(zip(names, layer.unbind(-1), strict=True)), "visible_keys": visible[i]}
        for i, layer in enumerate(values.unbind(0))
    ]


def finish_stacked(
    partials: list[LayerPartial], spec: StatsSpec
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Return (layers, n, heads, stats) float32 in `core_stat_names` order and visible keys (layers, n).

    None when the layers differ in rows, heads or head size (then `finish` takes them one by one).
    """
    if len({(p.out.shape, p.keep_values.shape[-1]) for p in partials}) > 1:
        return None
    if topk.on_host(partials[0].out):
        return _finish_host(partials, spec)
    if all(p.counted_by_sort for p in partials):
        return _finish_sorted(partials, spec)
    layers = len(partials)
    n, kv_heads, group, _ = partials[0].out.shape
    high = torch.stack([p.high for p in partials])
    total = torch.stack([p.total for p in partials])
    log_total = torch.log(total)
    lse = high + log_total
    entropy = log_total - torch.stack([p.entropy_sum for p in partials]) / total
    if all(p.out_is_output for p in partials):
        output = torch.stack([p.out for p in partials])
    elif not any(p.out_is_output for p in partials):  # one division for all layers
        output = torch.stack([p.out for p in partials]) / total
    else:
        output = torch.stack([p.out if p.out_is_output else p.out / p.total for p in partials])
    top = _top_logits(partials)
    cum_top = torch.exp(sorted_descending(top) - lse).cumsum(-1)
    top_masses = cum_top[..., [min(k, top.shape[-1]) - 1 for k in spec.top_k]]
    atoms = None
    if any(p.atom is not None for p in partials):
        atoms = torch.stack(
            [torch.zeros_like(p.total) if p.atom is None else p.atom for p in partials]
        )
    goal = spec.mass_target * (1 - _MASS_SLACK)
    target = goal if atoms is None else (1 - atoms / total).mul_(goal)
    # Rows solved by the top-k need at most its width (guards a last-ulp disagreement of the sums).
    keys_needed = (cum_top < target).sum(-1, keepdim=True, dtype=torch.float32)
    keys_needed.clamp_(max=top.shape[-1] - 1).add_(1.0)
    if any(p.keys_needed is not None for p in partials):
        refined = torch.stack(
            [
                keys_needed[i]
                if p.keys_needed is None
                else _counted(p.keys_needed, p.counted_by_sort)
                for i, p in enumerate(partials)
            ]
        )
        if all(p.solved is None for p in partials):
            keys_needed = refined.float()
        else:
            solved = [
                torch.zeros_like(p.total, dtype=torch.bool) if p.solved is None else p.solved
                for p in partials
            ]
            keys_needed = torch.where(torch.stack(solved), keys_needed, refined)
    keep_logits = _pad([p.keep_logits for p in partials], -math.inf)
    keep = torch.exp((keep_logits - high).sub_(log_total))
    # The learned sink atom is never evicted: it joins the kept keys' weight.
    atom_logit = None if atoms is None else torch.log(atoms) + high
    sink_mass, recent_mass, eviction = _keep_set(partials, keep_logits, keep, output, atom_logit)
    visible = torch.stack([p.visible for p in partials])
    bad = (visible == 0).reshape(layers, n, 1, 1, 1).logical_or(~torch.isfinite(lse))
    # `_device_pass` rows (in a pass with other rows) have a maximum of 0 and a total of 1: a NaN
    # shows in their entropy.
    bad.logical_or_(~torch.isfinite(entropy))
    parts = [entropy, sink_mass, recent_mass, top_masses, keys_needed, eviction]
    return _stat_table(parts, bad, kv_heads * group), visible


def _finish_sorted(
    partials: list[LayerPartial], spec: StatsSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """`finish_stacked` of `_device_pass` partials only, about 20 operations fewer.

    Their maximum is 0 and their total 1 (everything is relative to the log-sum-exp), their
    output is normalised, their top-k are probabilities sorted largest first and their counts
    come from the sort.
    """
    layers = len(partials)
    n, kv_heads, group, _ = partials[0].out.shape
    entropy = torch.stack([p.entropy_sum for p in partials]).neg_()
    output = torch.stack([p.out for p in partials])
    cum_top = _pad([p.top for p in partials], 0.0).cumsum(-1)
    top_masses = cum_top[..., [min(k, cum_top.shape[-1]) - 1 for k in spec.top_k]]
    counts = [p.keys_needed for p in partials if p.keys_needed is not None]
    keys_needed = torch.stack(counts).to(torch.float32).add_(1.0)
    keep_logits = _pad([p.keep_logits for p in partials], -math.inf)
    sink_mass, recent_mass, eviction = _keep_set(
        partials, keep_logits, torch.exp(keep_logits), output, None
    )
    visible = torch.stack([p.visible for p in partials])
    # a row whose logits are not finite has a NaN entropy
    bad = (visible == 0).reshape(layers, n, 1, 1, 1).logical_or(~torch.isfinite(entropy))
    parts = [entropy, sink_mass, recent_mass, top_masses, keys_needed, eviction]
    return _stat_table(parts, bad, kv_heads * group), visible


def _keep_set(
    partials: list[LayerPartial],
    keep_logits: torch.Tensor,
    keep: torch.Tensor,
    output: torch.Tensor,
    atom_logit: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the sink mass, the recent mass and the eviction error, each (layers, n, kv, group, 1).

    keep_logits: the stacked keep-set logits (-inf where masked); keep: their probabilities;
    output: the attention output; atom_logit: the learned sink's logit on the keep-set's scale
    (it is never evicted), or None.
    """
    layers = len(partials)
    n = output.shape[1]
    first = partials[0].keep_is_sink
    if all(p.keep_is_sink is first for p in partials):  # one keep-set for all layers
        is_sink = first.reshape(1, n, 1, -1, 1)
    else:
        is_sink = _pad([p.keep_is_sink for p in partials], False).reshape(layers, n, 1, -1, 1)
    sink_mass = torch.matmul(keep, is_sink.to(keep.dtype))
    recent_mass = keep.sum(-1, keepdim=True).sub_(sink_mass)
    # Renormalise over the kept keys (and the learned sink atom), scaled by the keep-set's own
    # largest weight: exact even when all of it lies far below the maximum.
    keep_high = keep_logits.amax(-1, keepdim=True).nan_to_num_(neginf=0.0)
    relative = torch.exp(keep_logits - keep_high)
    kept = torch.matmul(relative, _pad([p.keep_values for p in partials], 0.0, dim=-2))
    kept_weight = relative.sum(-1, keepdim=True)
    if atom_logit is not None:
        kept_weight += torch.exp(atom_logit - keep_high)
    kept = kept / kept_weight
    eviction = torch.linalg.vector_norm(output - kept, dim=-1, keepdim=True)
    eviction = eviction / torch.linalg.vector_norm(output, dim=-1, keepdim=True)
    return sink_mass, recent_mass, eviction


def _stat_table(parts: list[torch.Tensor], bad: torch.Tensor, heads: int) -> torch.Tensor:
    """Return (layers, n, heads, stats) from the parts in `core_stat_names` order, NaN where bad.

    parts: entropy, sink, recent, top-k masses, keys_for_90pct, eviction error, each (layers,
    n, kv_heads, group, width).
    """
    stacked = torch.cat(parts, dim=-1).masked_fill_(bad, math.nan)
    return stacked.reshape(stacked.shape[0], stacked.shape[1], heads, -1)


def _top_logits(partials: list[LayerPartial]) -> torch.Tensor:
    """Return (layers, n, kv_heads, group, widest k) top-k logits, padded with -inf.

    The top-k of a `counted_by_sort` partial holds probabilities: their logarithm (plus its
    `high`, 0) is taken here.
    """
    return _pad(
        [torch.log(p.top).add_(p.high) if p.counted_by_sort else p.top for p in partials], -math.inf
    )


def _counted(keys_needed: torch.Tensor, from_sort: bool) -> torch.Tensor:
    """A partial's count of keys reaching the target (`_sorted_counts` leaves out the last one)."""
    return keys_needed + 1 if from_sort else keys_needed


def _finish_host(
    partials: list[LayerPartial], spec: StatsSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """`finish_stacked` in numpy, step for step, for partials in CPU memory.

    These arrays hold a few hundred values; numpy's per-operation cost is a fraction of torch's,
    which made this the largest fixed cost of a measured pass on the CPU (0.65 ms of 4 layers).
    """
    layers = len(partials)
    n, kv_heads, group, _ = partials[0].out.shape

    # torch.stack then one view: several times cheaper than np.stack of small arrays.
    def stacked(name: str) -> np.ndarray:
        return host_view(torch.stack([getattr(p, name) for p in partials]))

    high, total = stacked("high"), stacked("total")
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_total = np.log(total)
        lse = high + log_total
        entropy = log_total - stacked("entropy_sum") / total
        output = host_view(
            torch.stack([p.out if p.out_is_output else p.out / p.total for p in partials])
        )
        top = host_view(_top_logits(partials))
        cum_top = np.exp(-np.sort(-top, axis=-1) - lse).cumsum(-1)
        top_masses = cum_top[..., [min(k, top.shape[-1]) - 1 for k in spec.top_k]]
        atoms = None
        if any(p.atom is not None for p in partials):
            atoms = np.stack(
                [
                    np.zeros_like(host_view(p.total)) if p.atom is None else host_view(p.atom)
                    for p in partials
                ]
            )
        goal = np.float32(spec.mass_target * (1 - _MASS_SLACK))
        target = goal if atoms is None else (1 - atoms / total) * goal
        # Rows solved by the top-k need at most its width (guards a last-ulp disagreement).
        keys_needed = (cum_top < target).sum(-1, keepdims=True, dtype=np.float32)
        keys_needed = np.minimum(keys_needed, top.shape[-1] - 1) + 1
        if any(p.keys_needed is not None for p in partials):
            refined = np.stack(
                [
                    keys_needed[i]
                    if p.keys_needed is None
                    else host_view(_counted(p.keys_needed, p.counted_by_sort))
                    for i, p in enumerate(partials)
                ]
            )
            if all(p.solved is None for p in partials):
                keys_needed = refined.astype(np.float32)
            else:
                solved = [
                    np.zeros(p.total.shape, bool) if p.solved is None else host_view(p.solved)
                    for p in partials
                ]
                keys_needed = np.where(np.stack(solved), keys_needed, refined)
        keep_logits = host_view(_pad([p.keep_logits for p in partials], -math.inf))
        keep = np.exp(keep_logits - high - log_total)
        first = partials[0].keep_is_sink
        if all(p.keep_is_sink is first for p in partials):  # one keep-set for all layers
            is_sink = host_view(first).reshape(1, n, 1, -1, 1)
        else:
            sinks = _pad([p.keep_is_sink for p in partials], False)
            is_sink = host_view(sinks).reshape(layers, n, 1, -1, 1)
        sink_mass = np.matmul(keep, is_sink.astype(keep.dtype))
        kept_mass = keep.sum(-1, keepdims=True)
        keep_high = keep_logits.max(-1, keepdims=True)
        keep_high[keep_high == -np.inf] = 0.0  # nothing kept visible (np.nan_to_num is slower)
        relative = np.exp(keep_logits - keep_high)
        values = host_view(_pad([p.keep_values for p in partials], 0.0, dim=-2))
        kept = np.matmul(relative, values)
        kept_weight = relative.sum(-1, keepdims=True)
        if atoms is not None:
            kept_weight = kept_weight + np.exp(np.log(atoms) + high - keep_high)
        kept = kept / kept_weight
        eviction = np.linalg.norm(output - kept, axis=-1, keepdims=True)
        eviction = eviction / np.linalg.norm(output, axis=-1, keepdims=True)
    visible = stacked("visible")
    bad = (visible == 0).reshape(layers, n, 1, 1, 1) | ~np.isfinite(lse)
    parts = [entropy, sink_mass, kept_mass - sink_mass, top_masses, keys_needed, eviction]
    result = np.concatenate(parts, axis=-1).astype(np.float32)
    np.copyto(result, np.float32(np.nan), where=bad)
    stats = torch.from_numpy(result.reshape(layers, n, kv_heads * group, -1))
    return stats, torch.from_numpy(visible)


def _keep_logits(rows: RowInputs, logits_of: _Logits) -> torch.Tensor:
    """Return (n, kv_heads, group, J) keep-set logits, -inf where masked (S + R keys)."""
    index = rows.keep_index
    n = index.shape[0]
    batch = rows.batch_index[:, None].expand_as(index)
    keys = rows.key[batch, :, index].transpose(1, 2).float()  # (n, kv_heads, J, d)
    logits = torch.matmul(logits_of.query, keys.transpose(-1, -2))
    if logits_of.softcap is not None:
        logits = torch.tanh(logits.div_(logits_of.softcap)).mul_(logits_of.softcap)
    bias = torch.gather(rows.bias.float(), 1, index).masked_fill_(~rows.keep_valid, -math.inf)
    return logits.add_(bias.reshape(n, 1, 1, -1))
