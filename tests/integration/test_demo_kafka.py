"""`headwatch demo --kafka`: the bundled model's head statistics published to a real broker.

The demo runs in this process on a short context with the topic of this test (the collector's
`HEADWATCH_COLLECTOR_KAFKA__TOPIC`); the test then reads the topic back and checks that every
message arrived, decodes with collector.schema, and is what the demo's report was built from.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from collector.schema import HeadStatsMessage
from headwatch.demo import main
from headwatch.report.data import read_summary_json
from headwatch.report.summary import SUMMARY_STATS, summarize
from tests.helpers import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180)]

REQUESTS = 3
CONTEXT_TOKENS = 256
RECENT_TOKENS = 32


def _read_topic(bootstrap: str, topic: str, expected: int, settings: dict[str, Any]) -> list[Any]:
    """Return the records of `topic` once `expected` have arrived (and then a moment for extras)."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, **settings)
    records: list[Any] = []
    try:

        def poll() -> bool:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
            return len(records) >= expected

        wait_until(poll, 60, message=f"{expected} records on {topic}")
        # Anything published twice would be on the partition already: read to the end once more.
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
    finally:
        consumer.close()
    return records


def test_demo_publishes_what_its_report_shows(
    kafka_bootstrap: str,
    fresh_topic: Callable[..., str],
    kafka_consumer_settings: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    topic = fresh_topic(partitions=1)
    monkeypatch.setenv("HEADWATCH_COLLECTOR_KAFKA__TOPIC", topic)
    out = tmp_path / "demo"
    status = main(
        [
            "--kafka", kafka_bootstrap, "--requests", str(REQUESTS),
            "--context-tokens", str(CONTEXT_TOKENS), "--recent-tokens", str(RECENT_TOKENS),
            "--out", str(out),
        ]
    )  # fmt: skip
    printed = capsys.readouterr()
    assert status == 0, printed.err
    summary = read_summary_json(out / "heads.json")
    # One sampled position per request: the last prompt token of the prefill pass.
    assert summary.samples == REQUESTS
    assert f"published {REQUESTS} of {REQUESTS} messages to {kafka_bootstrap}" in printed.out

    records = _read_topic(kafka_bootstrap, topic, REQUESTS, kafka_consumer_settings)
    messages = [HeadStatsMessage.from_bytes(r.value) for r in records]
    assert len(messages) == REQUESTS
    assert len({m.header.message_id for m in messages}) == REQUESTS
    for record, m in zip(records, messages, strict=True):
        assert record.key == m.header.model_key.encode()
        assert m.header.model_name == summary.model_name
        assert (m.header.sink_tokens, m.header.recent_tokens) == (4, RECENT_TOKENS)
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
    policy = (out / "policy" / "policy.json").read_text()
    assert re.search(rf'"recent_tokens": {RECENT_TOKENS}\b', policy)


def test_demo_with_an_unreachable_broker_says_so_before_loading_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    status = main(["--kafka", f"127.0.0.1:{port}", "--requests", "1", "--out", str(tmp_path / "r")])
    assert status == 2
    assert f"127.0.0.1:{port}" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
