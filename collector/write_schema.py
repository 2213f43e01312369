"""Write collector/head_stats.schema.json from schema.json_schema().

Usage:
    python -m collector.write_schema
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from collector.schema import json_schema

PATH = Path(__file__).with_name("head_stats.schema.json")


def main(argv: list[str] | None = None) -> int:
    """Write the schema file; return 0."""
    PATH.write_text(json.dumps(json_schema(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
