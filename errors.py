"""One error type for problems the user can fix, and the CLI wrapper that prints them.

Every command-line entry point runs its `main` through `run_cli`, so bad input ends in one
readable line on stderr and exit code 2 instead of a traceback.
"""
import argparse
import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input or environment, worded so that it says how to fix it."""


def run_cli(main: Callable[[], object]) -> None:
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


class ArgParser(argparse.ArgumentParser):
    """argparse, but a bad command line is a UserError (one line) instead of a usage dump, and
    no abbreviations: `--ran 8` is an error, not a silent `--rank 8`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        raise UserError(f"{message}; run with --help for the list of options")
