"""`headwatch demo --kafka` refuses a malformed bootstrap address before touching the network."""

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
