"""Uncertainty over independent units: BCa intervals, paired permutation tests, Holm correction, detectable effects.

A run's record (:func:`crosskv.evaluate`) keeps per-sample ``details``. The unit of every interval and test
is an *independent* sample (a prompt of a retrieval task, a perplexity window or sequence) — never a layer,
group, head, rank or token of one sequence: aggregate those per sequence first (:func:`per_sequence`).
Generation runs carry three per-sample metrics: ``score`` (exact match by generation, on the decoded subset),
``gold_loglik`` and ``gold_match`` (the gold answer teacher-forced through the compressed cache); perplexity
runs keep each window's summed NLL and token count (score ``exp(Σ nll / Σ tokens)``).

- :func:`interval` / :func:`mean_ci` / :func:`perplexity_ci` — a score with its BCa bootstrap interval
  (``scipy.stats.bootstrap(method="BCa")``);
- :func:`paired` — the paired difference of per-unit values with its BCa interval, a two-sided paired
  permutation (sign-flip) p-value (``scipy.stats.permutation_test``) and a verdict;
- :func:`compare` — the same on two records (same task, context, seed and sample indices);
- :func:`holm` — Holm's correction of a family of p-values (``statsmodels``);
- :func:`min_detectable_effect` — the smallest paired mean difference a two-sided test at ``n`` detects
  with 80 % power (``statsmodels`` t-test power);
- :func:`pool` — one record over several records' samples (a method's task mix), the only pooling;
- :func:`halves` — a fixed split of the samples into halves A and B, stratified per pooled task (select on
  one half, confirm on the other).

**Nothing is called below** :data:`N_MIN` paired units: with fewer, a sign-flip test has too few sign
patterns and a BCa interval's coverage is unreliable, so the verdict is ``"too few"``. Above it a verdict is
``"better"``/``"worse"`` only when the 95 % interval excludes zero, else ``"tie"``. Resampling is seeded
(``seed``), so a re-run on the same records prints the same numbers.
"""
from __future__ import annotations

import logging
import math
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

log = logging.getLogger(__name__)

LEVEL = 0.95
RESAMPLES = 4999   # bootstrap resamples (BCa)
PERMUTATIONS = 4999  # random sign flips when 2**n exceeds it (else the exact test)
N_MIN = 20         # paired units below which no comparison is called
METRICS = ("score", "gold_loglik", "gold_match")
POOL_STRIDE = 1_000_000  # pooled index = position of the (task, context) · stride + sample index


@dataclass(frozen=True)
class Interval:
    """A point estimate with its interval over ``n`` independent units (``method``: ``BCa``, ``percentile``
    when BCa is undefined on the data, or ``point`` when every resample is the same)."""

    estimate: float
    lo: float
    hi: float
    n: int
    level: float = LEVEL
    method: str = "BCa"

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


def bootstrap_interval(data: tuple[np.ndarray, ...], statistic: Callable[..., np.ndarray], level: float = LEVEL,
                       resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """``statistic(*data, axis=-1)`` on paired arrays (one entry per independent unit) with its BCa interval.

    Data on which BCa is undefined (a constant statistic over resamples) give the point itself
    (``method="point"``); data where BCa's acceleration is undefined fall back to the percentile interval,
    logged and named in ``method``."""
    _check_level(level, resamples)
    data = tuple(np.asarray(x, dtype=float) for x in data)
    n = data[0].size
    if n == 0 or any(x.size != n for x in data):
        raise ValueError(f"bootstrap needs non-empty arrays of one length, got {[x.size for x in data]}")
    estimate = float(statistic(*data, axis=-1))
    if n == 1 or all(np.ptp(x) == 0 for x in data):
        return Interval(estimate, estimate, estimate, n, level, "point")
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sps.DegenerateDataWarning)
            warnings.simplefilter("ignore", RuntimeWarning)  # BCa's acceleration on near-constant data
            res = sps.bootstrap(data, statistic, paired=True, vectorized=True, confidence_level=level,
                                n_resamples=resamples, method=method, random_state=np.random.default_rng(seed))
        lo, hi = (float(v) for v in res.confidence_interval)
        if math.isfinite(lo) and math.isfinite(hi):
            if method != "BCa":
                log.warning("BCa undefined on these %d units; percentile interval used", n)
            return Interval(estimate, lo, hi, n, level, method)
    return Interval(estimate, estimate, estimate, n, level, "point")


def _mean(x, axis=-1):
    return np.mean(x, axis=axis)


def _ppl(nll, tokens, axis=-1):
    return np.exp(np.sum(nll, axis=axis) / np.sum(tokens, axis=axis))


def mean_ci(values: Sequence[float], level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """Mean of ``values`` (one per independent unit) with its BCa interval."""
    if len(values) == 0:
        raise ValueError("mean_ci needs at least one value")
    return bootstrap_interval((np.asarray(values, float),), _mean, level, resamples, seed)


def perplexity_ci(nll: Sequence[float], tokens: Sequence[int], level: float = LEVEL, resamples: int = RESAMPLES,
                  seed: int = 0) -> Interval:
    """``exp(Σ nll / Σ tokens)`` over windows with a BCa interval resampling whole windows."""
    if len(nll) == 0 or len(nll) != len(tokens):
        raise ValueError(f"perplexity_ci needs matching non-empty nll ({len(nll)}) and tokens ({len(tokens)})")
    return bootstrap_interval((np.asarray(nll, float), np.asarray(tokens, float)), _ppl, level, resamples, seed)


def permutation_p(a: Sequence[float], b: Sequence[float], resamples: int = PERMUTATIONS, seed: int = 0) -> float:
    """Two-sided paired permutation p-value of ``mean(a − b)``: the pair labels are swapped (signs of the
    differences flipped) at random, exactly when ``2**n`` is at most ``resamples``."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if np.all(a == b):
        return 1.0
    res = sps.permutation_test((a, b), lambda x, y, axis=-1: np.mean(x - y, axis=axis), permutation_type="samples",
                               vectorized=True, n_resamples=resamples, alternative="two-sided",
                               random_state=np.random.default_rng(seed))
    return float(res.pvalue)


def verdict(diff: Interval, higher_is_better: bool = True, n_min: int = N_MIN) -> str:
    """``"too few"`` below ``n_min`` units; else ``"better"``/``"worse"`` (a relative to b) when the interval
    excludes zero, ``"tie"`` when it contains it."""
    if diff.n < n_min:
        return "too few"
    if not diff.excludes(0.0):
        return "tie"
    return "better" if (diff.estimate > 0) == higher_is_better else "worse"


def paired_perplexity(nll_a: Sequence[float], tokens_a: Sequence[float], nll_b: Sequence[float],
                      tokens_b: Sequence[float], n_min: int = N_MIN, level: float = LEVEL, resamples: int = RESAMPLES,
                      seed: int = 0, permutations: int = PERMUTATIONS) -> dict[str, Any]:
    """Paired comparison of two runs' perplexity over the same windows (window ``i`` is the same text in both)
    → ``dict(diff, low, high, n, p, verdict)`` as :func:`paired`: ``diff`` is ``ppl(a) − ppl(b)`` with its BCa
    interval (whole windows resampled jointly), ``p`` the paired permutation p-value of the per-window mean NLL
    per token (``permutations`` random sign flips), lower is better."""
    arrays = [np.asarray(x, float) for x in (nll_a, tokens_a, nll_b, tokens_b)]
    if len({x.shape for x in arrays}) != 1 or arrays[0].ndim != 1 or arrays[0].size == 0:
        raise ValueError(f"paired_perplexity needs four non-empty 1-d arrays of one length, got {[x.shape for x in arrays]}")
    if (arrays[1] <= 0).any() or (arrays[3] <= 0).any():
        raise ValueError("paired_perplexity: every window needs a positive token count")
    if arrays[0].size < 2:
        return untestable(float(_ppl(arrays[0], arrays[1]) - _ppl(arrays[2], arrays[3])), arrays[0].size)
    diff, p = _perplexity_diff(*arrays, level=level, resamples=resamples, seed=seed, permutations=permutations)
    return {"diff": diff.estimate, "low": diff.lo, "high": diff.hi, "n": diff.n, "p": p,
            "verdict": verdict(diff, False, n_min)}


def _perplexity_diff(na, ta, nb, tb, level: float, resamples: int, seed: int,
                     permutations: int = PERMUTATIONS) -> tuple[Interval, float]:
    """(``ppl(a) − ppl(b)`` with its BCa interval over windows, permutation p of the per-window NLL per token)."""
    def stat(x, y, u, v, axis=-1):
        return _ppl(x, y, axis) - _ppl(u, v, axis)
    diff = bootstrap_interval((na, ta, nb, tb), stat, level, resamples, seed)
    return diff, permutation_p(na / ta, nb / tb, permutations, seed=seed)


def halves(index: Sequence[int], stride: int = POOL_STRIDE) -> np.ndarray:
    """``True`` where a sample falls in half A, ``False`` in half B: a fixed split for selecting on one half and
    confirming on the other. Stratified per task (a :func:`pool` index carries its task as ``index // stride``):
    within each task the distinct samples are ordered by a CRC-32 of their index and the first ``⌈m/2⌉`` are A,
    so every configuration's sample ``i`` lands in the same half, re-runs give the same split, and the halves do
    not follow the order the samples were generated in. ``index``: ``(N,)`` sample indices (repeats allowed)."""
    idx = np.asarray(index, dtype=np.int64)
    if idx.ndim != 1:
        raise ValueError(f"halves needs a 1-d index, got shape {idx.shape}")
    first: list[int] = []
    unique = np.unique(idx)
    for task in np.unique(unique // stride):
        members = sorted(unique[unique // stride == task].tolist(), key=lambda i: (zlib.crc32(str(i).encode()), i))
        first += members[: (len(members) + 1) // 2]
    return np.isin(idx, first)


def untestable(diff: float, n: int) -> dict[str, Any]:
    """A paired comparison on a single unit: its difference, no interval, no p, never called."""
    return {"diff": diff, "low": math.nan, "high": math.nan, "n": int(n), "p": math.nan, "verdict": "too few"}


def paired(a: Sequence[float], b: Sequence[float], higher_is_better: bool = True, n_min: int = N_MIN,
           level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0,
           permutations: int = PERMUTATIONS) -> dict[str, Any]:
    """Paired comparison of per-unit values ``a`` and ``b`` (unit ``i`` is the same sample or sequence in both)
    → ``dict(diff, low, high, n, p, verdict)``: the mean difference ``a − b`` with its BCa interval, the paired
    permutation p-value (``permutations`` random sign flips: the smallest p it can give is about
    ``2 / (permutations + 1)``, which bounds a Holm-adjusted family) and the :func:`verdict` (``n_min``: the minimum
    n for calling anything)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired needs two non-empty 1-d arrays of one length, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired got non-finite values")
    if n_min < 2:
        raise ValueError(f"n_min={n_min} must be at least 2")
    if a.size < 2:
        return untestable(float((a - b).mean()), a.size)
    diff = bootstrap_interval((a - b,), _mean, level, resamples, seed)
    return {"diff": diff.estimate, "low": diff.lo, "high": diff.hi, "n": diff.n,
            "p": permutation_p(a, b, permutations, seed=seed), "verdict": verdict(diff, higher_is_better, n_min)}


def holm(pvalues: Sequence[float] | pd.Series, alpha: float = 1 - LEVEL) -> pd.DataFrame:
    """Holm's step-down correction of a family of p-values (``statsmodels.stats.multitest.multipletests``)
    → frame (index kept from a Series) with ``p``, ``p_holm`` and ``reject`` (at ``alpha``)."""
    from statsmodels.stats.multitest import multipletests

    p = pd.Series(pvalues, dtype=float)
    if p.empty:
        return pd.DataFrame({"p": [], "p_holm": [], "reject": []})
    if p.isna().any() or ((p < 0) | (p > 1)).any():
        raise ValueError(f"holm needs p-values in [0, 1], got {list(p)}")
    reject, adjusted, _, _ = multipletests(p.to_numpy(), alpha=alpha, method="holm")
    return pd.DataFrame({"p": p, "p_holm": adjusted, "reject": reject}, index=p.index)


def min_detectable_effect(values_or_sd: Sequence[float] | float, n: int, level: float = LEVEL,
                          power: float = 0.8) -> float:
    """Smallest true mean paired difference a two-sided paired t-test at ``n`` units detects with ``power``:
    ``d·sd`` with ``d`` from ``statsmodels``' ``TTestPower``. ``values_or_sd``: per-unit paired differences
    (their sd, ddof 1) or the sd itself."""
    from statsmodels.stats.power import TTestPower

    if n < 2:
        raise ValueError(f"n={n} must be at least 2")
    if not 0 < power < 1:
        raise ValueError(f"power={power} must be in (0, 1)")
    _check_level(level, RESAMPLES)
    if np.ndim(values_or_sd) == 0:
        sd = float(values_or_sd)
    else:
        values = np.asarray(values_or_sd, float)
        if values.size < 2:
            raise ValueError("min_detectable_effect needs at least two values to estimate their sd")
        sd = float(values.std(ddof=1))
    if not (math.isfinite(sd) and sd >= 0):
        raise ValueError(f"sd={sd} must be a finite number >= 0")
    d = TTestPower().solve_power(effect_size=None, nobs=n, alpha=1 - level, power=power, alternative="two-sided")
    return float(d) * sd


def per_sequence(frame: pd.DataFrame, value: str, unit: str = "sequence", by: Sequence[str] = ()) -> pd.DataFrame:
    """One row per (``by``…, ``unit``) with the mean of ``value`` over that unit's rows (layers, groups, ranks,
    tokens of one sequence): the independent units to resample."""
    missing = {value, unit, *by} - set(frame.columns)
    if missing:
        raise ValueError(f"per_sequence: frame lacks column(s) {sorted(missing)}")
    return frame.groupby([*by, unit], sort=True)[value].mean().reset_index()


# ----------------------------------------------------------------------------- records

def is_perplexity(record: dict[str, Any]) -> bool:
    """True for a perplexity run (per-window ``nll`` details), False for a scored generation run."""
    details = record.get("details") or []
    return bool(details) and "nll" in details[0]


def _details(record: dict[str, Any]) -> list[dict[str, Any]]:
    details = record.get("details")
    if not details:
        raise ValueError(f"record {str(record.get('key', '?'))[:12]} ({record.get('method')} on {record.get('task')}) "
                         "has no per-sample details; intervals need them")
    return sorted(details, key=lambda d: d["index"])


def _check_metric(record: dict[str, Any], metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is not one of {', '.join(METRICS)}")
    if is_perplexity(record) and metric != "score":
        raise ValueError(f"{record.get('task')} is a perplexity run: it has no {metric!r}")


def unit_values(record: dict[str, Any], metric: str = "score") -> tuple[list[int], np.ndarray]:
    """(sample indices, values) of a generation record's ``metric``, samples without it (not decoded) left out."""
    _check_metric(record, metric)
    rows = [(d["index"], d.get(metric)) for d in _details(record)]
    rows = [(i, v) for i, v in rows if v is not None]
    if not rows:
        raise ValueError(f"record {str(record.get('key', '?'))[:12]} ({record.get('method')} on {record.get('task')}) "
                         f"has no {metric!r} values")
    return [i for i, _ in rows], np.array([v for _, v in rows], float)


def interval(record: dict[str, Any], level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0,
             metric: str = "score") -> Interval:
    """The run's ``metric`` with its BCa interval over samples (sample mean, or window perplexity)."""
    _check_metric(record, metric)
    if is_perplexity(record):
        details = _details(record)
        return perplexity_ci([d["nll"] for d in details], [d["scored_tokens"] for d in details], level, resamples, seed)
    return mean_ci(unit_values(record, metric)[1], level, resamples, seed)


def _paired_units(a: dict[str, Any], b: dict[str, Any]) -> None:
    for field in ("task", "context", "seed"):
        if a.get(field) != b.get(field):
            raise ValueError(f"cannot pair runs with different {field}: {a.get(field)!r} vs {b.get(field)!r}")


def paired_diff(a: dict[str, Any], b: dict[str, Any], level: float = LEVEL, resamples: int = RESAMPLES,
                seed: int = 0, metric: str = "score") -> tuple[Interval, float]:
    """(``metric`` of run ``a`` minus run ``b`` on the same samples with its BCa interval, permutation p).

    Perplexity runs: the interval is on the perplexity difference (windows resampled jointly); the p-value
    tests the per-window mean NLL per token."""
    _paired_units(a, b)
    if is_perplexity(a) != is_perplexity(b):
        raise ValueError("cannot pair a perplexity run with a generation run")
    if is_perplexity(a):
        da, db = _details(a), _details(b)
        if [d["index"] for d in da] != [d["index"] for d in db]:
            raise ValueError(f"cannot pair runs on different samples: {len(da)} vs {len(db)} windows")
        na, ta = np.array([d["nll"] for d in da], float), np.array([d["scored_tokens"] for d in da], float)
        nb, tb = np.array([d["nll"] for d in db], float), np.array([d["scored_tokens"] for d in db], float)
        return _perplexity_diff(na, ta, nb, tb, level, resamples, seed)
    ia, va = unit_values(a, metric)
    ib, vb = unit_values(b, metric)
    if ia != ib:
        raise ValueError(f"cannot pair runs on different samples: indices {ia[:5]}… vs {ib[:5]}…")
    return bootstrap_interval((va - vb,), _mean, level, resamples, seed), permutation_p(va, vb, seed=seed)


@dataclass(frozen=True)
class Comparison:
    """Run ``a`` against run ``b`` on the same samples. ``verdict``: ``"better"``, ``"worse"``, ``"tie"``
    (the paired interval contains zero) or ``"too few"`` (fewer than ``n_min`` paired units)."""

    a: str
    b: str
    score_a: Interval
    score_b: Interval
    diff: Interval
    higher_is_better: bool
    metric: str
    p: float = math.nan
    n_min: int = N_MIN

    @property
    def verdict(self) -> str:
        return verdict(self.diff, self.higher_is_better, self.n_min)

    @property
    def sentence(self) -> str:
        """One sentence stating the verdict with both scores, the paired difference and the sample count."""
        scores = f"{self.a} {self.score_a} vs {self.b} {self.score_b} {self.metric}"
        diff = (f"paired difference {self.diff.format(signed=True)}, p = {self.p:.2g}, n = {self.diff.n}, "
                f"95 % {self.diff.method} bootstrap")
        if self.verdict == "too few":
            return f"Not called: {self.a} vs {self.b} rests on n = {self.diff.n} < {self.n_min} ({scores}; {diff})."
        if self.verdict == "tie":
            return f"No detectable difference between {self.a} and {self.b} ({scores}; {diff})."
        return f"{self.a} is {self.verdict} than {self.b} ({scores}; {diff})."


def compare(a: dict[str, Any], b: dict[str, Any], label_a: str | None = None, label_b: str | None = None,
            level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0, metric: str = "score",
            n_min: int = N_MIN) -> Comparison:
    """Paired comparison of two runs' records (same task, context, seed and samples) on ``metric``."""
    diff, p = paired_diff(a, b, level, resamples, seed, metric)
    higher = True if metric in ("gold_loglik", "gold_match") else bool(a.get("higher_is_better", True))
    name = str(a.get("metric", "score")) if metric == "score" else metric
    return Comparison(label_a or a.get("method", "a"), label_b or b.get("method", "b"),
                      interval(a, level, resamples, seed, metric), interval(b, level, resamples, seed, metric),
                      diff, higher, name, p, n_min)


def pool(records: Sequence[dict[str, Any]], name: str = "mix") -> dict[str, Any]:
    """One record over every sample of ``records`` (one configuration's runs over a task mix): the only pooling.

    Records are ordered by (task, context) — each pair at most once — and sample ``i`` of the ``k``-th gets
    index ``k·10⁶ + i``, so two pools over the same (task, context) list pair sample by sample in
    :func:`compare` whatever order they were given in. Every per-sample field is kept (``score``,
    ``gold_loglik``, ``gold_match``, ``nll``…); the pooled score is the mean over samples (perplexity:
    ``exp(Σ nll / Σ tokens)``); ``kept_held``/``kept`` are sample-weighted means, ``decode_tok_s`` the median.
    Perplexity and generation runs cannot mix.
    """
    records = sorted(records, key=lambda r: (str(r.get("task")), r.get("context") or 0))
    if not records:
        raise ValueError("pool needs at least one record")
    if len({is_perplexity(r) for r in records}) > 1:
        raise ValueError("pool cannot mix perplexity and generation runs")
    parts = [(r.get("task"), r.get("context")) for r in records]
    if len(set(parts)) != len(parts):
        raise ValueError(f"pool got a (task, context) twice: {parts}")
    details = [{**d, "index": k * POOL_STRIDE + d["index"]} for k, r in enumerate(records) for d in _details(r)]
    first = records[0]
    contexts = {r.get("context") for r in records}
    out = {"method": first.get("method"), "params": first.get("params", {}),
           "task": f"{name}:" + "+".join(f"{t}@{c}" for t, c in parts), "context": contexts.pop() if len(contexts) == 1 else None,
           "seed": first.get("seed"), "metric": first.get("metric", "score"),
           "higher_is_better": first.get("higher_is_better", True), "details": details,
           "git_commit": first.get("git_commit"), "code": first.get("code"), "method_bytes": first.get("method_bytes"),
           "key": "+".join(str(r.get("key", "?"))[:12] for r in records)}
    if is_perplexity(first):
        out["score"] = _ppl(np.array([d["nll"] for d in details]), np.array([d["scored_tokens"] for d in details]))
    else:
        scores = [d["score"] for d in details if d.get("score") is not None]
        out["score"] = float(np.mean(scores)) if scores else None
        for metric in ("gold_loglik", "gold_match"):
            values = [d[metric] for d in details if d.get(metric) is not None]
            out[metric] = float(np.mean(values)) if values else None
    weights = [len(r["details"]) for r in records]
    for field in ("kept_held", "kept"):
        values = [r.get(field) for r in records]
        if all(v is not None for v in values):
            out[field] = sum(v * w for v, w in zip(values, weights)) / sum(weights)
    speeds = [r["decode_tok_s"] for r in records if r.get("decode_tok_s")]
    out["decode_tok_s"] = float(np.median(speeds)) if speeds else None
    return out


def table(records: Iterable[dict[str, Any]], columns: Sequence[str] = ("method", "task", "context", "kept"),
          labels: Sequence[str] | None = None, level: float = LEVEL, seed: int = 0,
          metric: str = "score") -> pd.DataFrame:
    """Tidy rows: ``columns`` of each record (``param.<name>`` reads a method parameter), an optional
    ``label``, then ``score``, ``score_lo``, ``score_hi`` and ``n`` (samples) of ``metric``."""
    rows = []
    records = list(records)
    for i, record in enumerate(records):
        row = {}
        if labels is not None:
            row["label"] = labels[i]
        for column in columns:
            row[column] = record.get("params", {}).get(column[6:]) if column.startswith("param.") else record.get(column)
        iv = interval(record, level, seed=seed, metric=metric)
        row.update(score=iv.estimate, score_lo=iv.lo, score_hi=iv.hi, n=iv.n)
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- equal memory

MATCH_TOLERANCE = 0.10  # equal memory: held kept within 10 % relative


def matched(kept_a: float, kept_b: float, tolerance: float = MATCH_TOLERANCE) -> bool:
    """Whether two held kept fractions are within ``tolerance`` of each other, relative to the larger."""
    if kept_a <= 0 or kept_b <= 0:
        raise ValueError(f"kept must be positive, got {kept_a} and {kept_b}")
    return abs(kept_a - kept_b) <= tolerance * max(kept_a, kept_b)
