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

from headwatch.training.errors import CheckpointError, ConfigError
from headwatch.training.tasks import KINDS, WindowMaker
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
MIX_A = "random_repeat=0.45,text_repeat=0.15,needle=0.25,text=0.15"
MIX_B = "text=0.4,needle=0.4,text_repeat=0.1,random_repeat=0.1"


def parse_mix(text: str) -> dict[str, float]:
    """Return the task shares of a mix written "kind=share,kind=share" (normalised to sum 1)."""
    mix: dict[str, float] = {}
    for item in text.split(","):
        kind, _, share = item.partition("=")
        try:
            value = float(share)
        except ValueError:
            value = -1.0
        if kind.strip() not in KINDS or value < 0:
            raise ConfigError(f"expected kind=share with a kind in {KINDS}, got {item!r}")
        mix[kind.strip()] = value
    total = sum(mix.values())
    if total <= 0:
        raise ConfigError(f"expected shares that sum to more than 0, got {text!r}")
    return {k: v / total for k, v in mix.items()}


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
    """Which window length, batch size, task mix and learning rate each point of a run uses.

    A run's progress is the larger of its share of steps done and its share of the time
    budget used, so a slow machine still gets the whole curriculum (phase A, then phase B)
    and the whole learning-rate decay, only with fewer steps.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.steps_a = args.steps_a
        self.total = args.steps_a + args.steps_b
        self.share_a = args.steps_a / self.total
        self.budget_s = float(getattr(args, "max_minutes", 0.0)) * 60.0
        self.context_a = args.context_a
        self.context_b = args.context
        self.tokens_per_step = args.tokens_per_step
        self.tokens_per_step_a = getattr(args, "tokens_per_step_a", None) or args.tokens_per_step
        self.mix_a = parse_mix(getattr(args, "mix_a", MIX_A))
        self.mix_b = parse_mix(getattr(args, "mix_b", MIX_B))
        self.peak_lr = args.lr
        self.warmup = args.warmup

    def progress(self, step: int, elapsed_s: float) -> float:
        """Return how far the run is (0..1, >= 1 means done) after `step` steps and `elapsed_s`."""
        by_time = elapsed_s / self.budget_s if self.budget_s > 0 else float(elapsed_s > 0)
        return max(step / self.total, by_time)

    def window(self, progress: float) -> tuple[int, int, dict[str, float]]:
        """Return (window length, windows per batch, task mix) at `progress`."""
        if progress < self.share_a:
            return self.context_a, max(1, self.tokens_per_step_a // self.context_a), self.mix_a
        return self.context_b, max(1, self.tokens_per_step // self.context_b), self.mix_b

    def lr(self, step: int, progress: float) -> float:
        """Linear warm-up over the first steps, then cosine decay to a tenth of the peak."""
        if step < self.warmup:
            return self.peak_lr * (step + 1) / self.warmup
        return self.peak_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_step(
    model: LlamaForCausalLM,
    optim: torch.optim.Optimizer,
    maker: WindowMaker,
    sched: Schedule,
    step: int,
    device: str,
    progress: float | None = None,
) -> tuple[torch.Tensor, int]:
    """Run one optimiser step; return (weighted loss as a 0-d tensor, tokens in the batch).

    The loss stays on the device: reading it (`float(loss)`) waits for the step, so the caller
    reads it only after queueing the next step, and a GPU never waits for the next batch.
    """
    if progress is None:
        progress = step / sched.total
    length, batch, mix = sched.window(progress)
    kinds = list(mix)
    chosen = maker.rng.choice(len(kinds), size=batch, p=np.array([mix[k] for k in kinds]))
    windows = [maker.make(kinds[i], length) for i in chosen]
    ids = _to_device(np.stack([w.ids for w in windows]), device)
    weights = _to_device(np.stack([w.weights for w in windows]), device)
    for group in optim.param_groups:
        group["lr"] = sched.lr(step, progress)
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
    return loss.detach(), int(ids.numel())


def _to_device(array: np.ndarray, device: str) -> torch.Tensor:
    """Return `array` on `device`; to a GPU through pinned memory, without waiting for the copy."""
    tensor = torch.from_numpy(array)
    if device.startswith("cuda"):
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


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


def load_weights(model: LlamaForCausalLM, model_dir: Path) -> None:
    """Copy the weights of an exported model folder into `model` (same shape; tied head allowed)."""
    from safetensors.torch import load_file

    path = model_dir / "model.safetensors"
    try:
        weights = load_file(path)
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"expected readable weights at {path}, got {exc}") from exc
    own = model.state_dict()
    mismatched = [k for k, v in weights.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in weights and k != "lm_head.weight"]
    if mismatched or missing:
        raise CheckpointError(
            f"expected weights of this model's shape in {path}, got "
            f"{len(mismatched)} tensors of another shape and {len(missing)} missing "
            f"(e.g. {(mismatched + missing)[0]})"
        )
    with torch.no_grad():
        for key, value in weights.items():
            own[key].copy_(value.to(own[key].dtype))
