"""Exactness on a matrix of tiny random-weight models: every statistic equals the one computed from
the eager kernel's own probabilities and value vectors; logits are bitwise identical with the hook."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from collector import MemorySink, attach
from collector.schema import HeadStatsMessage

SINK, RECENT = 4, 8
TOP_K = (1, 16, 256)
COMMON: dict[str, Any] = {
    "vocab_size": 96, "initializer_range": 0.2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
LLAMA_LIKE = {
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 128,
}  # fmt: skip

MODELS: dict[str, tuple[PretrainedConfig, str]] = {
    "llama": (LlamaConfig(**LLAMA_LIKE, **COMMON), "sdpa"),
    "qwen2": (Qwen2Config(**LLAMA_LIKE, **COMMON), "sdpa"),
    "qwen3": (Qwen3Config(**LLAMA_LIKE, head_dim=16, **COMMON), "sdpa"),
    "mistral": (MistralConfig(**LLAMA_LIKE, sliding_window=16, **COMMON), "sdpa"),
    "gemma2": (
        Gemma2Config(
            **LLAMA_LIKE,
            head_dim=16,
            sliding_window=16,
            attn_logit_softcapping=3.0,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"],
            **COMMON,
        ),
        "eager",
    ),
    "phi3": (Phi3Config(**LLAMA_LIKE, **COMMON), "sdpa"),
    "gpt2": (GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **COMMON), "sdpa"),
    "gpt_neox": (
        GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            rotary_pct=0.5,
            **COMMON,
        ),
        "sdpa",
    ),
}


@dataclass
class Call:
    """One eager attention call of the reference run."""

    probs: np.ndarray  # (batch, heads, q, keys)
    value: np.ndarray  # (batch, kv_heads, keys, d)


def build(name: str, implementation: str) -> torch.nn.Module:
    config, _ = MODELS[name]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
    return model.eval()


@contextlib.contextmanager
def capture(model: torch.nn.Module) -> Iterator[list[Call]]:
    """Record the eager kernel's probabilities and values on every attention call."""
    calls: list[Call] = []
    modules = {sys.modules[type(m).__module__] for m in model.modules() if hasattr(m, "layer_idx")}
    saved = {mod: mod.eager_attention_forward for mod in modules}

    def make(original: Any) -> Any:
        def recording(
            module: Any, query: Any, key: Any, value: Any, mask: Any, **kwargs: Any
        ) -> Any:
            out, weights = original(module, query, key, value, mask, **kwargs)
            calls.append(Call(weights.double().numpy(), value.double().numpy()))
            return out, weights

        return recording

    for mod, original in saved.items():
        mod.eager_attention_forward = make(original)
    try:
        yield calls
    finally:
        for mod, original in saved.items():
            mod.eager_attention_forward = original


def inputs(batch_lengths: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts of the given lengths."""
    torch.manual_seed(1)
    width = max(batch_lengths)
    ids = torch.randint(3, 96, (len(batch_lengths), width))
    mask = torch.ones_like(ids)
    for b, n in enumerate(batch_lengths):
        ids[b, : width - n] = 0
        mask[b, : width - n] = 0
    return ids, mask


def generate(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, steps: int, **kwargs: Any
) -> Any:
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
            return_dict_in_generate=True, output_logits=True, pad_token_id=0, **kwargs,
        )  # fmt: skip


def reference(
    call: Call, b: int, slots_mask: np.ndarray, layer_sink: bool = True
) -> dict[str, np.ndarray]:
    """Statistics of the last query row of batch entry b, from eager probabilities and values."""
    p = call.probs[b, :, -1, :]  # (heads, keys)
    keys = p.shape[-1]
    total = slots_mask.shape[0]
    offset = total - keys if keys < total else 0
    real = slots_mask.astype(bool)
    positions = np.where(real, np.cumsum(real) - 1, -1)[offset : offset + keys]
    qpos = int(np.cumsum(real)[-1] - 1)
    sink = (positions >= 0) & (positions < SINK)
    recent = (positions > qpos - RECENT) & (positions >= SINK) & (positions <= qpos)
    heads, kv_heads = p.shape[0], call.value.shape[1]
    values = call.value[b][np.arange(heads) // (heads // kv_heads)]  # (heads, keys, d)
    out = np.einsum("hk,hkd->hd", p, values)
    keep = sink | recent
    kept = np.einsum("hk,hkd->hd", p[:, keep], values[:, keep]) / p[:, keep].sum(-1, keepdims=True)
    ordered = -np.sort(-p, axis=-1)
    cum = np.cumsum(ordered, axis=-1)
    stats = {
        "entropy_nats": -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(-1),
        "sink_mass": p[:, sink].sum(-1),
        "recent_mass": p[:, recent].sum(-1),
        "middle_mass": p[:, ~keep].sum(-1),
        "eviction_error": np.linalg.norm(out - kept, axis=-1) / np.linalg.norm(out, axis=-1),
        "cum": cum,
    }
    for k in TOP_K:
        stats[f"top{k}_mass"] = cum[:, min(k, keys) - 1]
    return stats


def check(message: HeadStatsMessage, calls: list[Call], b: int, slots_mask: np.ndarray) -> None:
    assert message.context_tokens == int(slots_mask.sum())
    assert message.query_position == int(slots_mask.sum()) - 1
    # one eager call per layer: with none captured the comparisons below would be skipped
    assert len(calls) == message.num_layers
    for layer, call in enumerate(calls):
        ref = reference(call, b, slots_mask)
        assert message.visible_keys[layer] == int((call.probs[b, 0, -1] > 0).sum())
        for name in (
            "entropy_nats",
            "sink_mass",
            "recent_mass",
            "middle_mass",
            *(f"top{k}_mass" for k in TOP_K),
        ):
            np.testing.assert_allclose(
                message.stat(name)[layer], ref[name], atol=1e-5, rtol=0, err_msg=name
            )
        np.testing.assert_allclose(
            message.stat("eviction_error")[layer], ref["eviction_error"], atol=1e-4, rtol=0
        )
        counts = message.stat("keys_for_90pct")[layer].astype(int)
        cum = ref["cum"]
        for h, c in enumerate(counts):
            assert cum[h, c - 1] >= 0.9 - 1e-5
            assert c == 1 or cum[h, c - 2] < 0.9 + 1e-5


def measured_generate(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    steps: int,
    expected: Any,
    **kwargs: Any,
) -> MemorySink:
    """Generate with every prefill and decode row measured; the sink of its messages. The tokens
    must equal `expected`'s (the hook changes nothing) and the hook must raise nothing."""
    sink = MemorySink()
    with attach(
        model, sink=sink, sample_rate=1.0, min_context_tokens=0, sink_tokens=SINK, recent_tokens=RECENT,
        decode_every=1, max_decode_samples=steps, max_sampled_passes_per_second=1000.0,
    ) as handle:  # fmt: skip
        got = generate(model, ids, mask, steps, **kwargs)
    assert handle.errors == 0
    assert torch.equal(got.sequences, expected.sequences)
    return sink


# On the numpy (CPU) and the torch (GPU: `_device_pass`, buffers shared across layers) paths.
@pytest.mark.usefixtures("stats_path")
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("lengths", [(40,), (40, 31)], ids=["single", "left_padded"])
def test_prefill_and_decode_rows_match_eager_probabilities(
    name: str, lengths: tuple[int, ...]
) -> None:
    steps = 3
    ids, mask = inputs(lengths)
    eager = build(name, "eager")
    with capture(eager) as calls:
        expected = generate(eager, ids, mask, steps)
    sink = measured_generate(build(name, MODELS[name][1]), ids, mask, steps, expected)
    batch, layers = len(lengths), 2
    assert len(sink.messages) == steps * batch
    for i, message in enumerate(sink.messages):
        step, b = divmod(i, batch)
        assert message.phase == ("prefill" if step == 0 else "decode")
        slots = np.concatenate([mask[b].numpy(), np.ones(step, dtype=np.int64)])
        check(message, calls[step * layers : (step + 1) * layers], b, slots)


# A static cache makes generate() pass the model a 4-D mask over the cache's slots (a dict of them
# by layer type for Qwen2, Qwen3 and Gemma2) instead of the 2-D padding mask.
@pytest.mark.parametrize("name", sorted(MODELS))
def test_static_cache_padded_rows_match_eager_probabilities(name: str) -> None:
    steps = 3
    lengths = (40, 31)
    ids, mask = inputs(lengths)
    eager = build(name, "eager")
    with capture(eager) as calls:
        expected = generate(eager, ids, mask, steps)
    sink = measured_generate(
        build(name, MODELS[name][1]), ids, mask, steps, expected, cache_implementation="static"
    )
    batch, layers = len(lengths), 2
    assert len(sink.messages) == steps * batch
    for i, message in enumerate(sink.messages):
        step, b = divmod(i, batch)
        slots = np.concatenate([mask[b].numpy(), np.ones(step, dtype=np.int64)])
        check(message, calls[step * layers : (step + 1) * layers], b, slots)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_are_bitwise_identical_with_the_hook(name: str) -> None:
    ids, mask = inputs((40, 31))
    model = build(name, MODELS[name][1])
    plain = generate(model, ids, mask, 2)
    for rate in (1.0, 0.01):
        with attach(
            model, sink=MemorySink(), sample_rate=rate, min_context_tokens=0, decode_every=1, seed=3
        ):
            hooked = generate(model, ids, mask, 2)
        for a, b in zip(plain.logits, hooked.logits, strict=True):
            assert torch.equal(a, b)


# Chunked prefill: each chunk is a pass that continues the prompt, measured at its last token
# against the keys cached by the chunks before it (and a sliding window where the model has one).
# A static cache is initialised before the first chunk there (`early_initialization`); the eager
# reference keeps a dynamic cache, whose keys are the sequence's.
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_chunked_prefill_rows_match_eager_probabilities(name: str, cache: str) -> None:
    steps = 3
    ids, mask = inputs((40,))
    eager = build(name, "eager")
    with capture(eager) as calls:
        expected = generate(eager, ids, mask, steps, prefill_chunk_size=16)
    given: dict[str, Any] = {"prefill_chunk_size": 16}
    if cache == "static":
        given["cache_implementation"] = "static"
    sink = measured_generate(build(name, MODELS[name][1]), ids, mask, steps, expected, **given)
    ends = [16, 32, 40, 41, 42]  # the chunks' last tokens, then the decode steps
    assert [m.query_position + 1 for m in sink.messages] == ends
    assert [m.phase for m in sink.messages] == ["prefill"] * 3 + ["decode"] * 2
    layers = 2
    for i, (message, end) in enumerate(zip(sink.messages, ends, strict=True)):
        check(message, calls[i * layers : (i + 1) * layers], 0, np.ones(end, dtype=np.int64))
