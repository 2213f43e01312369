"""Long-context prompts for the demo, `analyze` and the validation: needles in haystacks and documents.

Usage:
    maker = PromptMaker(encode=lambda s: tok(s, add_special_tokens=False).input_ids, bos_id=0)
    prompts = maker.mixed(count=6, context_tokens=2048, seed=0)

The haystack is text the bundled tokenizer knows: the held-out part of the training corpus (the
King James Bible and the Jargon File, both public domain, from their Debian packages), and where
those packages are missing, a seeded text built from a fixed word list. It is never user data.
The needle facts have the same form as the training task ("<subject> is <answer>."), so a model
that learned to retrieve can be seen doing it: the prompt ends with the question "<subject> is".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from headwatch.report.errors import PromptError

logger = logging.getLogger(__name__)

PromptKind = Literal["needle", "document"]
MIN_CONTEXT_TOKENS = 64
# Every 50th document of each source is held out of training (headwatch.training.corpus).
HELD_OUT_EVERY = 50

_WORDS = (
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "that",
    "he",
    "it",
    "was",
    "for",
    "on",
    "with",
    "as",
    "his",
    "they",
    "at",
    "be",
    "this",
    "from",
    "had",
    "by",
    "not",
    "but",
    "what",
    "all",
    "were",
    "when",
    "there",
    "which",
    "said",
    "their",
    "one",
    "each",
    "people",
    "river",
    "city",
    "king",
    "house",
    "land",
    "water",
    "day",
    "night",
    "word",
    "time",
    "way",
    "program",
    "file",
    "system",
    "user",
    "code",
    "machine",
    "hacker",
    "number",
    "name",
    "light",
    "stone",
    "field",
    "road",
)


@dataclass(frozen=True)
class Prompt:
    """One prompt: its token ids and, for a needle prompt, where the fact sits and its answer."""

    name: str
    kind: PromptKind
    ids: tuple[int, ...]
    needle_start: int = -1
    needle_end: int = -1
    answer: str = ""
    answer_start: int = -1

    @property
    def has_needle(self) -> bool:
        """Return True when the prompt hides a fact whose answer it asks for."""
        return self.needle_start >= 0


def corpus_text() -> tuple[str, str]:
    """Return (held-out corpus text, its source description); a seeded word text if it is missing."""
    try:
        from headwatch.training.corpus import read_jargon, read_kjv, split_held_out

        docs = [*read_kjv(), *read_jargon()]
    except (ImportError, OSError, ValueError) as exc:
        logger.warning("held-out corpus unavailable (%s); using a seeded word text", exc)
        return synthetic_text(200_000, seed=0), "seeded word text"
    _, held = split_held_out(docs, every=HELD_OUT_EVERY)
    return "\n\n".join(d.text for d in held), "held-out KJV and Jargon File (public domain)"


def synthetic_text(chars: int, seed: int) -> str:
    """Return about `chars` characters of seeded sentences over a fixed word list."""
    rng = np.random.default_rng(seed)
    sentences: list[str] = []
    size = 0
    while size < chars:
        words = list(rng.choice(_WORDS, size=int(rng.integers(6, 16))))
        sentence = " ".join(words).capitalize() + "."
        sentences.append(sentence)
        size += len(sentence) + 1
    return " ".join(sentences)


# Answers of the form "to find the <adjective> <noun> and say <word>" open with template words a
# model predicts without looking back; the question takes them, so that it ends where retrieval
# starts and the last prompt token is the one whose attention goes to the needle.
_TEMPLATE_OPENING = " to find the"


def random_fact(rng: np.random.Generator) -> tuple[str, str, str]:
    """Return (fact, question, answer) in the training task's form "<subject> is <answer>.".

    The question ends just before the first answer word that only the fact can tell.
    """
    from headwatch.training.tasks import random_needle

    needle = random_needle(rng)
    question, answer = needle.question, needle.answer
    if answer.startswith(_TEMPLATE_OPENING + " "):
        question += _TEMPLATE_OPENING
        answer = answer[len(_TEMPLATE_OPENING) :]
    return needle.fact, question, answer


class PromptMaker:
    """Cut prompts of exact token lengths from haystack text."""

    def __init__(
        self,
        encode: Callable[[str], list[int]],
        bos_id: int | None,
        text: str | None = None,
    ) -> None:
        self.encode = encode
        self.bos_id = bos_id
        if text is None:
            text, self.source = corpus_text()
        else:
            self.source = "given text"
        # Encode paragraph by paragraph: tokenizers warn about (and some truncate) long inputs.
        pieces = [encode(chunk + "\n\n") for chunk in text.split("\n\n") if chunk.strip()]
        self.text_ids = np.asarray([t for piece in pieces for t in piece], dtype=np.int64)
        if self.text_ids.size < 2 * MIN_CONTEXT_TOKENS:
            raise PromptError(
                f"expected a haystack of >= {2 * MIN_CONTEXT_TOKENS} tokens, got {self.text_ids.size}"
            )

    def _prefix(self) -> list[int]:
        return [] if self.bos_id is None else [self.bos_id]

    def _hay(self, n: int, rng: np.random.Generator) -> list[int]:
        """Return `n` consecutive haystack tokens, wrapping around the text when it is short."""
        start = int(rng.integers(0, self.text_ids.size))
        idx = (start + np.arange(n)) % self.text_ids.size
        return [int(t) for t in self.text_ids[idx]]

    def document(self, context_tokens: int, seed: int) -> Prompt:
        """Return a plain-document prompt of exactly `context_tokens` tokens."""
        _check_length(context_tokens)
        rng = np.random.default_rng(seed)
        prefix = self._prefix()
        ids = prefix + self._hay(context_tokens - len(prefix), rng)
        return Prompt(name=f"document-{context_tokens}-s{seed}", kind="document", ids=tuple(ids))

    def needle(self, context_tokens: int, depth: float, seed: int) -> Prompt:
        """Return a needle prompt of exactly `context_tokens` tokens, the fact at `depth` (0..1)."""
        _check_length(context_tokens)
        if not 0.0 <= depth <= 1.0:
            raise PromptError(f"expected depth in [0, 1], got {depth}")
        rng = np.random.default_rng(seed)
        fact, question, answer = random_fact(rng)
        fact_ids, question_ids = self.encode(fact), self.encode(question)
        prefix = self._prefix()
        hay_len = context_tokens - len(prefix) - len(fact_ids) - len(question_ids)
        if hay_len < 16:
            raise PromptError(
                f"expected context_tokens large enough for the needle, got {context_tokens}"
            )
        hay = self._hay(hay_len, rng)
        cut = round(depth * hay_len)
        ids = prefix + hay[:cut] + fact_ids + hay[cut:] + question_ids
        start = len(prefix) + cut
        return Prompt(
            name=f"needle-{context_tokens}-d{depth:.2f}-s{seed}",
            kind="needle",
            ids=tuple(ids),
            needle_start=start,
            needle_end=start + len(fact_ids),
            answer=answer,
        )

    def with_answer(self, prompt: Prompt) -> Prompt:
        """Return a needle prompt with its answer's tokens appended (documents come back unchanged).

        The validation scores the answer tokens: a model that retrieves the fact predicts them.
        """
        if not prompt.has_needle:
            return prompt
        answer_ids = self.encode(prompt.answer)
        return replace(prompt, ids=prompt.ids + tuple(answer_ids), answer_start=len(prompt.ids))

    def mixed(self, count: int, context_tokens: int, seed: int = 0) -> list[Prompt]:
        """Return `count` prompts alternating needle and document, lengths varied up to the given one.

        Lengths cycle through 100%, 75% and 50% of `context_tokens` so that patterns are seen at
        several context lengths; needle depths cycle through 0.25, 0.5 and 0.75.
        """
        if count < 1:
            raise PromptError(f"expected count >= 1, got {count}")
        prompts: list[Prompt] = []
        for i in range(count):
            length = max(MIN_CONTEXT_TOKENS, int(context_tokens * (1.0, 0.75, 0.5)[(i // 2) % 3]))
            if i % 2 == 0:
                depth = (0.5, 0.25, 0.75)[(i // 2) % 3]
                prompts.append(self.needle(length, depth, seed=seed + i))
            else:
                prompts.append(self.document(length, seed=seed + i))
        return prompts


def _check_length(context_tokens: int) -> None:
    if context_tokens < MIN_CONTEXT_TOKENS:
        raise PromptError(f"expected context_tokens >= {MIN_CONTEXT_TOKENS}, got {context_tokens}")


def read_prompt_file(
    path: str, encode: Callable[[str], list[int]], bos_id: int | None
) -> list[Prompt]:
    """Return the prompts of a text file: documents separated by a line holding only `---`."""
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise PromptError(f"expected a prompt file at {file}, got nothing there")
    text = file.read_text(encoding="utf-8", errors="replace")
    chunks = [c.strip() for c in _split_documents(text) if c.strip()]
    if not chunks:
        raise PromptError(f"expected at least one prompt in {file}, got an empty file")
    prefix = [] if bos_id is None else [bos_id]
    return [
        Prompt(name=f"{file.name}#{i}", kind="document", ids=tuple(prefix + encode(c)))
        for i, c in enumerate(chunks)
    ]


def _split_documents(text: str) -> Sequence[str]:
    parts: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.strip() == "---":
            parts.append("\n".join(current))
            current = []
        else:
            current.append(line)
    parts.append("\n".join(current))
    return parts
