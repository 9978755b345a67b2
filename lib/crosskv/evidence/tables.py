"""Tidy tables → CSV + Markdown, the papers' published numbers as data, and the low-rank tables of notebook 03.

The published figures live in ``data/paper_reference/paper_numbers.csv`` (copied from the
project's method notes; columns: paper, source, table, model, benchmark, method, setting,
compression, compression_convention, score, metric). Side-by-side tables are built from it,
never from numbers typed into a notebook.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from crosskv.core import lowrank
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


# ----------------------------------------------------------------------------- low-rank structure (notebook 03)

def energy_table(fields: dict[str, torch.Tensor], group_sizes: list[int]) -> pd.DataFrame:
    """Tidy energy-vs-rank curves: one row per (field, G, rank) with the mean energy over groups and sequences.

    ``fields`` maps a label (e.g. "keys (pre-RoPE)") to ``(L, N, H, T, d)``. Columns: field,
    group_size, rank, rank_fraction (rank / (G·H·d): equal values mean equal basis storage per layer,
    factors excluded), energy (:func:`crosskv.core.lowrank.group_energy`).
    """
    rows = []
    for label, kv in fields.items():
        for g in group_sizes:
            curve = lowrank.group_energy(kv, g).mean(dim=(0, 1))  # (n,)
            width = g * kv.shape[2] * kv.shape[4]
            rows += [{"field": label, "group_size": g, "rank": r + 1, "rank_fraction": (r + 1) / width,
                      "energy": float(curve[r])} for r in range(curve.shape[0])]
    return pd.DataFrame(rows)


def grouped_error_units(fields: dict[str, torch.Tensor], group_sizes: list[int], single_ranks: list[int],
                        lengths: list[int]) -> pd.DataFrame:
    """:func:`crosskv.core.lowrank.equal_storage_errors` for every (field, T, sequence, G, single rank, group): the
    paired units of a per-layer vs grouped comparison at equal stored elements.

    ``fields`` maps a label to ``(L, N, H, T_max, d)``; each T of ``lengths`` (≤ T_max) uses every sequence's
    first T tokens. One SVD per layer and per group (errors for every rank come from its spectrum). One row
    per unit with columns field, tokens, sequence, group_size, first_layer, single_rank, grouped_rank,
    single, grouped (relative Frobenius errors over the group), kept (stored / uncompressed elements).
    """
    rows = []
    for label, kv in fields.items():
        layers, sequences, h, t_max, d = kv.shape
        for t in lengths:
            if not 0 < t <= t_max:
                raise ValueError(f"length {t} outside 1..{t_max} (the captured tokens)")
            for n in range(sequences):
                part = kv[:, n:n + 1, :, :t]  # (L, 1, H, T, d)
                energy = [lowrank.spectrum(lowrank.group_matrix(part[i:i + 1]))[0].pow(2) for i in range(layers)]
                for g in group_sizes:
                    for first in range(0, layers - g + 1, g):
                        grouped = lowrank.spectrum(lowrank.group_matrix(part[first:first + g]))[0].pow(2)
                        for r in single_ranks:
                            e = lowrank.equal_storage_errors(energy[first:first + g], grouped, t, h * d, r)
                            rows.append({"field": label, "tokens": t, "sequence": n, "group_size": g,
                                         "first_layer": first, "single_rank": r, "grouped_rank": e["grouped_rank"],
                                         "single": e["single"], "grouped": e["grouped"],
                                         "kept": e["elements"] / (g * t * h * d)})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- names

def context_label(context: int | None) -> str:
    """A context length as a reader writes it: ``512`` → ``"512"``, ``2048`` → ``"2K"``, ``32768`` → ``"32K"``
    (whole multiples of 1024 from 1024 up in K)."""
    if context is None:
        raise ValueError("context_label needs a context length, got None")
    context = int(context)
    if context <= 0:
        raise ValueError(f"context={context} must be positive")
    return f"{context // 1024}K" if context >= 1024 and context % 1024 == 0 else str(context)


def metric_label(metric: str, context: int | None) -> str:
    """A metric named with the context it was measured at: ``ppl@512``, ``ppl_cont@2K``, ``gold_match@2K`` (the
    same metric at another context is another number); the bare metric when the context is unknown (a mix of
    contexts)."""
    return metric if context is None or context != context else f"{metric}@{context_label(context)}"
