"""Measure where each head of a trained model looks from the last token of a needle prompt.

Usage:
    rows = probe_heads(model, maker, n_prompts=8, length=2048)
    print(format_table(rows))

Used to write the pattern table of headwatch/model/MODEL_CARD.md; the collector measures the
same quantities in production. Needs eager attention (probabilities are materialised).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from headwatch.training.tasks import WindowMaker

SINK_TOKENS = 4  # as in StreamingLLM
RECENT_TOKENS = 64


@dataclass(frozen=True)
class HeadStats:
    """Mean statistics of one head's last-query attention over several needle prompts."""

    layer: int
    head: int
    entropy_nats: float
    sink_mass: float
    recent_mass: float
    middle_mass: float
    needle_mass: float
    top1_mass: float
    top16_mass: float
    top256_mass: float
    pattern: str


def classify(
    sink: float, recent: float, middle: float, needle: float, entropy: float, n_keys: int
) -> str:
    """Return the study's pattern name for one head's statistics (simple fixed thresholds)."""
    if needle >= 0.3:
        return "concentrated-middle (needle)"
    if sink >= 0.8:
        return "sink"
    if recent >= 0.8:
        return "recency"
    if sink + recent >= 0.8 and min(sink, recent) >= 0.15:
        return "V-shaped"
    if entropy >= 0.9 * math.log(n_keys):
        return "uniform"
    if middle >= 0.5 and entropy < 2.0:
        return "concentrated-middle"
    if middle >= 0.5:
        return "scattered-middle"
    return "mixed"


def probe_heads(
    model: PreTrainedModel,
    maker: WindowMaker,
    n_prompts: int = 8,
    length: int = 2048,
    form: int | None = 0,
) -> tuple[list[HeadStats], float, float]:
    """Return per-head mean statistics and needle accuracy (first token, exact) over prompts.

    `form` 0 asks for a pass key: its first answer token is a digit that only copying predicts.
    """
    model.config._attn_implementation = "eager"
    sums: dict[tuple[int, int], np.ndarray] = {}
    hits = 0
    exact = 0
    n_keys = 0
    for i in range(n_prompts):
        w = maker.needle_window(length, n_needles=1, depth=(i + 0.5) / n_prompts, form=form)
        # the whole window runs once; causal attention makes the row of the prompt's last
        # token (the question's end) the same as if the prompt ran alone
        with torch.no_grad():
            out = model(input_ids=torch.as_tensor(w.ids).unsqueeze(0), output_attentions=True)
        a, b = w.answer_start, w.answer_end
        pred = out.logits[0, a - 1 : b - 1].argmax(-1).numpy()
        hits += int(pred[0] == w.ids[a])
        exact += int((pred == w.ids[a:b]).all())
        n_keys = a
        for layer, att in enumerate(out.attentions):
            p = att[0, :, a - 1, :a].float()  # (heads, keys) for the question's last token
            for head in range(p.size(0)):
                row = p[head]
                top = torch.sort(row, descending=True).values
                stats = np.array(
                    [
                        float(-(row.clamp_min(1e-30) * row.clamp_min(1e-30).log()).sum()),
                        float(row[:SINK_TOKENS].sum()),
                        float(row[-RECENT_TOKENS:].sum()),
                        float(row[w.fact_start : w.fact_end].sum()),
                        float(top[:1].sum()),
                        float(top[:16].sum()),
                        float(top[:256].sum()),
                    ]
                )
                sums[(layer, head)] = sums.get((layer, head), 0) + stats / n_prompts
    rows = []
    for (layer, head), s in sorted(sums.items()):
        middle = max(0.0, 1.0 - s[1] - s[2])
        rows.append(
            HeadStats(
                layer,
                head,
                float(s[0]),
                float(s[1]),
                float(s[2]),
                middle,
                float(s[3]),
                float(s[4]),
                float(s[5]),
                float(s[6]),
                classify(s[1], s[2], middle, s[3], s[0], n_keys),
            )
        )
    return rows, hits / n_prompts, exact / n_prompts


def format_table(rows: list[HeadStats]) -> str:
    """Return a Markdown table of `rows`."""
    lines = [
        "| layer | head | entropy (nats) | sink (first 4) | recent (last 64) | middle | needle "
        "| top-1 | top-16 | top-256 | pattern |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.layer} | {r.head} | {r.entropy_nats:.2f} | {r.sink_mass:.2f} | {r.recent_mass:.2f} "
            f"| {r.middle_mass:.2f} | {r.needle_mass:.2f} | {r.top1_mass:.2f} | {r.top16_mass:.2f} "
            f"| {r.top256_mass:.2f} | {r.pattern} |"
        )
    return "\n".join(lines)


def held_out_maker(tokenizer: object, seed: int = 11) -> WindowMaker:
    """Return a WindowMaker over the held-out KJV and Jargon File documents (needle haystacks)."""
    from headwatch.training.corpus import read_jargon, read_kjv, split_held_out

    _, held = split_held_out([*read_kjv(), *read_jargon()])

    def encode(text: str) -> list[int]:
        ids: list[int] = tokenizer(text, add_special_tokens=False).input_ids  # type: ignore[operator]
        return ids

    ids = np.concatenate([np.asarray([*encode(d.text), 1], dtype=np.int64) for d in held])
    return WindowMaker(ids, encode, vocab_size=int(ids.max()) + 1, seed=seed)


def main(argv: list[str] | None = None) -> int:
    """Print the per-head pattern table of a model directory (default: the bundled model)."""
    import argparse
    from pathlib import Path

    from headwatch.bundled import bundled_model_dir, load_bundled

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--model-dir", type=Path, default=bundled_model_dir())
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--form", type=int, default=0, help="needle form: 0 pass key, 1 word, 2 phrase")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    model, tok = load_bundled(model_dir=args.model_dir, attn_implementation="eager")
    rows, first, exact = probe_heads(
        model, held_out_maker(tok), args.prompts, args.length, args.form
    )
    print(format_table(rows))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.pattern] = counts.get(r.pattern, 0) + 1
    print(
        f"\npatterns: {counts}; needle accuracy over {args.prompts} prompts: "
        f"first token {first:.2f}, whole answer {exact:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
