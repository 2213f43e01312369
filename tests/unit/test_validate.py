"""The validation step: per-head sink+recent restriction, KL and perplexity, safe vs unsafe heads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from headwatch.prompts import Prompt
from headwatch.report.errors import PolicyError
from headwatch.validate import (
    compare,
    effect,
    markdown,
    restricted_heads,
    streaming_mask,
    unsafe_draws,
)

LAYERS, HEADS, KV, T = 2, 4, 2, 160
S, R = 4, 16


@pytest.fixture(name="model", scope="module")
def fixture_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).eval()
    # Hand-set heads: KV head 0 of every layer feeds query heads 0-1, whose outputs o_proj drops,
    # so those heads cannot matter; KV head 1's query heads are left as trained (random).
    head_dim = 64 // HEADS
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, : 2 * head_dim] = 0.0
    return model


def _prompts(n: int = 2) -> list[Prompt]:
    gen = torch.Generator().manual_seed(1)
    return [
        Prompt(f"p{i}", "document", tuple(torch.randint(3, 128, (T,), generator=gen).tolist()))
        for i in range(n)
    ]


def test_streaming_mask_keeps_sink_and_recent_for_restricted_heads_only() -> None:
    mask = streaming_mask(np.array([True, False]), 10, sink=2, recent=3, device=torch.device("cpu"))
    assert mask[0, 9].nonzero().flatten().tolist() == [0, 1, 7, 8, 9]
    assert mask[1, 9].all() and not mask[1, 5, 6:].any()
    assert mask[0, 3].tolist() == [True] * 4 + [False] * 6


def test_restriction_of_no_heads_reproduces_the_model(model: LlamaForCausalLM) -> None:
    ids = torch.tensor([_prompts(1)[0].ids])
    with torch.no_grad():
        full = model(input_ids=ids).logits
        with restricted_heads(model, np.zeros((LAYERS, KV), dtype=bool), S, R):
            same = model(input_ids=ids).logits
    torch.testing.assert_close(same, full, atol=1e-5, rtol=1e-5)
    assert model.config._attn_implementation == "sdpa"


def test_restricting_heads_that_matter_changes_the_next_token_distribution(
    model: LlamaForCausalLM,
) -> None:
    heads = np.array([[False, True], [False, True]])
    result = effect(model, _prompts(), heads, S, R, "matter")
    assert result.mean_kl_nats > 1e-4
    assert result.perplexity_restricted != pytest.approx(result.perplexity_full, rel=1e-6)


def test_safe_heads_show_a_smaller_effect_than_unsafe_heads(model: LlamaForCausalLM) -> None:
    safe_set = np.array([[True, False], [True, False]])  # the heads whose output is dropped
    safe, unsafe = compare(model, _prompts(), safe_set, S, R, draws=2)
    assert safe.mean_kl_nats < 1e-6
    assert min(e.mean_kl_nats for e in unsafe) > 100 * max(safe.mean_kl_nats, 1e-9)
    table = markdown(safe, unsafe, LAYERS * KV, "Tiny model.")
    assert "marked safe" in table and "| 2 of 4 |" in table
    assert "2 of 2 unsafe draws changed the distribution more" in table


def test_unsafe_draws_have_the_safe_set_size_and_avoid_safe_heads() -> None:
    safe = np.array([[True, False, False], [True, False, False]])
    for pick in unsafe_draws(safe, draws=4, seed=0):
        assert pick.sum() == 2 and not (pick & safe).any()


def test_validation_needs_safe_and_unsafe_heads(model: LlamaForCausalLM) -> None:
    with pytest.raises(PolicyError, match="safe"):
        compare(model, _prompts(1), np.zeros((LAYERS, KV), dtype=bool), S, R)
    with pytest.raises(PolicyError, match="unsafe"):
        compare(model, _prompts(1), np.ones((LAYERS, KV), dtype=bool), S, R)


def test_answer_tokens_are_scored_for_needle_prompts(model: LlamaForCausalLM) -> None:
    base = _prompts(1)[0]
    needle = Prompt(
        "n", "needle", base.ids, needle_start=40, needle_end=45, answer=" x", answer_start=T - 3
    )
    result = effect(model, [needle], np.array([[False, True], [False, True]]), S, R, "n")
    assert np.isfinite(result.answer_nll_change_nats)


def test_verdicts_measured_on_hand_set_heads_predict_the_effect_of_restriction() -> None:
    """The whole chain on known heads: collector -> exporter rules -> verdicts -> restriction."""
    from headwatch.analyze import measure
    from headwatch.report.summary import summarize
    from headwatch.training.handset import BOS_TOKEN_ID, MARKER_TOKEN_ID, handset_model

    model = handset_model(layers=1)
    gen = torch.Generator().manual_seed(3)
    prompts = []
    for i in range(4):
        ids = torch.randint(6, 64, (600,), generator=gen)
        ids[0] = BOS_TOKEN_ID
        ids[150 + 50 * i] = MARKER_TOKEN_ID  # the marker head reads this one middle token
        prompts.append(Prompt(f"h{i}", "document", tuple(ids.tolist())))
    summary = summarize(measure(model, prompts, "handset", S, R, progress=False))
    assert summary.patterns[0].tolist() == ["sink", "recency", "concentrated_middle", "uniform"]
    # KV head 0 serves the sink and recency heads, KV head 1 the marker and uniform heads
    assert summary.safe_kv_heads.tolist() == [[True, False]]
    safe, unsafe = compare(model, prompts, summary.safe_kv_heads, S, R, draws=1)
    assert unsafe[0].mean_kl_nats > 10 * safe.mean_kl_nats


def test_lowest_error_picks_the_heads_with_the_smallest_measured_error() -> None:
    from headwatch.validate import lowest_error

    error = np.array([[0.3, np.nan], [0.01, 0.2]])
    assert lowest_error(error, 2).tolist() == [[False, False], [True, True]]
    with pytest.raises(PolicyError, match="--lowest"):
        lowest_error(error, 4)


def test_lowest_error_breaks_ties_by_the_mean_error() -> None:
    from headwatch.validate import lowest_error

    p95 = np.array([[1.0, 1.0, 1.0]])  # every p95 at the histogram's top value
    mean = np.array([[0.4, 0.1, 0.3]])
    assert lowest_error(p95, 1, mean).tolist() == [[False, True, False]]


def test_cli_writes_the_markdown_table(tmp_path: Path, model_dir: Path) -> None:
    from headwatch.policy import KvPolicy, write_policy
    from headwatch.validate import main

    streaming = np.array([[True, False], [False, False]])
    write_policy(
        KvPolicy("tiny", S, R, streaming, np.full((2, 2), 0.01), "test"), tmp_path / "policy"
    )
    out = tmp_path / "validation.md"
    args = [
        "--policy",
        str(tmp_path / "policy" / "policy.json"),
        "--model",
        str(model_dir),
        "--prompts",
        "2",
        "--context-tokens",
        "200",
        "--draws",
        "2",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    text = out.read_text()
    assert (
        "| marked safe" in text
        and "random draws" in text
        and "Restricted: the KV heads the policy marks safe" in text
    )


@pytest.mark.parametrize("shape", [(1, 2), (2, 1)], ids=["fewer-layers", "fewer-kv-heads"])
def test_cli_refuses_a_policy_of_another_shape_naming_both(
    tmp_path: Path, model_dir: Path, shape: tuple[int, int], capsys: pytest.CaptureFixture[str]
) -> None:
    from headwatch.policy import KvPolicy, write_policy
    from headwatch.validate import main

    streaming = np.zeros(shape, dtype=bool)
    streaming[0, 0] = True
    write_policy(KvPolicy("other", S, R, streaming, np.full(shape, 0.01), "test"), tmp_path / "p")
    out = tmp_path / "validation.md"
    args = ["--policy", str(tmp_path / "p" / "policy.json"), "--model", str(model_dir),
            "--prompts", "2", "--context-tokens", "200", "--draws", "2", "--out", str(out)]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    # the tiny model's (layers, kv_heads) and the policy's
    assert "(2, 2)" in err and str(shape) in err
    assert not out.exists()


def test_cli_refuses_a_malformed_policy_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from headwatch.validate import main

    policy = tmp_path / "policy.json"
    policy.write_text('{"format": "headwatch.kv-policy.v1", "num_kv_heads": 2}')
    assert main(["--policy", str(policy), "--out", str(tmp_path / "v.md")]) == 2
    assert "'num_layers'" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--draws", "--prompts"])
def test_cli_refuses_no_draws_or_prompts_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    from headwatch.validate import main

    assert main(["--policy", str(tmp_path / "absent.json"), flag, "0"]) == 2
    assert "expected --draws and --prompts >= 1" in capsys.readouterr().err
