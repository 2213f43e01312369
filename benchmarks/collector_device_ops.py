"""Kernel launches of one sampled decode step on the device path, counted on the CPU.

Usage:
    python benchmarks/collector_device_ops.py [--geometry llama3.2-1b] [--dtype bfloat16] [--save]

On a GPU a serving process launches its kernels one by one from Python: up to 16K keys the
launches, not the arithmetic, set the cost of a decode step and of the collector's work on it
(`collector_sampled_row.py --profile` on CUDA shows it). This script counts them where no GPU
is at hand. It forces the statistics onto their device path (`collector.topk.on_host` answers
no, as on a GPU) and counts, with a torch dispatch mode, the aten operations of a plain decode
step and of the same step with its row measured, by where they run: the pass's inputs
(`layer_inputs`), the layers (`layer_pass`), `finish` (with the batches it flushes) and message
assembly. Views, and conversions that return their input, launch nothing and are left out.

Where the CPU differs from CUDA: 16-bit q.k takes float32 copies on the CPU
(`collector.stats.products._bmm_float32`), two operations per layer that CUDA does not launch
(subtracted in `collector_ops_on_cuda`); on CUDA a pass copies 5 small index tensors to the
device, which the CPU does not (not counted). A small model of the geometry's layer and head
counts is used (hidden 512, heads of 16): the counts do not depend on sizes. Counts only: no
timing, nothing a CPU says about a GPU's seconds.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import GEOMETRIES, llama, report

# Operations that make views (or nothing) and launch no kernel.
VIEWS = frozenset(
    {
        "aten.reshape.default", "aten.view.default", "aten.unsqueeze.default",
        "aten.transpose.int", "aten.slice.Tensor", "aten.alias.default", "aten.expand.default",
        "aten.t.default", "aten.select.int", "aten.squeeze.dim", "aten._unsafe_view.default",
        "aten.detach.default", "aten.detach_.default", "aten.permute.default",
        "aten.unflatten.int", "aten.expand_as.default", "aten.unbind.int", "aten.split.Tensor",
        "aten.as_strided.default", "aten.lift_fresh.default", "aten.narrow.default",
        "aten.resolve_conj.default", "aten.resolve_neg.default",
    }
)  # fmt: skip
# Conversions, which return their input when it already has the dtype and device asked for.
CONVERSIONS = frozenset(
    {"aten.to.dtype", "aten.to.dtype_layout", "aten.to.device", "aten.to.other"}
)
STAGES = ("layer_inputs", "layer_pass", "finish_stacked", "assemble")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="llama3.2-1b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args(argv)

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import DynamicCache

    import collector.runtime
    import collector.topk
    from collector import MemorySink, attach

    runtime = sys.modules["collector.runtime"]  # (the package re-exports names over modules)
    collector.topk.on_host = lambda tensor: False  # the device path, as on a GPU
    stage = ["model"]
    counts: collections.Counter[str] = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            result = func(*args, **(kwargs or {}))
            name = str(func)
            # a conversion to what the tensor already is returns it: nothing launched
            converted_nothing = name in CONVERSIONS and args and result is args[0]
            if name not in VIEWS and not converted_nothing:
                counts[stage[-1]] += 1
            return result

    def counted(name: str) -> None:
        inner = getattr(runtime, name)

        def wrapper(*a: Any, **k: Any) -> Any:
            stage.append(name)
            try:
                return inner(*a, **k)
            finally:
                stage.pop()

        setattr(runtime, name, wrapper)

    for name in STAGES:
        counted(name)
    layers, _, heads, kv_heads, _, _, _ = GEOMETRIES[args.geometry]
    model = llama(
        hidden=512, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=16, intermediate=512,
        vocab=256, dtype=args.dtype,
    )  # fmt: skip
    dtype = getattr(torch, args.dtype)
    cache = DynamicCache(config=model.config)
    for layer in range(layers):
        shape = (1, kv_heads, args.context, 16)
        cache.update(torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype), layer)
    token, position = torch.tensor([[5]]), torch.tensor([[args.context]])
    # transformers renamed `past_key_values` to `cache` in 5.2x
    cache_kw = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )

    def step() -> dict[str, int]:
        counts.clear()
        with torch.inference_mode(), Count():
            model(token, position_ids=position, use_cache=True, **{cache_kw: cache})
        cache.crop(-1)
        return dict(counts)

    plain = step()["model"]
    sink = MemorySink()
    with attach(model, sink=sink, sample_rate=1.0, min_context_tokens=0, decode_every=1):
        step()  # first use: the float32-output product is tried once
        sampled = step()
    if len(sink.messages) != 2:
        raise RuntimeError(
            f"expected both measured steps to give a message, got {len(sink.messages)}"
        )
    collector_ops = sum(v for k, v in sampled.items() if k != "model")
    cpu_only = 2 if dtype in (torch.bfloat16, torch.float16) else 0
    on_gpu = collector_ops - cpu_only * layers
    result = {
        "geometry": args.geometry,
        "dtype": args.dtype,
        "context": args.context,
        "layers": layers,
        "plain_step_ops": plain,
        "collector_ops_by_stage": {name: sampled.get(name, 0) for name in STAGES},
        "collector_ops": collector_ops,
        "cpu_only_per_layer": cpu_only,
        "collector_ops_on_cuda": on_gpu,
        "collector_over_plain_ops": round(on_gpu / plain, 3),
    }
    stem = f"collector_device_ops_{args.geometry}_{args.dtype}"
    return report("collector_device_ops", result, args.save, stem)


if __name__ == "__main__":
    raise SystemExit(main())
