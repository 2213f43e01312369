"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import collector.topk
from headwatch.prompts import synthetic_text
from headwatch.training.tokenizer import save_tokenizer, train_tokenizer


@pytest.fixture(name="model_dir", scope="module")
def fixture_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (GQA) with a byte-level BPE tokenizer, saved like any HF model directory."""
    out = tmp_path_factory.mktemp("tiny-llama")
    save_tokenizer(
        train_tokenizer([synthetic_text(30_000, seed=1)], vocab_size=320),
        out,
        model_max_length=1024,
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(name="stats_path", params=["numpy", "torch"])
def fixture_stats_path(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """Run a statistics test on each path: numpy (what the CPU runs) and torch (what a GPU runs)."""
    if request.param == "torch":
        monkeypatch.setattr(collector.topk, "on_host", lambda t: False)
    yield request.param
