"""Under torch.compile the hooks trace to two constant stores: the compiled graph is the bare
model's (no graph break, no recompile, logits bitwise equal) and those passes go unmeasured.

transformers' `generate()` compiles its decode steps on a GPU when the cache is static (and
`transformers serve --compile` does); `_compile_all_devices` makes it do so on the CPU here. The
"eager" backend traces as on a GPU without generating kernels, which keeps the tests fast.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM

from collector import MemorySink, attach
from collector.hook import output_cache

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
        ids, max_new_tokens=5, min_new_tokens=5, do_sample=False,
        cache_implementation="static", compile_config=config, return_dict_in_generate=True,
        output_logits=True,
    )  # fmt: skip


def same(a: Any, b: Any) -> bool:
    return torch.equal(a.sequences, b.sequences) and all(
        torch.equal(x, y) for x, y in zip(a.logits, b.logits, strict=True)
    )


def test_compiled_decode_steps_run_the_bare_graph(caplog: pytest.LogCaptureFixture) -> None:
    model = llama()
    ids = torch.randint(1, 64, (1, 40))
    bare = compiled_generate(model, ids)
    sink = MemorySink()
    with (
        caplog.at_level(logging.WARNING, logger="collector.runtime"),
        attach(model, sink=sink, **EVERY_PASS) as handle,
    ):
        hooked = compiled_generate(model, ids)
        assert handle.collector.saw_compiled  # the 4 decode steps; the prefill runs eagerly
        compiled_generate(model, ids)
    assert handle.errors == 0 and same(hooked, bare)
    assert [(m.phase, m.query_position) for m in sink.messages] == [("prefill", 39)] * 2
    # the compiled steps left their mark: an uncompiled pass on this cache reads its length
    assert getattr(output_cache(hooked), "_headwatch_ran_compiled", False)
    assert not counters["graph_break"]
    said = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(said) == 1  # at the second request's prefill


def test_full_graphs_without_dynamic_shapes_never_recompile() -> None:
    """fullgraph=True, dynamic=False (transformers' default on TPU and Neuron): a value the
    hooks read or a count they kept inside the trace would recompile every step and raise once
    the recompile limit (8) is hit; 20 decode steps pass it."""
    model = llama()
    ids = torch.randint(1, 64, (1, 40))
    config = CompileConfig(backend="eager", mode=None, fullgraph=True, dynamic=False)
    config._compile_all_devices = True

    def run() -> Any:
        return model.generate(
            ids, max_new_tokens=20, min_new_tokens=20, do_sample=False, cache_implementation="static",
            compile_config=config, return_dict_in_generate=True, output_logits=True,
        )  # fmt: skip

    bare = run()
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()  # compile afresh with the hooks
    counters.clear()
    with attach(model, sink=MemorySink(), **EVERY_PASS) as handle:
        hooked = run()
    assert handle.errors == 0 and same(hooked, bare)
    assert hooked.sequences.shape[1] == 40 + 20  # 19 compiled decode steps
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_compiled_forward_has_no_graph_break_and_the_same_logits() -> None:
    model = llama()
    ids = torch.randint(1, 64, (2, 24))
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        bare = compiled(ids).logits
        with attach(model, sink=MemorySink(), **EVERY_PASS) as handle:
            hooked = compiled(ids).logits
    assert handle.errors == 0 and handle.collector.saw_compiled
    assert torch.equal(hooked, bare)
    assert not counters["graph_break"]


def compile_forward(model: LlamaForCausalLM) -> None:
    model.forward = torch.compile(model.forward, backend="eager")  # type: ignore[method-assign]


def compile_inner_model(model: LlamaForCausalLM) -> None:
    model.model.compile(backend="eager")


@pytest.mark.parametrize("compile_part", [compile_forward, compile_inner_model])
def test_a_part_compiled_on_its_own_is_not_taken_for_an_unwrapped_attention(
    compile_part: Any,
) -> None:
    """`model.forward = torch.compile(model.forward)` or `model.model.compile()`: the pass hooks
    run uncompiled, the attention inside a compiled graph. Not measured, not counted as an
    unwrapped attention function."""
    model = llama()
    ids = torch.randint(1, 64, (1, 24))
    sink = MemorySink()
    with torch.no_grad():
        bare = model(ids).logits
        compile_part(model)
        with attach(model, sink=sink, **EVERY_PASS) as handle:
            hooked = [model(ids).logits for _ in range(3)]
            unwrapped = handle.metrics.value(
                "headwatch_collector_unmeasured_passes_total",
                model_name="llama",
                reason="unwrapped_attention",
            )
    assert handle.errors == 0 and handle.collector.saw_compiled
    assert unwrapped == 0 and sink.messages == []
    assert all(torch.equal(h, bare) for h in hooked)


def test_a_non_strict_export_records_none_of_the_hooks() -> None:
    """torch.export (non-strict: Python runs as usual while it traces) must record the bare
    model's graph: no planning, no statistics in it."""
    model = llama()
    ids = torch.randint(1, 64, (1, 16))
    inputs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
    bare = torch.export.export(model, (), inputs, strict=False)
    with attach(model, sink=MemorySink(), **EVERY_PASS) as handle:
        hooked = torch.export.export(model, (), inputs, strict=False)
    assert handle.errors == 0
    assert len(hooked.graph.nodes) == len(bare.graph.nodes)
