"""Policy export: from an analysis or /metrics text to policy.json and DuoAttention head patterns."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from headwatch.policy import (
    FORMAT,
    KvPolicy,
    from_metrics_text,
    from_summary,
    main,
    read_policy,
    write_policy,
)
from headwatch.report.data import summary_to_dict
from headwatch.report.errors import PolicyError
from headwatch.report.summary import SUMMARY_STATS, HeadSummary

LAYERS, HEADS, KV = 3, 4, 2


def _summary() -> HeadSummary:
    p95 = np.array(
        [[0.5, 0.4, 0.3, 0.6], [0.01, 0.02, 0.3, 0.9], [0.0, 0.04, 0.03, 0.01]], dtype=float
    )
    safe_q = p95 <= 0.05
    safe_kv = safe_q.reshape(LAYERS, KV, HEADS // KV).all(axis=2)
    stats = {k: np.zeros((LAYERS, HEADS)) for k in SUMMARY_STATS}
    return HeadSummary(
        model_name="tiny",
        num_layers=LAYERS,
        num_query_heads=HEADS,
        num_kv_heads=KV,
        head_dim=16,
        kv_dtype_bytes=2,
        sink_tokens=4,
        recent_tokens=64,
        samples=10,
        context_tokens=(512,) * 10,
        stats=stats,
        eviction_error_p95=p95,
        patterns=np.full((LAYERS, HEADS), "mixed", dtype=object),
        safe_query_heads=safe_q,
        safe_kv_heads=safe_kv,
    )


EXPECTED_STREAMING = [[False, False], [True, False], [True, True]]


def test_policy_from_summary_streams_exactly_the_safe_kv_heads() -> None:
    policy = from_summary(_summary())
    assert policy.streaming.tolist() == EXPECTED_STREAMING
    assert policy.error[1, 0] == pytest.approx(0.02)  # worst of its two query heads
    assert policy.streaming_share == pytest.approx(3 / 6)


def test_policy_json_follows_the_documented_schema(tmp_path: Path) -> None:
    write_policy(from_summary(_summary()), tmp_path)
    doc = json.loads((tmp_path / "policy.json").read_text())
    assert doc["format"] == FORMAT
    assert {
        "model_name",
        "source",
        "sink_tokens",
        "recent_tokens",
        "num_layers",
        "num_kv_heads",
        "eviction_error_bound",
        "streaming_share",
        "kv_heads",
    } <= set(doc)
    assert (doc["sink_tokens"], doc["recent_tokens"]) == (4, 64)
    assert len(doc["kv_heads"]) == LAYERS * KV
    assert {h["keep"] for h in doc["kv_heads"]} == {"sink_recent", "all"}
    assert doc["kv_heads"][2] == {
        "layer": 1,
        "kv_head": 0,
        "keep": "sink_recent",
        "eviction_error_p95": 0.02,
        "eviction_error_mean": 0.0,
    }


def test_policy_json_round_trips(tmp_path: Path) -> None:
    policy = from_summary(_summary())
    write_policy(policy, tmp_path)
    back = read_policy(tmp_path / "policy.json")
    assert np.array_equal(back.streaming, policy.streaming)
    np.testing.assert_allclose(back.error, policy.error, atol=1e-6)


def _drop_num_layers(doc: dict[str, Any]) -> None:
    del doc["num_layers"]


def _word_for_num_layers(doc: dict[str, Any]) -> None:
    doc["num_layers"] = "three"


def _kv_heads_not_a_list(doc: dict[str, Any]) -> None:
    doc["kv_heads"] = 6


def _entry_without_keep(doc: dict[str, Any]) -> None:
    del doc["kv_heads"][0]["keep"]


def _entry_past_the_last_layer(doc: dict[str, Any]) -> None:
    doc["kv_heads"][0]["layer"] = LAYERS


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (_drop_num_layers, "'num_layers'"),
        (_word_for_num_layers, "three"),
        (_kv_heads_not_a_list, "not iterable"),
        (_entry_without_keep, "'keep'"),
        (_entry_past_the_last_layer, f"layer {LAYERS}"),
    ],
    ids=["missing-field", "bad-number", "kv-heads-not-a-list", "entry-field", "entry-range"],
)
def test_a_malformed_policy_is_a_policy_error_naming_the_problem(
    tmp_path: Path, damage: Callable[[dict[str, Any]], None], named: str
) -> None:
    write_policy(from_summary(_summary()), tmp_path)
    path = tmp_path / "policy.json"
    doc = json.loads(path.read_text())
    damage(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(PolicyError, match=re.escape(named)) as caught:
        read_policy(path)
    assert str(path) in str(caught.value)


def _duo_streaming(folder: Path, ratio: float) -> np.ndarray:
    """Read a DuoAttention pattern folder the way kvpress's DuoAttentionPress does.

    config.json gives sink_size and recent_size; full_attention_heads.tsv is read with
    np.loadtxt(delimiter="\\t") and clipped to [0, 1]; the round(n * ratio) lowest scores
    become streaming heads.
    """
    config = json.loads((folder / "config.json").read_text())
    assert isinstance(config["sink_size"], int) and isinstance(config["recent_size"], int)
    scores = np.clip(
        np.loadtxt(
            StringIO((folder / "full_attention_heads.tsv").read_text()), dtype=float, delimiter="\t"
        ),
        0,
        1,
    )
    mask = np.zeros(scores.shape, dtype=bool)
    n = round(scores.size * ratio)
    if n:
        mask[np.unravel_index(np.argsort(scores, axis=None)[:n], scores.shape)] = True
    return mask


def test_duo_attention_pattern_selects_the_policy_heads(tmp_path: Path) -> None:
    write_policy(from_summary(_summary()), tmp_path)
    duo = tmp_path / "duo_attention"
    config = json.loads((duo / "config.json").read_text())
    assert (config["sink_size"], config["recent_size"]) == (4, 64)
    assert _duo_streaming(duo, config["head_compression_ratio"]).tolist() == EXPECTED_STREAMING


def test_duo_attention_smaller_ratio_picks_the_safest_heads_first(tmp_path: Path) -> None:
    write_policy(from_summary(_summary()), tmp_path)
    mask = _duo_streaming(tmp_path / "duo_attention", 1 / 6)
    # worst p95 of the safe KV heads: (1, 0) 0.02, (2, 0) 0.04, (2, 1) 0.03
    assert mask.sum() == 1 and mask[1, 0]


METRICS = """# HELP headwatch_kv_head_safe_to_compress 1 when safe
# TYPE headwatch_kv_head_safe_to_compress gauge
headwatch_kv_head_safe_to_compress{model_name="tiny",layer="0",kv_head="0"} 0.0
headwatch_kv_head_safe_to_compress{model_name="tiny",layer="0",kv_head="1"} 1.0
headwatch_kv_head_safe_to_compress{model_name="tiny",layer="1",kv_head="0"} 1.0
headwatch_kv_head_safe_to_compress{model_name="tiny",layer="1",kv_head="1"} 0.0
headwatch_kv_head_safe_to_compress{model_name="other",layer="0",kv_head="0"} 1.0
# HELP headwatch_head_eviction_error_ratio p95
# TYPE headwatch_head_eviction_error_ratio gauge
headwatch_head_eviction_error_ratio{model_name="tiny",layer="0",head="2",kv_head="1"} 0.01
headwatch_head_eviction_error_ratio{model_name="tiny",layer="0",head="3",kv_head="1"} 0.03
"""


def test_policy_from_metrics_reads_one_model() -> None:
    policy = from_metrics_text(METRICS, "tiny", 4, 64, "test")
    assert policy.streaming.tolist() == [[False, True], [True, False]]
    assert policy.error[0, 1] == pytest.approx(0.03)
    assert np.isnan(policy.error[1, 0])


def test_policy_from_metrics_needs_a_model_name_when_several() -> None:
    with pytest.raises(PolicyError, match="one model"):
        from_metrics_text(METRICS, None, 4, 64, "test")


def test_policy_from_metrics_without_verdicts_is_an_error() -> None:
    with pytest.raises(PolicyError, match="headwatch_kv_head_safe_to_compress"):
        from_metrics_text("# nothing\n", None, 4, 64, "test")


def test_policy_rejects_mismatched_shapes() -> None:
    with pytest.raises(PolicyError, match="shape"):
        KvPolicy("m", 4, 64, np.zeros((2, 2), dtype=bool), np.zeros((2, 3)), "test")


def test_cli_writes_both_formats_from_an_analysis(tmp_path: Path) -> None:
    analysis = tmp_path / "heads.json"
    analysis.write_text(json.dumps(summary_to_dict(_summary())))
    assert main(["--from-analysis", str(analysis), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "policy.json").is_file()
    assert (tmp_path / "out" / "duo_attention" / "full_attention_heads.tsv").is_file()


def test_cli_names_a_missing_analysis_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--from-analysis", str(tmp_path / "nope.json"), "--out", str(tmp_path)]) == 2
    assert "nope.json" in capsys.readouterr().err


def test_the_policy_carries_the_bound_its_verdicts_were_taken_at(tmp_path: Path) -> None:
    import dataclasses

    summary = dataclasses.replace(_summary(), error_bound=0.07)
    write_policy(from_summary(summary), tmp_path)
    assert json.loads((tmp_path / "policy.json").read_text())["eviction_error_bound"] == 0.07


def test_a_policy_from_metrics_carries_the_bound_it_is_given() -> None:
    """The exporter's /metrics do not carry VERDICTS__ENTER_BOUND: --bound says it."""
    assert from_metrics_text(METRICS, "tiny", 4, 64, "test").error_bound == 0.05
    assert from_metrics_text(METRICS, "tiny", 4, 64, "test", bound=0.07).error_bound == 0.07
