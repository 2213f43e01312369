"""The CPU (numpy) and device (torch) selection paths give the same statistics, both exact.

On the CPU, `collector.topk` selects and sorts with numpy; on a GPU it stays in torch. These tests
run the hard cases of `test_stats_layers` through both paths on the CPU: the torch path is the
one a GPU runs, so it stays tested on machines without one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

import collector.topk as topk
from collector.stats import StatsSpec, row_statistics
from tests.unit.test_stats_layers import MIXED, assert_matches, direct, make_rows


@pytest.fixture(params=["numpy", "torch"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "torch":
        monkeypatch.setattr(topk, "_on_host", lambda t: False)
    yield request.param


@pytest.mark.parametrize(
    ("keys", "chunk_keys", "scales", "seed"),
    [
        (2600, 300, MIXED, 0),
        (2600, 4096, MIXED, 0),
        (3000, 65536, [1.5, 1.8, 2.0, 2.2, 2.5, 2.8, 3.0, 3.5], 1),
        (20_000, 65536, MIXED, 0),
        (20_000, 7000, MIXED, 2),
    ],
    ids=["chunks", "one-chunk", "just-beyond-top-k", "block-bound", "long-chunks"],
)
def test_each_path_equals_the_direct_computation(
    path: str, keys: int, chunk_keys: int, scales: list[float], seed: int
) -> None:
    rows = make_rows(keys, scales, seed=seed)
    got = row_statistics(rows, 0.25, StatsSpec(chunk_keys=chunk_keys))
    assert_matches(got, direct(rows, 0.25))


def test_the_paths_agree_bit_for_bit_on_key_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = make_rows(5000, [0.1, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 0.0], seed=3)
    spec = StatsSpec(chunk_keys=1500)
    on_host = row_statistics(rows, 0.25, spec)
    monkeypatch.setattr(topk, "_on_host", lambda t: False)
    on_device = row_statistics(rows, 0.25, spec)
    assert torch.equal(on_host["keys_for_90pct"], on_device["keys_for_90pct"])
    for name, value in on_host.items():
        torch.testing.assert_close(value, on_device[name], atol=1e-6, rtol=0, msg=name)


def test_near_ties_are_counted_as_equal_on_each_path(path: str) -> None:
    """40,000 equal logits: one bin holds them all; 90% is 36,000 keys."""
    rows = make_rows(40_000, [0.0] * 4 + [0.3] * 4, rows=1)
    got = row_statistics(rows, 0.25, StatsSpec(chunk_keys=7000))
    assert got["keys_for_90pct"][0, :4].tolist() == [36000.0] * 4


def test_non_finite_and_fully_masked_rows_are_nan_on_each_path(path: str) -> None:
    rows = make_rows(3000, MIXED)
    rows.key[2, 0, 17, 0] = math.nan  # row 0 reads batch entry 2: its KV head 0 is NaN
    rows.bias[1] = -math.inf  # row 1 sees nothing
    got = row_statistics(rows, 0.25, StatsSpec())
    group = len(MIXED) // 2
    assert bool(torch.isnan(got["keys_for_90pct"][0, :group]).all())
    assert bool(torch.isnan(got["entropy_nats"][1]).all())
    # The NaN head leaves its neighbours (the other KV head of the same row) exact.
    want = direct(rows, 0.25)
    assert_matches(
        {k: got[k][:1, group:] for k in want}, {k: v[:1, group:] for k, v in want.items()}
    )
