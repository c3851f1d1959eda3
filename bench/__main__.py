"""`python -m bench run [SCENARIO ...] [--quick] [--profile] [--uvloop]`."""

from __future__ import annotations

import sys

from bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
