"""`headwatch demo --kafka`: the bundled model's head statistics published to a real broker.

The demo runs once in this process on a short context with a topic of this module (the collector's
`HEADWATCH_COLLECTOR_KAFKA__TOPIC`). One test reads the topic back and checks that every message
arrived, decodes with collector.schema, and is what the demo's report was built from; another
serves the topic with a real exporter and writes a policy from its /metrics with no S or R given.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from collector.schema import HeadStatsMessage
from headwatch import demo, policy
from headwatch.report.data import read_summary_json
from headwatch.report.summary import SUMMARY_STATS, HeadSummary, summarize
from tests.helpers import unique_name, wait_until
from tests.integration.conftest_exporter import ExporterProcess, delete_side_topics, exporters

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180)]

REQUESTS = 3
CONTEXT_TOKENS = 256
SINK_TOKENS = 4  # the demo's S
RECENT_TOKENS = 32


@dataclass(frozen=True)
class DemoRun:
    """One `headwatch demo --kafka` run: its topic, exit status, printed text and report folder."""

    bootstrap: str
    topic: str
    status: int
    out_text: str
    err_text: str
    report: Path

    def summary(self) -> HeadSummary:
        return read_summary_json(self.report / "heads.json")


@pytest.fixture(name="demo_run", scope="module")
def fixture_demo_run(
    kafka_bootstrap: str, kafka_admin: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DemoRun]:
    from kafka.admin import NewTopic

    topic = unique_name("test", "demo_kafka")
    kafka_admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    report = tmp_path_factory.mktemp("demo") / "report"
    out, err = io.StringIO(), io.StringIO()
    argv = ["--kafka", kafka_bootstrap, "--requests", str(REQUESTS),
            "--context-tokens", str(CONTEXT_TOKENS), "--recent-tokens", str(RECENT_TOKENS),
            "--out", str(report)]  # fmt: skip
    try:
        with (
            pytest.MonkeyPatch.context() as mp,
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            mp.setenv("HEADWATCH_COLLECTOR_KAFKA__TOPIC", topic)
            status = demo.main(argv)
        yield DemoRun(kafka_bootstrap, topic, status, out.getvalue(), err.getvalue(), report)
    finally:
        kafka_admin.delete_topics([topic])


def _read_topic(bootstrap: str, topic: str, expected: int, settings: dict[str, Any]) -> list[Any]:
    """Return the records of `topic` once `expected` have arrived, read to the end once more."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, **settings)
    records: list[Any] = []
    try:

        def poll() -> bool:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
            return len(records) >= expected

        wait_until(poll, 60, message=f"{expected} records on {topic}")
        # Anything published twice would be on the partition already.
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
    finally:
        consumer.close()
    return records


def test_demo_publishes_what_its_report_shows(
    demo_run: DemoRun, kafka_consumer_settings: dict[str, Any]
) -> None:
    assert demo_run.status == 0, demo_run.err_text
    summary = demo_run.summary()
    # One sampled position per request: the last prompt token of the prefill pass.
    assert summary.samples == REQUESTS
    assert (
        f"published {REQUESTS} of {REQUESTS} messages to {demo_run.bootstrap} "
        f"(topic {demo_run.topic})" in demo_run.out_text
    )

    records = _read_topic(demo_run.bootstrap, demo_run.topic, REQUESTS, kafka_consumer_settings)
    messages = [HeadStatsMessage.from_bytes(r.value) for r in records]
    assert len(messages) == REQUESTS
    assert len({m.header.message_id for m in messages}) == REQUESTS
    for record, m in zip(records, messages, strict=True):
        assert record.key == m.header.model_key.encode()
        assert m.header.model_name == summary.model_name
        assert (m.header.sink_tokens, m.header.recent_tokens) == (SINK_TOKENS, RECENT_TOKENS)
        assert m.header.query_position == m.header.context_tokens - 1
        assert (m.header.num_layers, m.header.num_query_heads) == (
            summary.num_layers,
            summary.num_query_heads,
        )
    assert sorted(m.header.context_tokens for m in messages) == sorted(summary.context_tokens)
    assert max(summary.context_tokens) <= CONTEXT_TOKENS

    # The report's per-head statistics are those of the messages on the topic.
    received = summarize(messages)
    for name in SUMMARY_STATS:
        np.testing.assert_allclose(
            summary.stats[name], received.stats[name], atol=1e-6, equal_nan=True, err_msg=name
        )
    np.testing.assert_array_equal(summary.patterns, received.patterns)
    written = json.loads((demo_run.report / "policy" / "policy.json").read_text())
    assert (written["sink_tokens"], written["recent_tokens"]) == (SINK_TOKENS, RECENT_TOKENS)


def test_an_exporter_on_the_demos_topic_gives_policy_its_sink_and_recent_tokens(
    demo_run: DemoRun, consumer_group: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo_run.status == 0, demo_run.err_text
    summary = demo_run.summary()
    model = summary.model_name
    try:
        replica = ExporterProcess(demo_run.bootstrap, demo_run.topic, consumer_group, tmp_path)
        with exporters(replica):
            replica.wait_healthy(partitions=1)
            wait_until(
                lambda: replica.value("headwatch_model_window_samples", model_name=model) == REQUESTS,
                60, 0.2, f"{REQUESTS} samples of {model} in the exporter's window", ignore=(OSError,),
            )  # fmt: skip
            assert replica.value("headwatch_model_sink_tokens", model_name=model) == SINK_TOKENS
            assert replica.value("headwatch_model_recent_tokens", model_name=model) == RECENT_TOKENS
            out = tmp_path / "policy"
            status = policy.main(["--from-metrics", f"{replica.url}/metrics", "--out", str(out)])
    finally:
        delete_side_topics(demo_run.bootstrap, demo_run.topic)
    assert status == 0, capsys.readouterr().err
    written = json.loads((out / "policy.json").read_text())
    assert written["model_name"] == model
    assert (written["sink_tokens"], written["recent_tokens"]) == (SINK_TOKENS, RECENT_TOKENS)
    assert (written["num_layers"], written["num_kv_heads"]) == (
        summary.num_layers,
        summary.num_kv_heads,
    )


def test_demo_with_an_unreachable_broker_says_so_before_loading_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    status = demo.main(
        ["--kafka", f"127.0.0.1:{port}", "--requests", "1", "--out", str(tmp_path / "r")]
    )
    assert status == 2
    assert f"expected a Kafka broker answering at 127.0.0.1:{port}" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
