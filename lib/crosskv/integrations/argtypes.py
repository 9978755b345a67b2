"""argparse value types that refuse out-of-range numbers and unusable paths with a message naming the value.

``--threads 0`` → ``argument --threads: 0 is not a positive integer``; ``--out missing/dir/x.jsonl`` →
``argument --out: folder missing/dir of missing/dir/x.jsonl does not exist``: used by every CLI command, so a
bad argument fails when the command line is parsed, before any work.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
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


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def output_file(text: str) -> str:
    """An argparse type: a file path that can be written (its folder exists and is writable; not a folder)."""
    path = Path(text)
    folder = path.parent
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file")
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"folder {folder} of {text} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text} is not writable")
    return text


def output_folder(text: str) -> str:
    """An argparse type: a folder that exists writable, or can be created (nearest existing ancestor writable)."""
    existing = Path(text)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: {existing} is not writable")
    return text
