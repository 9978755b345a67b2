"""argparse value types that refuse out-of-range numbers with a message naming the value.

``--threads 0`` → ``argument --threads: 0 is not a positive integer``; used by every CLI command.
"""
from __future__ import annotations

import argparse
from typing import Callable


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def int_at_least(low: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer ≥ ``low`` (``what`` names the kind in the error, e.g. "positive integer")."""
    def parse(text: str) -> int:
        value = _integer(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is not a {what} (must be >= {low})")
        return value
    parse.__name__ = what.replace(" ", "_")
    return parse


positive_int = int_at_least(1, "positive integer")
nonnegative_int = int_at_least(0, "non-negative integer")
