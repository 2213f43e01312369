"""`finish`: the statistics of every layer of a pass from their partials, small operations done once.

A layer's pass (`collector.stats.layer`, `collector.stats.device`) leaves a few small tensors per
row and head; everything that needs no key is done here for all layers at once: one set of
operations per pass instead of one per layer. On the CPU it runs in numpy (`_finish_host`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from collector import topk
from collector.schema import core_stat_names
from collector.stats.inputs import MASS_SLACK, LayerPartial, StatsSpec, pad_stack, stack
from collector.topk import host_view, sorted_descending


def has_learned_sinks(partials: list[LayerPartial]) -> bool:
    """Whether any layer of a pass has learned sink logits: then every layer reports their mass."""
    return any(p.atom is not None for p in partials)


def finish(partials: list[LayerPartial], spec: StatsSpec) -> list[dict[str, torch.Tensor]]:
    """Return the statistics of each layer's partial, computed for all layers at once.

    All partials come from one measured pass (same rows and heads); top-k widths and keep-set
    sizes may differ between layers and are padded (zero weight), which changes no sum. With
    learned sink logits in any layer, every layer's statistics include `learned_sink_mass`
    (0 in a layer without them).
    """
    learned = has_learned_sinks(partials)
    stacked = finish_stacked(partials, spec, learned)
    if stacked is None:
        return [_finish_alone(p, spec, learned) for p in partials]
    values, visible = stacked
    names = core_stat_names(spec.top_k, learned)
    return [
        {**dict(zip(names, layer.unbind(-1), strict=True)), "visible_keys": visible[i]}
        for i, layer in enumerate(values.unbind(0))
    ]


def _finish_alone(partial: LayerPartial, spec: StatsSpec, learned: bool) -> dict[str, torch.Tensor]:
    """`finish` of one layer, with a learned sink mass where its pass has one (`learned`)."""
    stacked = finish_stacked([partial], spec, learned)
    if stacked is None:  # one layer always has one shape
        raise RuntimeError("finish_stacked refused a single layer")
    values, visible = stacked
    names = core_stat_names(spec.top_k, learned)
    return {**dict(zip(names, values[0].unbind(-1), strict=True)), "visible_keys": visible[0]}


def finish_stacked(
    partials: list[LayerPartial], spec: StatsSpec, learned_sinks: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Return (layers, n, heads, stats) float32 in `core_stat_names` order and visible keys (layers, n).

    The statistics include `learned_sink_mass` when `learned_sinks` is true (None: when any of
    these layers has learned sink logits, `has_learned_sinks`). None when the layers differ in
    rows, heads or head size (then `finish` takes them one by one).
    """
    learned = has_learned_sinks(partials) if learned_sinks is None else learned_sinks
    for partial in partials:  # fill the top-k and counts of batched layers
        if partial.batch is not None:
            partial.batch.flush()
    if len({(p.out.shape, p.keep_values.shape[-1]) for p in partials}) > 1:
        return None
    if topk.on_host(partials[0].out):
        return _finish_host(partials, spec, learned)
    if all(p.counted_by_sort for p in partials):
        return _finish_sorted(partials, spec, learned)
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
    top_masses = _top_masses(cum_top, spec.top_k)
    atoms = None
    if any(p.atom is not None for p in partials):
        atoms = torch.stack(
            [torch.zeros_like(p.total) if p.atom is None else p.atom for p in partials]
        )
    goal = spec.mass_target * (1 - MASS_SLACK)
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
        # (a pass of `device_pass` layers only, which have no `solved`, takes `_finish_sorted`)
        solved = [
            torch.zeros_like(p.total, dtype=torch.bool) if p.solved is None else p.solved
            for p in partials
        ]
        keys_needed = torch.where(torch.stack(solved), keys_needed, refined)
    keep_logits = pad_stack([p.keep_logits for p in partials], -math.inf)
    keep = torch.exp((keep_logits - high).sub_(log_total))
    # The learned sink atom is never evicted: it joins the kept keys' weight.
    atom_logit = None if atoms is None else torch.log(atoms) + high
    sink_mass, recent_mass, eviction = _keep_set(partials, keep_logits, keep, output, atom_logit)
    visible = torch.stack([p.visible for p in partials])
    bad = (visible == 0).reshape(layers, n, 1, 1, 1).logical_or(~torch.isfinite(lse))
    if any(p.counted_by_sort for p in partials):
        # `device_pass` rows (in a pass with other rows) have a maximum of 0 and a total of 1: a
        # NaN shows in their entropy.
        bad.logical_or_(~torch.isfinite(entropy))
    parts = [entropy, sink_mass, recent_mass, top_masses, keys_needed, eviction]
    if learned:
        parts.insert(3, torch.zeros_like(total) if atoms is None else atoms / total)
    return _stat_table(parts, bad, kv_heads * group), visible


def _finish_sorted(
    partials: list[LayerPartial], spec: StatsSpec, learned: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """`finish_stacked` of `device_pass` partials only, about 20 operations fewer.

    Their maximum is 0 and their total 1 (everything is relative to the log-sum-exp), their
    output is normalised, their top-k are probabilities sorted largest first and their counts
    come from the sort. They have no learned sink logits (a learned sink mass of 0 where
    `learned` asks for one).
    """
    layers = len(partials)
    n, kv_heads, group, _ = partials[0].out.shape
    entropy = stack([p.entropy_sum for p in partials]).neg()
    output = stack([p.out for p in partials])
    cum_top = pad_stack([p.top for p in partials], 0.0).cumsum(-1)
    top_masses = _top_masses(cum_top, spec.top_k)
    counts = [p.keys_needed for p in partials if p.keys_needed is not None]
    keys_needed = stack(counts).to(torch.float32).add_(1.0)
    keep_logits = pad_stack([p.keep_logits for p in partials], -math.inf)
    sink_mass, recent_mass, eviction = _keep_set(
        partials, keep_logits, torch.exp(keep_logits), output, None
    )
    visible = torch.stack([p.visible for p in partials])
    # a row whose logits are not finite has a NaN entropy
    bad = (visible == 0).reshape(layers, n, 1, 1, 1).logical_or(~torch.isfinite(entropy))
    parts = [entropy, sink_mass, recent_mass, top_masses, keys_needed, eviction]
    if learned:
        parts.insert(3, torch.zeros_like(sink_mass))
    return _stat_table(parts, bad, kv_heads * group), visible


def _top_masses(cum_top: torch.Tensor, top_k: tuple[int, ...]) -> torch.Tensor:
    """Return (..., len(top_k)) the running sums at k (or at the widest top-k kept, if fewer).

    Selected one by one and stacked: indexing with a list of positions would first copy the list
    to the device, a host sync on a GPU.
    """
    width = cum_top.shape[-1]
    return torch.stack([cum_top[..., min(k, width) - 1] for k in top_k], -1)


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
        is_sink = pad_stack([p.keep_is_sink for p in partials], False).reshape(layers, n, 1, -1, 1)
    sink_mass = torch.matmul(keep, is_sink.to(keep.dtype))
    recent_mass = keep.sum(-1, keepdim=True).sub_(sink_mass)
    # Renormalise over the kept keys (and the learned sink atom), scaled by the keep-set's own
    # largest weight: exact even when all of it lies far below the maximum.
    keep_high = keep_logits.amax(-1, keepdim=True).nan_to_num_(neginf=0.0)
    relative = torch.exp(keep_logits - keep_high)
    kept = torch.matmul(relative, pad_stack([p.keep_values for p in partials], 0.0, dim=-2))
    kept_weight = relative.sum(-1, keepdim=True)
    if atom_logit is not None:
        kept_weight += torch.exp(atom_logit - keep_high)
    # Nothing kept (S = R = 0, or a sliding window past the sink tokens and R = 0): o' = 0 and
    # the error is 1, not 0 / 0. A kept key weighs at least 1 here (the largest is exp(0)).
    kept = kept / kept_weight.clamp_(min=torch.finfo(kept_weight.dtype).tiny)
    eviction = torch.linalg.vector_norm(output - kept, dim=-1, keepdim=True)
    eviction = eviction / torch.linalg.vector_norm(output, dim=-1, keepdim=True)
    return sink_mass, recent_mass, eviction


def _stat_table(parts: list[torch.Tensor], bad: torch.Tensor, heads: int) -> torch.Tensor:
    """Return (layers, n, heads, stats) from the parts in `core_stat_names` order, NaN where bad.

    parts: entropy, sink, recent, (learned sink,) top-k masses, keys_for_90pct, eviction error,
    each (layers, n, kv_heads, group, width).
    """
    stacked = torch.cat(parts, dim=-1).masked_fill_(bad, math.nan)
    return stacked.reshape(stacked.shape[0], stacked.shape[1], heads, -1)


def _top_logits(partials: list[LayerPartial]) -> torch.Tensor:
    """Return (layers, n, kv_heads, group, widest k) top-k logits, padded with -inf.

    The top-k of a `counted_by_sort` partial holds probabilities: their logarithm (plus its
    `high`, 0) is taken here.
    """
    return pad_stack(
        [torch.log(p.top).add_(p.high) if p.counted_by_sort else p.top for p in partials], -math.inf
    )


def _counted(keys_needed: torch.Tensor, from_sort: bool) -> torch.Tensor:
    """A partial's count of keys reaching the target (`sorted_counts` leaves out the last one)."""
    return keys_needed + 1 if from_sort else keys_needed


def _finish_host(
    partials: list[LayerPartial], spec: StatsSpec, learned: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """`finish_stacked` in numpy, step for step, for partials in CPU memory.

    Those come from the general path of `layer_pass` (`device_pass` runs off the CPU only).

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
        top = host_view(pad_stack([p.top for p in partials], -math.inf))
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
        goal = np.float32(spec.mass_target * (1 - MASS_SLACK))
        target = goal if atoms is None else (1 - atoms / total) * goal
        # Rows solved by the top-k need at most its width (guards a last-ulp disagreement).
        keys_needed = (cum_top < target).sum(-1, keepdims=True, dtype=np.float32)
        keys_needed = np.minimum(keys_needed, top.shape[-1] - 1) + 1
        if any(p.keys_needed is not None for p in partials):
            refined = np.stack(
                [
                    keys_needed[i] if p.keys_needed is None else host_view(p.keys_needed)
                    for i, p in enumerate(partials)
                ]
            )
            keys_needed = np.where(stacked("solved"), keys_needed, refined)
        keep_logits = host_view(pad_stack([p.keep_logits for p in partials], -math.inf))
        keep = np.exp(keep_logits - high - log_total)
        first = partials[0].keep_is_sink
        if all(p.keep_is_sink is first for p in partials):  # one keep-set for all layers
            is_sink = host_view(first).reshape(1, n, 1, -1, 1)
        else:
            sinks = pad_stack([p.keep_is_sink for p in partials], False)
            is_sink = host_view(sinks).reshape(layers, n, 1, -1, 1)
        sink_mass = np.matmul(keep, is_sink.astype(keep.dtype))
        kept_mass = keep.sum(-1, keepdims=True)
        keep_high = keep_logits.max(-1, keepdims=True)
        keep_high[keep_high == -np.inf] = 0.0  # nothing kept visible (np.nan_to_num is slower)
        relative = np.exp(keep_logits - keep_high)
        values = host_view(pad_stack([p.keep_values for p in partials], 0.0, dim=-2))
        kept = np.matmul(relative, values)
        kept_weight = relative.sum(-1, keepdims=True)
        if atoms is not None:
            kept_weight = kept_weight + np.exp(np.log(atoms) + high - keep_high)
        # Nothing kept: o' = 0 and the error is 1 (see `_keep_set`).
        kept = kept / np.maximum(kept_weight, np.finfo(kept_weight.dtype).tiny)
        eviction = np.linalg.norm(output - kept, axis=-1, keepdims=True)
        eviction = eviction / np.linalg.norm(output, axis=-1, keepdims=True)
    visible = stacked("visible")
    bad = (visible == 0).reshape(layers, n, 1, 1, 1) | ~np.isfinite(lse)
    parts = [entropy, sink_mass, kept_mass - sink_mass, top_masses, keys_needed, eviction]
    if learned:
        parts.insert(3, np.zeros_like(total) if atoms is None else atoms / total)
    result = np.concatenate(parts, axis=-1).astype(np.float32)
    np.copyto(result, np.float32(np.nan), where=bad)
    stats = torch.from_numpy(result.reshape(layers, n, kv_heads * group, -1))
    return stats, torch.from_numpy(visible)
