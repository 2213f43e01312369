"""Attaching refuses models whose attention never reaches the wrapped functions, naming them."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, FalconConfig, GPT2Config

from collector import MemorySink, attach
from collector.errors import UnsupportedModelError


def gpt2(implementation: str, reorder_and_upcast_attn: bool) -> torch.nn.Module:
    config = GPT2Config(
        vocab_size=96,
        n_embd=32,
        n_layer=2,
        n_head=2,
        reorder_and_upcast_attn=reorder_and_upcast_attn,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=implementation).eval()


def test_a_model_that_computes_attention_itself_is_refused_at_attach_time() -> None:
    # Falcon declares sdpa support but calls torch's kernel from its own forward.
    config = FalconConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        new_decoder_architecture=False,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    with pytest.raises(UnsupportedModelError, match=r"FalconAttention .*FalconForCausalLM"):
        attach(model, sink=MemorySink())


def test_gpt2_reordered_upcast_attention_is_refused_under_eager() -> None:
    with pytest.raises(UnsupportedModelError, match=r"reorder_and_upcast_attn.*GPT2LMHeadModel"):
        attach(gpt2("eager", reorder_and_upcast_attn=True), sink=MemorySink())


def test_gpt2_with_the_flag_is_still_measured_through_sdpa() -> None:
    # The flag only changes GPT-2's eager path; sdpa still goes through the registry.
    model, sink = gpt2("sdpa", reorder_and_upcast_attn=True), MemorySink()
    with (
        attach(model, sink=sink, sample_rate=1.0, min_context_tokens=0) as handle,
        torch.no_grad(),
    ):
        model(torch.randint(3, 96, (1, 12)))
    assert handle.errors == 0
    assert len(sink.messages) == 1
