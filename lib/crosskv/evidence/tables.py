"""Tidy tables → CSV + Markdown, and the papers' published numbers as data.

The published figures live in ``data/paper_reference/paper_numbers.csv`` (copied from the
project's method notes; columns: paper, source, table, model, benchmark, method, setting,
compression, compression_convention, score, metric). Side-by-side tables are built from it,
never from numbers typed into a notebook.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from crosskv.core.assets import PROJECT_ROOT

PAPER_NUMBERS = PROJECT_ROOT / "data" / "paper_reference" / "paper_numbers.csv"
SOURCE_LABELS = {"paper": "read in the paper", "2nd": "secondary source (independent re-run / later version)"}


def save_table(df: pd.DataFrame, name: str, figures_dir: str | Path, floatfmt: str = ".4g",
               commit: str | None = None) -> list[Path]:
    """Write ``df`` as ``<figures_dir>/<name>.csv`` and ``.md``; returns the paths.

    Floats are written with 6 significant digits so that run-to-run floating-point noise (thread
    scheduling in reductions) does not show up as a diff. Both carry the git commit they came from
    (``commit``, default the checkout's HEAD): a ``commit`` column in the CSV, a footer line in the Markdown.
    """
    from crosskv.run.results import git_commit

    commit = commit or git_commit() or "unknown"
    if not name.startswith("tab_"):
        raise ValueError(f"table name {name!r} must start with 'tab_NN_'")
    out = Path(figures_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv, md = out / f"{name}.csv", out / f"{name}.md"
    df.assign(commit=commit).to_csv(csv, index=False, lineterminator="\n", float_format="%.6g")
    md.write_text(df.to_markdown(index=False, floatfmt=floatfmt) + f"\n\n<sub>crosskv commit {commit}</sub>\n")
    return [csv, md]


def paper_numbers(paper: str | None = None, **filters) -> pd.DataFrame:
    """Published reference numbers, optionally filtered by ``paper`` and any column=value."""
    df = pd.read_csv(PAPER_NUMBERS)
    if paper is not None:
        filters["paper"] = paper
    for column, value in filters.items():
        if column not in df.columns:
            raise ValueError(f"unknown reference column {column!r}; columns: {', '.join(df.columns)}")
        df = df[df[column] == value]
    df = df.assign(source_label=df["source"].map(SOURCE_LABELS).fillna(df["source"]))
    return df.reset_index(drop=True)


def side_by_side(ours: pd.DataFrame, reference: pd.DataFrame, on: str, ours_label: str,
                 reference_label: str) -> pd.DataFrame:
    """Stack our rows and the papers' rows under one ``origin`` column so neither is mistaken for the other.

    ``on`` is the column naming the compared setting (e.g. ``method``); both frames must have it and
    ``score``. The ``origin`` column says whose model/benchmark a row is.
    """
    for frame, label in ((ours, "ours"), (reference, "reference")):
        missing = {on, "score"} - set(frame.columns)
        if missing:
            raise ValueError(f"{label} table lacks column(s) {sorted(missing)}")
    a = ours.assign(origin=ours_label)
    b = reference.assign(origin=reference_label)
    columns = ["origin"] + [c for c in dict.fromkeys([*a.columns, *b.columns]) if c != "origin"]
    return pd.concat([a, b], ignore_index=True)[columns]
