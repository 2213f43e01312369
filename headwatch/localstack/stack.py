"""The local stack as one object: start services on demand, describe them, stop them all."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

from headwatch.localstack.alertmanager import AlertmanagerServer, start_alertmanager
from headwatch.localstack.kafka import KafkaBroker, restart_kafka, start_kafka
from headwatch.localstack.kafka_fetch import cached_kafka, fetch_kafka
from headwatch.localstack.paths import StackPaths
from headwatch.localstack.process import ProcessHandle, is_running, stop
from headwatch.localstack.prometheus import PrometheusServer, start_prometheus
from headwatch.localstack.settings import StackSettings
from headwatch.localstack.state import ServiceState, StackState
from headwatch.localstack.tools import find_tool, require_java

logger = logging.getLogger(__name__)

SERVICES = ("kafka", "alertmanager", "prometheus")


class LocalStack:
    """Kafka, Alertmanager and Prometheus under one run folder, each started at most once.

    Usage:
        stack = LocalStack(StackSettings(kafka_port=0), find_paths(), Path(tempfile.mkdtemp()))
        bootstrap = stack.start_kafka().bootstrap; ...; stack.stop()
    """

    def __init__(
        self, settings: StackSettings, paths: StackPaths, run_dir: Path, *,
        die_with_parent: bool = False,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.paths = paths
        self.run_dir = run_dir
        self.die_with_parent = die_with_parent
        self.kafka: KafkaBroker | None = None
        self.alertmanager: AlertmanagerServer | None = None
        self.prometheus: PrometheusServer | None = None

    def start_kafka(self) -> KafkaBroker:
        """Return the broker, fetching the jars and starting it on first use."""
        if self.kafka is None:
            java = require_java()
            dist = fetch_kafka(self.paths)
            self.kafka = start_kafka(
                dist, java, self.paths, self.run_dir, self.settings,
                taken_ports=self._ports(), die_with_parent=self.die_with_parent,
            )  # fmt: skip
        return self.kafka

    def restart_kafka(self) -> KafkaBroker:
        """Stop the broker and start it again with the same address, topics and offsets."""
        if self.kafka is None:
            raise ValueError("expected a started broker to restart, got none (call start_kafka)")
        self.kafka = restart_kafka(
            self.kafka, require_java(), fetch_kafka(self.paths), self.paths, self.settings,
            die_with_parent=self.die_with_parent,
        )  # fmt: skip
        return self.kafka

    def start_alertmanager(self) -> AlertmanagerServer:
        """Return Alertmanager, starting it on first use."""
        if self.alertmanager is None:
            self.alertmanager = start_alertmanager(
                find_tool("alertmanager"), self.paths, self.run_dir, self.settings,
                taken_ports=self._ports(), die_with_parent=self.die_with_parent,
            )  # fmt: skip
        return self.alertmanager

    def start_prometheus(self) -> PrometheusServer:
        """Return Prometheus (with Alertmanager, which it sends alerts to), starting on first use."""
        if self.prometheus is None:
            binary = find_tool("prometheus")
            alertmanager = self.start_alertmanager()
            self.prometheus = start_prometheus(
                binary, self.paths, self.run_dir, self.settings, alertmanager.address,
                taken_ports=self._ports(), die_with_parent=self.die_with_parent,
            )  # fmt: skip
        return self.prometheus

    def start(self, services: Iterable[str] = SERVICES) -> None:
        """Start `services` (all by default), checking every needed tool before starting any."""
        wanted = list(services)
        unknown = sorted(set(wanted) - set(SERVICES))
        if unknown:
            raise ValueError(f"expected services among {SERVICES}, got {unknown}")
        if "kafka" in wanted:
            require_java()
            if cached_kafka(self.paths) is None:
                find_tool("mvn")
        if "prometheus" in wanted:
            find_tool("prometheus")
        if "alertmanager" in wanted or "prometheus" in wanted:
            find_tool("alertmanager")
        try:
            for name in SERVICES:
                if name in wanted:
                    getattr(self, f"start_{name}")()
        except BaseException:
            self.stop()
            raise

    def handles(self) -> list[ProcessHandle]:
        """Return the processes started so far, in start order."""
        running = (self.kafka, self.alertmanager, self.prometheus)
        return [service.process for service in running if service is not None]

    def _ports(self) -> set[int]:
        ports: set[int] = set()
        if self.kafka is not None:
            ports |= {self.kafka.port, self.kafka.controller_port}
        if self.alertmanager is not None:
            ports.add(self.alertmanager.port)
        if self.prometheus is not None:
            ports.add(self.prometheus.port)
        return ports

    def stop(self) -> None:
        """Stop every started service, the last started first."""
        for handle in reversed(self.handles()):
            stop(handle, self.settings.stop_timeout_seconds)
        self.kafka = self.alertmanager = self.prometheus = None

    def state(self) -> StackState:
        """Return what a later `headwatch stack down` needs to stop exactly these processes."""
        services = []
        for service, address in (
            (self.kafka, self.kafka.bootstrap if self.kafka else ""),
            (self.alertmanager, self.alertmanager.url if self.alertmanager else ""),
            (self.prometheus, self.prometheus.url if self.prometheus else ""),
        ):
            if service is not None:
                handle = service.process
                services.append(ServiceState(
                    name=handle.name, pid=handle.pid, start_ticks=handle.start_ticks,
                    log_path=str(handle.log_path), address=address,
                ))  # fmt: skip
        return StackState(
            run_dir=str(self.run_dir),
            kafka_version=self.kafka.version if self.kafka else None,
            kafka_bootstrap=self.kafka.bootstrap if self.kafka else None,
            prometheus_url=self.prometheus.url if self.prometheus else None,
            prometheus_targets_dir=str(self.prometheus.targets_dir) if self.prometheus else None,
            alertmanager_url=self.alertmanager.url if self.alertmanager else None,
            alertmanager_config=str(self.alertmanager.config_path) if self.alertmanager else None,
            services=tuple(services),
        )


def handle_of(service: ServiceState) -> ProcessHandle:
    """Return a handle for a process recorded in a state file (by another `headwatch` process)."""
    return ProcessHandle(service.name, service.pid, service.start_ticks, Path(service.log_path))


def running_services(state: StackState) -> list[ServiceState]:
    """Return the recorded services that are still the very processes `up` started."""
    return [service for service in state.services if is_running(handle_of(service))]


def stop_recorded(state: StackState, stop_timeout_seconds: float) -> list[str]:
    """Stop the processes recorded in `state` (only those), remove its run folder, return names."""
    stopped = []
    for service in reversed(state.services):
        handle = handle_of(service)
        if is_running(handle):
            stop(handle, stop_timeout_seconds)
            stopped.append(service.name)
    shutil.rmtree(state.run_dir, ignore_errors=True)
    return stopped
