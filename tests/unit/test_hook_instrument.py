"""`headwatch run` and the zero-code attach: argument handling, environment, from_pretrained patch."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from collector import auto
from collector.instrument import BOOTSTRAP, child_environment, main


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: headwatch run" in capsys.readouterr().err


def test_bad_settings_fail_before_the_program_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HEADWATCH_COLLECTOR_SAMPLE_RATE", "2")
    assert main(["--", sys.executable, "-c", "raise SystemExit(0)"]) == 2
    assert (
        "sample_rate: expected a value less than or equal to 1, got '2'" in capsys.readouterr().err
    )


def test_exit_status_is_the_programs() -> None:
    assert main(["--", sys.executable, "-c", "raise SystemExit(3)"]) == 3


def test_bootstrap_comes_first_on_pythonpath() -> None:
    env = child_environment({"PYTHONPATH": "/elsewhere"})
    parts = env["PYTHONPATH"].split(":")
    assert parts[0] == str(BOOTSTRAP) and parts[-1] == "/elsewhere"


def test_child_process_loads_the_import_hook() -> None:
    import subprocess

    code = "import sys; from collector.auto import _Finder; print(any(isinstance(f, _Finder) for f in sys.meta_path))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=child_environment({}),
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "True"


@pytest.fixture(name="patched")
def fixture_patched() -> Iterator[None]:
    original = PreTrainedModel.__dict__["from_pretrained"]
    auto.install_import_hook()  # transformers is already imported: patches now
    try:
        yield
    finally:
        PreTrainedModel.from_pretrained = original  # type: ignore[method-assign]
        auto.shutdown()


def test_every_loaded_model_is_attached(
    patched: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEADWATCH_COLLECTOR_SINK", "memory")
    monkeypatch.setenv("HEADWATCH_COLLECTOR_SAMPLE_RATE", "1.0")
    monkeypatch.setenv("HEADWATCH_COLLECTOR_MIN_CONTEXT_TOKENS", "0")
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 12)))
    sink = auto._state["sink"]
    assert len(sink.messages) == 1
    assert sink.messages[0].model_name == str(tmp_path)


def test_a_metrics_port_in_use_still_attaches_and_says_so_in_one_line(
    patched: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        monkeypatch.setenv("HEADWATCH_COLLECTOR_SINK", "memory")
        monkeypatch.setenv("HEADWATCH_COLLECTOR_SAMPLE_RATE", "1.0")
        monkeypatch.setenv("HEADWATCH_COLLECTOR_MIN_CONTEXT_TOKENS", "0")
        monkeypatch.setenv("HEADWATCH_COLLECTOR_METRICS_PORT", str(port))
        config = LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )  # fmt: skip
        LlamaForCausalLM(config).save_pretrained(tmp_path)
        with caplog.at_level("WARNING", logger="collector.auto"):
            model = LlamaForCausalLM.from_pretrained(tmp_path)
        with torch.no_grad():
            model(torch.randint(0, 64, (1, 12)))
    finally:
        busy.close()
    assert len(auto._state["sink"].messages) == 1
    (record,) = [r for r in caplog.records if r.name == "collector.auto"]
    assert (
        f"metrics_port: expected a port free to serve metrics on 127.0.0.1, got {port}"
        in record.getMessage()
    )
    assert record.exc_info is None
