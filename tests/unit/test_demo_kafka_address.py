"""`headwatch demo --kafka` refuses bad arguments before touching the network."""

from __future__ import annotations

from pathlib import Path

import pytest

from headwatch.demo import main


@pytest.mark.parametrize("bootstrap", ["localhost", ":9092", "localhost:port", ","])
def test_a_malformed_bootstrap_is_a_clear_error(
    bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--kafka", bootstrap, "--out", str(tmp_path / "r")]) == 2
    assert (
        f"expected --kafka as host:port[,host:port...], got {bootstrap!r}"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "r").exists()


def test_serve_with_kafka_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--kafka", "127.0.0.1:9092", "--serve", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert "expected --serve or --kafka, got both" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
