"""Exact per-head attention statistics of a few query rows, recomputed from query, keys and values.

Usage:
    rows = RowInputs(query=q, key=k, value=v, batch_index=b, bias=bias, keep_index=ki, keep_is_sink=ks, keep_valid=kv)
    stats = row_statistics(rows, scaling=0.125, spec=StatsSpec())  # {"entropy_nats": (n, heads), ...}

Pure torch, no I/O. Everything stays on the tensors' device; nothing here synchronises with the host.

Cost and memory (K visible keys, n rows, h query heads, d head dim, C = `chunk_keys`):
- pass 1 reads every key and value once (q.k logits, a running log-sum-exp, the entropy sum,
  p.V and a running top-k merge); extra memory O(n x h x C);
- the sink+recent keep-set is gathered by index (S + R keys), so its mass and the value-aware
  eviction error cost O(S + R);
- `keys_for_90pct` is read from the sorted top-k when the largest top-k already holds 90% of the
  mass (peaked heads: no extra cost); otherwise two more passes over the logits: a 4096-bin
  histogram of mass and count, then an exact sort of the keys in the bin where the cumulative
  mass crosses 90% (a masked top-k of that bin's size). When one chunk covers the row the logits
  of pass 1 are reused; otherwise the passes recompute q.k (reading the keys again, not the values).
GQA: the query heads are reshaped into (kv_heads, group), never `repeat_kv` copies of the cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from collector.schema import DEFAULT_TOP_K, top_k_stat

_BINS = 4096
_RANGE = 88.0  # exp(-88) is below float32's smallest normal: such keys have probability 0
_MAX_SORTED = 16384
# Float32 probabilities carry ~1e-7 relative error each: a cumulative mass within this fraction of
# the target counts as reaching it, so exact ties (e.g. 900 of 1000 equal keys) count exactly.
_MASS_SLACK = 1e-6


@dataclass(frozen=True)
class StatsSpec:
    """What to compute: the top-k set, the mass target of `keys_for_90pct`, chunking of keys."""

    top_k: tuple[int, ...] = DEFAULT_TOP_K
    mass_target: float = 0.9
    chunk_keys: int = 65536


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


def _logits(
    rows: RowInputs, start: int, stop: int, scaling: float, softcap: float | None
) -> torch.Tensor:
    """Return (n, kv_heads, group, stop - start) float32 logits as the kernel computes them."""
    key = _gather_keys(rows.key, rows.batch_index, start, stop)
    logits = torch.matmul(rows.query.float(), key.float().transpose(-1, -2))
    logits.mul_(scaling)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.add_(rows.bias[:, None, None, start:stop])


def _gather_keys(t: torch.Tensor, batch_index: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Return (n, kv_heads, stop - start, d): a view when all rows read one batch entry."""
    if t.shape[0] == 1:
        return t[:, :, start:stop].expand(batch_index.shape[0], -1, -1, -1)
    return t[batch_index, :, start:stop]


def row_statistics(
    rows: RowInputs, scaling: float, spec: StatsSpec, softcap: float | None = None
) -> dict[str, torch.Tensor]:
    """Return per-(row, query head) statistics as float32 tensors (n, heads), plus `visible_keys` (n,).

    Rows with no visible key, or with non-finite logits, come out as NaN (flagged upstream).
    """
    n, kv_heads, group, _ = rows.query.shape
    total_keys = rows.key.shape[2]
    kmax = min(max(spec.top_k), total_keys)
    device = rows.query.device
    shape = (n, kv_heads, group)
    running_max = torch.full(shape, -math.inf, device=device)
    sum_exp = torch.zeros(shape, device=device)
    sum_xlogx = torch.zeros(shape, device=device)
    out = torch.zeros((*shape, rows.value.shape[-1]), device=device)
    top = torch.full((*shape, 0), -math.inf, device=device)
    last_logits = last_weights = torch.empty(0)
    for start in range(0, total_keys, spec.chunk_keys):
        stop = min(start + spec.chunk_keys, total_keys)
        logits = _logits(rows, start, stop, scaling, softcap)
        new_max = torch.maximum(running_max, logits.amax(-1))
        safe_max = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        # Rescale what was accumulated against the old maximum: e' = e * r, e' log e' = r (e log e - d e).
        seen = torch.isfinite(running_max)
        shift = torch.where(seen, running_max - safe_max, torch.zeros_like(safe_max))
        rescale = torch.where(seen, torch.exp(shift), torch.zeros_like(shift))
        # log of each weight; masked keys (-inf) are clamped so that 0 * log 0 counts as 0.
        log_weights = (logits - safe_max[..., None]).clamp_(min=-1e30)
        weights = torch.exp(log_weights)
        sum_xlogx = rescale * (sum_xlogx + shift * sum_exp) + torch.linalg.vecdot(
            weights, log_weights
        )
        sum_exp = rescale * sum_exp + weights.sum(-1)
        value = _gather_keys(rows.value, rows.batch_index, start, stop).float()
        out = rescale[..., None] * out + torch.matmul(weights, value)
        chunk_top = logits.topk(min(kmax, stop - start), dim=-1).values
        merged = torch.cat([top, chunk_top], dim=-1)
        top = merged.topk(min(kmax, merged.shape[-1]), dim=-1).values
        running_max = new_max
        last_logits, last_weights = logits, weights
    safe_max = torch.where(torch.isfinite(running_max), running_max, torch.zeros_like(running_max))
    total = sum_exp
    xlogx = sum_xlogx
    sink_atom = torch.zeros_like(total)
    if rows.sinks is not None:
        atom = torch.exp(rows.sinks.float().reshape(1, kv_heads, group) - safe_max)
        sink_atom = atom.expand_as(total)
        total = total + sink_atom
        xlogx = xlogx + torch.special.xlogy(sink_atom, sink_atom)
    lse = safe_max + torch.log(total)
    entropy = torch.log(total) - xlogx / total
    output = out / total[..., None]

    probs_top = torch.exp(top - lse[..., None])
    cum_top = probs_top.cumsum(-1)
    result: dict[str, torch.Tensor] = {"entropy_nats": entropy}
    for k in spec.top_k:
        result[top_k_stat(k)] = cum_top[..., min(k, kmax) - 1]

    key_mass = 1.0 - sink_atom / total
    target = spec.mass_target * key_mass
    keys_needed = _keys_for_target(
        rows,
        scaling,
        softcap,
        spec,
        cum_top,
        target,
        lse,
        running_max,
        (last_logits, last_weights, total),
    )
    result["keys_for_90pct"] = keys_needed

    sink_mass, recent_mass, kept_output, kept_mass = _keep_set(rows, scaling, softcap, lse)
    result["sink_mass"] = sink_mass
    result["recent_mass"] = recent_mass
    # Renormalise over the kept keys (and the learned sink atom, which is never evicted).
    kept = kept_output / (kept_mass + sink_atom / total)[..., None]
    result["eviction_error"] = torch.linalg.vector_norm(
        output - kept, dim=-1
    ) / torch.linalg.vector_norm(output, dim=-1)
    visible = torch.isfinite(rows.bias).sum(-1)
    bad = ~torch.isfinite(running_max) | ~torch.isfinite(lse)
    flat: dict[str, torch.Tensor] = {}
    for name, value in result.items():
        value = value.float().masked_fill(bad, math.nan)
        flat[name] = value.reshape(n, kv_heads * group)
    flat["visible_keys"] = visible
    return flat


def _keep_set(
    rows: RowInputs, scaling: float, softcap: float | None, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return sink mass, recent mass, sum p v over the keep-set and its mass, from S + R keys."""
    index = rows.keep_index
    n = index.shape[0]
    batch = rows.batch_index[:, None].expand_as(index)
    keys = rows.key[batch, :, index].permute(0, 2, 1, 3).float()  # (n, kv_heads, J, d)
    values = rows.value[batch, :, index].permute(0, 2, 1, 3).float()
    logits = torch.matmul(rows.query.float(), keys.transpose(-1, -2)) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    bias = torch.gather(rows.bias, 1, index)
    bias = bias.masked_fill(~rows.keep_valid, -math.inf)
    probs = torch.exp(logits + bias[:, None, None, :] - lse[..., None])
    is_sink = rows.keep_is_sink.reshape(n, 1, 1, -1).to(probs.dtype)
    sink = (probs * is_sink).sum(-1)
    mass = probs.sum(-1)
    return sink, mass - sink, torch.matmul(probs, values), mass


def _keys_for_target(
    rows: RowInputs,
    scaling: float,
    softcap: float | None,
    spec: StatsSpec,
    cum_top: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    high: torch.Tensor,
    cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Return the smallest number of keys (largest first) whose mass reaches `target`, as float.

    `cached` holds the logits, unnormalised weights and their total from pass 1 (the whole row when
    one chunk covers it, which saves recomputing them).
    """
    if cum_top.shape[-1] == 0:
        return torch.full_like(target, math.nan)
    reached = cum_top >= (target * (1 - _MASS_SLACK))[..., None]
    from_top = (~reached).sum(-1).float() + 1.0
    solved = reached[..., -1]
    # Peaked heads are answered by the top-k already: no extra pass (a host sync on measured passes only).
    if bool(solved.all()):
        return from_top
    total_keys = rows.key.shape[2]
    one_chunk = total_keys <= spec.chunk_keys

    def chunks() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if one_chunk:
            logits, weights, total = cached
            yield logits, weights / total[..., None]
            return
        for start in range(0, total_keys, spec.chunk_keys):
            logits = _logits(
                rows, start, min(start + spec.chunk_keys, total_keys), scaling, softcap
            )
            yield logits, torch.exp(logits - lse[..., None])

    refined = _select(chunks, target, lse, high, solved)
    return torch.where(solved, from_top, refined)


def _bin_of(logits: torch.Tensor, top: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """Return the bin index of each logit, 0 for the largest, clamped to [0, bins)."""
    raw = (top[..., None] - logits).mul_(1.0 / width[..., None])
    # Non-negative, so truncation is floor; masked keys (inf) and NaN land in the last bin.
    return raw.nan_to_num_(nan=_BINS - 1, posinf=_BINS - 1).clamp_(0, _BINS - 1).long()


def _select(
    chunks: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]],
    target: torch.Tensor,
    lse: torch.Tensor,
    high: torch.Tensor,
    solved: torch.Tensor,
) -> torch.Tensor:
    """Count the largest keys reaching `target`: one histogram pass, then the crossing bin sorted.

    Pass 1: a histogram of mass and count over logits in [max - 88, max] (below that, float32
    probabilities are 0). Pass 2 takes the keys of the bin where the cumulative mass crosses the
    target, sorts them exactly (a masked top-k of the bin's largest count) and counts within it.
    When that bin holds more than `_MAX_SORTED` keys (near-ties), its keys are counted as equal:
    their logits differ by less than the bin width (88 / 4096 nats).
    """
    width = torch.full_like(high, _RANGE / _BINS)
    top = torch.where(torch.isfinite(high), high, torch.zeros_like(high))
    target = target.double()
    mass = torch.zeros((*target.shape, _BINS), device=target.device, dtype=torch.float64)
    count = torch.zeros_like(mass, dtype=torch.float32)  # exact up to 2**24 keys a bin
    one = torch.ones((1,) * mass.dim(), device=mass.device)
    kept_bins: list[torch.Tensor] = []
    for logits, probs in chunks():
        bins = _bin_of(logits, top, width)
        mass.scatter_add_(-1, bins, probs.double())
        # Masked keys (logit -inf) land in the last bin, which never holds the 90% crossing.
        count.scatter_add_(-1, bins, one.expand_as(bins))
        if not kept_bins:
            kept_bins.append(bins)
        else:
            kept_bins.append(torch.empty(0))
    cum_mass = mass.cumsum(-1)
    crossing = (cum_mass < target[..., None]).sum(-1).clamp(max=_BINS - 1)
    before = (crossing - 1).clamp(min=0)[..., None]
    has_before = (crossing > 0).double()
    mass_above = cum_mass.gather(-1, before).squeeze(-1) * has_before
    count_above = count.double().cumsum(-1).gather(-1, before).squeeze(-1) * has_before
    bin_mass = mass.gather(-1, crossing[..., None]).squeeze(-1)
    bin_count = count.double().gather(-1, crossing[..., None]).squeeze(-1)
    widest = int(torch.where(solved, torch.zeros_like(bin_count), bin_count).max())
    if widest > _MAX_SORTED:
        per_key = bin_mass / bin_count.clamp(min=1)
        needed = torch.ceil((target - mass_above) / per_key.clamp(min=1e-300) * (1 - 1e-9))
        return (count_above + needed.clamp(min=1).minimum(bin_count.clamp(min=1))).float()
    inside: torch.Tensor | None = None
    one_pass = len(kept_bins) == 1
    for logits, _ in chunks():
        bins = kept_bins[0] if one_pass else _bin_of(logits, top, width)
        picked = torch.where(bins == crossing[..., None], logits, -math.inf)
        merged = picked if inside is None else torch.cat([inside, picked], dim=-1)
        inside = merged.topk(min(max(widest, 1), merged.shape[-1]), dim=-1).values
    if inside is None:
        return torch.full_like(high, math.nan)
    cum_inside = mass_above[..., None] + torch.exp(inside - lse[..., None]).double().cumsum(-1)
    needed = (cum_inside < (target * (1 - _MASS_SLACK))[..., None]).sum(-1).double() + 1
    return (count_above + needed.minimum(bin_count.clamp(min=1))).float()
