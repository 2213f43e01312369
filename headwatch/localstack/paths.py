"""Where the stack finds its configuration (deploy/local/) and keeps its cache (.cache/)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from headwatch.localstack.errors import CheckoutNotFoundError


@dataclass(frozen=True)
class StackPaths:
    """The repository checkout the stack runs from and the git-ignored cache it writes to."""

    repo_root: Path
    cache_dir: Path

    @property
    def deploy_dir(self) -> Path:
        """deploy/local/: the pom and the service configuration templates."""
        return self.repo_root / "deploy" / "local"

    @property
    def pom(self) -> Path:
        return self.deploy_dir / "pom.xml"

    @property
    def kafka_cache(self) -> Path:
        """.cache/kafka/: one folder per Kafka version, each holding a complete libs/."""
        return self.cache_dir / "kafka"

    @property
    def stack_dir(self) -> Path:
        """.cache/stack/: the state file and the run folders of `headwatch stack up`."""
        return self.cache_dir / "stack"

    @property
    def state_file(self) -> Path:
        return self.stack_dir / "state.json"

    @property
    def rules_glob(self) -> str:
        """The alert and recording rule files Prometheus loads (an empty glob is fine)."""
        return str(self.repo_root / "dashboards" / "generated" / "rules" / "*.yml")


def find_paths(cache_dir: Path | None = None) -> StackPaths:
    """Return the paths of the checkout this package lives in; `cache_dir` overrides `.cache/`."""
    repo_root = Path(__file__).resolve().parents[2]
    if not (repo_root / "deploy" / "local" / "pom.xml").is_file():
        raise CheckoutNotFoundError(
            f"expected deploy/local/pom.xml under {repo_root}, got none: the local stack runs "
            "from a source checkout (git clone ... && pip install -e .)"
        )
    return StackPaths(repo_root=repo_root, cache_dir=cache_dir or repo_root / ".cache")
