"""Under torch.compile the hooks trace to nothing but a pass count: the compiled graph is the bare
model's (no graph break, logits bitwise equal) and those passes are counted as unmeasured.

transformers' `generate()` compiles its decode steps on a GPU when the cache is static (and
`transformers serve --compile` does); `_compile_all_devices` makes it do so on the CPU here. The
"eager" backend traces as on a GPU without generating kernels, which keeps the tests fast.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM

from collector import MemorySink, attach

CONFIG = LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip
EVERY_PASS: dict[str, Any] = dict(
    sample_rate=1.0, min_context_tokens=0, decode_every=1, max_decode_samples=64,
    max_sampled_passes_per_second=1000.0,
)  # fmt: skip


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(CONFIG, attn_implementation="sdpa").eval()


def compiled_generate(model: LlamaForCausalLM, ids: torch.Tensor) -> Any:
    config = CompileConfig(backend="eager", mode=None)
    config._compile_all_devices = True  # what a GPU gets without asking
    return model.generate(
        ids, max_new_tokens=5, do_sample=False, cache_implementation="static",
        compile_config=config, return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip


def test_compiled_decode_steps_run_the_bare_graph_and_are_counted() -> None:
    model = llama()
    ids = torch.randint(1, 64, (1, 40))
    bare = compiled_generate(model, ids)
    sink = MemorySink()
    with attach(model, sink=sink, **EVERY_PASS) as handle:
        hooked = compiled_generate(model, ids)
        assert handle.collector.compiled_passes == 4  # the decode steps; the prefill runs eagerly
        compiled_generate(model, ids)  # its eager prefill counts the 4 compiled passes before it
        counted = handle.metrics.value(
            "headwatch_collector_unmeasured_passes_total", model_name="llama", reason="compiled"
        )
    assert handle.errors == 0
    assert torch.equal(hooked.sequences, bare.sequences)
    assert all(torch.equal(a, b) for a, b in zip(hooked.logits, bare.logits, strict=True))
    assert [(m.phase, m.query_position) for m in sink.messages] == [("prefill", 39)] * 2
    assert counted == 4
    assert not counters["graph_break"]


def test_a_compiled_forward_has_no_graph_break_and_the_same_logits() -> None:
    model = llama()
    ids = torch.randint(1, 64, (2, 24))
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        bare = compiled(ids).logits
        with attach(model, sink=MemorySink(), **EVERY_PASS) as handle:
            hooked = compiled(ids).logits
    assert handle.errors == 0 and handle.collector.compiled_passes == 1
    assert torch.equal(hooked, bare)
    assert not counters["graph_break"]
