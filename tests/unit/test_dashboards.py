"""Generated dashboards: up to date, fixed UIDs, variables, units and no-data text on every panel.

No Grafana runs here: the JSON comes from the typed builder (grafana-foundation-sdk) and every
query is checked against the metric catalogue and parsed by promtool.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboards import cli
from dashboards.catalogue import METRICS
from dashboards.config import GenerateConfig
from dashboards.errors import UnknownMetricError
from dashboards.generate import GRAFANA_DIR, iter_panels, render_all
from dashboards.queries import all_queries, substitute
from dashboards.validate import check_queries

ROOT = Path(__file__).resolve().parents[2]
UIDS = {
    "fleet-overview": "headwatch-fleet",
    "model-heads": "headwatch-model-heads",
    "head-detail": "headwatch-head-detail",
    "pipeline-health": "headwatch-pipeline",
}


def _committed(stem: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((ROOT / GRAFANA_DIR / f"{stem}.json").read_text())
    return data


def _variables(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in model["templating"]["list"]}


def test_committed_generated_files_are_up_to_date() -> None:
    for relative, text in render_all(GenerateConfig()).items():
        assert (ROOT / relative).read_text() == text, f"{relative} is stale: run generate"


@pytest.mark.parametrize(("stem", "uid"), sorted(UIDS.items()))
def test_dashboard_has_fixed_uid_datasource_and_model_variables(stem: str, uid: str) -> None:
    model = _committed(stem)
    variables = _variables(model)
    assert model["uid"] == uid
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["model_name"]["datasource"]["uid"] == "${datasource}"


@pytest.mark.parametrize("stem", sorted(UIDS))
def test_every_panel_has_intent_datasource_and_no_data_text(stem: str) -> None:
    for panel in iter_panels(_committed(stem)):
        if panel["type"] == "row":
            continue
        defaults = panel["fieldConfig"]["defaults"]
        assert panel.get("description"), panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert defaults.get("noValue"), panel["title"]
        assert defaults.get("thresholds", {}).get("steps"), panel["title"]
        assert panel["targets"] and all(t["refId"] for t in panel["targets"]), panel["title"]
        if panel["type"] in {"timeseries", "stat"}:
            assert defaults.get("unit"), panel["title"]


def test_panel_ids_are_unique_within_each_dashboard() -> None:
    for stem in UIDS:
        ids = [p["id"] for p in iter_panels(_committed(stem))]
        assert len(ids) == len(set(ids))


def test_model_heads_matrices_group_layers_into_rows_and_heads_into_columns() -> None:
    matrices = [
        p
        for p in iter_panels(_committed("model-heads"))
        if any(t["id"] == "groupingToMatrix" for t in p.get("transformations", []))
    ]
    titles = {p["title"] for p in matrices}
    assert {"Pattern by layer x head", "Sink mass by layer x head"} <= titles
    assert any(t.startswith("Eviction error") for t in titles)
    for panel in matrices:
        grouping = next(t for t in panel["transformations"] if t["id"] == "groupingToMatrix")
        assert grouping["options"]["rowField"] == "layer"
        assert grouping["options"]["columnField"] == "head"
        assert panel["targets"][0]["instant"] and panel["targets"][0]["format"] == "table"
        assert "by (layer, head)" in panel["targets"][0]["expr"]


def test_pattern_map_names_every_pattern_with_a_colour() -> None:
    panel = next(
        p for p in iter_panels(_committed("model-heads")) if p["title"] == "Pattern by layer x head"
    )
    options = panel["fieldConfig"]["defaults"]["mappings"][0]["options"]
    names = {o["text"] for o in options.values()}
    assert names == {
        "uniform",
        "v_shaped",
        "sink",
        "recency",
        "scattered_middle",
        "concentrated_middle",
        "mixed",
    }
    assert all(o["color"] for o in options.values())


def test_head_detail_has_layer_and_head_variables_and_a_pattern_timeline() -> None:
    model = _committed("head-detail")
    assert {"model_name", "layer", "head"} <= set(_variables(model))
    types = {p["title"]: p["type"] for p in iter_panels(model)}
    assert types["Pattern timeline"] == "state-timeline"


def test_pipeline_health_covers_scrape_durations_and_dead_letters() -> None:
    exprs = " ".join(
        t["expr"] for p in iter_panels(_committed("pipeline-health")) for t in p.get("targets", [])
    )
    for name in (
        "scrape_duration_seconds",
        "headwatch_exporter_dead_letters_total",
        "headwatch_exporter_invalid_messages_total",
        "headwatch_collector_queue_messages",
        "headwatch_collector_hook_errors_total",
        "headwatch_exporter_consumer_lag_messages",
    ):
        assert name in exprs


def test_every_query_reads_only_catalogued_or_recorded_metrics() -> None:
    queries = all_queries(GenerateConfig())
    check_queries((q.where, q.expr) for q in queries)
    assert len(queries) > 50


def test_an_unknown_metric_in_a_query_is_rejected() -> None:
    with pytest.raises(UnknownMetricError, match="headwatch_head_entropy_bits"):
        check_queries([("panel X", 'max(headwatch_head_entropy_bits{model_name="m"})')])


def test_catalogue_matches_docs_metrics_md() -> None:
    documented = set(
        re.findall(
            r"^\| `(headwatch_[a-z_]+)`", (ROOT / "docs" / "metrics.md").read_text(), re.MULTILINE
        )
    )
    assert documented == {m.name for m in METRICS}


def test_catalogue_matches_the_collector_metrics() -> None:
    """The collector's registry (names as exposed, label names) is what the catalogue lists."""
    from collector.metrics import CollectorMetrics

    exposed = {
        (family.name + ("_total" if family.type == "counter" else ""), family.type)
        for family in CollectorMetrics().registry.collect()
    }
    catalogued = {(m.name, m.type) for m in METRICS if m.name.startswith("headwatch_collector_")}
    assert exposed == catalogued


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_every_shipped_query_parses_as_promql(tmp_path: Path) -> None:
    values = {"model_name": "m", "layer": "0", "head": "0", "datasource": "prom"}
    rules = [
        {"record": f"headwatch_query_check_{i}", "expr": substitute(q.expr, values)}
        for i, q in enumerate(all_queries(GenerateConfig()))
    ]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    result = subprocess.run(
        ["promtool", "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_substitute_refuses_unknown_variables() -> None:
    with pytest.raises(KeyError):
        substitute('up{job="$job"}', {})


def test_check_command_passes_on_the_committed_tree(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check"]) == 0


def test_check_command_names_a_stale_file_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["generate", "--root", str(tmp_path)]) == 0
    stale = tmp_path / GRAFANA_DIR / "head-detail.json"
    stale.write_text(stale.read_text().replace("Pattern timeline", "Old title"))
    assert cli.main(["check", "--root", str(tmp_path)]) == 1
    assert "stale: dashboards/generated/grafana/head-detail.json" in capsys.readouterr().err


def test_check_command_flags_a_leftover_generated_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["generate", "--root", str(tmp_path)]) == 0
    (tmp_path / GRAFANA_DIR / "removed-dashboard.json").write_text("{}")
    assert cli.main(["check", "--root", str(tmp_path)]) == 1
    assert "removed-dashboard.json" in capsys.readouterr().err


def test_generate_rejects_bad_config_without_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("dashboards:\n  head_matrices: [headwatch_head_nope]\n")
    out = tmp_path / "out"
    assert cli.main(["generate", "--config", str(config), "--root", str(out)]) == 2
    assert "unknown metric 'headwatch_head_nope'" in capsys.readouterr().err
    assert not out.exists()


def test_queries_over_fault_only_series_are_not_expected_to_return_data() -> None:
    by_where = {q.where: q for q in all_queries(GenerateConfig())}
    assert by_where["headwatch-model-heads / Pattern by layer x head / A"].expects_data
    assert not by_where["headwatch-model-heads / Drifting heads / B"].expects_data
    assert not by_where["alert HeadwatchPatternDrift"].expects_data
    assert by_where["headwatch-fleet / Alerts firing / A"].expects_data  # `or vector(0)`


def test_substitute_fills_grafana_builtins_and_dashboard_variables() -> None:
    expr = 'rate(x{model_name=~"$model_name", layer="${layer}"}[$__rate_interval])'
    assert (
        substitute(expr, {"model_name": "m", "layer": "3"})
        == 'rate(x{model_name=~"m", layer="3"}[1m])'
    )
