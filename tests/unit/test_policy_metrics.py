"""`headwatch policy --from-metrics`: S and R from the exporter's gauges unless flags say otherwise."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest, start_http_server

from exporter.aggregate import Aggregator
from exporter.metrics import ExporterStats, HeadwatchCollector, SeriesLimits
from exporter.model_state import AggregatePolicy
from headwatch.policy import from_metrics_text, main
from headwatch.report.errors import PolicyError
from tests.factories import MessageFactory

SINK, RECENT = 4, 128
VERDICTS_ONLY = """\
# TYPE headwatch_kv_head_safe_to_compress gauge
headwatch_kv_head_safe_to_compress{model_name="tiny",layer="0",kv_head="0"} 1.0
"""


def _exporter_registry(sink: int = SINK, recent: int = RECENT) -> CollectorRegistry:
    """What an exporter serves after folding 20 messages of a (2 layers, 4 heads, 2 KV) model."""
    agg = Aggregator(AggregatePolicy(window_samples=64))
    factory = MessageFactory(layers=2, heads=4, kv_heads=2, model_name="tiny",
                             sink_tokens=sink, recent_tokens=recent, seed=3)  # fmt: skip
    for i in range(20):
        agg.fold(factory.message(timestamp_seconds=1000.0 + i), partition=0, replay=False,
                 now_wall=1000.0 + i)  # fmt: skip
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HeadwatchCollector(lambda: (agg.snapshot(), ExporterStats()), SeriesLimits()))
    return registry


def _exposition(sink: int = SINK, recent: int = RECENT) -> str:
    return generate_latest(_exporter_registry(sink, recent)).decode()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [((None, None), (SINK, RECENT)), ((2, None), (2, RECENT)), ((None, 32), (SINK, 32)),
     ((0, 16), (0, 16))],
)  # fmt: skip
def test_flags_win_over_the_exporters_sink_and_recent_tokens(
    flags: tuple[int | None, int | None], expected: tuple[int, int]
) -> None:
    policy = from_metrics_text(_exposition(), None, *flags, where="test")
    assert (policy.sink_tokens, policy.recent_tokens) == expected
    assert policy.model_name == "tiny" and policy.streaming.shape == (2, 2)


@pytest.mark.parametrize(
    ("flags", "missing"),
    [((None, None), "--sink-tokens or headwatch_model_sink_tokens and --recent-tokens"),
     ((4, None), "--recent-tokens or headwatch_model_recent_tokens for model 'tiny'"),
     ((None, 64), "--sink-tokens or headwatch_model_sink_tokens for model 'tiny'")],
)  # fmt: skip
def test_an_exporter_without_the_gauges_needs_the_flags(
    flags: tuple[int | None, int | None], missing: str
) -> None:
    with pytest.raises(PolicyError, match=re.escape(missing)):
        from_metrics_text(VERDICTS_ONLY, None, *flags, where="test")


def test_a_fractional_recent_tokens_gauge_is_rejected() -> None:
    text = VERDICTS_ONLY + (
        "# TYPE headwatch_model_sink_tokens gauge\n"
        'headwatch_model_sink_tokens{model_name="tiny"} 4.0\n'
        "# TYPE headwatch_model_recent_tokens gauge\n"
        'headwatch_model_recent_tokens{model_name="tiny"} 63.5\n'
    )
    with pytest.raises(PolicyError, match=r"headwatch_model_recent_tokens of 'tiny'.*got 63\.5"):
        from_metrics_text(text, None, where="test")


def test_the_gauges_of_the_chosen_model_are_read() -> None:
    text = _exposition().replace('model_name="tiny"', 'model_name="other"')
    text += _exposition(sink=2, recent=32)
    policy = from_metrics_text(text, "tiny", where="test")
    assert (policy.sink_tokens, policy.recent_tokens) == (2, 32)


@pytest.fixture(name="exporter_url")
def fixture_exporter_url() -> Iterator[str]:
    """An exporter's /metrics served on 127.0.0.1 (a free port)."""
    server, thread = start_http_server(0, addr="127.0.0.1", registry=_exporter_registry())
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_cli_writes_the_exporters_sink_and_recent_tokens(
    exporter_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--from-metrics", exporter_url, "--out", str(tmp_path)]) == 0
    policy = json.loads((tmp_path / "policy.json").read_text())
    duo = json.loads((tmp_path / "duo_attention" / "config.json").read_text())
    assert (policy["sink_tokens"], policy["recent_tokens"]) == (SINK, RECENT)
    assert (duo["sink_size"], duo["recent_size"]) == (SINK, RECENT)
    assert f"sink {SINK} + recent {RECENT}" in capsys.readouterr().out
