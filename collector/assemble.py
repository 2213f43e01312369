"""Turn the per-layer results of a measured pass into wire messages (one per measured row).

Usage:
    messages = assemble(plan, identity, layout)

Pure: numpy arrays in, HeadStatsMessage out. The only copy of a measured pass's statistics to
the host happens here, once, after the last layer (one host sync on a GPU).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from collector import codec
from collector.plan import PassPlan, RowPlan, key_offset
from collector.schema import HeadStatsMessage, MessageHeader, core_stat_names
from collector.stats import has_learned_sinks

_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "_attn_implementation",
        "_commit_hash",
        "dtype",
        "torch_dtype",
    }
)


@dataclass(frozen=True)
class Identity:
    """Who measured what: model identity and server identity, fixed at attach time."""

    model_name: str
    model_revision: str
    config_hash: str
    server_id: str


@dataclass(frozen=True)
class Layout:
    """Message layout fixed at attach time."""

    num_layers: int
    sink_tokens: int
    recent_tokens: int
    top_k: tuple[int, ...]
    sample_rate: float
    middle_keys: int = 0  # positions of the largest middle keys per head; 0: none


def config_hash(config: Mapping[str, Any]) -> str:
    """Return a stable 16-hex hash of a model config dict (load-time fields excluded)."""
    stable = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    text = json.dumps(stable, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def assemble(plan: PassPlan, identity: Identity, layout: Layout) -> list[HeadStatsMessage]:
    """Return one message per measured row of the pass; layers without results are NaN."""
    # The pass's statistics carry a learned sink mass when any layer has learned sink logits
    # (`collector.stats.finish`).
    names = core_stat_names(layout.top_k, has_learned_sinks(list(plan.partials.values())))
    if plan.stacked is not None:
        finished, values, visible_all = plan.stacked
        keep = [j for j, layer in enumerate(finished) if layer < layout.num_layers]
        layers = [finished[j] for j in keep]
        # One host sync for all statistics, layers and rows, (layers, n, heads, stats): the
        # visible keys' copy is queued first, so it is done when the statistics' copy returns.
        visible_copy = visible_all.to("cpu", non_blocking=True)
        host = values.cpu().numpy().astype(np.float64)
        visible_host = visible_copy.numpy()
        if len(keep) < len(finished):
            host, visible_host = host[keep], visible_host[keep]
        heads = values.shape[2]
        count = len(finished)
    elif plan.results:
        layers = [layer for layer in sorted(plan.results) if layer < layout.num_layers]
        per_layer = [
            torch.stack([plan.results[layer][name].float() for name in names], -1)
            for layer in layers
        ]
        host = torch.stack(per_layer).double().cpu().numpy() if layers else np.zeros((0, 0, 0, 0))
        visible_host = (
            torch.stack([plan.results[layer]["visible_keys"] for layer in layers]).cpu().numpy()
            if layers
            else np.zeros((0, len(plan.rows)), dtype=np.int64)
        )
        heads = host.shape[2] if layers else next(iter(plan.results.values()))[names[0]].shape[-1]
        count = len(plan.results)
    else:
        return []
    skipped = count < layout.num_layers
    masses = codec.mass_rows(names)
    middle = _middle_indices(plan, layout, heads) if layout.middle_keys else None
    messages = []
    now = time.time()
    for i, row in enumerate(plan.rows):
        table = np.full((len(names), layout.num_layers, heads), np.nan)
        table[:, layers] = host[:, i].transpose(2, 0, 1)
        visible = [0] * layout.num_layers
        for j, layer in enumerate(layers):
            visible[layer] = int(visible_host[j, i])
        flags: list[str] = []
        measured = np.array([v > 0 for v in visible])
        if any(visible[layer] == 0 for layer in layers):
            flags.append("fully_masked")
        finite = np.isfinite(table).all(axis=(0, 2)) | ~measured
        if not finite.all():
            flags.append("non_finite")
        if skipped:
            flags.append("layers_skipped")
        positions = None
        if middle is not None:
            positions = _middle_positions(
                middle, i, row, layout.num_layers, np.isfinite(table).all(0)
            )
        header = MessageHeader(
            message_id=uuid.uuid4().hex,
            model_name=identity.model_name,
            model_revision=identity.model_revision,
            config_hash=identity.config_hash,
            server_id=identity.server_id,
            timestamp_seconds=now,
            phase=plan.phase,
            context_tokens=row.query_position + 1,
            query_position=row.query_position,
            sink_tokens=layout.sink_tokens,
            recent_tokens=layout.recent_tokens,
            num_layers=layout.num_layers,
            num_query_heads=heads,
            num_kv_heads=plan.layout["kv_heads"],
            head_dim=plan.layout["head_dim"],
            kv_dtype_bytes=plan.layout["kv_dtype_bytes"],
            sample_rate=layout.sample_rate,
            top_k=layout.top_k,
            visible_keys=tuple(visible),
            flags=tuple(flags),  # type: ignore[arg-type]
            stat_names=names,
            top_middle_positions=positions,
        )
        # Clip float noise at the domain edges (a mass of 1 + 1e-7, an entropy of -1e-8).
        np.maximum(table, 0.0, out=table)
        table[masses] = np.minimum(table[masses], 1.0)
        messages.append(HeadStatsMessage.from_table(header, table))
    return messages


def _middle_indices(
    plan: PassPlan, layout: Layout, heads: int
) -> dict[int, tuple[int, np.ndarray]]:
    """Return layer -> (slot of key 0, (rows, heads, m) key indices) of the largest middle keys."""
    found = {}
    for layer, partial in plan.partials.items():
        if partial.middle_index is None or layer >= layout.num_layers:
            continue
        index = partial.middle_index.reshape(len(plan.rows), heads, -1).cpu().numpy()
        found[layer] = (key_offset(plan.total_slots, plan.key_counts[layer]), index)
    return found


def _middle_positions(
    middle: dict[int, tuple[int, np.ndarray]],
    i: int,
    row: RowPlan,
    num_layers: int,
    valid: np.ndarray,
) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Return per layer, per head, the absolute positions of row `i`'s largest middle keys.

    () where a layer was not measured or a head's statistics are not finite (`valid`: layers x heads).
    """
    heads = valid.shape[1]
    layers: list[tuple[tuple[int, ...], ...]] = []
    for layer in range(num_layers):
        if layer not in middle:
            layers.append(((),) * heads)
            continue
        offset, index = middle[layer]
        per_head = []
        for head in range(heads):
            keys = index[i, head]
            slots = keys[keys >= 0] + offset
            positions = row.positions[slots] if valid[layer, head] else slots[:0]
            per_head.append(tuple(int(p) for p in positions if p >= 0))
        layers.append(tuple(per_head))
    return tuple(layers)
