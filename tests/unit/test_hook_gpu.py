"""On CUDA: no host-device synchronisation on unsampled passes; GPU statistics equal the CPU ones."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from collector import MemorySink, attach
from collector.hook import output_cache
from tests.transformers_compat import cache_keyword

pytestmark = pytest.mark.gpu


def model() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()


def count_syncs(run: Callable[[], None]) -> int:
    """Return how many host-device synchronisations torch reports while `run()` executes."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_unsampled_passes_add_no_synchronisation(cache_kind: str) -> None:
    """The model itself may synchronise (mask checks); the hook must not add a single one. A static
    cache keeps its length in a device tensor (collector.lengths carries it on the host)."""
    from transformers import StaticCache

    gpu = model().cuda()
    ids = torch.randint(0, 64, (2, 64), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :10] = 0

    keyword = cache_keyword(gpu)

    def passes() -> None:
        given: dict[str, StaticCache] = {}
        if cache_kind == "static":
            given[keyword] = StaticCache(config=gpu.config, max_cache_len=80)
        with torch.no_grad():
            out = gpu(ids, attention_mask=mask, use_cache=True, **given)
            step = torch.ones(2, 1, dtype=ids.dtype, device="cuda")
            cache = {keyword: output_cache(out)}
            grown = mask
            for _ in range(3):
                grown = torch.cat([grown, torch.ones_like(step)], 1)
                gpu(step, attention_mask=grown, **cache)

    passes()  # warm-up
    plain = count_syncs(passes)
    with attach(gpu, sink=MemorySink(), sample_rate=1.0, min_context_tokens=10**9, decode_every=1):
        hooked = count_syncs(passes)
    # the model's own count varies between runs (mask checks, caching); the hook adds none
    assert hooked <= plain


def test_gpu_statistics_equal_cpu_statistics() -> None:
    ids = torch.randint(0, 64, (1, 200))
    results = []
    for device in ("cpu", "cuda"):
        m = model().to(device)
        sink = MemorySink()
        with torch.no_grad(), attach(m, sink=sink, sample_rate=1.0, min_context_tokens=0):
            m(ids.to(device))
        results.append(sink.messages[0])
    cpu, gpu = results
    for name in cpu.header.stat_names:
        tolerance = 1e-4 if name == "eviction_error" else 2e-5
        if name == "keys_for_90pct":
            tolerance = 1.0
        np.testing.assert_allclose(
            gpu.stat(name), cpu.stat(name), atol=tolerance, rtol=0, err_msg=name
        )


def test_a_sampled_decode_step_synchronises_once() -> None:
    """A measured decode step without padding waits for the GPU once: the copy of its statistics.

    The pass's index tensors go to the device from pinned memory, without a sync, and the
    visible keys' copy is queued before the statistics' one.
    """
    gpu = model().cuda()
    with torch.no_grad():
        out = gpu(torch.randint(0, 64, (1, 64), device="cuda"), use_cache=True)
    name = "cache" if hasattr(out, "cache") else "past_key_values"
    cache = getattr(out, name)
    step = torch.ones(1, 1, dtype=torch.long, device="cuda")

    def decode() -> None:
        with torch.no_grad():
            gpu(step, **{name: cache})
            cache.crop(-1)  # back to the 64 prompt tokens

    decode()  # warm-up (pinned memory, kernels)
    plain = count_syncs(decode)
    sink = MemorySink()
    with attach(gpu, sink=sink, sample_rate=1.0, min_context_tokens=0, decode_every=1):
        decode()
        hooked = count_syncs(decode)
    assert len(sink.messages) == 2
    assert hooked <= plain + 1


def test_compiled_decode_with_cuda_graphs_is_unchanged_and_counted() -> None:
    """On CUDA `generate()` compiles its decode steps when the cache is static (mode
    "reduce-overhead": CUDA graphs). The hooks must trace to constant stores, leave the logits
    bitwise equal, and measure the uncompiled prefill."""
    gpu = model().cuda()
    ids = torch.randint(0, 64, (1, 64), device="cuda")

    def generate() -> Any:
        with torch.no_grad():
            return gpu.generate(
                ids, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                cache_implementation="static",
                return_dict_in_generate=True, output_logits=True,
            )  # fmt: skip

    bare = generate()
    sink = MemorySink()
    with attach(
        gpu, sink=sink, sample_rate=1.0, min_context_tokens=0, decode_every=1,
        max_sampled_passes_per_second=1000.0,
    ) as handle:  # fmt: skip
        hooked = generate()
        generate()
        assert handle.collector.saw_compiled
    assert handle.errors == 0
    assert all(torch.equal(a, b) for a, b in zip(hooked.logits, bare.logits, strict=True))
    assert [m.phase for m in sink.messages] == ["prefill", "prefill"]
