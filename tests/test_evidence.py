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


def decision_problems(df: pd.DataFrame, name: str, alpha: float = 0.05) -> list[str]:
    """Why a decision table (a ``decision`` column, :func:`crosskv.evidence.frontier.best_at_budget`) calls a winner
    its own test does not support: every ``winner`` row needs a Holm-adjusted p below ``alpha``."""
    if "decision" not in df.columns:
        return []
    winners = df[df["decision"] == "winner"]
    bad = winners[~(winners["p_holm"] < alpha)]
    return [f"{name}: winner {r['leader']} at budget {r['budget']} has p_holm {r['p_holm']} (needs < {alpha})"
            for _, r in bad.iterrows()]


def pooled_problems(df: pd.DataFrame, name: str, band: tuple[float, float] = (0.25, 0.9)) -> list[str]:
    """Why a tidy table pools a task where the full cache sits at the floor or ceiling: every ``pooled`` task's
    full-cache gold_match must lie in ``band``."""
    if "pooled" not in df.columns or "metric" not in df.columns:
        return []
    full = df[(df["family"] == "full") & (df["metric"] == "gold_match") & (df["pooled"] == True)]  # noqa: E712
    bad = full[(full["score"] < band[0]) | (full["score"] > band[1])]
    return [f"{name}: task {r['task']} is pooled with full gold_match {r['score']:.3g} outside {band}"
            for _, r in bad.iterrows()]


def check_executed(executed: Path, figures_dir: Path, pool_band: bool = True) -> None:
    """Assert the evidence rules on one executed notebook whose files are in ``figures_dir`` (``pool_band``: the
    pooled tasks' band too — the smoke profile pools every task, its tiny sizes decide nothing)."""
    number = Path(executed).name[:2]  # a notebook writes only its own fig_NN_*; notebooks run in parallel share
    wanted = [f for f in written_figures(executed) if f.startswith(f"fig_{number}_")]  # one output window
    shown = image_outputs(executed)
    assert shown >= len(wanted), (f"{Path(executed).name} writes {len(wanted)} figure(s) but shows {shown} "
                                  "(use plotting.publish)")
    problems = []
    for name in figures.written_files(executed):
        if name.startswith("tab_") and name.endswith(".csv"):
            table = pd.read_csv(Path(figures_dir) / name)
            problems += interval_problems(table, name) + decision_problems(table, name) + (pooled_problems(table, name) if pool_band else [])
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


def test_decision_rule_catches_an_unsupported_winner():
    rows = pd.DataFrame({"decision": ["winner", "no decision", "winner"], "leader": ["a", "b", "c"],
                         "budget": [0.5, 0.25, 0.125], "p_holm": [0.01, 0.3, 0.05]})
    assert decision_problems(rows, "t") == ["t: winner c at budget 0.125 has p_holm 0.05 (needs < 0.05)"]
    assert decision_problems(rows.iloc[:2], "t") == []


def test_pooled_rule_catches_a_floor_task_in_the_mix():
    tidy = pd.DataFrame({"family": ["full", "full", "full", "xKV G=4"], "metric": "gold_match",
                         "task": ["fwe", "niah_multikey_1", "niah_single_2", "fwe"],
                         "score": [0.0, 0.36, 1.0, 0.0], "pooled": [True, True, False, True]})
    assert pooled_problems(tidy, "t") == ["t: task fwe is pooled with full gold_match 0 outside (0.25, 0.9)"]
    assert pooled_problems(tidy.assign(pooled=[False, True, False, False]), "t") == []
