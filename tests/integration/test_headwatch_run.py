"""`headwatch run -- transformers serve <tiny model dir>`: the unmodified server, real HTTP requests,
messages arriving in a JSON-lines file and in a real Kafka topic."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from collector.publish import read_jsonl
from collector.schema import HeadStatsMessage
from tests.helpers import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BIN = Path(sys.executable).parent
PROMPTS = ["the quick brown fox jumps over the lazy dog", "over the lazy dog the quick brown fox"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module", name="model_dir")
def fixture_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a byte-level BPE tokenizer, saved like any hub model directory."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(PROMPTS * 10, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    fast.save_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def healthy(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
        return response.status == 200


@pytest.fixture(name="serve")
def fixture_serve(model_dir: Path, tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start `headwatch run -- transformers serve <dir> [server arguments]` with extra
    environment; return its URL. Its output goes to serve.log in the test's folder."""
    started: list[subprocess.Popen[bytes]] = []
    logs: list[BinaryIO] = []

    def start(env: dict[str, str], *server_args: str) -> str:
        port = free_port()
        command = [
            str(BIN / "headwatch"), "run", "--", str(BIN / "transformers"), "serve", str(model_dir),
            "--host", "127.0.0.1", "--port", str(port), *server_args,
        ]  # fmt: skip
        log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 (closed with the fixture)
        logs.append(log)
        process = subprocess.Popen(
            command,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        started.append(process)
        url = f"http://127.0.0.1:{port}"
        wait_until(
            lambda: healthy(url), 120, message="transformers serve health", ignore=(OSError,)
        )
        return url

    try:
        yield start
    finally:
        for process in started:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for log in logs:
            log.close()


def ask(url: str, model_dir: Path) -> list[int]:
    """Send one completion and one chat request; return their prompt token counts."""
    first = post(
        f"{url}/v1/completions", {"model": str(model_dir), "prompt": PROMPTS[0], "max_tokens": 4}
    )
    second = post(
        f"{url}/v1/chat/completions",
        {
            "model": str(model_dir),
            "messages": [{"role": "user", "content": PROMPTS[1]}],
            "max_tokens": 4,
        },
    )
    return [first["usage"]["prompt_tokens"], second["usage"]["prompt_tokens"]]


def check(messages: list[HeadStatsMessage], prompt_tokens: list[int], model_dir: Path) -> None:
    assert [m.context_tokens for m in messages] == prompt_tokens
    for m in messages:
        assert m.model_name == str(model_dir)
        assert m.phase == "prefill"
        assert m.stat("entropy_nats").shape == (2, 4)
        assert m.valid.all()


COMMON_ENV = {
    "HEADWATCH_COLLECTOR_SAMPLE_RATE": "1.0",
    "HEADWATCH_COLLECTOR_MIN_CONTEXT_TOKENS": "0",
    "HEADWATCH_COLLECTOR_MAX_SAMPLED_PASSES_PER_SECOND": "100",
}


def test_messages_arrive_in_a_json_lines_file(
    serve: Callable[..., str], model_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "stats.jsonl"
    metrics_port = free_port()
    url = serve({
        **COMMON_ENV, "HEADWATCH_COLLECTOR_SINK": "file", "HEADWATCH_COLLECTOR_FILE_PATH": str(path),
        "HEADWATCH_COLLECTOR_METRICS_PORT": str(metrics_port),
    })  # fmt: skip
    prompt_tokens = ask(url, model_dir)
    messages = wait_until(
        lambda: path.exists() and len(read_jsonl(path)) >= 2 and read_jsonl(path), 30
    )
    check(messages, prompt_tokens, model_dir)
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert f'headwatch_collector_sampled_total{{model_name="{model_dir}"}} 2.0' in text


def test_messages_arrive_in_kafka(
    serve: Callable[..., str], model_dir: Path, kafka_bootstrap: str,
    fresh_topic: Callable[..., str], kafka_consumer_settings: dict[str, Any],
) -> None:  # fmt: skip
    from kafka import KafkaConsumer

    topic = fresh_topic(1)
    url = serve({
        **COMMON_ENV, "HEADWATCH_COLLECTOR_SINK": "kafka",
        "HEADWATCH_COLLECTOR_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap, "HEADWATCH_COLLECTOR_KAFKA__TOPIC": topic,
    })  # fmt: skip
    prompt_tokens = ask(url, model_dir)
    settings = {k: v for k, v in kafka_consumer_settings.items() if k != "enable_auto_commit"}
    consumer = KafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, **settings)
    received: list[HeadStatsMessage] = []
    try:

        def two() -> bool:
            for records in consumer.poll(500).values():
                received.extend(HeadStatsMessage.from_bytes(r.value) for r in records)
            return len(received) >= 2

        wait_until(two, 60, message="two head-stats messages")
    finally:
        consumer.close()
    check(received, prompt_tokens, model_dir)


def test_continuous_batching_is_served_unmeasured_and_named_once(
    serve: Callable[..., str], model_dir: Path, tmp_path: Path
) -> None:
    """`transformers serve --continuous-batching` packs requests into one row over a paged cache:
    the server answers, nothing is measured, no hook error is counted, and its log says so once."""
    path = tmp_path / "stats.jsonl"
    metrics_port = free_port()
    url = serve(
        {
            **COMMON_ENV, "HEADWATCH_COLLECTOR_SINK": "file",
            "HEADWATCH_COLLECTOR_FILE_PATH": str(path),
            "HEADWATCH_COLLECTOR_METRICS_PORT": str(metrics_port),
        },
        "--continuous-batching", "--cb-num-blocks", "64", "--cb-max-batch-tokens", "256",
    )  # fmt: skip
    assert all(tokens > 0 for tokens in ask(url, model_dir))
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert f'headwatch_collector_hook_enabled{{model_name="{model_dir}"}} 1.0' in text
    assert not re.search(r"^headwatch_collector_hook_errors_total\{.*\} [1-9]", text, re.M)
    assert not re.search(r"^headwatch_collector_sampled_total\{.*\} [1-9]", text, re.M)
    unmeasured = (
        r'^headwatch_collector_unmeasured_passes_total\{.*reason="continuous_batching"\} [1-9]'
    )
    assert re.search(unmeasured, text, re.M)
    assert not path.exists() or read_jsonl(path) == []
    log = (tmp_path / "serve.log").read_text(errors="replace")
    assert log.count("(continuous batching) are not measured") == 1, log[-3000:]
