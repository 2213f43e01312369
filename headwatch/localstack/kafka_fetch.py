"""Fetch the pinned Apache Kafka jars from Maven Central into .cache/kafka/<version>/libs.

The download goes to a temporary folder next to the cache and is renamed into place only when
Maven succeeded, so an interrupted fetch never leaves a half-made libs/ behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from headwatch.localstack.errors import KafkaFetchError
from headwatch.localstack.paths import StackPaths
from headwatch.localstack.tools import find_tool

logger = logging.getLogger(__name__)

_POM_NS = {"m": "http://maven.apache.org/POM/4.0.0"}
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class KafkaDistribution:
    """A complete set of Kafka jars for one version."""

    version: str
    libs: Path

    @property
    def classpath(self) -> str:
        """The java -cp argument: every jar in libs/ (the JVM expands the wildcard)."""
        return str(self.libs / "*")

    @property
    def broker_jar(self) -> Path:
        return self.libs / f"kafka_2.13-{self.version}.jar"


def pinned_kafka_version(pom: Path) -> str:
    """Return the `kafka.version` property of the pom: the one place the version is pinned."""
    try:
        root = ET.parse(pom).getroot()
    except (OSError, ET.ParseError) as exc:
        raise KafkaFetchError(f"expected a readable pom at {pom}, got {exc}") from exc
    node = root.find("m:properties/m:kafka.version", _POM_NS)
    if node is None or not (node.text or "").strip():
        raise KafkaFetchError(f"expected <properties><kafka.version> in {pom}, got none")
    return (node.text or "").strip()


def cached_kafka(paths: StackPaths, version: str | None = None) -> KafkaDistribution | None:
    """Return the cached distribution of the pinned version, or None when it is not complete."""
    version = version or pinned_kafka_version(paths.pom)
    dist = KafkaDistribution(version, paths.kafka_cache / version / "libs")
    return dist if dist.broker_jar.is_file() else None


def fetch_kafka(paths: StackPaths, timeout_seconds: float = 1800) -> KafkaDistribution:
    """Return the pinned Kafka distribution, fetching it with Maven when it is not cached yet.

    Usage:
        dist = fetch_kafka(find_paths())
        subprocess.run(["java", "-cp", dist.classpath, "kafka.Kafka", "server.properties"])
    """
    version = pinned_kafka_version(paths.pom)
    found = cached_kafka(paths, version)
    if found is not None:
        return found
    mvn = find_tool("mvn")
    paths.kafka_cache.mkdir(parents=True, exist_ok=True)
    with _exclusive(paths.kafka_cache / ".lock"):
        found = cached_kafka(paths, version)  # another process may have fetched meanwhile
        if found is not None:
            return found
        _remove_leftovers(paths.kafka_cache)
        final = paths.kafka_cache / version
        if final.exists():  # a libs/ someone emptied by hand
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{version}-", dir=paths.kafka_cache))
        try:
            _run_maven(mvn, paths.pom, tmp / "libs", timeout_seconds)
            dist = KafkaDistribution(version, tmp / "libs")
            if not dist.broker_jar.is_file():
                raise KafkaFetchError(
                    f"expected {dist.broker_jar.name} among the fetched jars, got "
                    f"{sorted(p.name for p in dist.libs.glob('*.jar'))}"
                )
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("fetched Kafka %s into %s", version, final / "libs")
    return KafkaDistribution(version, final / "libs")


def _run_maven(mvn: Path, pom: Path, target: Path, timeout_seconds: float) -> None:
    argv = [
        str(mvn), "-q", "-B", "-Dstyle.color=never", "-f", str(pom),
        "dependency:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={target}",
    ]  # fmt: skip
    logger.info("fetching Kafka jars: %s", " ".join(argv))
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_seconds, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise KafkaFetchError(f"mvn did not finish within {timeout_seconds:.0f}s") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
        raise KafkaFetchError(
            f"mvn exited with status {done.returncode} while fetching Kafka from Maven Central "
            "(is https://repo.maven.apache.org/maven2 or a mirror in ~/.m2/settings.xml "
            f"reachable?); last lines of its output:\n{tail}"
        )


def _remove_leftovers(kafka_cache: Path) -> None:
    # Only called under the lock, so no other fetch is writing into these.
    for leftover in kafka_cache.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
