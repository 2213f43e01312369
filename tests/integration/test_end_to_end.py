"""The whole pipeline, real everything: collector on a tiny model -> Kafka -> exporter -> Prometheus
with the project's generated rules -> every dashboard and rule query -> a drift alert through
Alertmanager to a webhook this test runs.

The model is the hand-set tiny Llama (headwatch.training.handset): its layer-0 heads have known
patterns (sink, recency, marker = concentrated middle, uniform), so the test knows what the
exporter must report. Drift is induced by swapping the query weights of head pairs that share a
KV head (sink <-> recency, marker <-> uniform): four heads change pattern, nothing else does.
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from collector import attach
from collector.metrics import CollectorMetrics
from collector.settings import CollectorSettings, KafkaSettings
from dashboards.promql import metric_names
from dashboards.queries import Query, all_queries, substitute
from headwatch.localstack.paths import StackPaths
from headwatch.training.handset import (
    BOS_TOKEN_ID,
    HANDSET_PATTERNS,
    HEAD_DIM,
    MARKER_TOKEN_ID,
    handset_model,
)
from tests.helpers import (
    AlertmanagerService,
    PrometheusService,
    WaitTimeout,
    query_values,
    unique_name,
    wait_until,
)
from tests.integration.conftest_e2e import (
    WebhookReceiver,
    generate_rules,
    loaded_rules,
    rules_prometheus,
)
from tests.integration.conftest_exporter import ExporterProcess, delete_side_topics, exporters

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]

# Small exporter windows so the test runs in seconds of traffic: a reference of 64 sampled
# requests, drift tests every 32, a head drifted after 2 failing tests in a row.
REFERENCE_SAMPLES = 64
DRIFT_WINDOW = 32
CONSECUTIVE_WINDOWS = 2
EXPORTER_ENV = {
    "HEADWATCH_EXPORTER_WINDOW__SAMPLES": "64",
    "HEADWATCH_EXPORTER_DRIFT__REFERENCE_SAMPLES": str(REFERENCE_SAMPLES),
    "HEADWATCH_EXPORTER_DRIFT__WINDOW_SAMPLES": str(DRIFT_WINDOW),
    "HEADWATCH_EXPORTER_DRIFT__MIN_HEAD_SAMPLES": "16",
    "HEADWATCH_EXPORTER_DRIFT__CONSECUTIVE_WINDOWS": str(CONSECUTIVE_WINDOWS),
    "HEADWATCH_EXPORTER_VERDICTS__MIN_SAMPLES": "16",
}
# The reference, then two test windows that must pass.
HEALTHY_REQUESTS = REFERENCE_SAMPLES + 2 * DRIFT_WINDOW
# Enough windows after the switch for a head to count as drifted, plus one.
DRIFTED_REQUESTS = (CONSECUTIVE_WINDOWS + 1) * DRIFT_WINDOW
MIN_DRIFTED_HEADS = 3
# The generated rules, with a drift alert that fires after 10s instead of 15 minutes.
FAST_RULES = {"alerts": {"drift": {"for": "10s", "min_heads": MIN_DRIFTED_HEADS}}}

PROMPT_TOKENS = 256
SINK_TOKENS = 4
RECENT_TOKENS = 16  # the marker sits well inside the middle region
# What the exporter calls each hand-set head's pattern, before and after the swap.
EXPECTED = {"sink": "sink", "recency": "recency", "marker": "concentrated_middle",
            "uniform": "uniform"}  # fmt: skip
BEFORE = {head: EXPECTED[p] for (layer, head), p in HANDSET_PATTERNS.items() if layer == 0}
SWAP = [1, 0, 3, 2]  # query heads 0,1 share KV head 0; heads 2,3 share KV head 1
AFTER = {head: BEFORE[SWAP[head]] for head in BEFORE}
DRIFT_METRICS = frozenset(
    {"headwatch_head_drift_p_value", "headwatch_head_drift_distance",
     "headwatch_head_drift_since_timestamp_seconds", "ALERTS"}
)  # fmt: skip


class Traffic:
    """Requests to the hand-set model: <bos> first, one marker token somewhere in the middle."""

    def __init__(self, model: torch.nn.Module, seed: int = 0) -> None:
        self.model = model
        self.generator = torch.Generator().manual_seed(seed)
        self.sent = 0

    def send(self, requests: int) -> None:
        with torch.no_grad():
            for _ in range(requests):
                ids = torch.randint(6, 64, (1, PROMPT_TOKENS), generator=self.generator)
                ids[0, 0] = BOS_TOKEN_ID
                marker = torch.randint(SINK_TOKENS + 16, PROMPT_TOKENS - 4 * RECENT_TOKENS, (1,),
                                       generator=self.generator)  # fmt: skip
                ids[0, int(marker)] = MARKER_TOKEN_ID
                self.model(input_ids=ids, use_cache=False)
                self.sent += 1


def swap_layer0_heads(model: Any) -> None:
    """Permute layer 0's query heads within their KV groups: four heads change pattern."""
    with torch.no_grad():
        weight = model.model.layers[0].self_attn.q_proj.weight
        heads = weight.view(len(SWAP), HEAD_DIM, -1)
        heads.copy_(heads[SWAP].clone())


def evaluate(url: str, expr: str) -> tuple[list[dict[str, Any]] | None, str]:
    """Return (result, "") of an instant query, or (None, Prometheus's error) when it fails."""
    query = urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query?{query}", timeout=10) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        answer = json.loads(exc.read() or b"{}")
    if answer.get("status") != "success":
        return None, f"{answer.get('errorType')}: {answer.get('error')}"
    data = answer["data"]
    if data["resultType"] != "vector":
        return None, f"expected an instant vector, got {data['resultType']}"
    return data["result"], ""


def check_queries(
    url: str, queries: list[Query], values: dict[str, str], must_answer: Callable[[Query], bool]
) -> list[str]:
    """Fail on any query Prometheus rejects; return where each query that must answer is empty."""
    errors, empty = [], []
    for q in queries:
        result, error = evaluate(url, substitute(q.expr, values))
        if error:
            errors.append(f"{q.where}: {error}\n    {q.expr}")
        elif not result and must_answer(q):
            empty.append(q.where)
    assert not errors, "Prometheus rejected shipped queries:\n" + "\n".join(errors)
    return empty


def wait_all_answer(
    url: str, queries: list[Query], values: dict[str, str], must_answer: Callable[[Query], bool],
    timeout_seconds: float,
) -> list[str]:  # fmt: skip
    """Wait until every query that must answer returns data (rates need a few scrapes).

    Return where each query still empty after `timeout_seconds` is (asserted by the caller at
    the end, so that one empty panel does not hide what the rest of the chain does).
    """
    try:
        wait_until(lambda: not check_queries(url, queries, values, must_answer),
                   timeout_seconds, 1.0, "every query that must answer to return data")  # fmt: skip
    except WaitTimeout:
        return check_queries(url, queries, values, must_answer)
    return []


def head_patterns(prom: PrometheusService, model: str, layer: int) -> dict[int, str]:
    rows = prom.query(f'headwatch_head_pattern{{model_name="{model}", layer="{layer}"}} == 1')
    return {int(r["metric"]["head"]): r["metric"]["pattern"] for r in rows}


def head_values(prom: PrometheusService, expr: str) -> dict[tuple[int, int], float]:
    return {
        (int(r["metric"]["layer"]), int(r["metric"]["head"])): float(r["value"][1])
        for r in prom.query(expr)
    }


def test_drift_in_served_traffic_reaches_the_webhook_and_every_query_answers(
    kafka_bootstrap: str, fresh_topic: Callable[..., str], consumer_group: str,
    alertmanager: AlertmanagerService, stack_paths: StackPaths, tmp_path: Path,
) -> None:  # fmt: skip
    config, rules_dir = generate_rules(FAST_RULES, tmp_path / "generated")
    queries = all_queries(config)
    topic = fresh_topic(partitions=1)
    model_name = unique_name("e2e-handset").replace("_", "-")
    values = {"model_name": model_name, "layer": "0", "head": "0"}
    model = handset_model(layers=2)
    with contextlib.ExitStack() as stack:
        stack.callback(delete_side_topics, kafka_bootstrap, topic)
        hook = stack.enter_context(WebhookReceiver())
        alertmanager.set_webhook(hook.url)
        stack.callback(alertmanager.set_webhook, None)
        server = stack.enter_context(
            rules_prometheus(stack_paths, tmp_path / "prometheus", rules_dir, alertmanager.url)
        )
        prom = PrometheusService(server.url, server.targets_dir)
        rules = loaded_rules(prom.url)
        assert rules["HeadwatchPatternDrift"]["duration"] == 10
        (exporter,) = stack.enter_context(exporters(
            ExporterProcess(kafka_bootstrap, topic, consumer_group, tmp_path, **EXPORTER_ENV)
        ))  # fmt: skip
        metrics = CollectorMetrics()
        stack.callback(metrics.close)
        collector_port = metrics.serve(0)
        handle = attach(
            model, metrics=metrics,
            # `sink` as a keyword takes a Sink object; the setting naming Kafka goes in `settings`.
            settings=CollectorSettings(sink="kafka", kafka=KafkaSettings(
                bootstrap_servers=kafka_bootstrap, topic=topic)),
            model_name=model_name, sample_rate=1.0, min_context_tokens=0,
            sink_tokens=SINK_TOKENS, recent_tokens=RECENT_TOKENS,
            max_sampled_passes_per_second=1e6, seed=0,
        )  # fmt: skip
        stack.callback(handle.close)
        exporter.wait_healthy(partitions=1)
        prom.add_scrape_target(config.exporter_job, f"127.0.0.1:{exporter.port}")
        prom.add_scrape_target(config.collector_job, f"127.0.0.1:{collector_port}")

        # Healthy traffic: the reference, then windows that pass the drift test.
        traffic = Traffic(model)
        traffic.send(HEALTHY_REQUESTS)
        wait_until(
            lambda: metrics.value("headwatch_collector_published_total", model_name=model_name)
            >= HEALTHY_REQUESTS, 60, 0.2, "the collector to publish the healthy requests",
        )  # fmt: skip
        exporter.wait_messages(HEALTHY_REQUESTS)
        m = f'model_name="{model_name}"'
        wait_until(lambda: query_values(prom.url, f"headwatch_model_messages_total{{{m}}}")
                   == [HEALTHY_REQUESTS], 60, 0.5, "Prometheus to scrape the healthy window")  # fmt: skip
        assert query_values(prom.url, f"headwatch_model_reference_samples{{{m}}}") == [
            REFERENCE_SAMPLES
        ]
        assert head_patterns(prom, model_name, 0) == BEFORE
        assert query_values(prom.url, f"headwatch_model_heads_drifted{{{m}}}") == [0.0]
        # KV head 0 of layer 0 serves the sink and recency heads: safe to keep sink+recent only.
        safe = f'headwatch_kv_head_safe_to_compress{{{m}, layer="0", kv_head="0"}}'
        assert query_values(prom.url, safe) == [1.0]

        # Every dashboard, variable, alert and recording expression evaluates; those a healthy
        # pipeline must answer return data.
        empty_when_healthy = wait_all_answer(
            prom.url, queries, values, lambda q: q.expects_data, 30
        )
        unhealthy = {n: r.get("lastError") for n, r in loaded_rules(prom.url).items()
                     if r.get("health") != "ok"}  # fmt: skip
        assert not unhealthy, f"rules Prometheus could not evaluate: {unhealthy}"
        assert not hook.alerts("firing", alertname="HeadwatchPatternDrift", model_name=model_name)

        # Drift: the same served model, four of its heads changed.
        swap_layer0_heads(model)
        traffic.send(DRIFTED_REQUESTS)
        total = HEALTHY_REQUESTS + DRIFTED_REQUESTS
        exporter.wait_messages(total)
        wait_until(lambda: query_values(prom.url, f"headwatch_model_heads_drifted{{{m}}}")
                   == [float(len(SWAP))], 60, 0.5, "Prometheus to see four drifted heads")  # fmt: skip
        detected = head_values(prom, f"headwatch_head_drift_detected{{{m}}}")
        assert {k for k, v in detected.items() if v == 1} == {(0, h) for h in range(len(SWAP))}
        assert head_patterns(prom, model_name, 0) == AFTER
        fired = wait_until(
            lambda: hook.alerts("firing", alertname="HeadwatchPatternDrift", model_name=model_name),
            90, 0.5, "Alertmanager to deliver HeadwatchPatternDrift to the webhook",
        )  # fmt: skip
        alert = fired[0]
        assert alert["labels"]["severity"] == config.alerts.drift.severity
        assert model_name in alert["annotations"]["summary"]
        assert alert["annotations"]["runbook_url"].endswith("#headwatchpatterndrift")
        changed = f"headwatch_model_heads_pattern_changed{{{m}}}"
        assert query_values(prom.url, changed) == [float(len(SWAP))]
        # Nothing else is wrong, so no other rule is pending or firing: alerts stay quiet.
        assert {r["metric"]["alertname"] for r in prom.query("ALERTS")} == {"HeadwatchPatternDrift"}

        # The drift panels and the alert annotations now have data; everything still evaluates.
        def shows_drift(q: Query) -> bool:
            if q.source == "alert":
                return q.where == "alert HeadwatchPatternDrift"
            return bool(metric_names(q.expr) & DRIFT_METRICS)

        empty_when_drifted = wait_all_answer(prom.url, queries, values, shows_drift, 30)
        # Every measured request reached Kafka: none dropped, whatever the reason.
        published = "headwatch_collector_published_total"
        assert metrics.value(published, model_name=model_name) == traffic.sent == total
        assert not empty_when_healthy + empty_when_drifted, (
            "queries without data on a healthy pipeline: "
            f"{empty_when_healthy}; while heads drift: {empty_when_drifted}"
        )
