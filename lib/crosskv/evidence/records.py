"""Notebook evidence from run records: the memory a run held, per-task and mix rows with intervals, and
comparisons of quantities that are not harness runs (reconstruction errors, similarities).

- :func:`held_kept` — the kept fraction a run measured by its memory census (``kept_held``), falling back
  to the method's own accounting (``kept``) for records written before the census existed;
- :func:`score_rows` — one row per (label, task) and per label over the whole mix (pooled samples), each
  with ``score``/``score_lo``/``score_hi``/``n`` and the held kept (no timings: those come from
  :mod:`crosskv.run.bench`, measured under one condition);
- :func:`values_record` — a record whose "samples" are arbitrary paired units (a layer group, a token,
  a sequence) so :func:`crosskv.evidence.stats.compare` can test a claim about them with a paired interval.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import pandas as pd

from crosskv.evidence import frontier
from crosskv.evidence import stats


def held_kept(record: dict[str, Any]) -> float:
    """Measured held bytes / a plain cache's bytes (``kept_held``), else the reported ``kept``."""
    return frontier.held_kept(record)[0]


def kept_source(records: Sequence[dict[str, Any]]) -> str:
    """``"held"`` when every record carries the census (``kept_held``), else ``"reported"``: for captions."""
    return "held" if all(r.get("kept_held") is not None for r in records) else "reported"


def _row(label: str, task: str, record: dict[str, Any], metric: str = "score") -> dict[str, Any]:
    iv = stats.interval(record, metric="score" if stats.is_perplexity(record) else metric)
    return {"label": label, "task": task, "kept": held_kept(record), "score": iv.estimate, "score_lo": iv.lo,
            "score_hi": iv.hi, "n": iv.n}


def score_rows(runs: Mapping[str, Sequence[dict[str, Any]]], mix: str = "mix", metric: str = "score") -> pd.DataFrame:
    """Rows ``label, task, kept (held), score, score_lo, score_hi, n`` for every record of
    ``runs`` (label → records of one method, one per task), plus a ``task == mix`` row per label pooling
    its generation tasks' samples (:func:`crosskv.evidence.stats.pool`; the mix average when every task has
    the same sample count). ``score`` is the generation runs' ``metric`` (``score``: exact match by generation;
    ``gold_match`` / ``gold_loglik``: the teacher-forced gold answer) and the perplexity runs' perplexity."""
    rows = []
    for label, records in runs.items():
        rows += [_row(label, r["task"], r, metric) for r in records]
        generation = [r for r in records if not stats.is_perplexity(r)]
        if len(generation) > 1:
            rows.append(_row(label, mix, stats.pool(generation, mix), metric))
    return pd.DataFrame(rows)


def values_record(values: Sequence[float], metric: str, higher_is_better: bool = True,
                  task: str = "values") -> dict[str, Any]:
    """A record whose sample ``i`` has score ``values[i]``: paired units (groups, tokens, sequences) for
    :func:`crosskv.evidence.stats.interval` / :func:`crosskv.evidence.stats.compare`. Two such records pair when their
    ``values`` list the same units in the same order."""
    if len(values) == 0:
        raise ValueError("values_record needs at least one value")
    return {"task": task, "context": None, "seed": None, "metric": metric, "higher_is_better": higher_is_better,
            "details": [{"index": i, "score": float(v)} for i, v in enumerate(values)]}
