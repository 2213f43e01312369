"""An empty keep-set (S = R = 0, or R = 0 where a sliding window has passed the sink tokens):
o' = 0, so the eviction error is 1, and the head's other statistics stay valid."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from collector import MemorySink, attach
from collector.stats import RowInputs, StatsSpec, row_statistics
from tests.unit.test_hook_matrix import build, inputs
from tests.unit.test_stats_layers import MIXED, assert_matches, direct, make_rows

KEYS = 2600
WINDOW = 16


def nothing_kept(rows: RowInputs) -> RowInputs:
    """S = R = 0: the keep-set is one padding entry per row."""
    n = rows.query.shape[0]
    none = torch.zeros(n, 1, dtype=torch.bool)
    return dataclasses.replace(
        rows, keep_index=torch.zeros(n, 1, dtype=torch.long), keep_is_sink=none, keep_valid=none
    )


def window_past_the_sinks(rows: RowInputs) -> RowInputs:
    """R = 0 on a sliding-window layer: the sink tokens are kept but outside the window."""
    n = rows.query.shape[0]
    bias = rows.bias.clone()
    bias[:, : KEYS - WINDOW] = -math.inf
    sinks = torch.arange(4)[None].expand(n, 4).clone()
    sinks[1:] += KEYS // 3  # the second row's first visible tokens, as in make_rows
    return dataclasses.replace(
        rows, bias=bias, keep_index=sinks, keep_is_sink=torch.ones(n, 4, dtype=torch.bool),
        keep_valid=torch.ones(n, 4, dtype=torch.bool), keep_all_valid=True,
    )  # fmt: skip


@pytest.mark.usefixtures("stats_path")
@pytest.mark.parametrize("chunk_keys", [1000, 4096], ids=["chunks", "one"])
@pytest.mark.parametrize("empty", [nothing_kept, window_past_the_sinks])
def test_an_empty_keep_set_has_an_eviction_error_of_one(
    chunk_keys: int, empty: Callable[[RowInputs], RowInputs]
) -> None:
    rows = empty(make_rows(KEYS, MIXED))
    got = row_statistics(rows, 0.25, StatsSpec(chunk_keys=chunk_keys))
    want = direct(rows, 0.25)  # its keep-set statistics ignore `keep_valid` and the bias
    want["sink_mass"] = want["recent_mass"] = torch.zeros_like(want["sink_mass"])
    want["eviction_error"] = torch.ones_like(want["eviction_error"])  # ||o - 0|| / ||o||
    assert_matches(got, want)


@pytest.mark.parametrize(
    ("name", "sink_tokens", "recent_tokens"),
    [("llama", 0, 0), ("mistral", 4, 0)],  # mistral: a 16-token window, 40 tokens
)
def test_heads_with_nothing_kept_are_measured(
    name: str, sink_tokens: int, recent_tokens: int
) -> None:
    ids, _ = inputs((40,))
    sink = MemorySink()
    with torch.no_grad(), attach(
        build(name, "sdpa"), sink=sink, sample_rate=1.0, min_context_tokens=0,
        sink_tokens=sink_tokens, recent_tokens=recent_tokens,
    ) as handle:  # fmt: skip
        handle.model(ids)
    assert handle.errors == 0
    (message,) = sink.messages
    assert message.flags == ()
    assert message.valid.all()
    np.testing.assert_allclose(message.stat("eviction_error"), 1.0, atol=1e-4)
    np.testing.assert_allclose(message.stat("middle_mass"), 1.0, atol=1e-5)
