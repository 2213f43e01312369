"""Wire size of a 32-layer x 32-head message with the default statistics, on computed attention."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from collector import MemorySink, attach


def test_32_layer_32_head_message_is_at_most_16_kb() -> None:
    config = LlamaConfig(
        vocab_size=64, hidden_size=128, intermediate_size=64, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=8, max_position_embeddings=1024, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    sink = MemorySink()
    ids = torch.randint(0, 64, (1, 600))
    with torch.no_grad(), attach(model, sink=sink, sample_rate=1.0, min_context_tokens=0):
        model(ids)
    (message,) = sink.messages
    assert message.stat("entropy_nats").shape == (32, 32)
    assert message.valid.all()
    assert len(message.to_bytes()) <= 16 * 1024
