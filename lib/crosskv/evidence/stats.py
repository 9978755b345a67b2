"""Uncertainty for every score: bootstrap 95 % intervals over samples and paired comparisons between methods.

A run's record (:func:`crosskv.evaluate`) keeps its per-sample ``details``. Generation tasks score each
sample in [0, 1] (the run's score is their mean); perplexity tasks keep each window's summed NLL and token
count (the run's score is ``exp(Σ nll / Σ tokens)``). Both are resampled *over samples* (contexts / windows):

- :func:`interval` — the run's score with a percentile-bootstrap interval;
- :func:`compare` — the paired difference ``a − b`` on the same samples (same task, context, seed and
  sample indices), resampling sample indices jointly, with a verdict that is only called when the interval
  excludes zero. :attr:`Comparison.sentence` is the text notebooks render, so prose flips when data do;
- :func:`table` — tidy rows with ``score``, ``score_lo``, ``score_hi`` and ``n`` for a list of records.

Resampling is seeded (``seed``) so a re-run on the same records prints the same interval.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd

LEVEL = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval over ``n`` samples."""

    estimate: float
    lo: float
    hi: float
    n: int
    level: float = LEVEL

    def excludes(self, value: float = 0.0) -> bool:
        return self.lo > value or self.hi < value

    def format(self, digits: int = 3, signed: bool = False) -> str:
        sign = "+" if signed else ""
        return f"{self.estimate:{sign}.{digits}g} [{self.lo:{sign}.{digits}g}, {self.hi:{sign}.{digits}g}]"

    def __str__(self) -> str:
        return self.format()


def _check_level(level: float, resamples: int) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1)")
    if resamples < 100:
        raise ValueError(f"resamples={resamples} must be >= 100")


def _bootstrap(statistic: Callable[[np.ndarray], np.ndarray], n: int, level: float, resamples: int,
               seed: int) -> tuple[float, float]:
    """Percentile interval of ``statistic(indices)`` where ``indices`` is ``(resamples, n)``."""
    _check_level(level, resamples)
    rng = np.random.default_rng(seed)
    draws = statistic(rng.integers(0, n, size=(resamples, n)))  # (resamples,)
    tail = (1 - level) / 2
    lo, hi = np.quantile(draws, [tail, 1 - tail])
    return float(lo), float(hi)


def mean_ci(values: Sequence[float], level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """Mean of ``values`` (one per sample) with a percentile-bootstrap interval."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    if x.size == 1:
        return Interval(float(x[0]), float(x[0]), float(x[0]), 1, level)
    lo, hi = _bootstrap(lambda idx: x[idx].mean(axis=1), x.size, level, resamples, seed)
    return Interval(float(x.mean()), lo, hi, int(x.size), level)


def perplexity_ci(nll: Sequence[float], tokens: Sequence[int], level: float = LEVEL, resamples: int = RESAMPLES,
                  seed: int = 0) -> Interval:
    """``exp(Σ nll / Σ tokens)`` over windows with a bootstrap interval resampling whole windows."""
    a, t = np.asarray(nll, dtype=float), np.asarray(tokens, dtype=float)
    if a.size == 0 or a.size != t.size:
        raise ValueError(f"perplexity_ci needs matching non-empty nll ({a.size}) and tokens ({t.size})")
    estimate = math.exp(a.sum() / t.sum())
    if a.size == 1:
        return Interval(estimate, estimate, estimate, 1, level)
    lo, hi = _bootstrap(lambda idx: np.exp(a[idx].sum(1) / t[idx].sum(1)), a.size, level, resamples, seed)
    return Interval(estimate, lo, hi, int(a.size), level)


def is_perplexity(record: dict[str, Any]) -> bool:
    """True for a perplexity run (per-window ``nll`` details), False for a scored generation run."""
    details = record.get("details") or []
    return bool(details) and "nll" in details[0]


def _details(record: dict[str, Any]) -> list[dict[str, Any]]:
    details = record.get("details")
    if not details:
        raise ValueError(f"record {record.get('key', '?')[:12]} ({record.get('method')} on {record.get('task')}) "
                         "has no per-sample details; intervals need them")
    return sorted(details, key=lambda d: d["index"])


def interval(record: dict[str, Any], level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """The run's score with its bootstrap interval over samples (score mean or window perplexity)."""
    details = _details(record)
    if is_perplexity(record):
        return perplexity_ci([d["nll"] for d in details], [d["scored_tokens"] for d in details], level, resamples, seed)
    return mean_ci([d["score"] for d in details], level, resamples, seed)


def _paired_arrays(a: dict[str, Any], b: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    for field in ("task", "context", "seed"):
        if a.get(field) != b.get(field):
            raise ValueError(f"cannot pair runs with different {field}: {a.get(field)!r} vs {b.get(field)!r}")
    da, db = _details(a), _details(b)
    ia, ib = [d["index"] for d in da], [d["index"] for d in db]
    if ia != ib:
        raise ValueError(f"cannot pair runs on different samples: indices {ia[:5]}… vs {ib[:5]}…")
    return da, db


def paired_diff(a: dict[str, Any], b: dict[str, Any], level: float = LEVEL, resamples: int = RESAMPLES,
                seed: int = 0) -> Interval:
    """Score of run ``a`` minus run ``b`` on the same samples, resampling sample indices jointly."""
    da, db = _paired_arrays(a, b)
    n = len(da)
    if is_perplexity(a):
        na, nb = np.array([d["nll"] for d in da]), np.array([d["nll"] for d in db])
        ta, tb = np.array([d["scored_tokens"] for d in da], float), np.array([d["scored_tokens"] for d in db], float)

        def stat(idx):
            return np.exp(na[idx].sum(-1) / ta[idx].sum(-1)) - np.exp(nb[idx].sum(-1) / tb[idx].sum(-1))
    else:
        sa, sb = np.array([d["score"] for d in da], float), np.array([d["score"] for d in db], float)

        def stat(idx):
            return sa[idx].mean(-1) - sb[idx].mean(-1)
    estimate = float(stat(np.arange(n)[None])[0])
    if n == 1:
        return Interval(estimate, estimate, estimate, 1, level)
    lo, hi = _bootstrap(stat, n, level, resamples, seed)
    return Interval(estimate, lo, hi, n, level)


@dataclass(frozen=True)
class Comparison:
    """Run ``a`` against run ``b`` on the same samples. ``verdict``: ``"better"``, ``"worse"`` or ``"tie"``
    (no detectable difference: the paired interval contains zero)."""

    a: str
    b: str
    score_a: Interval
    score_b: Interval
    diff: Interval
    higher_is_better: bool
    metric: str

    @property
    def verdict(self) -> str:
        if not self.diff.excludes(0.0):
            return "tie"
        return "better" if (self.diff.estimate > 0) == self.higher_is_better else "worse"

    @property
    def sentence(self) -> str:
        """One sentence stating the verdict with both scores, the paired difference and the sample count."""
        scores = f"{self.a} {self.score_a} vs {self.b} {self.score_b} {self.metric}"
        diff = f"paired difference {self.diff.format(signed=True)}, n = {self.diff.n}, 95 % bootstrap"
        if self.verdict == "tie":
            return f"No detectable difference between {self.a} and {self.b} ({scores}; {diff})."
        return f"{self.a} is {self.verdict} than {self.b} ({scores}; {diff})."


def compare(a: dict[str, Any], b: dict[str, Any], label_a: str | None = None, label_b: str | None = None,
            level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> Comparison:
    """Paired comparison of two runs' records (same task, context, seed and samples)."""
    return Comparison(label_a or a.get("method", "a"), label_b or b.get("method", "b"),
                      interval(a, level, resamples, seed), interval(b, level, resamples, seed),
                      paired_diff(a, b, level, resamples, seed), bool(a.get("higher_is_better", True)),
                      str(a.get("metric", "score")))


def pool(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One record whose samples are all of ``records``' samples (a method's runs over a task mix).

    Its score is the mean over every sample — the mix average when every task has the same sample
    count — so :func:`interval` and :func:`compare` work on it unchanged. Two pools pair when they were
    built from the same (task, context) list in the same order. Perplexity and generation runs cannot mix.
    """
    records = list(records)
    if not records:
        raise ValueError("pool needs at least one record")
    if len({is_perplexity(r) for r in records}) > 1:
        raise ValueError("pool cannot mix perplexity and generation runs")
    details, offset = [], 0
    for record in records:
        part = _details(record)
        details += [{**d, "index": offset + d["index"]} for d in part]
        offset += max(d["index"] for d in part) + 1
    first = records[0]
    return {"method": first.get("method"), "params": first.get("params", {}),
            "task": "+".join(f"{r.get('task')}@{r.get('context')}" for r in records), "context": None,
            "seed": first.get("seed"), "metric": first.get("metric", "score"),
            "higher_is_better": first.get("higher_is_better", True), "details": details}


def table(records: Iterable[dict[str, Any]], columns: Sequence[str] = ("method", "task", "context", "kept"),
          labels: Sequence[str] | None = None, level: float = LEVEL, seed: int = 0) -> pd.DataFrame:
    """Tidy rows: ``columns`` of each record (``param.<name>`` reads a method parameter), an optional
    ``label``, then ``score``, ``score_lo``, ``score_hi`` and ``n`` (samples)."""
    rows = []
    records = list(records)
    for i, record in enumerate(records):
        row = {}
        if labels is not None:
            row["label"] = labels[i]
        for column in columns:
            row[column] = record.get("params", {}).get(column[6:]) if column.startswith("param.") else record.get(column)
        iv = interval(record, level, seed=seed)
        row.update(score=iv.estimate, score_lo=iv.lo, score_hi=iv.hi, n=iv.n)
        rows.append(row)
    return pd.DataFrame(rows)
