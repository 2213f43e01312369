"""A single-node Apache Kafka 4 broker in KRaft mode (combined broker and controller)."""

from __future__ import annotations

import base64
import logging
import subprocess
import uuid
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path

from headwatch.localstack.errors import ServiceStartError
from headwatch.localstack.kafka_fetch import KafkaDistribution
from headwatch.localstack.paths import StackPaths
from headwatch.localstack.ports import HOST, choose_port
from headwatch.localstack.process import ProcessHandle, spawn, stop
from headwatch.localstack.readiness import port_accepts, wait_ready
from headwatch.localstack.settings import StackSettings
from headwatch.localstack.templates import render_file

logger = logging.getLogger(__name__)

BROKER_CLASS = "kafka.Kafka"
# What bin/kafka-storage.sh runs in Kafka 4.x.
STORAGE_TOOL_CLASS = "kafka.tools.StorageTool"
# Serial GC and the C1 compiler only: the broker starts faster and stays small on 2 cores.
JVM_FLAGS = ("-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true")


@dataclass(frozen=True)
class KafkaBroker:
    """A running broker this stack started."""

    process: ProcessHandle
    port: int
    controller_port: int
    data_dir: Path
    version: str

    @property
    def bootstrap(self) -> str:
        """The bootstrap address clients connect to, e.g. 127.0.0.1:9092."""
        return f"{HOST}:{self.port}"


def new_cluster_id() -> str:
    """Return a random Kafka cluster id: 16 bytes, URL-safe base64 without padding."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):  # Kafka's Uuid avoids ids a CLI would read as options
            return text


def java_command(
    java: Path, dist: KafkaDistribution, log4j_config: Path, heap: str, main_class: str,
    *args: str,
) -> list[str]:  # fmt: skip
    """Return the argv that runs `main_class` from the Kafka jars with a `heap` max heap."""
    return [
        str(java), f"-Xmx{heap}", "-Xms64m", *JVM_FLAGS,
        f"-Dlog4j2.configurationFile={log4j_config}",
        "-cp", dist.classpath, main_class, *args,
    ]  # fmt: skip


def broker_answers(bootstrap: str) -> bool:
    """Return whether the broker at `bootstrap` answers a metadata (DescribeCluster) request."""
    host, _, port = bootstrap.rpartition(":")
    if not port_accepts(host, int(port)):
        return False
    from kafka import KafkaAdminClient  # kafka-python comes with the exporter/collector extras
    from kafka.errors import KafkaError

    wanted = {"request_timeout_ms": 5000, "bootstrap_timeout_ms": 5000,
              "api_version_auto_timeout_ms": 5000}  # fmt: skip
    # kafka-python 2.x and 3.x name the bootstrap timeout differently; pass what this one knows.
    configs = {k: v for k, v in wanted.items() if k in KafkaAdminClient.DEFAULT_CONFIG}
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, **configs)
    except KafkaError:
        return False
    try:
        admin.describe_cluster()
    except KafkaError:
        return False
    finally:
        admin.close()
    return True


def start_kafka(
    dist: KafkaDistribution,
    java: Path,
    paths: StackPaths,
    run_dir: Path,
    settings: StackSettings,
    *,
    taken_ports: Collection[int] = (),
    die_with_parent: bool = False,
) -> KafkaBroker:
    """Format storage under `run_dir`/kafka, start the broker and return once it answers."""
    port = choose_port(settings.kafka_port, strict=settings.strict_ports, taken=taken_ports)
    controller_port = choose_port(
        settings.kafka_controller_port, strict=settings.strict_ports, taken={*taken_ports, port},
        setting="HEADWATCH_STACK_KAFKA_CONTROLLER_PORT",
    )  # fmt: skip
    kafka_dir = run_dir / "kafka"
    data_dir = kafka_dir / "data"
    kafka_dir.mkdir(parents=True, exist_ok=True)
    properties = render_file(
        paths.deploy_dir / "kafka-server.properties.tmpl",
        {"host": HOST, "port": port, "controller_port": controller_port,
         "data_dir": data_dir, "partitions": settings.kafka_partitions},
        kafka_dir / "server.properties",
    )  # fmt: skip
    _format_storage(java_command(
        java, dist, paths.deploy_dir / "log4j2.properties", "256m", STORAGE_TOOL_CLASS,
        "format", "-t", new_cluster_id(), "-c", str(properties),
    ), kafka_dir / "format.log")  # fmt: skip
    handle = _run_broker(java, dist, paths, settings, kafka_dir, port, die_with_parent)
    logger.info("Kafka %s at %s:%s", dist.version, HOST, port)
    return KafkaBroker(handle, port, controller_port, data_dir, dist.version)


def restart_kafka(
    broker: KafkaBroker,
    java: Path,
    dist: KafkaDistribution,
    paths: StackPaths,
    settings: StackSettings,
    *,
    die_with_parent: bool = False,
) -> KafkaBroker:
    """Stop `broker` and start it again on the same ports and data; return once it answers.

    Usage:
        broker = restart_kafka(broker, java, dist, paths, settings)  # topics and offsets kept
    """
    stop(broker.process, settings.stop_timeout_seconds)
    handle = _run_broker(
        java, dist, paths, settings, broker.data_dir.parent, broker.port, die_with_parent
    )
    logger.info("Kafka %s restarted at %s", dist.version, broker.bootstrap)
    return replace(broker, process=handle)


def _run_broker(
    java: Path, dist: KafkaDistribution, paths: StackPaths, settings: StackSettings,
    kafka_dir: Path, port: int, die_with_parent: bool,
) -> ProcessHandle:  # fmt: skip
    """Start the broker of `kafka_dir`/server.properties and return once it answers on `port`."""
    argv = java_command(
        java, dist, paths.deploy_dir / "log4j2.properties", settings.kafka_heap, BROKER_CLASS,
        str(kafka_dir / "server.properties"),
    )  # fmt: skip
    handle = spawn("kafka", argv, kafka_dir / "kafka.log", cwd=kafka_dir,
                   die_with_parent=die_with_parent)  # fmt: skip
    try:
        wait_ready(handle, lambda: broker_answers(f"{HOST}:{port}"), settings.start_timeout_seconds)
    except BaseException:
        stop(handle, settings.stop_timeout_seconds)
        raise
    return handle


def _format_storage(argv: list[str], log_path: Path) -> None:
    with open(log_path, "wb") as log:
        done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=300, check=False)
    if done.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise ServiceStartError(
            f"formatting Kafka storage failed with status {done.returncode}; "
            f"last lines of {log_path}:\n{tail}"
        )
