"""Long-context prompts: exact lengths, needle placement, held-out text, prompt files."""

from __future__ import annotations

from pathlib import Path

import pytest

from headwatch.prompts import PromptMaker, read_prompt_file, synthetic_text
from headwatch.report.errors import PromptError


def _encode(text: str) -> list[int]:
    """A byte-level stand-in tokenizer: one id per byte, shifted past BOS."""
    return [b + 3 for b in text.encode("utf-8")]


@pytest.fixture(name="maker")
def fixture_maker() -> PromptMaker:
    return PromptMaker(_encode, bos_id=0, text=synthetic_text(20_000, seed=3))


@pytest.mark.parametrize("length", [64, 500, 2048])
def test_document_prompts_have_exact_length_and_start_with_bos(
    maker: PromptMaker, length: int
) -> None:
    p = maker.document(length, seed=1)
    assert len(p.ids) == length and p.ids[0] == 0 and p.kind == "document"


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_sits_at_its_depth_and_the_prompt_ends_with_its_question(
    maker: PromptMaker, depth: float
) -> None:
    p = maker.needle(1024, depth, seed=7)
    assert len(p.ids) == 1024
    fact = bytes(t - 3 for t in p.ids[p.needle_start : p.needle_end]).decode()
    assert " is " in fact and fact.strip().endswith(".")
    # the question is the fact up to its answer: the prompt stops where retrieval starts
    question = fact.rstrip()[: -len(p.answer)]
    assert question.endswith((" is", " is ", " is to find the")), question
    assert bytes(t - 3 for t in p.ids[-len(question) :]).decode() == question
    hay = 1024 - 1 - (p.needle_end - p.needle_start) - len(_encode(question))
    assert p.needle_start == 1 + round(depth * hay)


@pytest.mark.parametrize("seed", range(12))
def test_the_question_ends_before_the_first_word_only_the_fact_tells(
    maker: PromptMaker, seed: int
) -> None:
    p = maker.needle(256, 0.5, seed=seed)
    # template words ("to find the") belong to the question, never to the answer
    assert not p.answer.startswith(" to find the"), p.answer
    fact = bytes(t - 3 for t in p.ids[p.needle_start : p.needle_end]).decode()
    assert fact.rstrip().endswith(p.answer)


def test_with_answer_appends_the_answer_tokens(maker: PromptMaker) -> None:
    p = maker.needle(256, 0.5, seed=2)
    full = maker.with_answer(p)
    assert full.ids[: len(p.ids)] == p.ids and full.answer_start == len(p.ids)
    assert bytes(t - 3 for t in full.ids[full.answer_start :]).decode() == p.answer


def test_mixed_alternates_kinds_and_varies_lengths(maker: PromptMaker) -> None:
    prompts = maker.mixed(6, 1000, seed=0)
    assert [p.kind for p in prompts] == ["needle", "document"] * 3
    assert sorted({len(p.ids) for p in prompts}) == [500, 750, 1000]


def test_prompts_are_seeded(maker: PromptMaker) -> None:
    assert maker.needle(300, 0.5, seed=4) == maker.needle(300, 0.5, seed=4)
    assert maker.needle(300, 0.5, seed=4) != maker.needle(300, 0.5, seed=5)


@pytest.mark.parametrize("bad", [{"context_tokens": 10}, {"depth": 1.5}])
def test_bad_prompt_arguments_are_refused(maker: PromptMaker, bad: dict[str, float]) -> None:
    args = {"context_tokens": 256, "depth": 0.5, **bad}
    with pytest.raises(PromptError, match="expected"):
        maker.needle(int(args["context_tokens"]), args["depth"], seed=0)


def test_default_haystack_is_held_out_corpus_text() -> None:
    maker = PromptMaker(_encode, bos_id=None)
    assert maker.text_ids.size > 10_000
    assert maker.source.startswith("held-out") or maker.source == "seeded word text"


def test_prompt_file_splits_on_dashes(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("first doc\n---\nsecond doc\n")
    prompts = read_prompt_file(str(path), _encode, bos_id=0)
    assert [bytes(t - 3 for t in p.ids[1:]).decode() for p in prompts] == [
        "first doc",
        "second doc",
    ]


def test_missing_prompt_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PromptError, match=r"nope\.txt"):
        read_prompt_file(str(tmp_path / "nope.txt"), _encode, bos_id=0)
