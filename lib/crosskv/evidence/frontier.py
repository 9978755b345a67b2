"""The quality-vs-memory frontier: tidy rows, the Pareto front, the best configuration at each budget, and
the papers' numbers on the same kept axis.

A *configuration* is one method with its parameters (a family label and a configuration label name it
on the chart); it is run on several tasks, one record per task. Its *task-mix* score is the mean of the
per-sample scores of its accuracy tasks pooled into one record (:func:`mix_record`), so
:func:`crosskv.evidence.stats.interval` and :func:`crosskv.evidence.stats.compare` apply to it unchanged (pairing is by
task and sample). The x axis is the memory the cache holds: ``kept_held`` (the memory census) when a
record has it, else ``kept`` — :func:`held_kept` says which one a row uses.

Paper numbers (:func:`crosskv.evidence.tables.paper_numbers`) are converted to kept fractions with the
conventions of the project's method notes (:func:`paper_kept`): ``multiplier`` → 1/x,
``fraction_of_layers_shared`` → 1 − f, ``fraction_of_memory_removed`` → 1 − f. :func:`orderings` checks
which pairwise orderings the papers report hold on our runs (a paired comparison, not a typed claim).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from crosskv.evidence import stats
from crosskv.methods.compose import parse_params

BUDGETS = (0.5, 0.25, 0.125, 0.05, 0.02)
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
                "metric", "higher_is_better", "kept", "kept_source", "kept_nominal", "decode_tok_s", "commit",
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
    for field in ("code_fingerprint", "fingerprint", "lib_fingerprint"):
        if record.get(field):
            return str(record[field])
    return None


def tidy(records: Iterable[dict[str, Any]], configurations: Sequence[str] | None = None,
         families: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per record (family × configuration × task) with :data:`TIDY_COLUMNS`.

    ``configurations``/``families`` label each record (defaults: :func:`family_of` and the method's
    parameters). ``kept_nominal`` is the method's own ``kept`` beside the held one on the x axis.
    """
    records = list(records)
    for name, labels in (("configurations", configurations), ("families", families)):
        if labels is not None and len(labels) != len(records):
            raise ValueError(f"{len(labels)} {name} for {len(records)} records")
    rows = []
    for i, record in enumerate(records):
        iv = stats.interval(record)
        kept, source = held_kept(record)
        rows.append({"family": families[i] if families is not None else family_of(record),
                     "configuration": configurations[i] if configurations is not None else _params_label(record),
                     "method": record["method"], "task": record["task"], "context": record.get("context"),
                     "n": iv.n, "score": iv.estimate, "score_lo": iv.lo, "score_hi": iv.hi,
                     "metric": record.get("metric"), "higher_is_better": bool(record.get("higher_is_better", True)),
                     "kept": kept, "kept_source": source, "kept_nominal": record.get("kept"),
                     "decode_tok_s": record.get("decode_tok_s"), "commit": record.get("git_commit"),
                     "dirty": record.get("git_dirty"), "fingerprint": _fingerprint(record), "key": record.get("key")})
    return pd.DataFrame(rows, columns=list(TIDY_COLUMNS))


def _params_label(record: dict[str, Any]) -> str:
    params = record.get("params", {})
    return " ".join(f"{k}={v}" for k, v in params.items() if v not in (None, "", 0) or k == "bits") or record["method"]


# ----------------------------------------------------------------------------- the task mix

def mix_record(records: Sequence[dict[str, Any]], name: str = "mix") -> dict[str, Any]:
    """Pool the per-sample scores of several accuracy-task records of one configuration into one record.

    Its score is the mean over all pooled samples (= the mean of the task means when every task has the
    same sample count); ``kept`` is the mean of the records' held kept, ``decode_tok_s`` their median.
    Sample indices are offset per task (``task position · 10⁶ + index``) so two mix records over the same
    tasks pair sample by sample in :func:`crosskv.evidence.stats.compare`.
    """
    records = sorted(records, key=lambda r: r["task"])
    if not records:
        raise ValueError("mix_record needs at least one record")
    tasks = [r["task"] for r in records]
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"mix_record got a task twice: {tasks}")
    for r in records:
        if not r.get("higher_is_better", True) or not r.get("details") or "score" not in r["details"][0]:
            raise ValueError(f"mix_record pools accuracy tasks only; {r['task']!r} is not one (perplexity "
                             "is shown on its own axis)")
    details = [{"index": t * 1_000_000 + d["index"], "score": d["score"]}
               for t, r in enumerate(records) for d in r["details"]]
    kept = [held_kept(r) for r in records]
    speeds = [r["decode_tok_s"] for r in records if r.get("decode_tok_s")]
    return {"method": records[0]["method"], "params": records[0].get("params", {}), "task": f"{name}:{'+'.join(tasks)}",
            "context": records[0].get("context"), "seed": records[0].get("seed"), "metric": "accuracy",
            "higher_is_better": True, "details": details, "score": float(np.mean([d["score"] for d in details])),
            "kept": float(np.mean([k for k, _ in kept])), "kept_source": kept[0][1],
            "decode_tok_s": float(np.median(speeds)) if speeds else None, "git_commit": records[0].get("git_commit"),
            "key": "+".join(str(r.get("key", "?"))[:12] for r in records)}


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


def best_at_budget(df: pd.DataFrame, budgets: Sequence[float] = BUDGETS, higher_is_better: bool = True) -> pd.DataFrame:
    """For each budget: the best row of each family with ``kept ≤ budget`` and the best overall.

    ``df`` has one row per configuration (columns family, configuration, kept, score, score_lo,
    score_hi, n, decode_tok_s). Ties on score go to the smaller kept. A family with no configuration
    under a budget has no row there; a budget nothing reaches has only ``overall = none`` (score NaN).
    """
    missing = {"family", "configuration", "kept", "score"} - set(df.columns)
    if missing:
        raise ValueError(f"best_at_budget needs column(s) {sorted(missing)}")
    sign = -1 if higher_is_better else 1
    rows = []
    for budget in budgets:
        under = df[df["kept"] <= budget + 1e-12].assign(_rank=lambda d: sign * d["score"])
        under = under.sort_values(["_rank", "kept"]).drop(columns="_rank")
        for family, group in under.groupby("family", sort=True):
            rows.append({"budget": budget, "scope": "family", **group.iloc[0].to_dict()})
        if under.empty:
            rows.append({"budget": budget, "scope": "overall", "family": "none", "configuration": "none",
                         "score": math.nan})
        else:
            rows.append({"budget": budget, "scope": "overall", **under.iloc[0].to_dict()})
    out = pd.DataFrame(rows)
    lead = ["budget", "scope", "family", "configuration", "score", "score_lo", "score_hi", "n", "kept", "decode_tok_s"]
    return out[[c for c in lead if c in out.columns] + [c for c in out.columns if c not in lead]]


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


def _nearest(ours: Sequence[Ours], family: str, kept: float) -> Ours | None:
    candidates = [o for o in ours if o.family == family]
    if not candidates:
        return None
    return min(candidates, key=lambda o: (abs(math.log(o.kept) - math.log(max(kept, 1e-6))), o.kept))


def orderings(reference: pd.DataFrame, ours_accuracy: Sequence[Ours], ours_perplexity: Sequence[Ours] = ()) -> pd.DataFrame:
    """Every pair of rows of one paper table (paper, table, model, benchmark) with both families run by us:
    the paper's ordering, ours at the nearest held kept (a paired :func:`crosskv.evidence.stats.compare`), agreement.

    ``reference`` comes from :func:`paper_kept`. Accuracy/score tables compare ``ours_accuracy``,
    perplexity tables ``ours_perplexity``; other metrics (memory, speed, claims) are skipped.
    ``agreement``: ``agree`` (same direction, our interval excludes zero), ``disagree`` (opposite
    direction, excluding zero) or ``undecided`` (our paired interval contains zero).
    """
    pools = {"accuracy": ours_accuracy, "score": ours_accuracy, "perplexity": ours_perplexity}
    rows = []
    table = reference.dropna(subset=["score", "family"])
    for (paper, name, model, bench), group in table.groupby(["paper", "table", "model", "benchmark"], sort=False):
        group = group.reset_index(drop=True)
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                a, b = group.iloc[i], group.iloc[j]
                pool = pools.get(a["metric"])
                if pool is None or a["score"] == b["score"]:
                    continue
                oa, ob = _nearest(pool, a["family"], a["kept"]), _nearest(pool, b["family"], b["kept"])
                if oa is None or ob is None or oa.record is ob.record:
                    continue
                higher = a["metric"] != "perplexity"
                paper_a_better = (a["score"] > b["score"]) == higher
                c = stats.compare(oa.record, ob.record, f"{a['family']} @ {oa.kept:.3g}", f"{b['family']} @ {ob.kept:.3g}")
                agreement = "undecided" if c.verdict == "tie" else (
                    "agree" if (c.verdict == "better") == paper_a_better else "disagree")
                rows.append({"paper": paper, "table": name, "model": model, "benchmark": bench,
                             "a": f"{a['method']} {a['setting'] if isinstance(a['setting'], str) else ''}".strip(),
                             "b": f"{b['method']} {b['setting'] if isinstance(b['setting'], str) else ''}".strip(),
                             "paper_kept_a": a["kept"], "paper_kept_b": b["kept"],
                             "paper_a": a["score"], "paper_b": b["score"],
                             "paper_says": "a better" if paper_a_better else "b better",
                             "ours_kept_a": oa.kept, "ours_kept_b": ob.kept,
                             "ours_diff": c.diff.estimate, "ours_diff_lo": c.diff.lo, "ours_diff_hi": c.diff.hi,
                             "n": c.diff.n, "ours_says": c.verdict, "agreement": agreement})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- configurations and the chart

@dataclass(frozen=True)
class Run:
    """One configuration on the chart: its family, its label and its records by task."""

    family: str
    configuration: str
    records: dict[str, dict[str, Any]]

    def combined(self, tasks: Sequence[str]) -> dict[str, Any]:
        """The record of one task, or the task-mix record (:func:`mix_record`) of several accuracy tasks."""
        missing = [t for t in tasks if t not in self.records]
        if missing:
            raise ValueError(f"{self.family} {self.configuration}: no record for task(s) {missing}")
        return self.records[tasks[0]] if len(tasks) == 1 else mix_record([self.records[t] for t in tasks])


def summary(runs: Sequence[Run], tasks: Sequence[str]) -> pd.DataFrame:
    """One row per run: family, configuration, held kept, score with interval and n, decode tok/s, on ``tasks``
    (their task mix when several); ``front`` marks the Pareto front."""
    rows = []
    for run in runs:
        record = run.combined(tasks)
        iv = stats.interval(record)
        rows.append({"family": run.family, "configuration": run.configuration, "kept": held_kept(record)[0],
                     "score": iv.estimate, "score_lo": iv.lo, "score_hi": iv.hi, "n": iv.n,
                     "decode_tok_s": record.get("decode_tok_s"),
                     "higher_is_better": bool(record.get("higher_is_better", True))})
    df = pd.DataFrame(rows)
    return df.assign(front=pareto(df, higher_is_better=bool(df["higher_is_better"].iloc[0])) if len(df) else [])


def plot(df: pd.DataFrame, ax, full: str = "full", ylabel: str = "score", title: str = "", legend: bool = True):
    """Score (with its interval) against held kept (log x) per family, the Pareto front as a step line and
    the ``full`` family's interval as a horizontal band. ``df`` is a :func:`summary` frame."""
    reference = df[df["family"] == full]
    for _, row in reference.iterrows():
        ax.axhspan(row["score_lo"], row["score_hi"], color="0.85", zorder=0, label=f"{full} (95 % interval)")
    markers = "osD^v<>ph*X"
    for i, (family, group) in enumerate(df[df["family"] != full].groupby("family", sort=True)):
        group = group.sort_values("kept")
        ax.errorbar(group["kept"], group["score"], yerr=[group["score"] - group["score_lo"],
                                                        group["score_hi"] - group["score"]],
                    marker=markers[i % len(markers)], ms=4, lw=1, capsize=2, label=family)
    front = df[df["front"]].sort_values("kept")
    ax.step(front["kept"], front["score"], where="post", color="k", lw=1.5, alpha=0.6, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("held kept (bytes / plain 16-bit cache, log)")
    ax.set_ylabel(ylabel)
    if not bool(df["higher_is_better"].iloc[0]):
        ax.set_yscale("log")
    ax.set_title(title)
    if legend:
        ax.legend(fontsize=6, ncol=2, loc="best")
    return ax
