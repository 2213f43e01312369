"""Synthetic training windows that reward copying from far back in the context.

Usage:
    maker = WindowMaker(text_ids, encode, vocab_size=4096, seed=0)
    window = maker.make("needle", length=2048)   # ids (length,), weights (length,)

Every window starts with ``<|bos|>``. Kinds:
- ``text``: a slice of the corpus.
- ``random_repeat``: random tokens repeated; only the repeats are scored, so the loss
  falls only once an induction (copy) head forms.
- ``text_repeat``: corpus text in which an earlier span occurs again later.
- ``needle``: one or more "<subject> is <answer>." sentences hidden in corpus text, then the
  question "<subject> is" and its answer, whose tokens carry extra weight; the sample has a
  random length and other text follows it after ``<|eos|>``, so the question ends anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from headwatch.training.errors import ConfigError
from headwatch.training.tokenizer import BOS_ID, EOS_ID

KINDS = ("text", "random_repeat", "text_repeat", "needle")

_ADJ = (
    "red",
    "blue",
    "green",
    "silver",
    "golden",
    "hidden",
    "old",
    "northern",
    "quiet",
    "bright",
    "iron",
    "wooden",
    "little",
    "great",
    "secret",
    "first",
    "last",
    "western",
    "black",
    "white",
)
_NOUN = (
    "door",
    "river",
    "tower",
    "garden",
    "ship",
    "lamp",
    "bridge",
    "valley",
    "city",
    "book",
    "stone",
    "key",
    "gate",
    "mountain",
    "forest",
    "house",
    "island",
    "road",
    "well",
    "cave",
)
_PLACE = (
    "San Francisco",
    "Edinburgh",
    "Paris",
    "the old city",
    "the valley",
    "Jerusalem",
    "the mountains",
    "Tokyo",
    "the harbour",
    "the desert",
)
_WORDS = (
    "apple",
    "lantern",
    "violet",
    "thunder",
    "marble",
    "candle",
    "harbor",
    "pepper",
    "silver",
    "falcon",
    "orange",
    "meadow",
    "copper",
    "willow",
    "garnet",
    "summit",
    "river",
    "ember",
    "cobalt",
    "saffron",
    "walnut",
    "sparrow",
    "granite",
    "juniper",
    "velvet",
    "amber",
)


@dataclass(frozen=True)
class Needle:
    """A fact hidden in a haystack: its text, the question that asks for it, and the answer."""

    fact: str
    question: str
    answer: str


@dataclass(frozen=True)
class Window:
    """One training window: token ids, per-token loss weights and the answer's positions."""

    ids: np.ndarray
    weights: np.ndarray
    answer_start: int = -1
    answer_end: int = -1
    fact_start: int = -1
    fact_end: int = -1


NEEDLE_FORMS = ("pass key", "secret word", "best thing")


def random_needle(rng: np.random.Generator, form: int | None = None) -> Needle:
    """Return a random fact of the form "<subject> is <answer>." and its question."""
    if form is None:
        form = int(rng.integers(len(NEEDLE_FORMS)))
    if form == 0:
        subject = f"The pass key of the {rng.choice(_ADJ)} {rng.choice(_NOUN)}"
        answer = "".join(str(d) for d in rng.integers(0, 10, size=int(rng.integers(3, 8))))
    elif form == 1:
        subject = f"The secret word of the {rng.choice(_ADJ)} {rng.choice(_NOUN)}"
        answer = " ".join(str(w) for w in rng.choice(_WORDS, size=int(rng.integers(1, 3))))
    else:
        subject = f"The best thing to do in {rng.choice(_PLACE)}"
        answer = f"to find the {rng.choice(_ADJ)} {rng.choice(_NOUN)} and say {rng.choice(_WORDS)}"
    if form == 0:
        # digits are split from the space before them, so the question ends with that space
        # and the first answer token is already a digit that must be copied
        return Needle(
            fact=f" {subject} is {answer}. ", question=f" {subject} is ", answer=f"{answer}."
        )
    return Needle(fact=f" {subject} is {answer}. ", question=f" {subject} is", answer=f" {answer}.")


class WindowMaker:
    """Cut and compose training windows from a flat array of corpus token ids."""

    def __init__(
        self,
        text_ids: np.ndarray,
        encode: Callable[[str], list[int]],
        vocab_size: int,
        seed: int,
        answer_weight: float = 4.0,
        repeat_vocab: int | None = None,
    ) -> None:
        if text_ids.ndim != 1 or text_ids.size < 4096:
            raise ConfigError(
                f"expected a 1-D array of >= 4096 token ids, got shape {text_ids.shape}"
            )
        self.text_ids = text_ids
        self.encode = encode
        self.vocab_size = vocab_size
        self.answer_weight = answer_weight
        # random_repeat draws from the first `repeat_vocab` ids (bytes and frequent merges)
        self.repeat_vocab = vocab_size if repeat_vocab is None else min(repeat_vocab, vocab_size)
        self.rng = np.random.default_rng(seed)

    def make(self, kind: str, length: int) -> Window:
        """Return one window of `length` tokens of the given kind."""
        if kind not in KINDS:
            raise ConfigError(f"expected a kind in {KINDS}, got {kind!r}")
        if length < 64:
            raise ConfigError(f"expected length >= 64, got {length}")
        if kind == "random_repeat":
            return self._random_repeat(length)
        if kind == "text_repeat":
            return self._text_repeat(length)
        if kind == "needle":
            return self._needle_anywhere(length)
        ids = np.concatenate([[BOS_ID], self._text(length - 1)])
        return Window(ids.astype(np.int64), np.ones(length, dtype=np.float32))

    def _text(self, n: int) -> np.ndarray:
        start = int(self.rng.integers(0, self.text_ids.size - n))
        return self.text_ids[start : start + n]

    def _random_repeat(self, length: int) -> Window:
        span = int(self.rng.integers(8, min(96, length // 2)))
        # skip the special tokens (ids 0-2)
        seg = self.rng.integers(3, self.repeat_vocab, size=span)
        reps = (length - 1) // span + 1
        ids = np.concatenate([[BOS_ID], np.tile(seg, reps)])[:length]
        weights = np.ones(length, dtype=np.float32)
        weights[: span + 1] = 0.0  # the first copy is noise: nothing to learn from it
        return Window(ids.astype(np.int64), weights)

    def _text_repeat(self, length: int) -> Window:
        body = self._text(length - 1).copy()
        span = int(self.rng.integers(16, min(128, length // 4)))
        src = int(self.rng.integers(0, (length - 1) // 2 - span))
        dst = int(self.rng.integers(src + span, length - 1 - span))
        body[dst : dst + span] = body[src : src + span]
        ids = np.concatenate([[BOS_ID], body])
        return Window(ids.astype(np.int64), np.ones(length, dtype=np.float32))

    def _needle_anywhere(self, length: int) -> Window:
        """Return a needle sample of random length, the rest of the window other text after EOS.

        A window whose question always ends at its last position teaches retrieval at that
        absolute position only: a model trained so retrieves at 2,047 tokens and not at 1,535.
        """
        part = int(self.rng.integers(min(length, 192), length + 1))
        # several facts (distractors) only where the sample has room for them
        n_needles = int(self.rng.integers(1, 4)) if part >= 512 else 1
        w = self.needle_window(part, n_needles=n_needles)
        if part == length:
            return w
        tail = np.concatenate([[EOS_ID], self._text(length - part - 1)]).astype(np.int64)
        return replace(
            w,
            ids=np.concatenate([w.ids, tail]),
            weights=np.concatenate([w.weights, np.ones(tail.size, dtype=np.float32)]),
        )

    def needle_window(
        self, length: int, n_needles: int = 1, depth: float | None = None, form: int | None = None
    ) -> Window:
        """Return haystack text with `n_needles` facts and a question about one of them at the end.

        `depth` (0..1) places the asked-for fact; None places every fact at random.
        """
        needles: list[Needle] = []
        while len(needles) < n_needles:
            # the asked-for fact has the requested form; distractors any form
            candidate = random_needle(self.rng, form if not needles else None)
            # two facts about one subject would make the question ambiguous
            if all(candidate.question != n.question for n in needles):
                needles.append(candidate)
        asked = needles[0]
        facts = [self.encode(n.fact) for n in needles]
        question = self.encode(asked.question)
        answer = self.encode(asked.answer)
        hay_len = length - 1 - sum(len(f) for f in facts) - len(question) - len(answer)
        if hay_len < 16:
            raise ConfigError(f"expected a window long enough for the needles, got length {length}")
        hay = list(self._text(hay_len))
        cuts = sorted(int(c) for c in self.rng.integers(0, hay_len, size=n_needles))
        if depth is not None:
            cuts[0] = int(depth * hay_len)
            cuts[1:] = sorted(cuts[1:])
            order = [0, *range(1, n_needles)]
        else:
            order = list(self.rng.permutation(n_needles))
        # insert from the back so earlier cut positions stay valid
        pieces: list[list[int]] = []
        prev = hay_len
        for cut, which in sorted(zip(cuts, order, strict=True), reverse=True):
            pieces.insert(0, hay[cut:prev])
            pieces.insert(0, facts[which])
            prev = cut
        pieces.insert(0, hay[:prev])
        body: list[int] = []
        fact_start = -1
        for piece in pieces:
            if piece is facts[0] and fact_start < 0:
                fact_start = 1 + len(body)
            body.extend(piece)
        start = 1 + len(body) + len(question)
        ids = np.array([BOS_ID, *body, *question, *answer], dtype=np.int64)
        weights = np.ones(length, dtype=np.float32)
        weights[start : start + len(answer)] = self.answer_weight
        return Window(
            ids,
            weights,
            answer_start=start,
            answer_end=start + len(answer),
            fact_start=fact_start,
            fact_end=fact_start + len(facts[0]),
        )
