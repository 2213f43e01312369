#!/usr/bin/env bash
# Set up (see scripts/setup.sh) and run the headwatch demo. Arguments go to `headwatch demo`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
exec .venv/bin/headwatch demo "$@"
