"""`headwatch analyze`: model-file errors, context limits, and a full run on a tiny model directory."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest

from headwatch.analyze import check_model_files, fit_context, main
from headwatch.prompts import Prompt
from headwatch.report.errors import ContextTooLongError, ModelFilesError


def _copy(model_dir: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in model_dir.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_analyze_writes_table_figures_and_per_head_json(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    assert (
        main(
            [
                "--model",
                str(model_dir),
                "--needles",
                "2",
                "--context-tokens",
                "256",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| pattern |" in printed and "layer |" in printed
    heads = json.loads((out / "heads.json").read_text())
    assert heads["format"] == "headwatch.head-summary.v1" and len(heads["heads"]) == 2 * 4
    assert heads["samples"] == 2 and heads["context_tokens"] == [256, 256]
    assert {"entropy_nats", "sink_mass", "eviction_error_p95", "pattern", "safe"} <= set(
        heads["heads"][0]
    )
    assert (out / "index.html").is_file() and (out / "entropy.png").is_file()
    assert (out / "policy" / "duo_attention" / "full_attention_heads.tsv").is_file()


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_model_file_is_named(model_dir: Path, tmp_path: Path, missing: str) -> None:
    broken = _copy(model_dir, tmp_path / "m")
    (broken / missing).unlink()
    with pytest.raises(ModelFilesError, match=r"config\.json|weights|tokenizer"):
        check_model_files(broken)


def test_corrupt_weights_are_named(model_dir: Path, tmp_path: Path) -> None:
    broken = _copy(model_dir, tmp_path / "m")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelFilesError, match=r"model\.safetensors"):
        check_model_files(broken)


def test_corrupt_config_is_named(model_dir: Path, tmp_path: Path) -> None:
    broken = _copy(model_dir, tmp_path / "m")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelFilesError, match=r"config\.json"):
        check_model_files(broken)


def test_cli_reports_a_missing_model_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--model", str(tmp_path / "absent"), "--out", str(tmp_path / "r")]) == 2
    assert "absent" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_prompt_longer_than_the_context_is_an_error() -> None:
    with pytest.raises(ContextTooLongError, match="at most 100 tokens"):
        fit_context([Prompt("p", "document", tuple(range(150)))], 100, truncate=False)


def test_without_a_truncate_flag_the_error_suggests_a_smaller_context() -> None:
    with pytest.raises(ContextTooLongError, match="smaller --context-tokens") as caught:
        fit_context(
            [Prompt("p", "document", tuple(range(150)))],
            100,
            truncate=False,
            has_truncate_flag=False,
        )
    assert "--truncate" not in str(caught.value)


def test_demo_suggests_only_flags_it_has_for_a_prompt_too_long(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from headwatch.demo import main as demo_main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["--model", str(model_dir), "--requests", "1", "--context-tokens", "2048",
            "--port", str(port), "--out", str(tmp_path / "r")]  # fmt: skip
    assert demo_main(argv) == 2
    err = capsys.readouterr().err
    assert "at most 1024 tokens" in err and "smaller --context-tokens" in err
    assert "--truncate" not in err


def test_validate_suggests_only_flags_it_has_for_a_prompt_too_long(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from headwatch.policy import KvPolicy, write_policy
    from headwatch.validate import main as validate_main

    streaming = np.array([[True, False], [False, False]])
    write_policy(KvPolicy("tiny", 4, 16, streaming, np.full((2, 2), 0.01), "test"), tmp_path / "p")
    argv = ["--policy", str(tmp_path / "p" / "policy.json"), "--model", str(model_dir),
            "--prompts", "1", "--context-tokens", "2048", "--out", str(tmp_path / "v.md")]  # fmt: skip
    assert validate_main(argv) == 2
    err = capsys.readouterr().err
    assert "at most 1024 tokens" in err and "smaller --context-tokens" in err
    assert "--truncate" not in err


def test_truncation_keeps_the_first_token_and_the_end(caplog: pytest.LogCaptureFixture) -> None:
    (p,) = fit_context([Prompt("p", "document", tuple(range(150)))], 100, truncate=True)
    assert len(p.ids) == 100 and p.ids[0] == 0 and p.ids[-1] == 149
    assert "truncated" in caplog.text


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device", "bogus"], "expected a torch device such as cpu or cuda:0, got 'bogus'"),
        (["--out", "FILE"], "expected a new or empty report folder, got existing file"),
    ],
    ids=["device", "out-is-a-file"],
)
def test_cli_refuses_bad_flags_before_loading_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    args = [str(taken) if f == "FILE" else f for f in flags]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "r")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
