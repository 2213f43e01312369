"""Pattern maps per kind of request: rows paired with their prompts, labelled kind by kind."""

from __future__ import annotations

import numpy as np

from exporter.patterns import PATTERNS
from headwatch.prompts import Prompt
from headwatch.report.by_kind import maps_by_kind
from tests.factories import MessageFactory

SINK, RECENCY = PATTERNS.index("sink"), PATTERNS.index("recency")


def _prompt(kind: str, i: int) -> Prompt:
    return Prompt(name=f"{kind}-{i}", kind=kind, ids=(0, 5, 6))  # type: ignore[arg-type]


def test_each_kind_gets_its_own_map() -> None:
    factory = MessageFactory(layers=2, heads=4, seed=1)
    prompts, messages = [], []
    for i in range(6):
        kind = "needle" if i % 2 == 0 else "document"
        codes = np.full((2, 4), SINK if kind == "needle" else RECENCY)
        prompts.append(_prompt(kind, i))
        messages.append(factory.message(codes=codes, timestamp_seconds=float(i + 1)))
    text = maps_by_kind(prompts, messages)
    document, needle = text.split("\n\n")
    assert document.startswith("document prompts only (3 rows):")
    assert needle.startswith("needle prompts only (3 rows):")
    assert document.splitlines()[1:] == ["    0 | R  R  R  R", "    1 | R  R  R  R"]
    assert needle.splitlines()[1:] == ["    0 | S  S  S  S", "    1 | S  S  S  S"]


def test_nothing_when_rows_and_prompts_do_not_pair_up_or_one_kind_only() -> None:
    factory = MessageFactory(layers=1, heads=2, seed=2)
    messages = [factory.message(timestamp_seconds=1.0)]
    assert maps_by_kind([_prompt("needle", 0), _prompt("document", 1)], messages) == ""
    assert maps_by_kind([_prompt("needle", 0)], messages) == ""
