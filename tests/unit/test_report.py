"""Report generation: summaries, the study-style table, PNG figures, index.html, atomic writes."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import numpy as np
import pytest

from collector.schema import HeadStatsMessage, MessageHeader, core_stat_names
from headwatch.prompts import Prompt
from headwatch.report.data import read_summary_json, write_summary_json
from headwatch.report.errors import ReportError
from headwatch.report.figures import heatmaps, pattern_rows, representative_heads
from headwatch.report.html import INDEX, staged_report, write_index
from headwatch.report.summary import (
    ANALYSIS_POLICY,
    HeadSummary,
    head_patterns,
    head_verdicts,
    summarize,
)
from headwatch.report.table import layer_ranges, markdown_table, pattern_map_text, study_rows

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N = 512  # context tokens of the synthetic messages
S, R = 4, 64


def _row(kind: str) -> np.ndarray:
    """Return an attention row of N keys shaped like one of the study's patterns."""
    p = np.full(N, 1e-9)
    if kind == "uniform":
        p[:] = 1.0
    elif kind == "sink":
        p[:S] = 1.0
    elif kind == "recency":
        p[-R:] = 1.0
    elif kind == "v_shaped":
        p[:S] = 0.5 / S
        p[-R:] = 0.5 / R
    elif kind == "concentrated_middle":
        p[200:203] = 1.0
    else:  # scattered_middle
        p[S:-R:2] = 1.0
    return p / p.sum()


LAYOUT = [
    ["uniform", "uniform", "uniform", "uniform"],
    ["sink", "recency", "v_shaped", "concentrated_middle"],
    ["v_shaped", "v_shaped", "scattered_middle", "recency"],
]


def _stats(p: np.ndarray) -> dict[str, float]:
    nz = p[p > 0]
    srt = np.sort(p)[::-1]
    kept = np.r_[p[:S], p[-R:]]
    return {
        "entropy_nats": float(-(nz * np.log(nz)).sum()),
        "sink_mass": float(p[:S].sum()),
        "recent_mass": float(p[-R:].sum()),
        "top1_mass": float(srt[:1].sum()),
        "top16_mass": float(srt[:16].sum()),
        "top256_mass": float(srt[:256].sum()),
        "keys_for_90pct": float(np.searchsorted(np.cumsum(srt), 0.9) + 1),
        # with equal value vectors the eviction error is the dropped mass (an upper bound)
        "eviction_error": float(1.0 - kept.sum()),
    }


def make_message(layout: list[list[str]] = LAYOUT, kv_heads: int = 2) -> HeadStatsMessage:
    """Return a head-stats message whose heads follow `layout` (layers x query heads)."""
    layers, heads = len(layout), len(layout[0])
    per = [[_stats(_row(k)) for k in row] for row in layout]
    stats = {n: np.array([[c[n] for c in row] for row in per]) for n in core_stat_names()}
    header = MessageHeader(
        message_id=uuid.uuid4().hex,
        model_name="tiny",
        config_hash="0123456789abcdef",
        timestamp_seconds=1.0,
        phase="prefill",
        context_tokens=N,
        query_position=N - 1,
        sink_tokens=S,
        recent_tokens=R,
        num_layers=layers,
        num_query_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=16,
        kv_dtype_bytes=2,
        sample_rate=1.0,
        visible_keys=(N,) * layers,
        stat_names=core_stat_names(),
    )
    return HeadStatsMessage.build(header, stats)


@pytest.fixture(name="summary")
def fixture_summary() -> HeadSummary:
    return summarize([make_message(), make_message()])


def test_local_classifier_recovers_every_study_pattern(summary: HeadSummary) -> None:
    assert summary.patterns.tolist() == LAYOUT


def test_verdicts_mark_kv_head_safe_only_when_all_its_query_heads_are(summary: HeadSummary) -> None:
    # layer 1: KV head 0 = (sink, recency) safe; KV head 1 = (v_shaped, concentrated) not
    assert summary.safe_kv_heads[1].tolist() == [True, False]
    assert summary.safe_kv_heads[0].tolist() == [False, False]


def test_head_without_a_dominant_label_is_mixed() -> None:
    codes = np.array([0, 1, 2, 3], dtype=np.int8).reshape(4, 1, 1)  # four labels, none >= 50%
    assert head_patterns(codes, dominance=0.5).tolist() == [["mixed"]]


def test_verdict_needs_every_sample_under_the_bound_when_samples_are_few() -> None:
    errors = np.array([0.01, 0.02, 0.2]).reshape(3, 1, 1)
    _, safe_q, _ = head_verdicts(errors, 1, ANALYSIS_POLICY)
    assert not safe_q.any()
    _, safe_q, _ = head_verdicts(errors[:2], 1, ANALYSIS_POLICY)
    assert safe_q.all()


def test_study_table_has_one_row_per_pattern_with_shares(summary: HeadSummary) -> None:
    rows = {r.pattern: r for r in study_rows(summary)}
    assert set(rows) == {p for row in LAYOUT for p in row}
    assert rows["uniform"].layers == "0" and rows["uniform"].share_of_heads == pytest.approx(4 / 12)
    assert rows["v_shaped"].layers == "1-2"
    assert rows["uniform"].entropy_nats == pytest.approx(np.log(N), abs=1e-3)
    assert "| pattern |" in markdown_table(list(rows.values()))


def test_layer_ranges_compresses_runs() -> None:
    assert layer_ranges([5, 0, 1, 2, 7, 8]) == "0-2, 5, 7-8"


def test_pattern_map_marks_safe_heads(summary: HeadSummary) -> None:
    line = pattern_map_text(summary).splitlines()[3]  # layer 1
    assert re.sub(r"\s+", " ", line).strip() == "1 | S* R* V C"


def _rows_for(summary: HeadSummary) -> dict[int, np.ndarray]:
    return {layer: np.stack([_row(k) for k in LAYOUT[layer]]) for layer in range(len(LAYOUT))}


def test_report_folder_has_valid_pngs_referenced_by_html(
    summary: HeadSummary, tmp_path: Path
) -> None:
    prompt = Prompt("needle-test", "needle", tuple(range(N)), needle_start=200, needle_end=203)
    final = tmp_path / "report"
    with staged_report(final) as folder:
        figures = heatmaps(summary, folder)
        figures += pattern_rows(summary, _rows_for(summary), prompt, folder)
        write_index(
            folder,
            "test",
            {"model": "tiny"},
            figures,
            study_rows(summary),
            pattern_map_text(summary),
        )
    page = (final / INDEX).read_text()
    pngs = sorted(p.name for p in final.glob("*.png"))
    assert len(pngs) == 4 + 6
    for name in pngs:
        assert (final / name).read_bytes()[:8] == PNG_MAGIC
        assert f'src="{name}"' in page
    assert "attention_concentrated_middle.png" in pngs


def test_representative_head_is_the_clearest_of_its_pattern(summary: HeadSummary) -> None:
    chosen = representative_heads(summary)
    assert chosen["sink"] == (1, 0) and chosen["concentrated_middle"] == (1, 3)


def test_interrupted_report_leaves_nothing_that_looks_complete(tmp_path: Path) -> None:
    final = tmp_path / "report"
    with pytest.raises(KeyboardInterrupt), staged_report(final) as folder:
        (folder / "entropy.png").write_bytes(PNG_MAGIC)
        raise KeyboardInterrupt
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_report_without_index_is_not_renamed_into_place(tmp_path: Path) -> None:
    final = tmp_path / "report"
    with pytest.raises(ReportError, match=r"index\.html"), staged_report(final):
        pass
    assert not final.exists()


def test_existing_report_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / INDEX).write_text("x")
    with pytest.raises(ReportError, match="existing"), staged_report(tmp_path / "old"):
        pass


def test_summary_json_round_trips(summary: HeadSummary, tmp_path: Path) -> None:
    path = tmp_path / "heads.json"
    write_summary_json(summary, study_rows(summary), path)
    data = json.loads(path.read_text())
    assert len(data["heads"]) == 12 and data["heads"][4]["pattern"] == "sink"
    back = read_summary_json(path)
    assert back.patterns.tolist() == summary.patterns.tolist()
    assert np.array_equal(back.safe_kv_heads, summary.safe_kv_heads)
    np.testing.assert_allclose(back.stats["sink_mass"], summary.stats["sink_mass"], atol=1e-6)


def test_a_query_head_counts_as_compressible_only_when_its_kv_head_is(summary: HeadSummary) -> None:
    """Layer 1's v_shaped head shares its KV head with a concentrated_middle one: neither is."""
    assert summary.patterns[1, 2] == "v_shaped" and not summary.safe_kv_heads[1, 1]
    assert not summary.safe_query_heads[1, 2]
    assert np.array_equal(summary.safe_query_heads, np.repeat(summary.safe_kv_heads, 2, axis=1))
