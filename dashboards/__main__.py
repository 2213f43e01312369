"""`python -m dashboards ...`: the same as `headwatch dashboards ...`."""

from __future__ import annotations

import sys

from dashboards.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
