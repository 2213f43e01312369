"""4-D attention masks from the caller: the rows they show as padding are planned as the 2-D mask's
are, so the statistics still equal those of the eager kernel run with the 2-D mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from collector import MemorySink, attach
from tests.unit.test_hook_matrix import RECENT, SINK, build, capture, check, inputs

WINDOW = 16  # Mistral's sliding window in the matrix


def four_d(mask: torch.Tensor, additive: bool, window: int | None = None) -> torch.Tensor:
    """The causal 4-D mask of a 2-D padding mask, (batch, 1, slots, slots): boolean (True:
    visible) or additive (0 / the dtype's minimum), as transformers builds them for sdpa / eager."""
    slots = mask.shape[1]
    query, key = torch.arange(slots)[:, None], torch.arange(slots)[None, :]
    visible = (key <= query) & mask.bool()[:, None, :]
    if window is not None:
        visible &= query - key < window
    visible = visible[:, None]
    if not additive:
        return visible
    return torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as generate() makes them: the index among real tokens, 1 on padding."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def measure(
    name: str, implementation: str, mask_4d: torch.Tensor, ids: torch.Tensor, **kwargs: torch.Tensor
) -> tuple[MemorySink, int]:
    model = build(name, implementation)
    sink = MemorySink()
    with attach(
        model, sink=sink, sample_rate=1.0, min_context_tokens=0, sink_tokens=SINK,
        recent_tokens=RECENT, max_sampled_passes_per_second=1000.0,
    ) as handle, torch.no_grad():  # fmt: skip
        model(input_ids=ids, attention_mask=mask_4d, **kwargs)
    return sink, handle.errors


@pytest.mark.parametrize(
    ("implementation", "additive"), [("sdpa", False), ("eager", True)], ids=["boolean", "additive"]
)
def test_a_4d_padding_mask_from_the_caller_matches_eager_probabilities(
    implementation: str, additive: bool
) -> None:
    ids, mask = inputs((40, 31))
    eager = build("llama", "eager")
    with capture(eager) as calls, torch.no_grad():
        eager(input_ids=ids, attention_mask=mask)
    sink, errors = measure("llama", implementation, four_d(mask, additive), ids)
    assert errors == 0
    assert len(sink.messages) == 2
    for b, message in enumerate(sink.messages):
        check(message, calls, b, mask[b].numpy())


def test_a_sliding_window_mask_is_placed_by_the_callers_position_ids() -> None:
    ids, mask = inputs((40, 31))
    eager = build("mistral", "eager")
    with capture(eager) as calls, torch.no_grad():
        eager(input_ids=ids, attention_mask=mask, position_ids=positions_of(mask))
    sink, errors = measure(
        "mistral", "sdpa", four_d(mask, False, WINDOW), ids, position_ids=positions_of(mask)
    )
    assert errors == 0
    assert [m.query_position for m in sink.messages] == [39, 30]
    for b, message in enumerate(sink.messages):
        check(message, calls, b, mask[b].numpy())


def test_a_sliding_window_mask_without_position_ids_is_refused_not_guessed() -> None:
    ids, mask = inputs((40, 31))
    sink, errors = measure("mistral", "sdpa", four_d(mask, False, WINDOW), ids)
    assert errors == 1  # counted (and logged) as a failed pass decision
    assert sink.messages == []


def test_padding_rows_of_a_window_sized_cache_count_the_tokens_before_it() -> None:
    from collector.masks import padding_rows
    from collector.plan import plan_rows

    # A decode step over a 16-slot window of a 41-slot sequence whose first 9 slots are padding.
    padding = torch.ones(1, 41, dtype=torch.long)
    padding[0, :9] = 0
    window_mask = torch.ones(1, 1, 1, WINDOW, dtype=torch.bool)
    rows, unseen = padding_rows(window_mask, [0], 40, 1, positions_of(padding)[:, -1:])
    (plan,) = plan_rows(rows, [0], 1, "decode", SINK, RECENT, unseen)
    (expected,) = plan_rows(padding.numpy(), [0], 1, "decode", SINK, RECENT)
    assert (plan.query_slot, plan.query_position) == (expected.query_slot, expected.query_position)
    assert plan.recent_slots.tolist() == expected.recent_slots.tolist()
    assert np.array_equal(plan.positions[-WINDOW:], expected.positions[-WINDOW:])


def test_padding_rows_count_past_tokens_a_window_hides_from_a_full_length_mask() -> None:
    """A window (W=4) hides cached slots 0-1 from a 3-token chunk after 3 cached tokens while the
    mask still spans every slot (no offset): they are tokens, not padding (position_ids say so)."""
    from collector.masks import padding_rows
    from collector.plan import plan_rows

    past, chunk, window = 3, 3, 4
    total = past + chunk
    real = torch.ones(1, total, dtype=torch.long)
    full = four_d(real, additive=False, window=window)[:, :, past:, :]  # the chunk's query rows
    rows, unseen = padding_rows(full, [0], past, chunk, positions_of(real)[:, past:])
    (plan,) = plan_rows(rows, [0], chunk, "prefill", 2, 2, unseen)
    (expected,) = plan_rows(real.numpy(), [0], chunk, "prefill", 2, 2)
    assert (plan.query_slot, plan.query_position) == (expected.query_slot, expected.query_position)
    assert plan.sink_slots.tolist() == [] and plan.recent_slots.tolist() == [4, 5]
    # left padding of a full-length mask stays padding: position_ids count real tokens only
    padded = real.clone()
    padded[0, :2] = 0
    full = four_d(padded, additive=False)[:, :, past:, :]
    rows, unseen = padding_rows(full, [0], past, chunk, positions_of(padded)[:, past:])
    assert unseen == [0] and rows.tolist() == [padded[0].tolist()]
