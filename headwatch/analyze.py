"""`headwatch analyze`: the study, on any local causal LM: patterns, table, figures, per-head JSON.

Usage:
    headwatch analyze                                   # the bundled model, built-in needle prompts
    headwatch analyze --model ./my-llama --prompts docs.txt --out reports/my-llama

Each prompt runs once through the model with the real collector attached (in-memory sink); the
last prompt token's exact attention statistics of every head are summarised with the exporter's
pattern and verdict rules. Prompts longer than the model's context are an error unless
`--truncate` is given, which keeps the first token and the last tokens that fit, with a warning.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from headwatch.prompts import Prompt, PromptMaker, read_prompt_file
from headwatch.report.errors import ContextTooLongError, HeadwatchToolError, ModelFilesError

logger = logging.getLogger(__name__)

# 4 sink tokens, as in StreamingLLM. 64 recent tokens: at the 2K contexts of the bundled model
# the collector's production default (256) would be an eighth of the cache; 64 keeps 3%.
SINK_TOKENS = 4
RECENT_TOKENS = 64
BUNDLED_NAME = "headwatch-bundled"
_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZERS = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_model_files(model_dir: Path) -> None:
    """Raise ModelFilesError naming the missing or unreadable file of a HF model directory."""
    if not model_dir.is_dir():
        raise ModelFilesError(f"expected a model directory at {model_dir}, got nothing there")
    config = model_dir / "config.json"
    if not config.is_file():
        raise ModelFilesError(f"expected the model file {config}, got nothing there")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFilesError(f"expected valid JSON in {config}, got {exc}") from exc
    if not any((model_dir / w).is_file() for w in _WEIGHTS):
        raise ModelFilesError(
            f"expected weights in {model_dir} (one of {', '.join(_WEIGHTS)}), got none"
        )
    if not any((model_dir / t).is_file() for t in _TOKENIZERS):
        raise ModelFilesError(
            f"expected a tokenizer in {model_dir} (one of {', '.join(_TOKENIZERS)}), got none"
        )
    weights = model_dir / "model.safetensors"
    if weights.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as f:
                f.keys()
        except Exception as exc:  # safetensors raises its own error types for every kind of damage
            raise ModelFilesError(
                f"expected a readable safetensors file {weights}, got {exc}"
            ) from exc


def check_device(device: str) -> None:
    """Raise ModelFilesError unless torch can place a model on `device` here."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError as exc:
        raise ModelFilesError(
            f"expected a torch device such as cpu or cuda:0, got {device!r}"
        ) from exc
    if kind == "cuda" and not torch.cuda.is_available():
        raise ModelFilesError(
            f"expected a CUDA GPU for --device {device}, got none on this machine"
        )


def load_model(model_dir: Path | None, device: str = "cpu") -> tuple[Any, Any, str]:
    """Return (model, tokenizer, name) of a local HF causal-LM directory, or of the bundled model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_device(device)
    if model_dir is None:
        from headwatch.bundled import BundledModelError, load_bundled

        try:
            model, tokenizer = load_bundled(device)
        except BundledModelError as exc:
            raise ModelFilesError(str(exc)) from exc
        return model, tokenizer, BUNDLED_NAME
    check_model_files(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, local_files_only=True, attn_implementation="sdpa"
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelFilesError(f"expected a loadable causal LM in {model_dir}, got {exc}") from exc
    model = model.to(device)  # type: ignore[arg-type]
    return model.eval(), tokenizer, model_dir.resolve().name


def encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """Return a function that encodes text with `tokenizer`, without special tokens."""

    def encode(s: str) -> list[int]:
        return list(tokenizer(s, add_special_tokens=False, verbose=False).input_ids)

    return encode


def prompt_maker(tokenizer: Any, text: str | None = None) -> PromptMaker:
    """Return a PromptMaker encoding with `tokenizer` (ids without special tokens, plus its BOS)."""
    return PromptMaker(encoder(tokenizer), tokenizer.bos_token_id, text)


def max_context(model: Any) -> int | None:
    """Return the model's context length (max_position_embeddings), None when it has none."""
    value = getattr(model.config, "max_position_embeddings", None)
    return int(value) if value else None


def fit_context(
    prompts: Sequence[Prompt], limit: int | None, truncate: bool, *, has_truncate_flag: bool = True
) -> list[Prompt]:
    """Return the prompts, checked against `limit`; truncated with a warning if `truncate`.

    The error for a prompt too long suggests --truncate where the command has that flag
    (`has_truncate_flag`), a smaller --context-tokens where it does not.
    """
    out: list[Prompt] = []
    for p in prompts:
        if limit is None or len(p.ids) <= limit:
            out.append(p)
            continue
        if not truncate:
            remedy = (
                f"pass --truncate to keep the first token and the last {limit - 1}"
                if has_truncate_flag
                else "pass a smaller --context-tokens"
            )
            raise ContextTooLongError(
                f"expected prompts of at most {limit} tokens (the model's context), got {len(p.ids)} "
                f"in {p.name}; {remedy}"
            )
        logger.warning(
            "%s: %d tokens truncated to the model's context of %d", p.name, len(p.ids), limit
        )
        out.append(
            Prompt(
                name=p.name + "-truncated", kind="document", ids=(p.ids[0], *p.ids[-(limit - 1) :])
            )
        )
    return out


def measure(
    model: Any,
    prompts: Sequence[Prompt],
    model_name: str,
    sink_tokens: int = SINK_TOKENS,
    recent_tokens: int = RECENT_TOKENS,
    sink: Any = None,
    progress: bool = True,
    metrics: Any = None,
) -> list[Any]:
    """Run every prompt once with the collector attached; return the messages of a MemorySink.

    With another `sink` (e.g. a KafkaSink) the messages go there and the list is empty. With
    `metrics` (a CollectorMetrics) the collector counts into it, and its owner serves it; without,
    attach() makes its own (served on HEADWATCH_COLLECTOR_METRICS_PORT when set).
    """
    import torch
    from tqdm import tqdm

    from collector import MemorySink, attach

    target = sink if sink is not None else MemorySink()
    handle = attach(
        model,
        sink=target,
        metrics=metrics,
        sample_rate=1.0,
        min_context_tokens=0,
        sink_tokens=sink_tokens,
        recent_tokens=recent_tokens,
        max_sampled_passes_per_second=1e6,  # every request here is meant to be measured
        model_name=model_name,
    )
    with handle, torch.no_grad():
        for p in tqdm(prompts, desc="requests", unit="req", disable=not progress, file=sys.stderr):
            model(
                input_ids=torch.tensor([p.ids], dtype=torch.long, device=model.device),
                use_cache=False,
            )
    return list(target.messages) if sink is None else []


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="headwatch analyze", description=__doc__.split("\n")[0])
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="local HF causal-LM directory (default: the bundled model)",
    )
    p.add_argument(
        "--prompts",
        default=None,
        help="text file of prompts separated by lines of `---` (default: built-in needle prompts)",
    )
    p.add_argument(
        "--needles", type=int, default=1, help="built-in needle prompts to run (default 1)"
    )
    p.add_argument(
        "--context-tokens", type=int, default=2048, help="tokens per built-in prompt (default 2048)"
    )
    p.add_argument(
        "--sink-tokens", type=int, default=SINK_TOKENS, help=f"S (default {SINK_TOKENS})"
    )
    p.add_argument(
        "--recent-tokens", type=int, default=RECENT_TOKENS, help=f"R (default {RECENT_TOKENS})"
    )
    p.add_argument(
        "--truncate",
        action="store_true",
        help="truncate prompts longer than the model's context, with a warning",
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in prompts (default 0)")
    p.add_argument(
        "--out", type=Path, default=None, help="report folder (default ./reports/analyze-<time>/)"
    )
    return p


def main(argv: list[str]) -> int:
    """Run `headwatch analyze`; return the exit status."""
    from headwatch.report.build import build_report, default_out
    from headwatch.report.summary import summarize
    from headwatch.report.table import markdown_table, pattern_map_text, study_rows

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    from collector.errors import CollectorError
    from headwatch.report.html import check_report_folder

    out = args.out or default_out("analyze")
    try:
        check_report_folder(out)
        model, tokenizer, name = load_model(args.model, args.device)
        if args.prompts:
            prompts = read_prompt_file(args.prompts, encoder(tokenizer), tokenizer.bos_token_id)
        else:
            maker = prompt_maker(tokenizer)
            prompts = [
                maker.needle(args.context_tokens, (0.5, 0.25, 0.75)[i % 3], args.seed + i)
                for i in range(args.needles)
            ]
        prompts = fit_context(prompts, max_context(model), args.truncate)
        messages = measure(model, prompts, name, args.sink_tokens, args.recent_tokens)
        summary = summarize(messages)
        facts = {
            "model": name,
            "prompts": f"{len(prompts)} ({', '.join(p.name for p in prompts[:4])}{', ...' if len(prompts) > 4 else ''})",
        }
        build_report(out, f"headwatch analyze: {name}", summary, model, prompts[0], facts)
    except (HeadwatchToolError, CollectorError) as exc:  # CollectorError: settings, the model
        print(f"headwatch analyze: {exc}", file=sys.stderr)
        return 2
    print(pattern_map_text(summary))
    print()
    print(markdown_table(study_rows(summary)))
    print(f"\nreport: {out}/index.html  ({time.perf_counter() - started:.1f} s)")
    return 0
