"""Bad input and faults: clear errors at attach time, nothing ever raised into the forward pass."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama import modeling_llama

import collector.runtime
from collector import MemorySink, attach
from collector.errors import SettingsError, UnsupportedModelError
from collector.hook import MEASURING, output_cache
from tests.transformers_compat import cache_keyword

CONFIG: dict[str, Any] = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128,
)  # fmt: skip


def llama(implementation: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(
        LlamaConfig(**CONFIG), attn_implementation=implementation
    ).eval()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"sample_rate": 1.5}, "sample_rate: expected a value less than or equal to 1, got 1.5"),
        ({"sample_rate": 0.0}, "sample_rate: expected a value greater than 0, got 0.0"),
        (
            {"recent_tokens": -1},
            "recent_tokens: expected a value greater than or equal to 0, got -1",
        ),
        ({"sink_tokens": -4}, "sink_tokens: expected a value greater than or equal to 0, got -4"),
        ({"stats": ("entropy_nats", "median_mass")}, "got 'median_mass'"),
        ({"layers": (0, 7)}, "layers: expected indices below 2, got (0, 7)"),
    ],
)
def test_bad_settings_raise_at_attach_time(overrides: dict[str, Any], expected: str) -> None:
    with pytest.raises(SettingsError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        attach(llama(), sink=MemorySink(), **overrides)


def test_unsupported_attention_implementation_is_named() -> None:
    model = llama()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(UnsupportedModelError, match="'flex_attention'"):
        attach(model, sink=MemorySink())


def test_encoder_decoder_is_rejected() -> None:
    model = T5ForConditionalGeneration(
        T5Config(vocab_size=32, d_model=16, d_ff=16, d_kv=4, num_layers=1, num_heads=2)
    )
    with pytest.raises(UnsupportedModelError, match="T5ForConditionalGeneration"):
        attach(model, sink=MemorySink())


def test_a_model_split_across_devices_is_named() -> None:
    """device_map="auto" over several GPUs puts layers on several devices (here: the CPU and
    "meta", the only second device a CPU-only machine has)."""
    model = llama()
    model.model.layers[1].to("meta")
    with pytest.raises(
        UnsupportedModelError, match=r"on one device, got cpu, meta \(a model split"
    ):
        attach(model, sink=MemorySink())


def test_detach_restores_every_attention_function() -> None:
    before = {k: ALL_ATTENTION_FUNCTIONS[k] for k in ALL_ATTENTION_FUNCTIONS}
    eager = modeling_llama.eager_attention_forward
    model, other = llama(), llama("eager")
    with attach(model, sink=MemorySink()), attach(other, sink=MemorySink()):
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not before["sdpa"]
        assert modeling_llama.eager_attention_forward is not eager
    assert {k: ALL_ATTENTION_FUNCTIONS[k] for k in ALL_ATTENTION_FUNCTIONS} == before
    assert modeling_llama.eager_attention_forward is eager
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_failures_are_counted_logged_and_disable_the_hook(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(collector.runtime, "layer_pass", broken)
    model = llama()
    ids = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        expected = model(ids).logits
    sink = MemorySink()
    with caplog.at_level(logging.WARNING, logger="collector.runtime"), torch.no_grad(), attach(
        model, sink=sink, sample_rate=1.0, min_context_tokens=0, max_consecutive_errors=3,
        max_sampled_passes_per_second=100.0,
    ) as handle:  # fmt: skip
        for _ in range(4):
            assert torch.equal(model(ids).logits, expected)
        assert handle.errors == 3
        assert not handle.enabled
        assert (
            handle.metrics.value("headwatch_collector_hook_errors_total", model_name="llama") == 3
        )
        assert handle.metrics.value("headwatch_collector_hook_enabled", model_name="llama") == 0
    assert sink.messages == []
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1


def test_all_padding_sequence_is_skipped_not_raised() -> None:
    model = llama("eager")
    ids = torch.randint(0, 64, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :] = 0  # a sequence that is all padding: its rows see no key at all
    sink = MemorySink()
    with torch.no_grad(), attach(model, sink=sink, sample_rate=1.0, min_context_tokens=0) as handle:
        model(ids, attention_mask=mask)
    assert handle.errors == 0
    (message,) = sink.messages  # the all-padding sequence has no query token to measure
    assert message.flags == ()
    assert message.valid.all()


def test_fully_masked_row_is_flagged_not_raised() -> None:
    """A layer whose mask hides every key from a measured row: that layer is not measured."""
    model = llama("eager")

    def hide_last_row_of_sequence_1(
        module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        mask = kwargs["attention_mask"].clone()  # eager: additive (batch, 1, query, keys)
        mask[1, :, -1, :] = torch.finfo(mask.dtype).min
        return args, {**kwargs, "attention_mask": mask}

    model.model.layers[1].self_attn.register_forward_pre_hook(
        hide_last_row_of_sequence_1, with_kwargs=True
    )
    sink = MemorySink()
    with torch.no_grad(), attach(model, sink=sink, sample_rate=1.0, min_context_tokens=0) as handle:
        model(torch.randint(0, 64, (2, 12)))
    assert handle.errors == 0
    first, second = sink.messages
    assert first.flags == () and first.valid.all()
    assert second.flags == ("fully_masked",)
    assert second.visible_keys == (12, 0)
    assert second.valid[0].all() and not second.valid[1].any()


def test_non_finite_values_are_flagged() -> None:
    model = llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] = float("nan")
    sink = MemorySink()
    with torch.no_grad(), attach(model, sink=sink, sample_rate=1.0, min_context_tokens=0) as handle:
        model(torch.randint(0, 64, (1, 16)))
    assert handle.errors == 0
    (message,) = sink.messages
    assert "non_finite" in message.flags
    assert message.valid[0].all()


@pytest.mark.parametrize(
    ("settings", "observed"),
    [({"min_context_tokens": 10**6}, 0), ({"min_context_tokens": 0}, 2)],
    ids=["unmeasured", "measured"],
)
def test_only_measured_passes_reach_the_observer(
    monkeypatch: pytest.MonkeyPatch, settings: dict[str, Any], observed: int
) -> None:
    """While no measured pass is in flight a wrapper returns right after the kernel; the flag is
    down again after every pass, one that raised included."""
    calls: list[int] = []
    original = collector.runtime.PassCollector.observe

    def counted(self: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(collector.runtime.PassCollector, "observe", counted)
    model = llama()
    with torch.no_grad(), attach(model, sink=MemorySink(), sample_rate=1.0, **settings) as handle:
        model(torch.randint(0, 64, (1, 16)))
        assert len(calls) == observed and not MEASURING.active
        with pytest.raises(IndexError):
            model(torch.full((1, 16), 999))  # past the vocabulary: raises in the embedding
        assert not MEASURING.active
    assert handle.errors == 0


def test_unsampled_passes_do_no_tensor_work(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = collector.runtime.layer_pass

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(collector.runtime, "layer_pass", counted)
    model = llama()
    sink = MemorySink()
    with torch.no_grad(), attach(model, sink=sink, sample_rate=1.0, min_context_tokens=1000):
        model(torch.randint(0, 64, (1, 16)))
    assert calls == [] and sink.messages == []


def _aten_ops(model: torch.nn.Module, steps: int, cache_kind: str) -> list[str]:
    """The aten ops of a padded prefill and `steps` decode steps, in order (a host sync is one:
    `_local_scalar_dense` for .item() or int(), a `_to_copy` to the CPU for .cpu())."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import DynamicCache, StaticCache

    ops: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            ops.append(str(func))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    ids = torch.randint(1, 64, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0  # left padding: the mask is what a measured pass reads from the device
    # A static cache keeps its length in a tensor: reading it every pass would be a sync.
    if cache_kind == "static":
        cache = StaticCache(config=model.config, max_cache_len=32)
    else:
        cache = DynamicCache(config=model.config)
    with torch.no_grad(), Record():
        keyword = cache_keyword(model)
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **{keyword: cache})
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=nxt, attention_mask=mask, **{keyword: output_cache(out)})
    return ops


@pytest.mark.parametrize(
    "settings",
    [
        {"sample_rate": 1.0, "min_context_tokens": 10**6},
        {"sample_rate": 1e-9, "min_context_tokens": 0},
    ],
    ids=["context-too-short", "rate-rejected"],
)
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_unsampled_passes_add_no_tensor_op_and_no_host_sync(
    settings: dict[str, Any], cache_kind: str
) -> None:
    """The CPU-side check of "no host-device sync on unsampled passes": an attached model runs
    exactly the aten ops of the bare model (on a GPU, test_hook_gpu checks it with torch's sync
    debug mode)."""
    model = llama()
    bare = _aten_ops(model, steps=2, cache_kind=cache_kind)
    sink = MemorySink()
    with attach(model, sink=sink, seed=1, decode_every=1, **settings) as handle:
        hooked = _aten_ops(model, steps=2, cache_kind=cache_kind)
    assert handle.errors == 0 and sink.messages == []
    assert hooked == bare
    assert "aten._local_scalar_dense.default" not in set(hooked) - set(bare)


def test_a_layer_without_visible_keys_is_flagged_and_left_unmeasured() -> None:
    import math

    import numpy as np

    from collector.assemble import Identity, Layout, assemble
    from collector.plan import PassPlan, plan_rows
    from collector.schema import core_stat_names

    rows = plan_rows(np.ones((1, 8), dtype=np.int8), [0], 8, "prefill", 4, 2)
    plan = PassPlan(phase="prefill", total_slots=8, query_len=8, rows=rows)
    plan.layout.update(kv_heads=1, head_dim=4, kv_dtype_bytes=4)
    good = {n: torch.full((1, 2), 0.25) for n in core_stat_names()}
    good["keys_for_90pct"] = torch.full((1, 2), 3.0)
    plan.results[0] = {**good, "visible_keys": torch.tensor([8])}
    plan.results[1] = {
        **{n: torch.full((1, 2), math.nan) for n in core_stat_names()},
        "visible_keys": torch.tensor([0]),
    }
    (message,) = assemble(
        plan, Identity("m", "", "0" * 16, "s"), Layout(2, 4, 2, (1, 16, 256), 1.0)
    )
    assert "fully_masked" in message.flags
    assert message.valid[0].all() and not message.valid[1].any()
    assert message.visible_keys == (8, 0)


def test_a_sampled_pass_that_raised_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's own exception reaches the server; the layers measured before it are dropped."""

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("out of memory in the last layer's MLP")

    model = llama()
    monkeypatch.setattr(model.model.layers[-1].mlp, "forward", fail)
    sink = MemorySink()
    with (
        torch.no_grad(),
        attach(model, sink=sink, sample_rate=1.0, min_context_tokens=0) as handle,
        pytest.raises(RuntimeError, match="out of memory"),
    ):
        model(input_ids=torch.randint(1, 64, (1, 12)))
    assert handle.errors == 0 and sink.messages == []
