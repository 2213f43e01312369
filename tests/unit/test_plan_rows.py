"""Row plans: an unpadded row (the fast path) plans as the same row behind left padding does."""

from __future__ import annotations

import numpy as np
import pytest

from collector.plan import plan_rows


@pytest.mark.parametrize(
    ("total", "query_len", "sink", "recent"),
    [(1, 1, 4, 64), (3, 1, 4, 64), (8, 8, 4, 2), (100, 1, 4, 10), (100, 30, 0, 0), (50, 1, 60, 5)],
)
def test_an_unpadded_row_plans_as_the_same_row_behind_padding(
    total: int, query_len: int, sink: int, recent: int
) -> None:
    (plain,) = plan_rows(
        np.ones((1, total), dtype=np.int8), [0], query_len, "prefill", sink, recent
    )
    padded_mask = np.ones((1, total + 3), dtype=np.int8)
    padded_mask[0, :3] = 0  # the general path: three padding slots before the same tokens
    (padded,) = plan_rows(padded_mask, [0], query_len, "prefill", sink, recent)
    assert (plain.query_row, plain.query_position) == (padded.query_row, padded.query_position)
    assert plain.query_slot + 3 == padded.query_slot
    assert plain.positions.tolist() == padded.positions[3:].tolist()
    assert (plain.sink_slots + 3).tolist() == padded.sink_slots.tolist()
    assert (plain.recent_slots + 3).tolist() == padded.recent_slots.tolist()
