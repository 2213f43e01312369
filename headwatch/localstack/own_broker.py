"""A Kafka broker of one caller alone, on ports of its own, that can be killed and started again.

For the tests and benchmarks of broker outages (a shared broker must not be killed under others).

Usage:
    broker = OwnBroker(paths, run_dir)
    broker.start()   # the first start formats the storage; later starts reuse it, topics kept
    broker.kill()    # SIGKILL of its process group: no clean shutdown, as in a crash
    broker.stop()
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from headwatch.localstack.kafka import KafkaBroker, restart_kafka, start_kafka
from headwatch.localstack.kafka_fetch import fetch_kafka
from headwatch.localstack.paths import StackPaths
from headwatch.localstack.ports import HOST, choose_port
from headwatch.localstack.process import stop
from headwatch.localstack.settings import StackSettings
from headwatch.localstack.tools import require_java


class OwnBroker:
    """A broker on two free ports chosen once, so that a restart answers where clients connect."""

    def __init__(self, paths: StackPaths, run_dir: Path, kafka_heap: str = "512m") -> None:
        self.paths = paths
        self.run_dir = run_dir
        port = choose_port(0, strict=False, taken=set())
        self.settings = StackSettings(
            kafka_port=port, kafka_controller_port=choose_port(0, strict=False, taken={port}),
            strict_ports=True, kafka_heap=kafka_heap,
        )  # fmt: skip
        self.broker: KafkaBroker | None = None

    @property
    def bootstrap(self) -> str:
        """The address clients connect to, the same across restarts."""
        return f"{HOST}:{self.settings.kafka_port}"

    def start(self) -> None:
        """Start the broker (again, on the same storage, when it ran before); return once it answers."""
        java, dist = require_java(), fetch_kafka(self.paths)
        if self.broker is None:
            self.broker = start_kafka(
                dist, java, self.paths, self.run_dir, self.settings, die_with_parent=True
            )
        else:  # stopping a killed broker only reaps it
            self.broker = restart_kafka(
                self.broker, java, dist, self.paths, self.settings, die_with_parent=True
            )

    def kill(self) -> None:
        """SIGKILL the broker's process group and reap it."""
        if self.broker is None:
            return
        os.killpg(self.broker.process.pid, signal.SIGKILL)
        if self.broker.process.popen is not None:
            self.broker.process.popen.wait(30)

    def stop(self) -> None:
        """Stop the broker if it runs (SIGTERM, then SIGKILL)."""
        if self.broker is not None:
            stop(self.broker.process, self.settings.stop_timeout_seconds)
