"""The pieces of the training loop: model, schedule, one optimiser step, checkpoints."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from headwatch.training.errors import CheckpointError
from headwatch.training.tasks import WindowMaker
from headwatch.training.tokenizer import BOS_ID, EOS_ID, PAD_ID

CURVE_FIELDS = (
    "step",
    "tokens",
    "elapsed_s",
    "lr",
    "context",
    "train_loss",
    "held_loss",
    "copy_acc",
    "needle_exact",
    "needle_token_acc",
)

# Window kinds and their shares per phase. Phase A: short windows, copy-heavy, so that an
# induction head forms early; phase B: long windows, text plus retrieval from far back.
MIX_A = {"random_repeat": 0.3, "text_repeat": 0.15, "needle": 0.3, "text": 0.25}
MIX_B = {"text": 0.4, "needle": 0.45, "text_repeat": 0.1, "random_repeat": 0.05}


def build_model(args: argparse.Namespace, vocab_size: int) -> LlamaForCausalLM:
    """Return a freshly initialised Llama with the shape given on the command line."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.mlp,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.context,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


class Schedule:
    """Which window length, batch size and task mix each step uses, and its learning rate."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.steps_a = args.steps_a
        self.total = args.steps_a + args.steps_b
        self.context_a = args.context_a
        self.context_b = args.context
        self.tokens_per_step = args.tokens_per_step
        self.peak_lr = args.lr
        self.warmup = args.warmup

    def window(self, step: int) -> tuple[int, int, dict[str, float]]:
        """Return (window length, windows per batch, task mix) for `step`."""
        length, mix = (self.context_a, MIX_A) if step < self.steps_a else (self.context_b, MIX_B)
        return length, max(1, self.tokens_per_step // length), mix

    def lr(self, step: int) -> float:
        """Linear warm-up, then cosine decay to a tenth of the peak."""
        if step < self.warmup:
            return self.peak_lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return self.peak_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_step(
    model: LlamaForCausalLM,
    optim: torch.optim.Optimizer,
    maker: WindowMaker,
    sched: Schedule,
    step: int,
    device: str,
) -> tuple[float, int]:
    """Run one optimiser step; return (weighted loss, tokens in the batch)."""
    length, batch, mix = sched.window(step)
    kinds = list(mix)
    chosen = maker.rng.choice(len(kinds), size=batch, p=np.array([mix[k] for k in kinds]))
    windows = [maker.make(kinds[i], length) for i in chosen]
    ids = torch.as_tensor(np.stack([w.ids for w in windows]), device=device)
    weights = torch.as_tensor(np.stack([w.weights for w in windows]), device=device)
    for group in optim.param_groups:
        group["lr"] = sched.lr(step)
    with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)),
        ids[:, 1:].reshape(-1),
        reduction="none",
    )
    w = weights[:, 1:].reshape(-1)
    loss = (ce * w).sum() / w.sum().clamp_min(1.0)
    optim.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optim.step()
    return float(loss.detach()), int(ids.numel())


def save_checkpoint(
    path: Path,
    model: LlamaForCausalLM,
    optim: torch.optim.Optimizer,
    maker: WindowMaker,
    state: dict[str, Any],
) -> None:
    """Write model, optimiser, data-sampler and RNG state atomically (tmp file, then rename)."""
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optim": optim.state_dict(),
            "maker_rng": maker.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "state": dict(state),
        },
        tmp,
    )
    os.replace(tmp, path)


def load_checkpoint(
    path: Path, model: LlamaForCausalLM, optim: torch.optim.Optimizer, maker: WindowMaker
) -> dict[str, Any]:
    """Restore what `save_checkpoint` wrote; return the saved progress counters."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(blob["model"])
        optim.load_state_dict(blob["optim"])
    except (OSError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"expected a readable checkpoint at {path}, got {exc}") from exc
    maker.rng.bit_generator.state = blob["maker_rng"]
    torch.set_rng_state(blob["torch_rng"])
    state: dict[str, Any] = blob["state"]
    return state
