"""Notebook prose rendered from results: Markdown built in code, so a re-run that flips a number flips the text.

Notebooks never type a measured number into a Markdown cell. They build the text from records and
:class:`crosskv.evidence.stats.Comparison` objects and show it with :func:`show`::

    report.show(report.bullets([
        stats.compare(xkv, svd, "xKV G=4", "Single SVD").sentence,
        f"Search took {report.seconds(search_s)} per run (n = {len(times)}).",
    ]), title="Findings")

:func:`verdicts` prints every comparison with its interval as an executed check (its table is the
evidence behind the sentences).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import pandas as pd

from crosskv.evidence.stats import Comparison, Interval


def bullets(lines: Iterable[str]) -> str:
    """Markdown bullet list of ``lines`` (empty lines skipped)."""
    return "\n".join(f"- {line}" for line in lines if line)


def show(text: str, title: str | None = None) -> str:
    """Display ``text`` as Markdown in a notebook (plain print elsewhere); returns the Markdown shown."""
    body = f"### {title}\n\n{text}" if title else text
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:  # pragma: no cover - IPython ships with the notebook extras
        print(body)
        return body
    if get_ipython() is None:
        print(body)
    else:
        display(Markdown(body))
    return body


def verdicts(comparisons: Sequence[Comparison]) -> pd.DataFrame:
    """One row per comparison: both scores with intervals, the paired difference and the verdict."""
    return pd.DataFrame([{
        "a": c.a, "b": c.b, "metric": c.metric,
        "score_a": c.score_a.estimate, "score_a_lo": c.score_a.lo, "score_a_hi": c.score_a.hi,
        "score_b": c.score_b.estimate, "score_b_lo": c.score_b.lo, "score_b_hi": c.score_b.hi,
        "diff": c.diff.estimate, "diff_lo": c.diff.lo, "diff_hi": c.diff.hi, "n": c.diff.n,
        "verdict": c.verdict} for c in comparisons])


def seconds(values: float | Sequence[float]) -> str:
    """``"12.3 s"`` for one value, ``"21.7–55.1 s (median 30.2)"`` for several."""
    if isinstance(values, (int, float)):
        return f"{values:.3g} s"
    v = sorted(values)
    if not v:
        raise ValueError("seconds() needs at least one value")
    median = v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
    return f"{v[0]:.3g}–{v[-1]:.3g} s (median {median:.3g}, n = {len(v)})"


def versus(iv: Interval, against: float, above: str, below: str, neither: str) -> str:
    """The sentence for an interval checked against a value: ``above`` when the whole interval lies above
    ``against``, ``below`` when below, ``neither`` otherwise; the interval and its n are appended."""
    text = above if iv.lo > against else below if iv.hi < against else neither
    return f"{text} ({iv.format()}, n = {iv.n}, 95 % bootstrap)"
