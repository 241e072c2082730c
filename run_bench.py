#!/usr/bin/env python3
"""Entry point: `python run_bench.py --modules se,spe` (the same as the `attnbench` command)."""

import sys

from attnbench.cli import main

if __name__ == "__main__":
    sys.exit(main())
