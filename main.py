#!/usr/bin/env python3
"""diyapp: `python main.py` opens the guided session; `python main.py --help` lists the subcommands."""

import sys

from diyapp.cli import main

if __name__ == "__main__":
    sys.exit(main())
