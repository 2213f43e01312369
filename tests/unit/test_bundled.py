"""Unit tests of headwatch.bundled: the shipped model loads offline; damaged files are named."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from headwatch.bundled import REQUIRED_FILES, BundledModelError, bundled_model_dir, load_bundled

MAX_CHECKPOINT_BYTES = 16 * 1024 * 1024


@pytest.fixture(name="offline")
def fixture_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(name="model_copy")
def fixture_model_copy(tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(bundled_model_dir(), target)
    return target


def test_bundled_files_are_present_and_small() -> None:
    directory = bundled_model_dir()
    for name in (*REQUIRED_FILES, "special_tokens_map.json", "MODEL_CARD.md", "loss_curve.png"):
        assert (directory / name).is_file(), name
    assert (directory / "model.safetensors").stat().st_size <= MAX_CHECKPOINT_BYTES


@pytest.mark.usefixtures("offline")
def test_bundled_model_loads_offline_with_long_context() -> None:
    model, tok = load_bundled()
    config = model.config
    assert config.model_type == "llama"
    assert config.max_position_embeddings >= 2048
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    ids = tok(
        "In the beginning God created the heaven and the earth.", return_tensors="pt"
    ).input_ids
    assert ids[0, 0].item() == tok.bos_token_id == 0
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.usefixtures("offline")
def test_bundled_model_has_learned_text() -> None:
    model, tok = load_bundled()
    text = (
        "And God said unto Moses, Speak unto the children of Israel, that they go forward. "
        "And the LORD spake unto Moses, saying, Speak unto the children of Israel."
    )
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    # a random model scores about ln(vocab) = 8.3 nats per token
    assert loss < 0.6 * math.log(model.config.vocab_size)


@pytest.mark.parametrize("name", REQUIRED_FILES)
def test_missing_file_is_named(model_copy: Path, name: str) -> None:
    (model_copy / name).unlink()
    with pytest.raises(BundledModelError, match=name.replace(".", r"\.")):
        load_bundled(model_dir=model_copy)


@pytest.mark.parametrize("name", REQUIRED_FILES)
def test_corrupt_file_is_named(model_copy: Path, name: str) -> None:
    (model_copy / name).write_bytes(b"\x00not what it should be{")
    with pytest.raises(BundledModelError, match=name.replace(".", r"\.")):
        load_bundled(model_dir=model_copy)


def test_truncated_weights_are_named(model_copy: Path) -> None:
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 1 << 16])
    with pytest.raises(BundledModelError, match=r"model\.safetensors"):
        load_bundled(model_dir=model_copy)
