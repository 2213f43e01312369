#!/usr/bin/env bash
# Set up (see scripts/setup.sh) and run the whole test suite, integration tests included:
# they start a real Kafka broker, Prometheus and Alertmanager on 127.0.0.1 for the session.
# Arguments go to pytest, e.g. scripts/test.sh tests/unit -q
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
