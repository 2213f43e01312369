"""Shared helpers of the collector benchmarks: tiny models, timing, bounds and results."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BOUNDS = HERE / "bounds.json"
RESULTS = HERE / "results"

# name: (layers, hidden, heads, kv_heads, head_dim, intermediate, vocab)
GEOMETRIES = {
    "tiny": (4, 256, 8, 2, 32, 512, 256),
    "llama3.2-1b": (16, 2048, 32, 8, 64, 8192, 128256),
    "llama3-8b": (32, 4096, 32, 8, 128, 14336, 128256),
}


def llama(
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    vocab: int = 256,
    positions: int = 131072,
    intermediate: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> Any:
    """Return a random-weight Llama in eval mode (sdpa), built directly on `device` in `dtype`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, max_position_embeddings=positions, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(0)
    # built on the device: initialising billions of weights on the CPU would take minutes
    with torch.device(device):
        model = LlamaForCausalLM._from_config(
            config, attn_implementation="sdpa", dtype=getattr(torch, dtype)
        )
    return model.eval()


def geometry_llama(
    geometry: str, device: str = "cpu", dtype: str | None = None, layers: int | None = None
) -> Any:
    """Return `llama()` of one of `GEOMETRIES` (`layers` overrides its layers) on `device`, in
    `dtype` (default: float32 on the CPU, bfloat16 on a device); `model.dtype` says which."""
    n, hidden, heads, kv_heads, head_dim, intermediate, vocab = GEOMETRIES[geometry]
    return llama(
        hidden=hidden, layers=layers or n, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        intermediate=intermediate, vocab=vocab, device=device,
        dtype=dtype or ("float32" if device == "cpu" else "bfloat16"),
    )  # fmt: skip


def shape_suffix(geometry: str, device: str) -> str:
    """The part of a result's file name that says where it ran: `_<geometry>` unless the tiny
    model, `_<device type>` unless the CPU (`_llama3-8b_cuda`)."""
    suffix = "" if geometry == "tiny" else f"_{geometry}"
    return suffix if device == "cpu" else f"{suffix}_{device.split(':')[0]}"


def interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Return the median seconds of each run, measured in alternation so that drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def device_description(device: str = "cpu") -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def report(
    name: str,
    result: dict[str, Any],
    save: bool,
    file_stem: str | None = None,
    device: str = "cpu",
) -> int:
    """Print the result, compare it with the committed bounds, optionally save it; return the exit status."""
    bounds = json.loads(BOUNDS.read_text()).get(name, {})
    failures = []
    for key, limit in bounds.items():
        metric, _, kind = key.rpartition("_")
        if metric not in result:
            continue
        value = result[metric]
        if (kind == "max" and value > limit) or (kind == "min" and value < limit):
            failures.append(f"{metric}={value} outside {kind} {limit}")
    result = {
        "benchmark": name,
        "device": device_description(device),
        **result,
        "bounds": bounds,
        "failures": failures,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{file_stem or name}.json").write_text(text + "\n")
    return 1 if failures else 0
