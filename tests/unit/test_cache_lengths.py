"""The host-side cache length: exact on every pass, and reading a static cache's tensor only when
something other than the model's own passes changed it."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

from collector import MemorySink, attach
from collector.hook import pass_inputs
from collector.lengths import CacheLengths, mark_compiled
from tests.transformers_compat import cache_keyword

CONFIG = LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128,
)  # fmt: skip


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(CONFIG, attn_implementation="sdpa").eval()


def run(model: LlamaForCausalLM, lengths: CacheLengths, cache: object, query_len: int) -> int:
    """One pass of `query_len` tokens over `cache`; the length `lengths` gave before it, checked
    against the cache's own."""
    past = lengths.before_pass(cache, query_len)
    assert past == int(cache.get_seq_length())  # type: ignore[attr-defined]
    ids = torch.randint(1, 64, (1, query_len))
    model(input_ids=ids, use_cache=True, **{cache_keyword(model): cache})
    return past


@pytest.mark.parametrize("cache_kind", ["static", "dynamic"])
def test_passes_are_counted_on_the_host(model: LlamaForCausalLM, cache_kind: str) -> None:
    cache = (
        StaticCache(config=CONFIG, max_cache_len=48)
        if cache_kind == "static"
        else DynamicCache(config=CONFIG)
    )
    lengths = CacheLengths()
    with torch.no_grad():
        pasts = [run(model, lengths, cache, n) for n in (12, 1, 1, 5, 1)]
    assert pasts == [0, 12, 13, 14, 19]
    assert lengths.device_reads == 0


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda cache: cache.reset(), 0),  # a new request on a reused cache
        (lambda cache: cache.crop(-3), 10),  # assisted decoding rolls back rejected tokens
        (lambda cache: None, 13),  # nothing: no read
    ],
    ids=["reset", "crop", "untouched"],
)
def test_a_change_between_passes_is_read_once(
    model: LlamaForCausalLM, change: object, expected: int
) -> None:
    cache = StaticCache(config=CONFIG, max_cache_len=48)
    lengths = CacheLengths()
    with torch.no_grad():
        run(model, lengths, cache, 12)
        run(model, lengths, cache, 1)
        change(cache)  # type: ignore[operator]
        reads = lengths.device_reads
        assert run(model, lengths, cache, 1) == expected
        assert lengths.device_reads == reads + (expected != 13)
        assert run(model, lengths, cache, 1) == expected + 1
    assert lengths.device_reads == reads + (expected != 13)


def test_a_change_after_the_first_pass_is_read(model: LlamaForCausalLM) -> None:
    """The first pass sees an uninitialised layer (a host 0) and creates the length tensor."""
    cache = StaticCache(config=CONFIG, max_cache_len=48)
    lengths = CacheLengths()
    with torch.no_grad():
        run(model, lengths, cache, 12)
        cache.crop(-3)
        assert run(model, lengths, cache, 1) == 9
    assert lengths.device_reads == 1


def test_a_pass_after_compiled_passes_is_read(model: LlamaForCausalLM) -> None:
    """A CUDA graph's replay adds to the length without bumping the tensor's version; the mark a
    compiled pass leaves on the cache makes the next uncompiled pass read it. The replay is
    mimicked through `.data`, whose in-place ops leave the tensor's version alone."""
    cache = StaticCache(config=CONFIG, max_cache_len=48)
    lengths = CacheLengths()
    with torch.no_grad():
        run(model, lengths, cache, 12)
        cache.layers[0].cumulative_length.data.add_(1)  # one replayed decode step
        mark_compiled(cache)
        assert run(model, lengths, cache, 1) == 13
        assert run(model, lengths, cache, 1) == 14  # the mark is used once
    assert lengths.device_reads == 1


def test_a_cache_made_in_inference_mode_is_read_every_pass(model: LlamaForCausalLM) -> None:
    """Inference tensors keep no version counter: the length is right, at the cost of a read."""
    lengths = CacheLengths()
    with torch.inference_mode():
        cache = StaticCache(config=CONFIG, max_cache_len=48)
        pasts = [run(model, lengths, cache, n) for n in (12, 1, 1)]
    assert pasts == [0, 12, 13]
    assert lengths.device_reads == 2


def test_a_cache_first_seen_with_tokens_is_read(model: LlamaForCausalLM) -> None:
    """A cache filled before the collector saw it (attached mid-request) is read, not guessed."""
    cache = StaticCache(config=CONFIG, max_cache_len=48)
    with torch.no_grad():
        ids = torch.randint(1, 64, (1, 9))
        model(input_ids=ids, use_cache=True, **{cache_keyword(model): cache})
        lengths = CacheLengths()
        assert run(model, lengths, cache, 1) == 9
        assert run(model, lengths, cache, 1) == 10
    assert lengths.device_reads == 1


def test_a_pass_that_raised_is_not_counted(model: LlamaForCausalLM) -> None:
    """A forward that raised before its cache update, then a reset (one in-place op, as an
    update would be): the next prefill is a new request at position 0, not a continuation."""
    cache = StaticCache(config=CONFIG, max_cache_len=48)
    keyword = cache_keyword(model)
    sink = MemorySink()
    with torch.no_grad(), attach(model, sink=sink, sample_rate=1.0, min_context_tokens=0) as handle:
        model(input_ids=torch.randint(1, 64, (1, 12)), use_cache=True, **{keyword: cache})
        with pytest.raises(IndexError):  # a token id past the vocabulary: the embedding raises
            model(input_ids=torch.full((1, 1), 999), use_cache=True, **{keyword: cache})
        cache.reset()
        model(input_ids=torch.randint(1, 64, (1, 8)), use_cache=True, **{keyword: cache})
    assert handle.errors == 0
    assert [m.query_position for m in sink.messages] == [11, 7]


@pytest.mark.parametrize(
    "given",
    [{"cache": "C"}, {"past_key_values": "C"}, {"past_key_values": None, "cache": "C"}],
    ids=["cache", "past_key_values", "old-name-None"],
)
def test_the_cache_is_read_by_either_name(given: dict[str, object]) -> None:
    """transformers 5.2x renamed `past_key_values` to `cache`; a None under one name hides nothing."""
    shape, cache, _ = pass_inputs((), {"input_ids": torch.zeros(2, 5), **given})
    assert shape == (2, 5) and cache == "C"
