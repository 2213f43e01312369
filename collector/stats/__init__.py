"""Exact per-head attention statistics of a few query rows, recomputed from query, keys and values.

Usage:
    rows = RowInputs(query=q, key=k, value=v, batch_index=b, bias=bias, keep_index=ki, keep_is_sink=ks, keep_valid=kv)
    stats = row_statistics(rows, scaling=0.125, spec=StatsSpec())  # {"entropy_nats": (n, heads), ...}

No I/O. On a GPU everything stays in torch on the device; host syncs happen on measured rows
only. On the CPU the selections, sorts and `finish` run in numpy (`collector.topk.on_host`): on
arrays of a few thousand values its per-operation cost is a fraction of torch's. Both paths are
tested against the same float64 reference.

The package, in reading order:
- `inputs`: what a layer's statistics are computed from (`RowInputs`) and what a layer leaves
  (`LayerPartial`), with the constants every path shares;
- `products`: the two products over every key, q.k (`Logits`) and p.V;
- `keepset`: the sink+recent keep-set and the largest middle keys;
- `layer`: `layer_pass`, the general path (below);
- `batch`: `PassBatch`, the base of the two batches below, in which a pass's layers queue work
  that one flush does later (a failed flush fails the pass: its layers' tensors stay unfilled);
- `device`: `device_pass`, taken on a device by a layer whose keys fit one chunk (up to 147K keys
  by default) and that has no learned sink logits. A serving process launches the kernels one by
  one from Python, so their number is the cost: a layer launches its q.k (16-bit keys multiplied
  as they are into float32), the float32 copy of its values, its p.V (split over blocks of keys)
  and its keep-set's values, 4 kernels and no host sync; the scaling, the log-softmax, the
  entropy, the keep-set's logits, the sort that gives the top-k and `keys_for_90pct` and the sum
  of p.V's blocks run once for several layers (`DeviceBatch`, about
  `StatsSpec.device_batch_bytes` of their logits);
- `host`: `HostSelection`, where the CPU's one-chunk layers of a pass wait to have their top-k
  and `keys_for_90pct` selected together;
- `finish`: everything that needs no key, for all layers of a pass at once.

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
- on the CPU, a layer of one chunk leaves its top-k and `keys_for_90pct` to
  `collector.stats.host.HostSelection`, which selects those of the one-chunk layers of a pass at once
  (numpy's per-call cost, not the arithmetic, is most of a selection at a few thousand keys);
- `finish` does everything that needs no key for all layers of the pass at once (one set of small
  ops per pass instead of per layer);
- optionally (`StatsSpec.middle_keys`), the indices of the largest middle keys: one more top-k
  per chunk, merged across chunks.
"""

from __future__ import annotations

from collector.stats.finish import finish, finish_stacked, has_learned_sinks
from collector.stats.inputs import LayerPartial, RowInputs, StatsSpec
from collector.stats.layer import chunk_bounds, layer_pass, row_statistics

__all__ = [
    "LayerPartial",
    "RowInputs",
    "StatsSpec",
    "chunk_bounds",
    "finish",
    "finish_stacked",
    "has_learned_sinks",
    "layer_pass",
    "row_statistics",
]
