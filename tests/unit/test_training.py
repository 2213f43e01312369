"""Unit tests of headwatch.training: corpus errors, tokenizer, synthetic tasks, loop, export."""

from __future__ import annotations

import argparse
import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from headwatch.training import corpus
from headwatch.training.errors import CheckpointError, CorpusMissingError
from headwatch.training.handset import HANDSET_PATTERNS, MARKER_TOKEN_ID, handset_model
from headwatch.training.loop import Schedule, build_model, train_step
from headwatch.training.tasks import KINDS, WindowMaker
from headwatch.training.tokenizer import BOS_ID, encode_plain, save_tokenizer, train_tokenizer
from headwatch.training.train import main

WORDS = (
    "the",
    "river",
    "of",
    "light",
    "and",
    "stone",
    "a",
    "king",
    "went",
    "down",
    "to",
    "city",
    "with",
    "seven",
    "men",
    "who",
    "said",
    "unto",
    "him",
    "behold",
)


def _texts(n_docs: int = 40, words: int = 400, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=words)) + "." for _ in range(n_docs)]


@pytest.fixture(name="text_dir")
def fixture_text_dir(tmp_path: Path) -> Path:
    root = tmp_path / "texts"
    root.mkdir()
    for i, text in enumerate(_texts()):
        (root / f"doc{i}.txt").write_text(text)
    return root


@pytest.fixture(name="tokenizer", scope="module")
def fixture_tokenizer():  # type: ignore[no-untyped-def]
    return train_tokenizer(_texts(), vocab_size=300)


@pytest.mark.parametrize(
    ("reader", "package"),
    [
        (corpus.read_kjv, "bible-kjv-text"),
        (corpus.read_jargon, "jargon-text"),
        (corpus.read_pydoc, "python3.11-doc"),
    ],
)
def test_missing_corpus_source_names_its_package(reader, package, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CorpusMissingError, match=f"apt-get install {package}"):
        reader(tmp_path / "absent")


def test_unknown_source_is_rejected() -> None:
    with pytest.raises(CorpusMissingError, match="expected sources among"):
        corpus.build_corpus(["wikipedia"])


def test_jargon_reader_chunks_paragraphs(tmp_path: Path) -> None:
    path = tmp_path / "jargon.txt.gz"
    path.write_bytes(gzip.compress(("\n\n".join(["para " * 300] * 10)).encode()))
    docs = corpus.read_jargon(path)
    assert len(docs) >= 3
    assert all(d.source == "jargon" and d.text.startswith("para") for d in docs)


def test_held_out_split_is_deterministic_and_disjoint() -> None:
    docs = [corpus.Document("kjv", f"doc {i}") for i in range(100)]
    train, held = corpus.split_held_out(docs, every=10)
    assert len(held) == 10 and len(train) == 90
    assert {d.text for d in train}.isdisjoint({d.text for d in held})


def test_tokenizer_round_trip_starts_with_bos(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    text = "the king went down to the city 1234"
    ids = tokenizer.encode(text).ids
    assert ids[0] == BOS_ID
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # digits are split one per token so numbers copy token by token
    assert [tokenizer.id_to_token(i) for i in encode_plain(tokenizer, "1234")] == list("1234")
    from transformers import AutoTokenizer

    save_tokenizer(tokenizer, tmp_path, model_max_length=2048)
    hf = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert hf(text).input_ids == ids
    assert hf.bos_token == "<|bos|>"


@pytest.fixture(name="maker")
def fixture_maker(tokenizer) -> WindowMaker:  # type: ignore[no-untyped-def]
    ids = np.concatenate([encode_plain(tokenizer, t) for t in _texts()]).astype(np.int64)
    return WindowMaker(
        ids, lambda s: encode_plain(tokenizer, s), tokenizer.get_vocab_size(), seed=3
    )


@pytest.mark.parametrize("kind", KINDS)
def test_every_window_kind_has_length_and_bos(maker: WindowMaker, kind: str) -> None:
    window = maker.make(kind, 256)
    assert window.ids.shape == (256,) and window.weights.shape == (256,)
    assert window.ids[0] == BOS_ID and BOS_ID not in window.ids[1:]


def test_random_repeat_scores_only_the_copies(maker: WindowMaker) -> None:
    window = maker.make("random_repeat", 256)
    first_scored = int(np.argmax(window.weights > 0))
    span = first_scored - 1
    assert np.array_equal(window.ids[1 : 1 + span], window.ids[first_scored : first_scored + span])
    assert window.weights[:first_scored].sum() == 0


def test_needle_window_asks_for_the_hidden_fact(maker: WindowMaker, tokenizer) -> None:  # type: ignore[no-untyped-def]
    window = maker.needle_window(512, n_needles=3, depth=0.5)
    fact = tokenizer.decode(window.ids[window.fact_start : window.fact_end].tolist())
    answer = tokenizer.decode(window.ids[window.answer_start : window.answer_end].tolist())
    assert window.answer_end == 512
    assert answer.strip().rstrip(".") in fact
    assert abs(window.fact_start / 512 - 0.5) < 0.15
    assert window.weights[window.answer_start] > 1.0


def _tiny_args(tmp_path: Path, text_dir: Path, *extra: str) -> list[str]:
    return [
        "--run-dir",
        str(tmp_path / "run"),
        "--text-dir",
        str(text_dir),
        "--vocab-size",
        "300",
        "--layers",
        "1",
        "--hidden",
        "32",
        "--mlp",
        "64",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--context",
        "512",
        "--context-a",
        "256",
        "--tokens-per-step",
        "512",
        "--steps-a",
        "2",
        "--steps-b",
        "2",
        "--eval-every",
        "2",
        "--ckpt-every",
        "1",
        "--warmup",
        "1",
        "--device",
        "cpu",
        *extra,
    ]


def test_training_steps_reduce_the_loss(maker: WindowMaker) -> None:
    torch.manual_seed(0)
    args = argparse.Namespace(
        hidden=32,
        mlp=64,
        layers=1,
        heads=2,
        kv_heads=1,
        context=128,
        context_a=64,
        steps_a=30,
        steps_b=0,
        tokens_per_step=256,
        mix_a="text=1,random_repeat=1",
        lr=1e-2,
        warmup=1,
    )
    model = build_model(args, vocab_size=300)
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr)
    sched = Schedule(args)
    losses = [float(train_step(model, optim, maker, sched, step, "cpu")[0]) for step in range(30)]
    assert math.isfinite(losses[-1])
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5


def test_schedule_fits_the_curriculum_into_the_time_budget() -> None:
    args = argparse.Namespace(
        steps_a=100,
        steps_b=300,
        max_minutes=10.0,
        context=2048,
        context_a=256,
        tokens_per_step=4096,
        lr=1e-3,
        warmup=10,
    )
    sched = Schedule(args)
    # a quarter of the steps or a quarter of the time, whichever comes first, ends phase A
    assert sched.window(sched.progress(step=50, elapsed_s=60))[0] == 256
    assert sched.window(sched.progress(step=50, elapsed_s=160))[0] == 2048
    assert sched.window(sched.progress(step=120, elapsed_s=1))[0] == 2048
    assert sched.progress(step=10, elapsed_s=600) >= 1.0
    assert sched.lr(500, 1.0) == pytest.approx(1e-4)
    assert sched.lr(0, 0.0) == pytest.approx(1e-4)  # first warm-up step


def test_resume_continues_from_the_saved_step(tmp_path: Path, text_dir: Path) -> None:
    assert main(_tiny_args(tmp_path, text_dir, "--max-minutes", "0")) == 0
    blob = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert blob["state"]["step"] == 1  # a zero time budget ends the run after one step
    assert main(_tiny_args(tmp_path, text_dir, "--resume")) == 0
    blob = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert blob["state"]["step"] == 4
    rows = (tmp_path / "run" / "curve.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 4  # header + one row per step, none repeated


def test_resume_without_checkpoint_is_a_clear_error(tmp_path: Path, text_dir: Path) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt"):
        from headwatch.training.train import parse_args, run

        run(parse_args(_tiny_args(tmp_path, text_dir, "--resume")))


def test_export_writes_a_loadable_model(tmp_path: Path, text_dir: Path) -> None:
    from headwatch.bundled import load_bundled

    out = tmp_path / "model"
    assert main(_tiny_args(tmp_path, text_dir, "--export", str(out))) == 0
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "loss_curve.csv",
        "loss_curve.png",
    ):
        assert (out / name).is_file(), name
    model, tok = load_bundled(model_dir=out)
    ids = tok("the king went down", return_tensors="pt").input_ids
    assert ids[0, 0].item() == BOS_ID
    assert torch.isfinite(model(input_ids=ids).logits).all()
    assert model.config.max_position_embeddings == 512


def _last_query_attention(seq_len: int = 2048) -> torch.Tensor:
    model = handset_model()
    ids = torch.randint(6, 64, (1, seq_len), generator=torch.Generator().manual_seed(1))
    ids[0, 0] = BOS_ID
    ids[0, seq_len // 2] = MARKER_TOKEN_ID
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    return out.attentions[0][0, :, -1]  # (heads, keys)


@pytest.mark.parametrize(("head", "pattern"), [(h, p) for (_, h), p in HANDSET_PATTERNS.items()])
def test_handset_heads_show_their_pattern(head: int, pattern: str) -> None:
    p = _last_query_attention()[head]
    n = p.numel()
    entropy = float(-(p * p.clamp_min(1e-30).log()).sum())
    if pattern == "sink":
        assert float(p[:4].sum()) > 0.99
    elif pattern == "recency":
        assert float(p[-8:].sum()) > 0.95
    elif pattern == "marker":
        assert float(p[n // 2]) > 0.99
    else:
        assert entropy > 0.99 * math.log(n)


def test_needle_windows_end_their_question_at_many_positions(maker: WindowMaker) -> None:
    windows = [maker.make("needle", 1024) for _ in range(40)]
    assert all(w.ids.size == w.weights.size == 1024 and w.ids[0] == 0 for w in windows)
    ends = {w.answer_end for w in windows}
    assert len(ends) > 20 and min(ends) < 700  # not always at the window's end
    for w in windows:
        assert (w.weights[w.answer_start : w.answer_end] > 1).all()
        if w.answer_end < 1024:  # other text follows the answer, after one EOS
            assert w.ids[w.answer_end] == 1


def _shape_args(layers: int) -> argparse.Namespace:
    return argparse.Namespace(hidden=32, mlp=48, layers=layers, heads=4, kv_heads=2, context=128)


def test_init_from_copies_an_exported_models_weights(tmp_path: Path) -> None:
    from headwatch.training.loop import load_weights

    torch.manual_seed(1)
    source = build_model(_shape_args(2), vocab_size=300)
    source.half().save_pretrained(tmp_path, safe_serialization=True)
    torch.manual_seed(2)
    target = build_model(_shape_args(2), vocab_size=300)
    load_weights(target, tmp_path)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        torch.testing.assert_close(a.float(), b, msg=name)
    with pytest.raises(CheckpointError, match="missing"):
        load_weights(build_model(_shape_args(3), vocab_size=300), tmp_path)
