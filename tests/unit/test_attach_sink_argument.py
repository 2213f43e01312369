"""`attach(model, sink=...)`: a Sink object, a sink name the settings build, or a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from collector import attach
from collector.errors import SettingsError
from collector.schema import HeadStatsMessage
from collector.sinks import read_jsonl


def llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()


def test_a_sink_name_builds_that_sink(tmp_path: Path) -> None:
    path = tmp_path / "stats.jsonl"
    model = llama()
    with torch.no_grad(), attach(model, sink="file", file_path=str(path), sample_rate=1.0,
                                 min_context_tokens=0):  # fmt: skip
        model(torch.randint(0, 64, (1, 20)))
    messages = read_jsonl(path)
    assert len(messages) == 1 and isinstance(messages[0], HeadStatsMessage)


def test_an_unknown_sink_name_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match="sink"):
        attach(llama(), sink="redis")


def test_an_object_that_is_no_sink_is_named() -> None:
    with pytest.raises(SettingsError, match=r"expected a Sink .* got dict"):
        attach(llama(), sink={"kind": "memory"})  # type: ignore[arg-type]
