"""`headwatch demo`: in-process aggregation, /metrics, port errors and a full run on a tiny model."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest

from exporter.metrics import SeriesLimits
from headwatch.analyze import measure, prompt_maker
from headwatch.demo import LiveAggregation, exporter_settings, main, serve_metrics
from headwatch.report.errors import PortInUseError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_demo_folds_messages_and_serves_the_exporters_metrics(model_dir: Path) -> None:
    from headwatch.analyze import load_model

    model, tokenizer, name = load_model(model_dir)
    settings = exporter_settings(None)
    live = LiveAggregation(settings.aggregate_policy())
    prompts = prompt_maker(tokenizer).mixed(3, 256, seed=0)
    measure(model, prompts, name, 4, 32, sink=live, progress=False)
    assert live.folded == 3 and len(live.messages) == 3
    server = serve_metrics(live, "127.0.0.1", 0, SeriesLimits())
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{server.server_port}/metrics", timeout=10
        ) as r:
            body = r.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert (
        f'headwatch_kv_head_safe_to_compress{{kv_head="0",layer="0",model_name="{name}"}}' in body
    )
    assert body.count("headwatch_head_pattern{") == 2 * 4
    assert "headwatch_model_kv_reclaimable_bytes" in body


def test_port_in_use_is_a_clear_error_naming_the_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        live = LiveAggregation(exporter_settings(None).aggregate_policy())
        with pytest.raises(PortInUseError, match=f"port {port}"):
            serve_metrics(live, "127.0.0.1", port, SeriesLimits())


def test_demo_run_prints_the_table_and_writes_the_report(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    args = [
        "--model",
        str(model_dir),
        "--requests",
        "4",
        "--context-tokens",
        "256",
        "--port",
        str(_free_port()),
        "--out",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "layer |" in printed and "| pattern |" in printed and "index.html" in printed
    page = (out / "index.html").read_text()
    assert 'src="entropy.png"' in page and 'src="masses.png"' in page
    assert (out / "heads.json").is_file() and (out / "policy" / "policy.json").is_file()


def test_demo_refuses_a_taken_port_before_loading_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert (
            main(
                [
                    "--model",
                    str(tmp_path / "absent"),
                    "--port",
                    str(port),
                    "--out",
                    str(tmp_path / "r"),
                ]
            )
            == 2
        )
    assert f"port {port}" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_port_out_of_range_is_one_line_naming_the_setting_and_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model", str(tmp_path / "absent"), "--port", "99999", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "headwatch demo: http.port: expected a value less than or equal to 65535, got 99999"
    )


def test_a_bad_collector_variable_with_kafka_is_one_line_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import headwatch.localstack.kafka

    monkeypatch.setattr(headwatch.localstack.kafka, "broker_answers", lambda server: True)
    monkeypatch.setenv("HEADWATCH_COLLECTOR_METRICS_PORT", "99999")
    argv = ["--kafka", "127.0.0.1:9", "--model", str(tmp_path / "absent"),
            "--out", str(tmp_path / "r")]  # fmt: skip
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "headwatch demo: metrics_port: expected a value less than or equal to 65535, got '99999'"
    )


def test_recent_tokens_zero_is_refused_not_replaced_by_the_default(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model", str(model_dir), "--requests", "1", "--context-tokens", "128",
            "--recent-tokens", "0", "--port", str(_free_port()), "--out", str(tmp_path / "r")]  # fmt: skip
    assert main(argv) == 2
    assert "expected --recent-tokens >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
