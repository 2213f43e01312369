"""A tiny Llama whose layer-0 heads have hand-set Q/K weights with known patterns: FOR TESTS ONLY.

Usage:
    model = handset_model()
    model(input_ids, output_attentions=True)   # layer 0: head 0 sink, 1 recency, 2 marker, 3 uniform

Nothing here was learned. Unit tests use it where they need heads whose pattern is known in
advance; it is never the bundled model (that one is trained: headwatch/model/).

How the weights work. Every token embedding has the same norm (so RMSNorm keeps it as is) and
three feature dimensions: a constant "bias", "is <bos>" and "is the marker token". A head's
query reads the bias and its key reads one feature; on the lowest RoPE frequency the rotation
barely moves over a few thousand positions, so that score depends on the key's content only
(sink, marker). On the higher frequencies a constant query and key give a score that peaks at
relative distance 0, so that head looks at the last few tokens (recency). A zero query gives a
uniform head.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

HIDDEN = 64
HEAD_DIM = 16
BOS_TOKEN_ID = 0
MARKER_TOKEN_ID = 5
# (layer, head) -> the pattern its last-query attention shows
HANDSET_PATTERNS: dict[tuple[int, int], str] = {
    (0, 0): "sink",
    (0, 1): "recency",
    (0, 2): "marker",
    (0, 3): "uniform",
}

_BIAS, _IS_BOS, _IS_MARKER = 0, 1, 2
_FEATURE = 4.0  # value of a feature dimension in a unit-RMS embedding
_CONTENT_GAIN = 2.5  # sink/marker score about 0.25 * 16 * 6.25 * cos(small) ~ 20 nats
_LOCAL_GAIN = 0.9  # recency: score 4 * 0.81 * sum(cos(d * theta_i)), sharp at d = 0


def handset_config(vocab_size: int = 64, layers: int = 2, context: int = 4096) -> LlamaConfig:
    """Return the config of the hand-set model (4 query heads, 2 KV heads, head dim 16)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=context,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=1,
        pad_token_id=2,
    )
    config._attn_implementation = "eager"
    return config


def handset_model(
    seed: int = 0, vocab_size: int = 64, layers: int = 2, context: int = 4096
) -> LlamaForCausalLM:
    """Return a tiny Llama whose layer-0 heads follow `HANDSET_PATTERNS` (test fixture only)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(handset_config(vocab_size, layers, context)).eval()
    with torch.no_grad():
        emb = torch.randn(vocab_size, HIDDEN)
        emb[:, :3] = 0.0
        # the random dimensions carry the rest of a unit RMS: 64 - 16 (bias) - 16 (flag)
        emb[:, 3:] *= (32.0 / emb[:, 3:].pow(2).sum(-1, keepdim=True)).sqrt()
        emb[:, _BIAS] = _FEATURE
        emb[BOS_TOKEN_ID, _IS_BOS] = _FEATURE
        emb[MARKER_TOKEN_ID, _IS_MARKER] = _FEATURE
        plain = torch.ones(vocab_size, dtype=torch.bool)
        plain[[BOS_TOKEN_ID, MARKER_TOKEN_ID]] = False
        emb[plain, 3] = _FEATURE  # plain tokens get a flag-sized value too: similar norms
        model.model.embed_tokens.weight.copy_(emb)

        attn = model.model.layers[0].self_attn
        q = torch.zeros(4 * HEAD_DIM, HIDDEN)
        k = torch.zeros(2 * HEAD_DIM, HIDDEN)
        low = HEAD_DIM // 2 - 1  # the lowest RoPE frequency pair is (low, HEAD_DIM - 1)
        # head 0 (kv 0): sink, query bias . key "is <bos>"
        q[0 * HEAD_DIM + low, _BIAS] = _CONTENT_GAIN
        k[0 * HEAD_DIM + low, _IS_BOS] = _CONTENT_GAIN
        # head 1 (kv 0): recency, bias . bias on every higher-frequency pair
        for i in range(low):
            q[1 * HEAD_DIM + i, _BIAS] = _LOCAL_GAIN
            k[0 * HEAD_DIM + i, _BIAS] = _LOCAL_GAIN
        # head 2 (kv 1): marker, query bias . key "is the marker"
        q[2 * HEAD_DIM + low, _BIAS] = _CONTENT_GAIN
        k[1 * HEAD_DIM + low, _IS_MARKER] = _CONTENT_GAIN
        # head 3 (kv 1): zero query, uniform attention
        attn.q_proj.weight.copy_(q)
        attn.k_proj.weight.copy_(k)
        model.model.layers[0].input_layernorm.weight.fill_(1.0)
    return model
