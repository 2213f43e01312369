"""Unit tests of the local stack's pure parts: ports, templates, state, tools, fetch, processes."""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
from pathlib import Path

import pytest

from headwatch.localstack import kafka_fetch
from headwatch.localstack.alertmanager import config_values as alertmanager_values
from headwatch.localstack.cli import main as stack_main
from headwatch.localstack.errors import (
    KafkaFetchError,
    MissingToolError,
    PortUnavailableError,
    ServiceStartError,
    StackConfigError,
    StateFileError,
)
from headwatch.localstack.kafka import BROKER_CLASS, java_command, new_cluster_id
from headwatch.localstack.kafka_fetch import KafkaDistribution, cached_kafka, fetch_kafka
from headwatch.localstack.paths import StackPaths, find_paths
from headwatch.localstack.ports import choose_port, is_port_free
from headwatch.localstack.process import is_running, log_tail, spawn, start_ticks_of, stop
from headwatch.localstack.prometheus import config_values as prometheus_values
from headwatch.localstack.prometheus import duration, file_sd_document, write_scrape_target
from headwatch.localstack.readiness import wait_ready
from headwatch.localstack.settings import StackSettings
from headwatch.localstack.state import (
    ServiceState,
    StackState,
    dump_state,
    load_state,
    reuse_environment,
)
from headwatch.localstack.templates import render
from headwatch.localstack.tools import find_tool, parse_java_major, require_java

REPO = find_paths()


# ports -------------------------------------------------------------------------------------------


def test_choose_port_keeps_a_free_preferred_port() -> None:
    assert choose_port(9092, is_free=lambda port: True, pick_free=lambda: 40000) == 9092


def test_choose_port_falls_back_to_a_free_port_when_busy() -> None:
    assert choose_port(9092, is_free=lambda port: False, pick_free=lambda: 40001) == 40001


def test_choose_port_strict_names_the_busy_port() -> None:
    with pytest.raises(PortUnavailableError, match=r"port 9092 .* in use"):
        choose_port(9092, strict=True, is_free=lambda port: False, pick_free=lambda: 40001)


def test_choose_port_skips_ports_promised_to_other_services() -> None:
    picks = iter([40002, 40003])
    assert choose_port(0, taken={40002}, pick_free=lambda: next(picks)) == 40003


def test_choose_port_treats_a_taken_preferred_port_as_busy() -> None:
    assert choose_port(9092, taken={9092}, is_free=lambda p: True, pick_free=lambda: 40004) == 40004


def test_is_port_free_sees_a_listener() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert not is_port_free(sock.getsockname()[1])


# templates ---------------------------------------------------------------------------------------


def test_render_fills_every_placeholder() -> None:
    assert render("a=${x} b=${y}", {"x": 1, "y": "two"}) == "a=1 b=two"


@pytest.mark.parametrize(
    ("template", "values", "match"),
    [
        ("a=${x}", {}, r"expected values for \['x'\]"),
        ("a=${x}", {"x": 1, "y": 2}, r"got also \['y'\]"),
        ("a=${x}", {"x": "1\nextra=2"}, "one-line value"),
        ("a=${x} $1", {"x": 1}, "placeholders"),
    ],
)
def test_render_rejects(template: str, values: dict[str, object], match: str) -> None:
    with pytest.raises(StackConfigError, match=match):
        render(template, values)


def test_kafka_template_renders_a_combined_kraft_node(tmp_path: Path) -> None:
    text = render(
        (REPO.deploy_dir / "kafka-server.properties.tmpl").read_text(),
        {"host": "127.0.0.1", "port": 19092, "controller_port": 19093,
         "data_dir": tmp_path, "partitions": 1},
    )  # fmt: skip
    props = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and line[0] != "#")
    assert props["process.roles"] == "broker,controller"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19093"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert props["offsets.topic.replication.factor"] == "1"


def test_prometheus_template_renders_valid_yaml(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    values = prometheus_values(
        port=19090, alertmanager_address="127.0.0.1:19093", rules_glob=REPO.rules_glob,
        targets_dir=tmp_path / "targets", scrape_interval_seconds=1.0,
    )  # fmt: skip
    config = yaml.safe_load(render((REPO.deploy_dir / "prometheus.yml.tmpl").read_text(), values))
    assert config["global"]["scrape_interval"] == "1s"
    assert config["rule_files"] == [REPO.rules_glob]
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == [
        "127.0.0.1:19093"
    ]
    file_sd = config["scrape_configs"][1]["file_sd_configs"][0]["files"]
    assert file_sd == [str(tmp_path / "targets" / "*.json")]


@pytest.mark.parametrize("webhook", [None, 'http://127.0.0.1:8080/hook?x="y"'])
def test_alertmanager_template_renders_valid_yaml(webhook: str | None) -> None:
    yaml = pytest.importorskip("yaml")
    text = render(
        (REPO.deploy_dir / "alertmanager.yml.tmpl").read_text(), alertmanager_values(webhook)
    )
    (receiver,) = yaml.safe_load(text)["receivers"]
    urls = [config["url"] for config in receiver["webhook_configs"]]
    assert urls == ([webhook] if webhook else [])


def test_alertmanager_rejects_a_webhook_that_is_not_http() -> None:
    with pytest.raises(StackConfigError, match=r"http"):
        alertmanager_values("ftp://example/hook")


@pytest.mark.parametrize(("seconds", "text"), [(1.0, "1s"), (0.5, "500ms"), (15, "15s")])
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text


# scrape targets ----------------------------------------------------------------------------------


def test_file_sd_document_labels_the_job() -> None:
    assert json.loads(file_sd_document("exporter_1", "127.0.0.1:9100")) == [
        {"targets": ["127.0.0.1:9100"], "labels": {"job": "exporter_1"}}
    ]


@pytest.mark.parametrize(("job", "address"), [("bad job", "127.0.0.1:1"), ("ok", "no-port")])
def test_file_sd_document_rejects(job: str, address: str) -> None:
    with pytest.raises(StackConfigError):
        file_sd_document(job, address)


def test_write_scrape_target_leaves_only_the_json(tmp_path: Path) -> None:
    write_scrape_target(tmp_path, "probe", "127.0.0.1:9100")
    assert [p.name for p in tmp_path.iterdir()] == ["probe.json"]


# state file --------------------------------------------------------------------------------------


def _state(tmp_path: Path) -> StackState:
    return StackState(
        run_dir=str(tmp_path),
        kafka_version="4.4.0",
        kafka_bootstrap="127.0.0.1:9092",
        prometheus_url="http://127.0.0.1:9090",
        services=(ServiceState(name="kafka", pid=1234, start_ticks=99, log_path="/x.log",
                               address="127.0.0.1:9092"),),
    )  # fmt: skip


def test_state_round_trips(tmp_path: Path) -> None:
    state = _state(tmp_path)
    dump_state(state, tmp_path / "state.json")
    assert load_state(tmp_path / "state.json") == state


def test_missing_state_is_none(tmp_path: Path) -> None:
    assert load_state(tmp_path / "state.json") is None


def test_corrupt_state_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text('{"run_dir": 3}')
    with pytest.raises(StateFileError, match=r"remove the file"):
        load_state(tmp_path / "state.json")


def test_reuse_environment_names_only_what_runs(tmp_path: Path) -> None:
    assert reuse_environment(_state(tmp_path)) == {
        "HEADWATCH_TEST_KAFKA_BOOTSTRAP": "127.0.0.1:9092",
        "HEADWATCH_TEST_PROMETHEUS_URL": "http://127.0.0.1:9090",
    }


# tools -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tool", "package"),
    [("java", "default-jre-headless"), ("mvn", "maven"), ("prometheus", "prometheus"),
     ("alertmanager", "prometheus-alertmanager")],
)  # fmt: skip
def test_missing_tool_names_the_package(tool: str, package: str) -> None:
    with pytest.raises(
        MissingToolError, match=f"apt-get install -y --no-install-recommends {package} "
    ):
        find_tool(tool, which=lambda name: None)


def test_alertmanager_is_found_under_its_upstream_name() -> None:
    found = find_tool(
        "alertmanager", which=lambda n: "/opt/am/alertmanager" if n == "alertmanager" else None
    )
    assert found == Path("/opt/am/alertmanager")


@pytest.mark.parametrize(
    ("output", "major"),
    [('openjdk version "17.0.15" 2025-04-15', 17), ('java version "1.8.0_392"', 8),
     ('openjdk version "21" 2023-09-19', 21)],
)  # fmt: skip
def test_parse_java_major(output: str, major: int) -> None:
    assert parse_java_major(output) == major


def test_old_java_is_refused_with_what_to_install() -> None:
    with pytest.raises(
        MissingToolError, match=r"Java 17 or newer, got Java 11.*openjdk-17-jre-headless"
    ):
        require_java(which=lambda n: "/usr/bin/java", run=lambda argv: 'openjdk version "11.0.2"')


# Kafka fetch -------------------------------------------------------------------------------------


def test_pom_pins_a_kafka_4_release() -> None:
    version = kafka_fetch.pinned_kafka_version(REPO.pom)
    assert version.split(".")[0] == "4"
    assert all(part.isdigit() for part in version.split("."))


def _fake_mvn(bin_dir: Path, body: str) -> Path:
    """A stand-in `mvn` program that writes what a real one would (or fails part-way)."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "mvn"
    script.write_text(
        "#!/bin/sh\n"
        'for arg; do case "$arg" in -DoutputDirectory=*) out="${arg#-DoutputDirectory=}";; esac; done\n'
        'mkdir -p "$out"\n'
        f'echo run >> "{bin_dir}/calls"\n' + body
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


@pytest.fixture(name="sandbox")
def fixture_sandbox(tmp_path: Path) -> StackPaths:
    (tmp_path / "deploy" / "local").mkdir(parents=True)
    (tmp_path / "deploy" / "local" / "pom.xml").write_bytes(REPO.pom.read_bytes())
    return StackPaths(repo_root=tmp_path, cache_dir=tmp_path / ".cache")


def test_fetch_renames_a_complete_download_into_place_once(
    sandbox: StackPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = kafka_fetch.pinned_kafka_version(sandbox.pom)
    _fake_mvn(tmp_path / "bin", f'touch "$out/kafka_2.13-{version}.jar" "$out/log4j-core.jar"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")

    first = fetch_kafka(sandbox)
    second = fetch_kafka(sandbox)

    assert first == second == KafkaDistribution(version, sandbox.kafka_cache / version / "libs")
    assert (tmp_path / "bin" / "calls").read_text().count("run") == 1
    assert sorted(p.name for p in sandbox.kafka_cache.iterdir()) == [".lock", version]


def test_failed_fetch_leaves_nothing_half_made(
    sandbox: StackPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_mvn(
        tmp_path / "bin", 'touch "$out/half.jar"\necho "Could not transfer artifact"\nexit 1\n'
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")

    with pytest.raises(KafkaFetchError, match=r"(?s)status 1.*Could not transfer artifact"):
        fetch_kafka(sandbox)

    assert [p.name for p in sandbox.kafka_cache.iterdir()] == [".lock"]
    assert cached_kafka(sandbox) is None


def test_fetch_without_maven_says_how_to_get_it(
    sandbox: StackPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(MissingToolError, match=r"mvn not found.*apt-get install .* maven"):
        fetch_kafka(sandbox)
    assert not sandbox.kafka_cache.exists()


# Kafka command line ------------------------------------------------------------------------------


def test_cluster_id_is_kafka_uuid_text() -> None:
    ids = {new_cluster_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)


def test_java_command_runs_the_broker_from_the_jars(tmp_path: Path) -> None:
    dist = KafkaDistribution("4.4.0", tmp_path / "libs")
    argv = java_command(Path("/usr/bin/java"), dist, tmp_path / "log4j2.properties", "512m",
                        BROKER_CLASS, "server.properties")  # fmt: skip
    assert argv[:2] == ["/usr/bin/java", "-Xmx512m"]
    assert argv[-4:] == ["-cp", f"{tmp_path / 'libs'}/*", "kafka.Kafka", "server.properties"]


def test_settings_reject_a_malformed_heap() -> None:
    with pytest.raises(ValueError, match=r"kafka_heap"):
        StackSettings(kafka_heap="lots")


@pytest.mark.parametrize(
    ("argv", "env", "line"),
    [
        (["up", "--kafka-port", "70000"], {},
         "kafka_port: expected a value less than or equal to 65535, got 70000"),
        (["status"], {"HEADWATCH_STACK_KAFKA_HEAP": "lots"},
         "kafka_heap: expected a string matching pattern '^[0-9]+[kmgKMG]$', got 'lots'"),
    ],
    ids=["flag", "environment"],
)  # fmt: skip
def test_cli_names_a_bad_setting_and_its_value_in_one_line(
    argv: list[str],
    env: dict[str, str],
    line: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HEADWATCH_STACK_CACHE_DIR", str(tmp_path))  # no state of a running stack
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert stack_main(argv) == 2
    assert capsys.readouterr().err.strip() == f"headwatch stack {argv[0]}: {line}"


# processes ---------------------------------------------------------------------------------------


def test_stop_leaves_no_process_behind(tmp_path: Path) -> None:
    handle = spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"],
                   tmp_path / "sleeper.log", cwd=tmp_path)  # fmt: skip
    assert is_running(handle)
    stop(handle, timeout_seconds=5)
    assert not is_running(handle)
    assert start_ticks_of(handle.pid) is None


def test_a_recycled_pid_is_never_signalled(tmp_path: Path) -> None:
    handle = spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"],
                   tmp_path / "sleeper.log", cwd=tmp_path)  # fmt: skip
    try:
        impostor = type(handle)("other", handle.pid, handle.start_ticks + 1, handle.log_path)
        stop(impostor, timeout_seconds=1)
        assert is_running(handle)
    finally:
        stop(handle, timeout_seconds=5)


def test_a_service_that_dies_reports_its_log_tail(tmp_path: Path) -> None:
    handle = spawn("doomed", ["sh", "-c", "echo 'java.net.BindException: Address in use'; exit 3"],
                   tmp_path / "doomed.log", cwd=tmp_path)  # fmt: skip
    with pytest.raises(ServiceStartError, match=r"(?s)exited with status 3.*BindException"):
        wait_ready(handle, lambda: False, timeout_seconds=30)


def test_a_service_that_hangs_reports_its_log_tail(tmp_path: Path) -> None:
    handle = spawn("stuck", ["sh", "-c", "echo waiting for quorum; exec sleep 60"],
                   tmp_path / "stuck.log", cwd=tmp_path)  # fmt: skip
    try:
        with pytest.raises(ServiceStartError, match=r"(?s)not ready after 1s.*waiting for quorum"):
            wait_ready(handle, lambda: False, timeout_seconds=1.0)
    finally:
        stop(handle, timeout_seconds=5)


def test_log_tail_of_a_missing_log_says_so(tmp_path: Path) -> None:
    assert "no log at" in log_tail(tmp_path / "absent.log")
