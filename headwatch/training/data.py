"""Prepare the token arrays a run trains on, cached in the run directory.

Usage:
    data = prepare_data(run_dir, sources=("kjv", "jargon", "pydoc"), vocab_size=4096)
    data.train_ids, data.held_ids, data.tokenizer
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from headwatch.training.corpus import Document, build_corpus, split_held_out
from headwatch.training.tokenizer import EOS_ID, load_tokenizer, train_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedData:
    """Tokenizer and flat token arrays (documents joined by ``<|eos|>``) of one run."""

    tokenizer: Tokenizer
    train_ids: np.ndarray
    held_ids: np.ndarray
    source_tokens: dict[str, int]


def _flatten(tok: Tokenizer, docs: Sequence[Document]) -> tuple[np.ndarray, dict[str, int]]:
    encodings = tok.encode_batch([d.text for d in docs], add_special_tokens=False)
    parts: list[np.ndarray] = []
    counts: dict[str, int] = {}
    for doc, enc in zip(docs, encodings, strict=True):
        parts.append(
            np.asarray(
                [*enc.ids, EOS_ID], dtype=np.int16 if tok.get_vocab_size() < 32768 else np.int32
            )
        )
        counts[doc.source] = counts.get(doc.source, 0) + len(enc.ids)
    return np.concatenate(parts), counts


def prepare_data(
    run_dir: Path,
    sources: Sequence[str],
    vocab_size: int,
    docs: Sequence[Document] | None = None,
) -> PreparedData:
    """Build (or reload from `run_dir`) the tokenizer and the train / held-out token arrays."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tok_path = run_dir / "tokenizer.json"
    cache = run_dir / "tokens.npz"
    if tok_path.is_file() and cache.is_file():
        tok = load_tokenizer(tok_path)
        with np.load(cache) as arrays:
            counts = {
                str(k): int(v) for k, v in zip(arrays["names"], arrays["counts"], strict=True)
            }
            return PreparedData(
                tok, arrays["train"].astype(np.int64), arrays["held"].astype(np.int64), counts
            )
    all_docs = list(docs) if docs is not None else build_corpus(sources)
    # one document in 50 is held out; small corpora (tests, own text) hold out more
    train_docs, held_docs = split_held_out(all_docs, every=max(2, min(50, len(all_docs) // 5)))
    logger.info("corpus: %d documents (%d held out)", len(all_docs), len(held_docs))
    tok = train_tokenizer((d.text for d in train_docs), vocab_size=vocab_size)
    train, counts = _flatten(tok, train_docs)
    held, _ = _flatten(tok, held_docs)
    tok.save(str(tok_path))
    np.savez(
        cache,
        train=train,
        held=held,
        names=np.array(list(counts)),
        counts=np.array(list(counts.values())),
    )
    return PreparedData(tok, train.astype(np.int64), held.astype(np.int64), counts)
