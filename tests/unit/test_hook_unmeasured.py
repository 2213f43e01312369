"""Passes the collector cannot measure are left alone and named once in the log, not counted as
errors: the hook stays enabled for the passes it can measure."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from transformers import (
    AttentionInterface,
    ContinuousBatchingConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from collector import MemorySink, attach
from collector.attach import AttachHandle

CONFIG = LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip


EVERY_PASS: dict[str, Any] = dict(
    sample_rate=1.0, min_context_tokens=0, max_sampled_passes_per_second=1000.0
)


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(CONFIG, attn_implementation="sdpa").eval()


def unmeasured(handle: AttachHandle, reason: str) -> float:
    return handle.metrics.value(
        "headwatch_collector_unmeasured_passes_total", model_name="llama", reason=reason
    )


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "collector.runtime"]


def test_continuous_batching_is_named_once_and_not_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = llama()
    sink = MemorySink()
    config = GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=-1, pad_token_id=0)
    with (
        caplog.at_level(logging.WARNING, logger="collector.runtime"),
        attach(model, sink=sink, **EVERY_PASS) as handle,
    ):
        model.generate_batch(
            inputs=[[1, 2, 3, 4, 5, 6, 7, 8], [3, 4, 5, 6, 7]],
            generation_config=config,
            # a small paged cache: the default sizes it from free memory (gigabytes)
            continuous_batching_config=ContinuousBatchingConfig(num_blocks=16, max_batch_tokens=64),
            warmup=False,
        )
        assert handle.errors == 0 and sink.messages == []
        assert unmeasured(handle, "continuous_batching") >= 3  # a prefill and 2 decode steps
        with torch.no_grad():
            model(torch.randint(1, 64, (1, 8)))  # still enabled for plain passes
        assert len(sink.messages) == 1
    (message,) = warnings_of(caplog)
    assert "PagedAttentionCache (continuous batching) are not measured" in message


def test_an_attention_function_set_after_attach_is_named_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = llama()
    sink = MemorySink()
    AttentionInterface.register("unwrapped_sdpa", sdpa_attention_forward)
    try:
        with (
            caplog.at_level(logging.WARNING, logger="collector.runtime"),
            attach(model, sink=sink, **EVERY_PASS) as handle,
        ):
            model.set_attn_implementation("unwrapped_sdpa")
            with torch.no_grad():
                for _ in range(2):
                    model(torch.randint(1, 64, (1, 8)))
            assert handle.errors == 0 and sink.messages == []
            assert unmeasured(handle, "unwrapped_attention") == 2
            model.set_attn_implementation("sdpa")
            with torch.no_grad():
                model(torch.randint(1, 64, (1, 8)))
            assert len(sink.messages) == 1
    finally:
        AttentionInterface._global_mapping.pop("unwrapped_sdpa", None)
    (message,) = warnings_of(caplog)
    assert "attention implementation is now 'unwrapped_sdpa'" in message
