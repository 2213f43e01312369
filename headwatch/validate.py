"""Do verdicts mean something? Restrict heads to sink+recent keys and measure what changes.

Usage:
    python -m headwatch.validate --policy reports/demo-x/policy/policy.json --out validation.md
    results = compare(model, prompts, policy, unsafe_draws=5)

For the KV heads a policy marks safe, every query head that reads them sees only its first S and
last R keys (a custom attention function registered in transformers' AttentionInterface masks
per head, the way DuoAttention's streaming heads work); the next-token distribution at every
position past S + R is compared with the unrestricted model's (mean KL, nats per token), and so
is the perplexity of the held-out text. The same is done for random sets of as many KV heads
the policy marks unsafe. If verdicts mean something, the safe heads' effect is clearly smaller.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AttentionInterface, PreTrainedModel

from headwatch.policy import KvPolicy
from headwatch.prompts import Prompt
from headwatch.report.errors import HeadwatchToolError, PolicyError
from headwatch.report.rows import causal_sdpa
from headwatch.report.validation import Effect, markdown

logger = logging.getLogger(__name__)
_NAME = "headwatch_streaming_heads"
ANSWER_ROOM = 32  # tokens kept free for a needle's appended answer


def streaming_mask(
    restricted: np.ndarray, queries: int, sink: int, recent: int, device: torch.device
) -> torch.Tensor:
    """Return the allowed-keys mask (heads, queries, keys) of one causal sequence.

    `restricted` (heads,) bool: those heads see keys j < sink or i - j < recent only; the others
    see every key j <= i.
    """
    i = torch.arange(queries, device=device)[:, None]
    j = torch.arange(queries, device=device)[None, :]
    causal = j <= i
    local = causal & ((j < sink) | (i - j < recent))
    flags = torch.as_tensor(restricted, device=device)[:, None, None]
    return torch.where(flags, local, causal)


@contextmanager
def restricted_heads(
    model: PreTrainedModel, streaming_kv: np.ndarray, sink: int, recent: int
) -> Iterator[None]:
    """Within the block, query heads of KV heads marked in `streaming_kv` (layers, kv_heads) see sink+recent only."""
    config = model.config
    heads = int(config.num_attention_heads)
    group = heads // streaming_kv.shape[1]

    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if query.shape[0] != 1 or key.shape[2] != query.shape[2]:
            raise HeadwatchToolError(
                f"expected one sequence without a cache, got batch {query.shape[0]}, "
                f"{query.shape[2]} queries over {key.shape[2]} keys"
            )
        layer = int(module.layer_idx)  # type: ignore[arg-type]
        per_head = np.repeat(streaming_kv[layer], group)
        mask = streaming_mask(per_head, query.shape[2], sink, recent, query.device)
        return causal_sdpa(module, query, key, value, mask, kwargs.get("scaling")), None

    AttentionInterface.register(_NAME, attention)
    previous = config._attn_implementation
    model.set_attn_implementation(_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def _log_probs(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def effect(
    model: PreTrainedModel,
    prompts: Sequence[Prompt],
    streaming_kv: np.ndarray,
    sink: int,
    recent: int,
    label: str,
    reference: Sequence[torch.Tensor] | None = None,
) -> Effect:
    """Return the effect of restricting `streaming_kv` on `prompts` (answers appended to needles).

    KL and perplexity count the positions past sink + recent (before them nothing is masked).
    `reference` are the unrestricted log-probabilities of each prompt, computed when not given.
    """
    kls: list[float] = []
    nll_full: list[float] = []
    nll_cut: list[float] = []
    answer_change: list[float] = []
    for n, prompt in enumerate(prompts):
        ids = torch.tensor([prompt.ids], dtype=torch.long, device=model.device)
        full = reference[n] if reference is not None else _log_probs(model, ids)
        with restricted_heads(model, streaming_kv, sink, recent):
            cut = _log_probs(model, ids)
        start = sink + recent
        if ids.shape[1] - 1 <= start:
            raise HeadwatchToolError(
                f"expected prompts longer than sink + recent + 1 = {start + 1} tokens, got {ids.shape[1]}"
            )
        p = full[start:-1]
        kl = (p.exp() * (p - cut[start:-1])).sum(dim=-1)
        kls.extend(kl.tolist())
        target = ids[0, start + 1 :, None]
        nll_full.extend((-full[start:-1].gather(1, target)).squeeze(1).tolist())
        nll_cut.extend((-cut[start:-1].gather(1, target)).squeeze(1).tolist())
        if prompt.answer_start >= 0:
            span = slice(prompt.answer_start - 1, len(prompt.ids) - 1)
            tgt = ids[0, prompt.answer_start :, None]
            change = (-cut[span].gather(1, tgt)).sum() - (-full[span].gather(1, tgt)).sum()
            answer_change.append(float(change))
    return Effect(
        label=label,
        kv_heads=int(streaming_kv.sum()),
        mean_kl_nats=float(np.mean(kls)),
        perplexity_full=math.exp(float(np.mean(nll_full))),
        perplexity_restricted=math.exp(float(np.mean(nll_cut))),
        answer_nll_change_nats=float(np.mean(answer_change)) if answer_change else float("nan"),
    )


def unsafe_draws(streaming_kv: np.ndarray, draws: int, seed: int) -> list[np.ndarray]:
    """Return `draws` random sets of unsafe KV heads, each as large as the safe set (or all unsafe)."""
    unsafe = np.flatnonzero(~streaming_kv.ravel())
    count = min(int(streaming_kv.sum()), unsafe.size)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(draws):
        pick = np.zeros(streaming_kv.size, dtype=bool)
        pick[rng.choice(unsafe, size=count, replace=False)] = True
        out.append(pick.reshape(streaming_kv.shape))
    return out


def lowest_error(error: np.ndarray, count: int, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Return the mask (layers, kv_heads) of the `count` KV heads with the lowest measured error.

    Ties (e.g. several p95 errors at the histogram's top value 1.0) are broken by `tiebreak`
    (the mean error) when given.
    """
    if not 0 < count < error.size:
        raise PolicyError(f"expected --lowest in [1, {error.size - 1}], got {count}")
    second = (
        np.zeros(error.size) if tiebreak is None else np.nan_to_num(tiebreak, nan=np.inf).ravel()
    )
    order = np.lexsort((second, np.nan_to_num(error, nan=np.inf).ravel()))
    mask = np.zeros(error.size, dtype=bool)
    mask[order[:count]] = True
    return mask.reshape(error.shape)


def _ranking(
    policy: KvPolicy, rank_by: str, count: int
) -> tuple[np.ndarray, int, np.ndarray | None]:
    """Return the arguments of `lowest_error`: (primary error, count, tie-break error)."""
    if rank_by == "mean":
        if policy.mean_error is None or np.isnan(policy.mean_error).all():
            raise PolicyError(
                "expected mean eviction errors in the policy for --rank-by mean, got none"
            )
        return policy.mean_error, count, policy.error
    return policy.error, count, policy.mean_error


def compare(
    model: PreTrainedModel,
    prompts: Sequence[Prompt],
    streaming_kv: np.ndarray,
    sink: int,
    recent: int,
    draws: int = 5,
    seed: int = 0,
) -> tuple[Effect, list[Effect]]:
    """Return (effect of the safe heads, effects of `draws` equal-sized sets of unsafe heads)."""
    if not streaming_kv.any():
        raise PolicyError(
            "expected at least one KV head marked safe, got none: nothing to validate"
        )
    if streaming_kv.all():
        raise PolicyError("expected at least one KV head marked unsafe to compare with, got none")
    reference = [
        _log_probs(model, torch.tensor([p.ids], dtype=torch.long, device=model.device))
        for p in prompts
    ]
    safe = effect(model, prompts, streaming_kv, sink, recent, "safe (policy)", reference)
    unsafe = [
        effect(model, prompts, pick, sink, recent, f"unsafe draw {i}", reference)
        for i, pick in enumerate(unsafe_draws(streaming_kv, draws, seed))
    ]
    return safe, unsafe


def check_policy_fits(policy: KvPolicy, model: PreTrainedModel, model_name: str) -> None:
    """Raise PolicyError unless the policy's (layers, kv_heads) shape is the model's."""
    config = model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    expected = (int(config.num_hidden_layers), int(kv_heads))
    if policy.streaming.shape != expected:
        raise PolicyError(
            f"expected a policy of (layers, kv_heads) = {expected}, the shape of model "
            f"{model_name}, got {policy.streaming.shape} (policy of {policy.model_name})"
        )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m headwatch.validate", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--policy", type=Path, required=True, help="policy.json of `headwatch policy` or the demo"
    )
    p.add_argument(
        "--model", type=Path, default=None, help="model directory (default: the bundled model)"
    )
    p.add_argument("--prompts", type=int, default=6, help="held-out evaluation prompts (default 6)")
    p.add_argument(
        "--context-tokens", type=int, default=2048, help="tokens per prompt (default 2048)"
    )
    p.add_argument("--draws", type=int, default=5, help="random unsafe sets (default 5)")
    p.add_argument(
        "--seed",
        type=int,
        default=1000,
        help="prompt seed, apart from calibration's (default 1000)",
    )
    p.add_argument(
        "--lowest",
        type=int,
        default=None,
        metavar="N",
        help="restrict the N KV heads of lowest measured error instead of the policy's safe set",
    )
    p.add_argument(
        "--rank-by",
        choices=("p95", "mean"),
        default="p95",
        help="error that orders KV heads for --lowest: the verdict's p95 (default) or the mean",
    )
    p.add_argument("--out", type=Path, default=Path("validation.md"), help="markdown file to write")
    return p


def main(argv: list[str]) -> int:
    """Run the validation; return the exit status."""
    from headwatch.analyze import fit_context, load_model, max_context, prompt_maker
    from headwatch.policy import read_policy

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.draws < 1 or args.prompts < 1:
        print(
            f"headwatch validate: expected --draws and --prompts >= 1, got {args.draws} and "
            f"{args.prompts}",
            file=sys.stderr,
        )
        return 2
    started = time.perf_counter()
    try:
        policy = read_policy(args.policy)
        chosen = (
            policy.streaming
            if args.lowest is None
            else lowest_error(*_ranking(policy, args.rank_by, args.lowest))
        )
        model, tokenizer, name = load_model(args.model)
        check_policy_fits(policy, model, name)
        maker = prompt_maker(tokenizer)
        # leave room for the appended answer within the model's context
        base = maker.mixed(args.prompts, args.context_tokens - ANSWER_ROOM, seed=args.seed)
        prompts = fit_context(
            [maker.with_answer(p) for p in base],
            max_context(model),
            truncate=False,
            has_truncate_flag=False,
        )
        safe, unsafe = compare(
            model, prompts, chosen, policy.sink_tokens, policy.recent_tokens, args.draws
        )
    except HeadwatchToolError as exc:
        print(f"validate: {exc}", file=sys.stderr)
        return 2
    chosen_text = (
        "the KV heads the policy marks safe"
        if args.lowest is None
        else f"the {args.lowest} KV heads of lowest measured {args.rank_by} eviction error (not all under the bound)"
    )
    context = (
        f"Restricted: {chosen_text}. Model {name}; {len(prompts)} held-out prompts "
        f"({maker.source}) of up to {args.context_tokens} tokens, half needle-in-a-haystack "
        f"with the answer appended; S = {policy.sink_tokens}, R = {policy.recent_tokens}; "
        f"policy from {policy.source}; {time.perf_counter() - started:.0f} s."
    )
    table = markdown(safe, unsafe, policy.streaming.size, context)
    args.out.write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
