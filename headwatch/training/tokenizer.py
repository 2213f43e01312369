"""Train and save the byte-level BPE tokenizer of the bundled model.

Usage:
    tok = train_tokenizer(texts, vocab_size=4096)
    save_tokenizer(tok, out_dir)   # tokenizer.json + tokenizer_config.json + special_tokens_map.json

Every encoding starts with ``<|bos|>`` (id 0): a fixed first token gives attention heads a
place to park mass they do not need, which is how attention sinks form (StreamingLLM).
Digits are split one per token so that numbers copy token by token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from headwatch.training.errors import ConfigError

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
    """Return a byte-level BPE tokenizer trained on `texts` that prepends ``<|bos|>``."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ConfigError(f"expected vocab_size >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)]
    )
    return tok


def encode_plain(tok: Tokenizer, text: str) -> list[int]:
    """Return the token ids of `text` without the leading ``<|bos|>``."""
    ids: list[int] = tok.encode(text, add_special_tokens=False).ids
    return ids


def save_tokenizer(tok: Tokenizer, out_dir: Path, model_max_length: int) -> None:
    """Write the files that `AutoTokenizer.from_pretrained(out_dir)` loads offline."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "add_bos_token": True,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def load_tokenizer(path: Path) -> Tokenizer:
    """Return the tokenizer saved at `path` (a tokenizer.json file)."""
    if not path.is_file():
        raise ConfigError(f"expected a tokenizer file at {path}, got nothing")
    return Tokenizer.from_file(str(path))
