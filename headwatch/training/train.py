"""`headwatch train`: train the small Llama that headwatch ships, resumably and in bounded time.

Usage:
    headwatch train --run-dir runs/bundled --steps-a 500 --steps-b 1500 --max-minutes 60 --export
    headwatch train --run-dir runs/bundled --resume --export

Curriculum: phase A uses short windows rich in copy tasks (so that copying can be learned
cheaply first); phase B uses long windows (up to the model's context) of text and needle
retrieval. The schedule follows the larger of step progress and time progress, so
--max-minutes bounds the run and a slow machine still gets both phases and the full decay.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from headwatch.training.corpus import read_text_dir
from headwatch.training.data import prepare_data
from headwatch.training.errors import CheckpointError, ConfigError
from headwatch.training.evaluate import evaluate
from headwatch.training.export import export_model
from headwatch.training.loop import (
    CURVE_FIELDS,
    MIX_A,
    MIX_B,
    Schedule,
    build_model,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    train_step,
)
from headwatch.training.tasks import WindowMaker
from headwatch.training.tokenizer import encode_plain

logger = logging.getLogger(__name__)

DEFAULT_EXPORT = Path(__file__).resolve().parent.parent / "model"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Return the parsed command-line options of `headwatch train`."""
    p = argparse.ArgumentParser(prog="headwatch train", description=__doc__.splitlines()[0])
    p.add_argument(
        "--run-dir", type=Path, default=Path("runs/bundled"), help="checkpoints, curve, cache"
    )
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=60.0,
        help="time budget of the whole run (resumes included); the schedule fits into it",
    )
    p.add_argument("--sources", default="kjv,jargon,pydoc", help="corpus sources, comma-separated")
    p.add_argument(
        "--text-dir",
        type=Path,
        default=None,
        help="train on the *.txt files under this folder instead of the Debian sources",
    )
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--mlp", type=int, default=688)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument(
        "--context", type=int, default=2048, help="max_position_embeddings and phase-B window"
    )
    p.add_argument("--context-a", type=int, default=256, help="phase-A window length")
    p.add_argument("--steps-a", type=int, default=300)
    p.add_argument("--steps-b", type=int, default=900)
    p.add_argument("--tokens-per-step", type=int, default=8192)
    p.add_argument(
        "--tokens-per-step-a", type=int, default=4096, help="phase-A batch size in tokens"
    )
    p.add_argument("--mix-a", default=MIX_A, help="phase-A task shares, kind=share,...")
    p.add_argument("--mix-b", default=MIX_B, help="phase-B task shares, kind=share,...")
    p.add_argument("--repeat-vocab", type=int, default=1024, help="ids random_repeat draws from")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument(
        "--export",
        nargs="?",
        const=DEFAULT_EXPORT,
        type=Path,
        default=None,
        help="write the final fp16 model here (default: headwatch/model)",
    )
    p.add_argument(
        "--export-only", action="store_true", help="export RUN_DIR's checkpoint and exit"
    )
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from the weights of an exported model folder (fine-tuning; same shape)",
    )
    args = p.parse_args(argv)
    if args.steps_a < 0 or args.steps_b < 0 or args.steps_a + args.steps_b == 0:
        raise ConfigError(f"expected steps-a + steps-b > 0, got {args.steps_a} + {args.steps_b}")
    if args.tokens_per_step < args.context:
        raise ConfigError(
            f"expected tokens-per-step >= context {args.context}, got {args.tokens_per_step}"
        )
    return args


def _append_curve(path: Path, row: dict[str, float]) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CURVE_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in CURVE_FIELDS})


def run(args: argparse.Namespace) -> int:
    """Train (or resume, or only export) as `args` say; return the exit status."""
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    docs = None if args.text_dir is None else read_text_dir(args.text_dir)
    data = prepare_data(args.run_dir, args.sources.split(","), args.vocab_size, docs)
    tok = data.tokenizer
    model = build_model(args, tok.get_vocab_size())
    if args.init_from is not None and not (args.resume or args.export_only):
        load_weights(model, args.init_from)
        logger.info("initialised from %s", args.init_from)
    model = model.to(args.device)
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    maker = WindowMaker(
        data.train_ids,
        lambda s: encode_plain(tok, s),
        tok.get_vocab_size(),
        args.seed,
        repeat_vocab=args.repeat_vocab,
    )
    ckpt_path = args.run_dir / "checkpoint.pt"
    curve_path = args.run_dir / "curve.csv"
    state: dict[str, Any] = {"step": 0, "tokens": 0, "elapsed_s": 0.0}
    if args.resume or args.export_only:
        if not ckpt_path.is_file():
            raise CheckpointError(f"expected a checkpoint at {ckpt_path}, got nothing")
        state = load_checkpoint(ckpt_path, model, optim, maker)
        logger.info("resumed from %s at step %d", ckpt_path, state["step"])
    else:
        curve_path.unlink(missing_ok=True)
        # the options the run started with, kept through resumes for the model card
        state["args"] = {k: str(v) for k, v in vars(args).items()}
    sched = Schedule(args)
    last_eval: dict[str, float] = {}

    def summary() -> dict[str, object]:
        return {
            "step": state["step"],
            "tokens_seen": state["tokens"],
            "wall_time_s": round(state["elapsed_s"], 1),
            "args": state.get("args", {}),
            "source_tokens": data.source_tokens,
            "last_eval": last_eval,
        }

    if not args.export_only:
        started = time.monotonic()
        base_elapsed, base_tokens = state["elapsed_s"], state["tokens"]
        bar = tqdm(total=sched.total, initial=state["step"], unit="step", dynamic_ncols=True)
        progress = sched.progress(state["step"], state["elapsed_s"])
        # The curve row of the last step, written once its loss is read: reading the loss waits
        # for the step, so it is read after the next step is queued (see train_step).
        pending: tuple[dict[str, float], torch.Tensor] | None = None

        def write_pending() -> None:
            nonlocal pending
            if pending is not None:
                row, loss = pending
                row["train_loss"] = float(loss)
                _append_curve(curve_path, row)
                bar.set_postfix(
                    loss=f"{row['train_loss']:.3f}",
                    tok_s=f"{(state['tokens'] - base_tokens) / (time.monotonic() - started):.0f}",
                    T=int(row["context"]),
                    progress=f"{min(progress, 1.0):.0%}",
                )
                pending = None

        while progress < 1.0:
            step = state["step"]
            length = sched.window(progress)[0]
            lr = sched.lr(step, progress)
            loss, ntok = train_step(model, optim, maker, sched, step, args.device, progress)
            write_pending()
            state["step"] = step + 1
            state["tokens"] += ntok
            state["elapsed_s"] = base_elapsed + time.monotonic() - started
            progress = sched.progress(state["step"], state["elapsed_s"])
            pending = (
                {
                    "step": step + 1,
                    "tokens": state["tokens"],
                    "elapsed_s": round(state["elapsed_s"], 1),
                    "lr": lr,
                    "context": length,
                },
                loss,
            )
            done = progress >= 1.0
            if (step + 1) % args.eval_every == 0 or done:
                held = WindowMaker(
                    data.held_ids, maker.encode, maker.vocab_size, 7, repeat_vocab=args.repeat_vocab
                )
                last_eval = evaluate(
                    model,
                    held,
                    args.device,
                    text_length=min(args.context, 1024),
                    needle_length=min(args.context, 2048),
                )
                pending[0].update(last_eval)
                bar.write(
                    f"step {step + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in last_eval.items())
                )
            bar.update(1)
            if (step + 1) % args.ckpt_every == 0 or done:
                write_pending()  # the curve never runs behind a checkpoint
                save_checkpoint(ckpt_path, model, optim, maker, state)
        write_pending()
        bar.close()
        logger.info("finished at step %d after %.0f s", state["step"], state["elapsed_s"])
    if args.export is not None:
        export_model(model, tok, args.export, args.context, curve_path, summary())
        print(f"exported to {args.export}")
    return 0


def main(argv: list[str]) -> int:
    """Entry point of `headwatch train`."""
    logging.basicConfig(
        level=os.environ.get("HEADWATCH_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        args = parse_args(argv)
        return run(args)
    except (ConfigError, CheckpointError) as exc:
        print(f"headwatch train: {exc}")
        return 2


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
