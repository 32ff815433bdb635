"""Command line: the guided session (no arguments) and subcommands for scripts.

Only argparse is imported at the top so that ``--help`` answers at once; each command imports
the engine (and torch) when it runs.
"""

from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``python main.py``."""
    parser = argparse.ArgumentParser(
        prog="python main.py",
        description="diyapp: train a small Chinese GPT from scratch, chat with it, save, resume and export it. "
                    "With no subcommand, opens the guided session (needs a terminal).",
    )
    parser.add_argument("--version", action="version", version="diyapp 0.1.0")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        print("diyapp: the guided session is not built yet; see `python main.py --help`.", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK
