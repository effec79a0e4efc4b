"""What every command module shares: exit codes, the two consoles, the one-line usage error, argument types."""

from __future__ import annotations

import argparse
import math
import sys

from rich.console import Console

EXIT_USAGE = 2
EXIT_FAILURE = 1

err = Console(stderr=True, highlight=False, soft_wrap=True)


def out_console() -> Console:
    """Standard output; wide enough when piped that tables are not cut."""
    return Console() if sys.stdout.isatty() else Console(width=200)


def say(line: str) -> None:
    """One plain line on stderr (no markup, no highlighting)."""
    err.print(line, markup=False, highlight=False)


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def percent(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} must not be negative")
    return v


def one_model(model: str | None, checkpoint: str | None, command: str) -> None:
    """Exactly one of --model PRESET or --checkpoint DIR."""
    if (model is None) == (checkpoint is None):
        raise UsageError(f"{command}: give exactly one of --model PRESET or --checkpoint DIR")


def names(text: str | None, every: list[str]) -> list[str]:
    """A comma list of names; None or 'all': ``every``."""
    if text in (None, "all"):
        return list(every)
    return [b.strip() for b in text.split(",") if b.strip()]
