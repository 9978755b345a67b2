"""Notebook evidence rules (issue 10): every written figure is shown, every score table carries intervals.

Checked on the executed notebooks committed in ``notebooks/`` (the cpu profile, whose files are in
``figures/``) and, through :func:`check_executed`, on every smoke run of ``tests/test_notebooks.py``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from crosskv.evidence import figures
from crosskv.core.assets import PROJECT_ROOT

NOTEBOOKS = figures.notebooks()
# Columns that report a quality number (a score in [0, 1], a perplexity or an accuracy).
SCORE_COLUMNS = ("score", "perplexity", "ppl", "accuracy")


def image_outputs(executed: Path) -> int:
    """Number of image outputs (``image/png``) in the executed notebook's cells."""
    nb = json.loads(Path(executed).read_text())
    return sum("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))


def written_figures(executed: Path) -> list[str]:
    return [name for name in figures.written_files(executed) if name.startswith("fig_") and name.endswith(".png")]


def score_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c in SCORE_COLUMNS or c.endswith("_score")]


def interval_problems(df: pd.DataFrame, name: str) -> list[str]:
    """Why the table ``df`` lacks the intervals and sample counts its score columns need (empty: fine)."""
    problems = []
    for column in score_columns(df):
        lo, hi = f"{column}_lo", f"{column}_hi"
        missing = [c for c in (lo, hi) if c not in df.columns]
        if missing:
            problems.append(f"{name}: column {column!r} has no {', '.join(missing)}")
            continue
        rows = df[[column, lo, hi]].dropna()
        if rows.empty and df[column].notna().any():
            problems.append(f"{name}: column {column!r} has values but no interval in any row")
        bad = rows[(rows[lo] > rows[column] + 1e-9) | (rows[hi] < rows[column] - 1e-9)]
        if not bad.empty:
            problems.append(f"{name}: {len(bad)} row(s) of {column!r} lie outside their interval")
    if score_columns(df) and not any(c == "n" or c.startswith("n_") for c in df.columns):
        problems.append(f"{name}: reports scores but has no sample-count column 'n'")
    return problems


def check_executed(executed: Path, figures_dir: Path) -> None:
    """Assert the evidence rules on one executed notebook whose files are in ``figures_dir``."""
    number = Path(executed).name[:2]  # a notebook writes only its own fig_NN_*; notebooks run in parallel share
    wanted = [f for f in written_figures(executed) if f.startswith(f"fig_{number}_")]  # one output window
    shown = image_outputs(executed)
    assert shown >= len(wanted), (f"{Path(executed).name} writes {len(wanted)} figure(s) but shows {shown} "
                                  "(use plotting.publish)")
    problems = []
    for name in figures.written_files(executed):
        if name.startswith("tab_") and name.endswith(".csv"):
            problems += interval_problems(pd.read_csv(Path(figures_dir) / name), name)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_committed_notebook_shows_figures_and_intervals(notebook):
    assert figures.written_files(notebook), f"{notebook.name} records no written files: run `make figures`"
    check_executed(notebook, figures.layout("cpu").figures)


def test_interval_rule_catches_a_bare_score_table():
    bare = pd.DataFrame({"method": ["full"], "score": [0.5]})
    assert interval_problems(bare, "t")
    good = bare.assign(score_lo=0.4, score_hi=0.6, n=50)
    assert interval_problems(good, "t") == []
    outside = bare.assign(score_lo=0.6, score_hi=0.7, n=50)
    assert interval_problems(outside, "t")
    no_n = bare.assign(score_lo=0.4, score_hi=0.6)
    assert interval_problems(no_n, "t")
