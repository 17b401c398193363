"""One error type for problems the user can fix, and the CLI wrapper that prints them.

Every command-line entry point runs its `main` through `run_cli`, so bad input, and an operating
system refusing a file operation (permission, no space, name too long, not a folder), end in one
readable line on stderr and exit code 2 instead of a traceback.
"""
import argparse
import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input or environment, worded so that it says how to fix it."""


def describe_os_error(err: OSError) -> str:
    """One line naming the path(s) and the operating system's reason."""
    paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    reason = err.strerror or str(err)
    return f"{paths}: {reason}" if paths else reason


def one_line(err: BaseException) -> str:
    """The error as one line: a UserError's own words, an OSError's path and reason, else the
    type and the first line of the message."""
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, OSError):
        return describe_os_error(err)
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def check_range(flag: str, value, low=None, high=None, low_open: bool = False, high_open: bool = False) -> None:
    """Refuse a number outside [low, high] (an open end excludes the bound; None: unbounded).
    Written as `not inside` so that NaN is refused too."""
    inside = ((low is None or (value > low if low_open else value >= low))
              and (high is None or (value < high if high_open else value <= high)))
    if not inside:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        span = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise UserError(f"{flag} must be in {span}, got {value!r}")


def run_cli(main: Callable[[], object]) -> None:
    try:
        main()
    except (UserError, OSError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


class ArgParser(argparse.ArgumentParser):
    """argparse, but a bad command line is a UserError (one line) instead of a usage dump, and
    no abbreviations: `--ran 8` is an error, not a silent `--rank 8`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        raise UserError(f"{message}; run with --help for the list of options")
