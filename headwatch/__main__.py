"""`python -m headwatch` is the `headwatch` command."""

import sys

from headwatch.cli import main

sys.exit(main())
