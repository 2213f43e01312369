"""Locate and load the small trained model that ships inside the headwatch package.

Usage:
    model, tokenizer = load_bundled()            # CPU, eval mode
    ids = tokenizer("some text", return_tensors="pt").input_ids   # starts with <|bos|>

The model was trained by `headwatch train` (see headwatch/model/MODEL_CARD.md). Loading is
offline: nothing is fetched from a model hub.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class BundledModelError(ValueError):
    """A file of the bundled model is missing or unreadable."""


def bundled_model_dir() -> Path:
    """Return the directory that holds the bundled model's files."""
    return Path(__file__).resolve().parent / "model"


def check_model_dir(model_dir: Path) -> None:
    """Raise BundledModelError naming the first missing or unreadable file of `model_dir`."""
    for name in REQUIRED_FILES:
        path = model_dir / name
        if not path.is_file() or path.stat().st_size == 0:
            raise BundledModelError(
                f"expected the model file {path}, got nothing (missing or empty)"
            )
        if name.endswith(".json"):
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise BundledModelError(f"expected valid JSON in {path}, got {exc}") from exc
    weights = model_dir / "model.safetensors"
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            f.keys()
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise BundledModelError(
            f"expected a readable safetensors file {weights}, got {exc}"
        ) from exc


def load_bundled(
    device: str = "cpu",
    model_dir: Path | None = None,
    attn_implementation: str = "sdpa",
    dtype: Any = None,
) -> tuple[Any, Any]:
    """Return (model, tokenizer) of the bundled model, in eval mode on `device`.

    The weights are stored in fp16 and loaded in float32 unless `dtype` says otherwise.
    Pass attn_implementation="eager" to get attention probabilities (`output_attentions=True`).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = bundled_model_dir() if model_dir is None else Path(model_dir)
    check_model_dir(directory)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        # typed as Any: transformers' own stubs reject .to(device) on the loaded class
        model: Any = AutoModelForCausalLM.from_pretrained(
            directory,
            local_files_only=True,
            attn_implementation=attn_implementation,
            dtype=torch.float32 if dtype is None else dtype,
        )
    except (OSError, ValueError) as exc:
        raise BundledModelError(f"expected a loadable model in {directory}, got {exc}") from exc
    logger.info("loaded the bundled model from %s", directory)
    model = model.to(torch.device(device)).eval()
    return model, tokenizer
