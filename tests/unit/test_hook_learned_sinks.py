"""Models with learned sink logits (gpt-oss): valid messages whose statistics equal those of the
eager kernel's own probabilities, the learned sink counted as one more outcome."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GptOssConfig
from transformers.models.gpt_oss import modeling_gpt_oss

from collector import MemorySink, attach
from collector.schema import LEARNED_SINK_STAT, HeadStatsMessage
from tests.unit.test_hook_matrix import (
    COMMON,
    RECENT,
    SINK,
    TOP_K,
    generate,
    inputs,
    measured_generate,
)

LAYERS = 2
CONFIG = GptOssConfig(
    hidden_size=64, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
    sliding_window=16, layer_types=["sliding_attention", "full_attention"],
    max_position_embeddings=128, **COMMON,
)  # fmt: skip


def attention_modules(model: torch.nn.Module) -> list[Any]:
    """The attention modules: those with learned sink logits (`sinks`, one per query head)."""
    return [m for m in model.modules() if isinstance(getattr(m, "sinks", None), torch.Tensor)]


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIG, attn_implementation="eager").eval()
    with torch.no_grad():  # learned sinks that take from a few % to most of a head's mass
        for module in attention_modules(model):
            module.sinks.copy_(torch.linspace(-2.0, 3.0, module.sinks.numel()))
    return model


@dataclass
class Call:
    """One eager attention call of the reference run."""

    probs: np.ndarray  # (batch, heads, q, keys): the kernel's own, as output_attentions gives them
    value: np.ndarray  # (batch, kv_heads, keys, d)
    atom: np.ndarray  # (batch, heads, q): the learned sink's probability


@contextlib.contextmanager
def capture() -> Iterator[list[Call]]:
    """Record the eager kernel's probabilities and values, and the learned sink's probability.

    The kernel drops the learned sink's column from the probabilities it returns. What they
    leave (1 minus their float32 sum) loses all precision when the learned sink takes less
    than about 1e-6, and a head whose kept keys hold as little has its eviction error set by
    it: the learned sink's probability is recomputed in float64 from the kernel's inputs.
    """
    calls: list[Call] = []
    original = modeling_gpt_oss.eager_attention_forward

    def recording(
        module: Any, query: Any, key: Any, value: Any, mask: Any, scaling: float, **kwargs: Any
    ) -> Any:
        out, weights = original(module, query, key, value, mask, scaling, **kwargs)
        group = query.shape[1] // key.shape[1]
        logits = query.double() @ key.double().repeat_interleave(group, 1).transpose(2, 3)
        logits = logits * scaling + (0.0 if mask is None else mask.double())
        sinks = module.sinks.double().reshape(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
        atom = torch.softmax(torch.cat([logits, sinks], -1), -1)[..., -1]
        calls.append(Call(weights.double().numpy(), value.double().numpy(), atom.numpy()))
        return out, weights

    modeling_gpt_oss.eager_attention_forward = recording  # type: ignore[assignment]
    try:
        yield calls
    finally:
        modeling_gpt_oss.eager_attention_forward = original


def reference(call: Call, b: int, slots_mask: np.ndarray) -> dict[str, np.ndarray]:
    """Statistics of the last query row of batch entry b from the eager probabilities."""
    p = call.probs[b, :, -1, :]  # (heads, keys)
    atom = call.atom[b, :, -1]
    keys, total = p.shape[-1], slots_mask.shape[0]
    offset = total - keys if keys < total else 0
    real = slots_mask.astype(bool)
    positions = np.where(real, np.cumsum(real) - 1, -1)[offset : offset + keys]
    qpos = int(real.sum()) - 1
    sink = (positions >= 0) & (positions < SINK)
    recent = (positions > qpos - RECENT) & (positions >= SINK) & (positions <= qpos)
    keep = sink | recent
    heads, kv_heads = p.shape[0], call.value.shape[1]
    values = call.value[b][np.arange(heads) // (heads // kv_heads)]  # (heads, keys, d)
    out = np.einsum("hk,hkd->hd", p, values)
    # The learned sink is never evicted: it stays in the renormalisation of the kept keys.
    kept = np.einsum("hk,hkd->hd", p[:, keep], values[:, keep])
    kept /= (p[:, keep].sum(-1) + atom)[:, None]
    cum = np.cumsum(-np.sort(-p, axis=-1), axis=-1)
    logp = np.log(np.where(p > 0, p, 1))
    stats = {
        "entropy_nats": -(p * logp).sum(-1) - atom * np.log(atom),
        "sink_mass": p[:, sink].sum(-1),
        "recent_mass": p[:, recent].sum(-1),
        "middle_mass": p[:, ~keep].sum(-1),
        LEARNED_SINK_STAT: atom,
        "eviction_error": np.linalg.norm(out - kept, axis=-1) / np.linalg.norm(out, axis=-1),
        "cum": cum,
        "target": 0.9 * (1.0 - atom),  # keys_for_90pct: 90% of the keys' mass
    }
    for k in TOP_K:
        stats[f"top{k}_mass"] = cum[:, min(k, keys) - 1]
    return stats


def check(message: HeadStatsMessage, calls: list[Call], b: int, slots_mask: np.ndarray) -> None:
    assert message.learned_sinks
    assert len(calls) == message.num_layers  # with none captured nothing below would be compared
    for layer, call in enumerate(calls):
        ref = reference(call, b, slots_mask)
        visible = int((call.probs[b, 0, -1] > 0).sum())
        assert message.visible_keys[layer] == visible
        for name in (
            "entropy_nats", "sink_mass", "recent_mass", "middle_mass", LEARNED_SINK_STAT,
            *(f"top{k}_mass" for k in TOP_K),
        ):  # fmt: skip
            np.testing.assert_allclose(
                message.stat(name)[layer], ref[name], atol=1e-5, rtol=0, err_msg=name
            )
        np.testing.assert_allclose(
            message.stat("eviction_error")[layer], ref["eviction_error"], atol=1e-4, rtol=0
        )
        np.testing.assert_allclose(
            message.stat("normalized_entropy")[layer],
            ref["entropy_nats"] / np.log(visible + 1),
            atol=1e-5,
            rtol=0,
        )
        counts = message.stat("keys_for_90pct")[layer].astype(int)
        for h, c in enumerate(counts):
            assert ref["cum"][h, c - 1] >= ref["target"][h] - 1e-5
            assert c == 1 or ref["cum"][h, c - 2] < ref["target"][h] + 1e-5


@pytest.mark.usefixtures("stats_path")
@pytest.mark.parametrize("lengths", [(40,), (40, 31)], ids=["single", "left_padded"])
def test_prefill_and_decode_rows_match_eager_probabilities(lengths: tuple[int, ...]) -> None:
    """A sliding-window and a full layer; prefill and decode rows; left padding."""
    steps = 3
    ids, mask = inputs(lengths)
    eager = build()
    with capture() as calls:
        expected = generate(eager, ids, mask, steps)
    sink = measured_generate(build(), ids, mask, steps, expected)
    assert len(sink.messages) == steps * len(lengths)
    for i, message in enumerate(sink.messages):
        step, b = divmod(i, len(lengths))
        slots = np.concatenate([mask[b].numpy(), np.ones(step, dtype=np.int64)])
        check(message, calls[step * LAYERS : (step + 1) * LAYERS], b, slots)
        assert HeadStatsMessage.from_bytes(message.to_bytes()) == message


def test_entropy_above_ln_visible_keys_is_published() -> None:
    """Near-uniform heads over few keys: the learned sink lifts the entropy above ln(visible keys)."""
    model = build()
    with torch.no_grad():
        for module in attention_modules(model):
            module.sinks.fill_(0.0)
            module.q_proj.weight.zero_()  # equal logits: every key and the sink alike
            module.q_proj.bias.zero_()
    sink = MemorySink()
    with torch.no_grad(), attach(model, sink=sink, sample_rate=1.0, min_context_tokens=0) as handle:
        model(torch.randint(3, 96, (1, 6)))
    assert handle.errors == 0
    (message,) = sink.messages
    assert message.valid.all()
    np.testing.assert_allclose(message.stat("entropy_nats"), np.log(7), atol=1e-5)
    np.testing.assert_allclose(message.stat("normalized_entropy"), 1.0, atol=1e-5)
    np.testing.assert_allclose(message.stat("middle_mass"), 0.0, atol=1e-5)
    np.testing.assert_allclose(message.stat(LEARNED_SINK_STAT), 1 / 7, atol=1e-5)
