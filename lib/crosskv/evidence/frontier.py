"""The quality-vs-memory frontier: tidy rows, the Pareto front, the best configuration at each budget, and
the papers' numbers on the same kept axis.

A *configuration* is one method with its parameters (a family label and a configuration label name it
on the chart); it is run on several tasks, one record per task. Its *task-mix* score is the mean of the
per-sample scores of its accuracy tasks pooled into one record (:func:`crosskv.evidence.stats.pool`), so
:func:`crosskv.evidence.stats.interval` and :func:`crosskv.evidence.stats.compare` apply to it unchanged (pairing is by
task and sample). The x axis is the memory the cache holds: ``kept_held`` (the memory census) when a
record has it, else ``kept`` — :func:`held_kept` says which one a row uses.

Paper numbers (:func:`crosskv.evidence.tables.paper_numbers`) are converted to kept fractions with the
conventions of the project's method notes (:func:`paper_kept`): ``multiplier`` → 1/x,
``fraction_of_layers_shared`` → 1 − f, ``fraction_of_memory_removed`` → 1 − f. :func:`orderings` checks
which pairwise orderings the papers report hold on our runs (a paired comparison, not a typed claim).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from crosskv.evidence import stats
from crosskv.methods.compose import parse_params

BUDGETS = (0.5, 0.25, 0.125, 0.05)
CONVENTIONS = {"multiplier": lambda c: 1.0 / c, "fraction_of_layers_shared": lambda c: 1.0 - c,
               "fraction_of_memory_removed": lambda c: 1.0 - c}
PRESS_FAMILIES = {"kvpress:snapkv": "SnapKV", "kvpress:pyramidkv": "PyramidKV",
                  "kvpress:streaming_llm": "StreamingLLM", "kvpress:knorm": "KNorm",
                  "kvpress:expected_attention": "ExpectedAttention"}
# a paper's method name → our family label (the xKV group-size ablation names G in its setting)
PAPER_FAMILIES = {"Full": "full", "KIVI-2": "KIVI 2-bit", "SnapKV": "SnapKV", "Single SVD": "Single SVD",
                  "MiniCache": "MiniCache (paper reading)", "xKV-4": "xKV G=4", "KVSharer": "KVSharer",
                  "CommonKV": "CommonKV"}
TIDY_COLUMNS = ("family", "configuration", "method", "task", "context", "n", "score", "score_lo", "score_hi",
                "metric", "higher_is_better", "kept", "kept_source", "kept_nominal", "method_bytes", "decode_tok_s", "commit",
                "dirty", "fingerprint", "key")


# ----------------------------------------------------------------------------- labels and the x axis

def family_of(record: dict[str, Any]) -> str:
    """The chart family of a record: the method, with the parameters that change what it is."""
    method, params = record["method"], record.get("params", {})
    if method in PRESS_FAMILIES:
        return PRESS_FAMILIES[method]
    if method == "xkv":
        return f"xKV G={params.get('group_size', 4)}"
    if method == "svd":
        return "Single SVD"
    if method == "selective":
        return selective_family(params)
    if method == "kvsharer_xkv":
        return f"KVSharer + xKV G={params.get('group_size', 4)}"
    if method == "minicache":
        return f"MiniCache ({params.get('retention', 'paper')} reading)"
    if method == "compose":
        parts = [p for p in (params.get("evict", "none"), params.get("base", "full")) if p not in ("none", "full")]
        bits = int(params.get("bits", 0) or 0)
        if not parts and bits:
            return f"KIVI {bits}-bit"
        return " × ".join(parts + ([f"{bits}-bit"] if bits else [])) or "full"
    return {"full": "full", "kvsharer": "KVSharer", "commonkv": "CommonKV"}.get(method, method)


def selective_family(params: dict[str, Any]) -> str:
    """``selective xKV G=4 k=256`` / ``selective Single SVD k=64``: the base's family and ``top_k`` (which,
    like the base, changes what the method is; its ranks only move it along the kept axis)."""
    base_params = parse_params(str(params.get("base_params", "")))
    base = params.get("base", "xkv")
    label = "Single SVD" if base == "svd" else f"xKV G={base_params.get('group_size', 4)}"
    return f"selective {label} k={params.get('top_k', 256)}"


def held_kept(record: dict[str, Any]) -> tuple[float, str]:
    """``(kept, source)``: the census' ``kept_held`` when the record has it, else the method's ``kept``."""
    for source in ("kept_held", "kept"):
        value = record.get(source)
        if value is not None:
            return float(value), source
    raise ValueError(f"record {record.get('key', '?')[:12]} ({record.get('method')}) has neither kept_held nor kept")


def _fingerprint(record: dict[str, Any]) -> str | None:
    """The library code fingerprint a record was computed with (the results store keeps it as ``code``)."""
    return record.get("code")


def scored(record: dict[str, Any], metric: str) -> tuple[stats.Interval, str]:
    """A record's value on ``metric`` with its interval, and the metric's name: a generation record's ``metric``
    (``score``: its own metric, e.g. exact match; ``gold_match``, ``gold_loglik``); a perplexity record's perplexity
    whatever ``metric`` says (the retrieval metrics do not exist there)."""
    if stats.is_perplexity(record) or metric == "score":
        return stats.interval(record), str(record.get("metric", "score"))
    return stats.interval(record, metric=metric), metric


def tidy(records: Iterable[dict[str, Any]], configurations: Sequence[str] | None = None,
         families: Sequence[str] | None = None, metric: str = "score") -> pd.DataFrame:
    """One row per record (family × configuration × task) with :data:`TIDY_COLUMNS`; ``score`` is the record's
    value on ``metric`` (:func:`scored`), named in the ``metric`` column.

    ``configurations``/``families`` label each record (defaults: :func:`family_of` and the method's
    parameters). ``kept_nominal`` is the method's own ``kept`` beside the held one on the x axis;
    ``method_bytes`` what the method adds to the model (weights, factors) minus what it lets a deployment drop.
    """
    records = list(records)
    for name, labels in (("configurations", configurations), ("families", families)):
        if labels is not None and len(labels) != len(records):
            raise ValueError(f"{len(labels)} {name} for {len(records)} records")
    rows = []
    for i, record in enumerate(records):
        iv, name = scored(record, metric)
        kept, source = held_kept(record)
        rows.append({"family": families[i] if families is not None else family_of(record),
                     "configuration": configurations[i] if configurations is not None else _params_label(record),
                     "method": record["method"], "task": record["task"], "context": record.get("context"),
                     "n": iv.n, "score": iv.estimate, "score_lo": iv.lo, "score_hi": iv.hi,
                     "metric": name, "higher_is_better": bool(record.get("higher_is_better", True)),
                     "kept": kept, "kept_source": source, "kept_nominal": record.get("kept"),
                     "method_bytes": record.get("method_bytes"), "decode_tok_s": record.get("decode_tok_s"), "commit": record.get("git_commit"),
                     "dirty": record.get("git_dirty"), "fingerprint": _fingerprint(record), "key": record.get("key")})
    return pd.DataFrame(rows, columns=list(TIDY_COLUMNS))


def _params_label(record: dict[str, Any]) -> str:
    params = record.get("params", {})
    return " ".join(f"{k}={v}" for k, v in params.items() if v not in (None, "", 0) or k == "bits") or record["method"]


# ----------------------------------------------------------------------------- front and budgets

def pareto(df: pd.DataFrame, x: str = "kept", y: str = "score", higher_is_better: bool = True) -> pd.Series:
    """Boolean mask of the rows no other row dominates (x no larger and y no worse, one of them strictly)."""
    if df.empty:
        return pd.Series([], dtype=bool, index=df.index)
    xs = df[x].to_numpy(float)
    ys = df[y].to_numpy(float) * (1 if higher_is_better else -1)
    mask = []
    for i in range(len(df)):
        dominated = np.any((xs <= xs[i]) & (ys >= ys[i]) & ((xs < xs[i]) | (ys > ys[i])))
        mask.append(not dominated)
    return pd.Series(mask, index=df.index)


def family_class(family: str) -> str:
    """The kind of a chart family: ``full``, ``eviction`` (the presses), ``quantization`` (KIVI alone),
    ``composition`` (eviction/quantization over another method) or ``cross-layer`` (the rest)."""
    if family == "full":
        return "full"
    if family in PRESS_FAMILIES.values():
        return "eviction"
    if family.startswith("KIVI "):
        return "quantization"
    if " × " in family:
        return "composition"
    return "cross-layer"


def sample_frame(records: Mapping[str, dict[str, Any]] | Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Long per-sample rows ``configuration, family, class, kept, index`` + every per-sample metric
    (``score``, ``gold_loglik``, ``gold_match``) of generation records, one record per configuration (a
    :func:`crosskv.evidence.stats.pool` of its task mix). ``records``: label → record, or records (labelled by
    their family and parameters)."""
    items = records.items() if isinstance(records, Mapping) else (
        (f"{family_of(r)} {_params_label(r)}", r) for r in records)
    rows = []
    for label, record in items:
        if stats.is_perplexity(record):
            raise ValueError(f"{label}: best_at_budget compares per-sample retrieval metrics, not perplexity runs")
        family, kept = family_of(record), held_kept(record)[0]
        for d in record["details"]:
            rows.append({"configuration": label, "family": family, "class": family_class(family), "kept": kept,
                         "index": d["index"], **{m: d.get(m) for m in stats.METRICS}})
    return pd.DataFrame(rows)


def _paired_on(frame: pd.DataFrame, a: str, b: str, metric: str, n_min: int) -> dict[str, Any]:
    wide = frame[frame["configuration"].isin([a, b])].pivot(index="index", columns="configuration",
                                                             values=metric).dropna()
    return stats.paired(wide[a].to_numpy(float), wide[b].to_numpy(float), n_min=n_min)


def _means(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per configuration: family, class, kept and the mean of ``metric``, best first (ties: smaller kept)."""
    out = frame.dropna(subset=[metric]).groupby("configuration", sort=True).agg(
        family=("family", "first"), cls=("class", "first"), kept=("kept", "first"), mean=(metric, "mean"))
    return out.sort_values(["mean", "kept"], ascending=[False, True])


def best_at_budget(records_or_frame, budgets: Sequence[float] = BUDGETS, metric: str = "gold_loglik",
                   n_min: int = stats.N_MIN) -> pd.DataFrame:
    """Decisions, not leaders: for each budget, who is best at held kept ≤ budget on ``metric``, and whether
    that is decided.

    ``records_or_frame``: a :func:`sample_frame` (or what it takes). Per budget, rows:

    - ``scope == "decision"``: the leader (highest mean; ties to the smaller kept) against the runner-up,
      paired over the same samples (:func:`crosskv.evidence.stats.paired`). ``winner`` names the leader only
      when the verdict is ``better`` (its interval excludes zero); ``tied`` lists every configuration not
      separated from the leader (the leader included), ``;``-joined;
    - ``scope == "class"``: the best configuration of each class (cross-layer, eviction, quantization,
      composition) under the budget against ``full``, paired.

    Columns: budget, metric, scope, class, winner, tied, leader, leader_mean, leader_kept, versus, versus_mean,
    diff, low, high, n, p, p_holm (Holm over every row of this call), verdict. A budget nothing reaches has
    one decision row with verdict ``none under budget``.
    """
    frame = records_or_frame if isinstance(records_or_frame, pd.DataFrame) else sample_frame(records_or_frame)
    missing = {"configuration", "family", "class", "kept", "index", metric} - set(frame.columns)
    if missing:
        raise ValueError(f"best_at_budget needs per-sample column(s) {sorted(missing)} (see sample_frame)")
    if metric not in stats.METRICS:
        raise ValueError(f"metric={metric!r} is not one of {', '.join(stats.METRICS)}")
    means = _means(frame, metric)
    full = means[means["cls"] == "full"]
    rows = []
    for budget in budgets:
        under = means[(means["kept"] <= budget + 1e-12) & (means["cls"] != "full")]
        base = {"budget": budget, "metric": metric}
        if under.empty:
            rows.append({**base, "scope": "decision", "verdict": "none under budget"})
            continue
        leader = under.index[0]
        head = {"leader": leader, "leader_mean": under["mean"].iloc[0], "leader_kept": under["kept"].iloc[0]}
        if len(under) == 1:
            rows.append({**base, "scope": "decision", "class": under["cls"].iloc[0], "winner": leader, "tied": leader,
                         **head, "verdict": "only candidate"})
        else:
            tests = {c: _paired_on(frame, leader, c, metric, n_min) for c in under.index[1:]}
            tied = [leader] + [c for c, t in tests.items() if t["verdict"] != "better"]
            runner = under.index[1]
            t = tests[runner]
            rows.append({**base, "scope": "decision", "class": under["cls"].iloc[0],
                         "winner": leader if t["verdict"] == "better" else "", "tied": "; ".join(tied), **head,
                         "versus": runner, "versus_mean": under["mean"].iloc[1],
                         **{k: t[k] for k in ("diff", "low", "high", "n", "p", "verdict")}})
        for cls, group in under.groupby("cls", sort=True):
            best = group.index[0]
            row = {**base, "scope": "class", "class": cls, "leader": best, "leader_mean": group["mean"].iloc[0],
                   "leader_kept": group["kept"].iloc[0]}
            if not full.empty:
                t = _paired_on(frame, best, full.index[0], metric, n_min)
                row.update(versus=full.index[0], versus_mean=full["mean"].iloc[0],
                           **{k: t[k] for k in ("diff", "low", "high", "n", "p", "verdict")})
            rows.append(row)
    out = pd.DataFrame(rows)
    columns = ["budget", "metric", "scope", "class", "winner", "tied", "leader", "leader_mean", "leader_kept",
               "versus", "versus_mean", "diff", "low", "high", "n", "p", "p_holm", "verdict"]
    out = out.reindex(columns=columns)
    tested = out["p"].notna()
    if tested.any():
        out.loc[tested, "p_holm"] = stats.holm(out.loc[tested, "p"])["p_holm"].to_numpy()
    return out


# ----------------------------------------------------------------------------- the papers

def paper_kept(reference: pd.DataFrame) -> pd.DataFrame:
    """``reference`` (paper numbers) plus ``kept`` (fraction of a plain 16-bit cache) and ``family`` (ours)."""
    unknown = sorted(set(reference["compression_convention"]) - set(CONVENTIONS))
    if unknown:
        raise ValueError(f"unknown compression convention(s) {unknown}; known: {sorted(CONVENTIONS)}")
    kept = [CONVENTIONS[conv](float(c)) for conv, c in zip(reference["compression_convention"], reference["compression"])]
    return reference.assign(kept=kept, family=[paper_family(m, s) for m, s in
                                               zip(reference["method"], reference["setting"].fillna(""))])


def paper_family(method: str, setting: str = "") -> str | None:
    """Our family for a paper's method name (``None`` when we run no counterpart)."""
    if method == "xKV" and setting.startswith("G="):
        return "Single SVD" if setting.startswith("G=1 ") else f"xKV {setting.split()[0]}"
    return PAPER_FAMILIES.get(method)


@dataclass(frozen=True)
class Ours:
    """Our run of one family at one held kept: a record to compare (a mix record or a perplexity record)."""

    family: str
    kept: float
    record: dict[str, Any]


KEPT_TOLERANCE = 0.25  # a paper point matches one of ours only within ±25 % relative kept


def match_point(ours: Sequence[Ours], family: str, kept: float, tolerance: float = KEPT_TOLERANCE) -> Ours | None:
    """Our run of ``family`` closest to the paper's ``kept`` within ``tolerance`` relative, else ``None``."""
    candidates = [o for o in ours if o.family == family and abs(o.kept - kept) <= tolerance * kept]
    return min(candidates, key=lambda o: (abs(o.kept - kept), o.kept)) if candidates else None


def _floor(a: dict[str, Any], b: dict[str, Any], metric: str) -> bool:
    """Both runs at the same floor or ceiling on every sample (all 0 or all 1): nothing to order."""
    if stats.is_perplexity(a):
        return False
    va, vb = stats.unit_values(a, metric)[1], stats.unit_values(b, metric)[1]
    return any(bool(np.all(va == edge) and np.all(vb == edge)) for edge in (0.0, 1.0))


def _label(o: Ours) -> str:
    return f"{o.family} @ {o.kept:.3g}"


def orderings(reference: pd.DataFrame, ours_accuracy: Sequence[Ours], ours_perplexity: Sequence[Ours] = (),
              metric: str = "score", tolerance: float = KEPT_TOLERANCE) -> pd.DataFrame:
    """The papers' pairwise orderings checked on our runs, **one row per distinct comparison** on our side.

    Every pair of rows of one paper table (paper, table, model, benchmark) whose families we run is matched to
    our runs within ``tolerance`` relative kept (:func:`match_point`). Paper pairs that land on the same two
    runs of ours are one comparison: ``papers`` counts them, ``paper_says`` is ``a better``, ``b better`` or
    ``mixed`` (papers disagree). ``kind``: ``full vs X`` (full against a compressed cache, counted apart) or
    ``X vs Y``. ``agreement``: ``agree``/``disagree`` (our paired interval excludes zero, same/opposite
    direction), ``undecided`` (it contains zero, or fewer than the minimum n), ``floor`` (both runs at 0 on
    every sample, or both at 1) or ``no matching point`` (one per distinct paper pair without a run of ours
    within tolerance). ``reference`` comes from :func:`paper_kept`; accuracy tables use ``ours_accuracy``
    (compared on ``metric``), perplexity tables ``ours_perplexity``; other metrics are skipped.
    """
    pools = {"accuracy": ours_accuracy, "score": ours_accuracy, "perplexity": ours_perplexity}
    found: dict[tuple, dict[str, Any]] = {}
    unmatched: dict[tuple, dict[str, Any]] = {}
    table = reference.dropna(subset=["score", "family"])
    for (paper, name, model, bench), group in table.groupby(["paper", "table", "model", "benchmark"], sort=False):
        group = group.reset_index(drop=True)
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                a, b = group.iloc[i], group.iloc[j]
                pool = pools.get(a["metric"])
                if pool is None or a["score"] == b["score"]:
                    continue
                if not any(o.family == a["family"] for o in pool) or not any(o.family == b["family"] for o in pool):
                    continue  # a family we do not run: not a comparison we could make
                higher = a["metric"] != "perplexity"
                a_better = (a["score"] > b["score"]) == higher
                oa, ob = match_point(pool, a["family"], a["kept"], tolerance), match_point(pool, b["family"], b["kept"], tolerance)
                source = f"{paper} · {model}"
                if oa is None or ob is None:
                    key = tuple(sorted([(a["family"], round(float(a["kept"]), 4)), (b["family"], round(float(b["kept"]), 4))]))
                    row = unmatched.setdefault(key, {"a": f"{key[0][0]} @ {key[0][1]:.3g} (paper)",
                                                     "b": f"{key[1][0]} @ {key[1][1]:.3g} (paper)", "papers": 0,
                                                     "sources": set(), "agreement": "no matching point"})
                    row["papers"] += 1
                    row["sources"].add(source)
                    continue
                if oa.record is ob.record:
                    continue
                if b["family"] == "full" or (a["family"] != "full" and _label(ob) < _label(oa)):
                    oa, ob, a_better = ob, oa, not a_better  # full first, else alphabetical: one orientation
                key = (_label(oa), _label(ob), a["metric"] == "perplexity")
                row = found.get(key)
                if row is None:
                    row = found[key] = {"a": _label(oa), "b": _label(ob), "oa": oa, "ob": ob, "papers": 0,
                                        "a_better": 0, "b_better": 0, "sources": set()}
                row["papers"] += 1
                row["a_better" if a_better else "b_better"] += 1
                row["sources"].add(source)
    rows = []
    for row in found.values():
        oa, ob = row.pop("oa"), row.pop("ob")
        says = "mixed" if row["a_better"] and row["b_better"] else ("a better" if row["a_better"] else "b better")
        use = metric if not stats.is_perplexity(oa.record) else "score"
        c = stats.compare(oa.record, ob.record, row["a"], row["b"], metric=use)
        if _floor(oa.record, ob.record, use):
            agreement = "floor"
        elif c.verdict in ("tie", "too few") or says == "mixed":
            agreement = "undecided"
        else:
            agreement = "agree" if (c.verdict == "better") == (says == "a better") else "disagree"
        rows.append({"kind": "full vs X" if oa.family == "full" else "X vs Y", "a": row["a"], "b": row["b"],
                     "papers": row["papers"], "sources": "; ".join(sorted(row["sources"])), "paper_says": says,
                     "ours_kept_a": oa.kept, "ours_kept_b": ob.kept, "metric": c.metric, "ours_diff": c.diff.estimate,
                     "ours_diff_lo": c.diff.lo, "ours_diff_hi": c.diff.hi, "n": c.diff.n, "p": c.p,
                     "ours_says": c.verdict, "agreement": agreement})
    for row in unmatched.values():
        rows.append({"kind": "full vs X" if row["a"].startswith("full @") or row["b"].startswith("full @") else "X vs Y",
                     "a": row["a"], "b": row["b"], "papers": row["papers"], "sources": "; ".join(sorted(row["sources"])),
                     "agreement": row["agreement"]})
    columns = ["kind", "a", "b", "papers", "sources", "paper_says", "ours_kept_a", "ours_kept_b", "metric", "ours_diff",
               "ours_diff_lo", "ours_diff_hi", "n", "p", "ours_says", "agreement"]
    return pd.DataFrame(rows, columns=columns)


AGREEMENTS = ("agree", "disagree", "undecided", "floor", "no matching point")


def orderings_tally(order: pd.DataFrame) -> pd.DataFrame:
    """Counts of :func:`orderings` rows by ``kind`` (rows) and ``agreement`` (columns), with totals."""
    counts = pd.crosstab(order["kind"], order["agreement"]).reindex(columns=list(AGREEMENTS), fill_value=0)
    counts.loc["all"] = counts.sum()
    return counts.assign(total=counts.sum(axis=1)).rename_axis(index="kind", columns=None).reset_index()


@dataclass(frozen=True)
class Run:
    """One configuration on the chart: its family, its label and its records by task."""

    family: str
    configuration: str
    records: dict[str, dict[str, Any]]

    def combined(self, tasks: Sequence[str]) -> dict[str, Any]:
        """The record of one task, or the task-mix record (:func:`crosskv.evidence.stats.pool`) of several."""
        missing = [t for t in tasks if t not in self.records]
        if missing:
            raise ValueError(f"{self.family} {self.configuration}: no record for task(s) {missing}")
        return self.records[tasks[0]] if len(tasks) == 1 else stats.pool([self.records[t] for t in tasks])


def summary(runs: Sequence[Run], tasks: Sequence[str], metric: str = "score") -> pd.DataFrame:
    """One row per run: family, configuration, held kept, the value on ``metric`` (:func:`scored`) as ``score`` with
    interval and n, method bytes, decode tok/s, on ``tasks`` (their task mix when several); ``front`` marks the
    Pareto front."""
    rows = []
    for run in runs:
        record = run.combined(tasks)
        iv, _ = scored(record, metric)
        rows.append({"family": run.family, "configuration": run.configuration, "kept": held_kept(record)[0],
                     "score": iv.estimate, "score_lo": iv.lo, "score_hi": iv.hi, "n": iv.n,
                     "method_bytes": record.get("method_bytes"), "decode_tok_s": record.get("decode_tok_s"),
                     "higher_is_better": bool(record.get("higher_is_better", True))})
    df = pd.DataFrame(rows)
    return df.assign(front=pareto(df, higher_is_better=bool(df["higher_is_better"].iloc[0])) if len(df) else [])
