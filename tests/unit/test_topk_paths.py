"""The CPU (numpy) and device (torch) paths of the statistics agree with each other.

On the CPU, `collector.topk` selects and sorts, and `collector.stats` finishes the layers, with
numpy; on a GPU everything stays in torch. `test_stats` and `test_stats_layers` check both paths
against a float64 reference (the `stats_path` fixture); here they are compared with each other.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import collector.topk as topk
from collector.stats import StatsSpec, row_statistics
from tests.unit.test_stats_layers import MIXED, assert_matches, direct, make_rows


def test_the_paths_agree_on_key_counts_exactly_and_on_the_rest_to_float32_rounding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = make_rows(5000, [0.1, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 0.0], seed=3)
    spec = StatsSpec(chunk_keys=1500)
    on_host = row_statistics(rows, 0.25, spec)
    monkeypatch.setattr(topk, "on_host", lambda t: False)
    on_device = row_statistics(rows, 0.25, spec)
    assert torch.equal(on_host["keys_for_90pct"], on_device["keys_for_90pct"])
    for name, value in on_host.items():
        torch.testing.assert_close(value, on_device[name], atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.usefixtures("stats_path")
def test_a_nan_key_and_a_fully_masked_row_leave_their_neighbours_exact() -> None:
    rows = make_rows(3000, MIXED)
    rows.key[2, 0, 17, 0] = math.nan  # row 0 reads batch entry 2: its KV head 0 is NaN
    rows.bias[1] = -math.inf  # row 1 sees nothing
    got = row_statistics(rows, 0.25, StatsSpec())
    group = len(MIXED) // 2
    assert bool(torch.isnan(got["keys_for_90pct"][0, :group]).all())
    assert bool(torch.isnan(got["entropy_nats"][1]).all())
    want = direct(rows, 0.25)
    assert_matches(
        {k: got[k][:1, group:] for k in want}, {k: v[:1, group:] for k, v in want.items()}
    )


def _rows_of(kind: str, keys: int, seed: int) -> torch.Tensor:
    """(1, 2, 3, keys) float32 logits: near-uniform, peaked, tied, mostly masked, or with a NaN."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(1, 2, 3, keys, generator=generator)
    if kind == "peaked":
        rows *= 8
    elif kind == "ties":
        rows = rows.round()
    elif kind == "masked":
        rows[..., : keys * 3 // 4] = -1e30
    elif kind == "floor":  # fewer than k keys above the minimum (k = 256): a large tie
        rows[..., : keys - 100] = -87.0
        rows[0, 1, 2] = -87.0  # and one row with every key equal
    elif kind == "nan":
        rows[0, 0, 1, 7] = math.nan
    elif kind == "nan-last":
        rows[0, 1, 0, -1] = math.nan  # the odd one out when a fold halves an odd width
    return rows


KINDS = ["uniform", "peaked", "ties", "masked", "floor", "nan", "nan-last"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("keys", [300, 8192, 20_001, 70_000])
@pytest.mark.parametrize("k", [1, 16, 256])
def test_the_folded_top_k_equals_a_full_partition(kind: str, keys: int, k: int) -> None:
    """On the CPU from 32 k keys on, the top-k comes from a folded bound; below, or where the
    bound lets too many keys through, from numpy's partition, or torch's top-k for rows with
    many keys at their minimum (masked, floor). Same values as numpy's partition of the row."""
    logits = _rows_of(kind, keys, seed=keys + k)
    got = topk.top_values(logits, k).sort(-1).values
    want = torch.from_numpy(np.partition(logits.numpy(), keys - k, axis=-1)[..., keys - k :])
    torch.testing.assert_close(got, want.sort(-1).values, rtol=0, atol=0, equal_nan=True)


@pytest.mark.usefixtures("stats_path")
def test_rows_in_chunks_of_at_least_8192_keys_take_the_folded_top_k() -> None:
    rows = make_rows(20_000, MIXED)
    assert_matches(row_statistics(rows, 0.25, StatsSpec(chunk_keys=9000)), direct(rows, 0.25))
