"""attach() that fails part way leaves nothing behind: no wrapper, probe, hook, thread or endpoint."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import collector.attach
from collector import MemorySink, attach
from collector.errors import SettingsError
from collector.hook import set_probe
from tests.unit.test_attach_sink_argument import llama

UNREACHABLE_KAFKA = {"bootstrap_servers": "127.0.0.1:1", "request_timeout_seconds": 0.2}


@pytest.fixture(name="port_in_use")
def fixture_port_in_use() -> Iterator[int]:
    """A loopback port another socket is listening on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield int(listener.getsockname()[1])


def publisher_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "headwatch-publisher" and t.is_alive()}


@pytest.fixture(name="before")
def fixture_before() -> dict[str, Any]:
    """What exists before the test: the attention functions, and publisher threads (of other
    tests' sinks, which this test must neither count nor close)."""
    return {
        "functions": {k: ALL_ATTENTION_FUNCTIONS[k] for k in ALL_ATTENTION_FUNCTIONS},
        "publishers": publisher_threads(),
    }


def assert_nothing_left(model: torch.nn.Module, before: dict[str, Any]) -> None:
    assert {k: ALL_ATTENTION_FUNCTIONS[k] for k in ALL_ATTENTION_FUNCTIONS} == before["functions"]
    assert not any("_headwatch_probe" in m.__dict__ for m in model.modules())
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert publisher_threads() - before["publishers"] == set()


def test_a_metrics_port_in_use_is_named_and_nothing_stays_attached(
    port_in_use: int, before: dict[str, Any]
) -> None:
    model = llama()
    with pytest.raises(SettingsError, match=f"metrics_port: .* on 127.0.0.1, got {port_in_use}"):
        attach(model, sink="kafka", kafka=UNREACHABLE_KAFKA, metrics_port=port_in_use)
    assert_nothing_left(model, before)
    with attach(model, sink=MemorySink()):  # a second attach is not refused as "already attached"
        pass


class RecordingSink(MemorySink):
    """A caller's sink: attach never closes it."""

    closed = False

    def close(self, timeout_seconds: float | None = None) -> None:
        self.closed = True


@pytest.mark.parametrize("sink", ["kafka", "caller's"])
def test_a_failing_late_step_undoes_every_earlier_one(
    sink: str, monkeypatch: pytest.MonkeyPatch, before: dict[str, Any]
) -> None:
    """The second layer's probe fails: the first's probe, the wrappers and (a sink attach built)
    the publisher thread go; the caller's sink stays open."""
    probes: list[torch.nn.Module] = []

    def failing_on_the_second(module: torch.nn.Module, probe: Any) -> None:
        if probe is not None and probes:
            raise RuntimeError("probe refused")
        if probe is not None:
            probes.append(module)
        set_probe(module, probe)

    monkeypatch.setattr(collector.attach, "set_probe", failing_on_the_second)
    model = llama()
    given = RecordingSink()
    with pytest.raises(RuntimeError, match="probe refused"):
        if sink == "kafka":
            attach(model, sink="kafka", kafka=UNREACHABLE_KAFKA)
        else:
            attach(model, sink=given)
    assert len(probes) == 1
    assert_nothing_left(model, before)
    assert not given.closed
