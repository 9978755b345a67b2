"""The quality-vs-memory frontier: tidy rows, the Pareto front, the decision at each budget for each use, and
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
which pairwise orderings the papers report hold on our runs (a paired comparison at equal memory, not a typed
claim).

Two *uses* (:data:`USES`) are decided apart: ``retrieve`` (a fact from far back: gold-answer log-likelihood on
the retrieval mix, greedy reproduction beside it) and ``continue`` (the recent text: continuation perplexity,
paired per window). The mix pools only tasks where the full cache is informative (:func:`pool_status`: its
gold_match within :data:`POOL_BAND`; the rest are floor or ceiling, reported apart). :func:`best_at_budget`
selects each budget's leader on one half of the samples and confirms it on the other against every rival,
Holm over the distinct pairs of the use.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from crosskv.evidence import stats, tables
from crosskv.methods.compose import parse_params
from crosskv.methods.peers import PRESSES

BUDGETS = (0.5, 0.25, 0.125, 0.05)
CONVENTIONS = {"multiplier": lambda c: 1.0 / c, "fraction_of_layers_shared": lambda c: 1.0 - c,
               "fraction_of_memory_removed": lambda c: 1.0 - c}
PRESS_FAMILIES = {press.method: press.label for press in PRESSES.values()}  # method → chart family
# a paper's method name → our family label (the xKV group-size ablation names G in its setting)
PAPER_FAMILIES = {"Full": "full", "KIVI-2": "KIVI 2-bit", "SnapKV": "SnapKV", "Single SVD": "Single SVD",
                  "MiniCache": "MiniCache (paper reading)", "xKV-4": "xKV G=4", "KVSharer": "KVSharer",
                  "CommonKV": "CommonKV (Fisher ranks, sensitivity weights)"}
TIDY_COLUMNS = ("family", "configuration", "method", "task", "context", "pooled", "n", "score", "score_lo", "score_hi",
                "metric", "metric_label", "higher_is_better", "kept", "kept_source", "kept_nominal", "method_bytes", "decode_tok_s", "commit",
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
        return composition_label(params, ratios=False)
    if method == "commonkv":
        return commonkv_family(params)
    return {"full": "full", "kvsharer": "KVSharer"}.get(method, method)


def composition_label(params: Mapping[str, Any], ratios: bool = True) -> str:
    """A composition named as the method it is, its stages in the order they run (evict → base → quantize):
    ``"xKV G=4 → KIVI 4-bit"``, ``"SnapKV 0.75 → KIVI 2-bit"``. ``params``: the ``compose`` method's
    parameters; ``ratios`` names the eviction ratio (a configuration's label; without it, its family's).
    Quantization alone reads ``"KIVI 4-bit"``, no stage at all ``"full"``."""
    evict, base = str(params.get("evict", "none")), str(params.get("base", "full"))
    bits = int(params.get("bits", 0) or 0)
    stages = []
    if evict != "none":
        press = PRESS_FAMILIES.get(f"kvpress:{evict}", evict)
        stages.append(f"{press} {float(params.get('evict_ratio', 0) or 0):g}" if ratios else press)
    if base != "full":
        stages.append(family_of({"method": base, "params": parse_params(str(params.get("base_params") or ""))}))
    if bits:
        stages.append(f"KIVI {bits}-bit")
    return " → ".join(stages) or "full"


def commonkv_family(params: Mapping[str, Any]) -> str:
    """``"CommonKV (Fisher ranks, sensitivity weights)"`` (the paper's configuration) or e.g. ``"CommonKV (uniform
    ranks, uniform weights)"``: how ranks are allocated and how merged layers are weighted change what CommonKV is,
    so both are in its name (a parameter the record lacks takes the method's default)."""
    defaults = _defaults("commonkv")
    ranks, weights = (str(params.get(k, defaults[k])) for k in ("ranks", "weights"))
    return f"CommonKV ({'Fisher' if ranks == 'fisher' else ranks} ranks, {weights} weights)"


@functools.lru_cache(maxsize=None)
def _defaults(method: str) -> dict[str, Any]:
    from crosskv.methods import make_method

    return make_method(method).params()


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
         families: Sequence[str] | None = None, metric: str = "score",
         pooled: Mapping[str, bool] | None = None) -> pd.DataFrame:
    """One row per record (family × configuration × task) with :data:`TIDY_COLUMNS`; ``score`` is the record's
    value on ``metric`` (:func:`scored`), named in the ``metric`` column and, with its context, in ``metric_label``
    (``gold_match@2K``, ``ppl_cont@512``: :func:`crosskv.evidence.tables.metric_label`). ``pooled``: task → whether
    the task is pooled into the retrieval mix (:func:`pool_status`); tasks it does not name (perplexity) get none.

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
                     "pooled": (pooled or {}).get(record["task"]),
                     "n": iv.n, "score": iv.estimate, "score_lo": iv.lo, "score_hi": iv.hi, "metric": name,
                     "metric_label": tables.metric_label(record["task"] if stats.is_perplexity(record) else name,
                                                         record.get("context")),
                     "higher_is_better": bool(record.get("higher_is_better", True)),
                     "kept": kept, "kept_source": source, "kept_nominal": record.get("kept"),
                     "method_bytes": record.get("method_bytes"), "decode_tok_s": record.get("decode_tok_s"), "commit": record.get("git_commit"),
                     "dirty": record.get("git_dirty"), "fingerprint": _fingerprint(record), "key": record.get("key")})
    return pd.DataFrame(rows, columns=list(TIDY_COLUMNS))


def _params_label(record: dict[str, Any]) -> str:
    params = record.get("params", {})
    return " ".join(f"{k}={v}" for k, v in params.items() if v not in (None, "", 0) or k == "bits") or record["method"]


# ----------------------------------------------------------------------------- the retrieval mix

POOL_BAND = (0.25, 0.9)  # full's gold_match on a task must lie here for the task to join the pooled mix


def pool_label(full_gold_match: float, band: tuple[float, float] = POOL_BAND) -> str:
    """``"floor"`` (the full cache's gold_match below ``band``), ``"ceiling"`` (above) or ``"pooled"``: a task where
    the full cache sits at 0 or 1 cannot show a compressed cache losing or keeping anything, so it is reported
    apart, never pooled."""
    lo, hi = band
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"band={band} must satisfy 0 <= lo < hi <= 1")
    return "floor" if full_gold_match < lo else "ceiling" if full_gold_match > hi else "pooled"


def pool_status(full_records: Mapping[str, dict[str, Any]], band: tuple[float, float] = POOL_BAND) -> pd.DataFrame:
    """Per retrieval task (``full_records``: task → the full cache's record), the full cache's gold_match with its
    interval and n, ``status`` (:func:`pool_label`) and ``pooled`` (True only in the band). Its ``pooled`` column,
    as a task → bool mapping, is what :func:`tidy` takes."""
    rows = []
    for task, record in full_records.items():
        iv = stats.interval(record, metric="gold_match")
        status = pool_label(iv.estimate, band)
        rows.append({"task": task, "context": record.get("context"), "full_gold_match": iv.estimate,
                     "full_gold_match_lo": iv.lo, "full_gold_match_hi": iv.hi, "n": iv.n, "status": status,
                     "pooled": status == "pooled"})
    return pd.DataFrame(rows, columns=["task", "context", "full_gold_match", "full_gold_match_lo", "full_gold_match_hi",
                                       "n", "status", "pooled"])


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
    if " → " in family or " × " in family:
        return "composition"
    return "cross-layer"


def sample_frame(records: Mapping[str, dict[str, Any]] | Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Long per-unit rows ``configuration, family, class, kept, context, index`` + the per-unit values: every
    per-sample metric (``score``, ``gold_loglik``, ``gold_match``) of generation records, or each window's ``nll``
    and ``scored_tokens`` of perplexity records; one record per configuration (a
    :func:`crosskv.evidence.stats.pool` of its task mix). ``records``: label → record, or records (labelled by
    their family and parameters)."""
    items = list(records.items() if isinstance(records, Mapping) else (
        (f"{family_of(r)} {_params_label(r)}", r) for r in records))
    kinds = {stats.is_perplexity(r) for _, r in items}
    if len(kinds) > 1:
        raise ValueError("sample_frame got perplexity and generation records together; one use's records at a time")
    fields = ("nll", "scored_tokens") if kinds == {True} else stats.METRICS
    rows = []
    for label, record in items:
        family, kept = family_of(record), held_kept(record)[0]
        for d in record["details"]:
            rows.append({"configuration": label, "family": family, "class": family_class(family), "kept": kept,
                         "context": record.get("context"), "index": d["index"], **{m: d.get(m) for m in fields}})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- uses and decisions

ALPHA = 0.05  # a winner needs every Holm-adjusted p below it
PERMUTATIONS = 19_999  # sign flips per decision test: the smallest p (≈ 1e-4) keeps a family of a few hundred pairs decidable


@dataclass(frozen=True)
class Use:
    """What a cache is for, and the metric that decides it. ``metric``: a per-sample column of a generation
    :func:`sample_frame` (its mean is the estimate) or ``ppl_cont`` (window perplexity ``exp(Σ nll / Σ tokens)``
    of a perplexity frame, paired per window's NLL); ``reported``: per-sample metrics shown beside it."""

    name: str
    metric: str
    higher_is_better: bool
    data: str
    reported: tuple[str, ...] = ()

    @property
    def perplexity(self) -> bool:
        return self.metric not in stats.METRICS

    @property
    def values(self) -> tuple[str, ...]:
        """The frame columns the primary metric is computed from."""
        return ("nll", "scored_tokens") if self.perplexity else (self.metric,)

    @property
    def columns(self) -> tuple[str, ...]:
        """Every frame column the decision reads."""
        return (*self.values, *self.reported)

    def estimate(self, rows: pd.DataFrame) -> float:
        """The metric over ``rows`` (one configuration's units)."""
        if self.perplexity:
            return float(np.exp(rows["nll"].sum() / rows["scored_tokens"].sum()))
        return float(rows[self.metric].mean())

    def confirm(self, a: pd.DataFrame, b: pd.DataFrame, n_min: int = stats.N_MIN) -> dict[str, Any]:
        """``a`` against ``b`` on their common units, paired (:func:`crosskv.evidence.stats.paired` or
        :func:`crosskv.evidence.stats.paired_perplexity`): ``dict(diff, low, high, n, p, verdict)``, ``diff`` = a − b."""
        both = a.set_index("index")[list(self.values)].join(b.set_index("index")[list(self.values)], how="inner",
                                                            lsuffix="_a", rsuffix="_b").dropna()
        if a.empty or b.empty:  # the split left this half without units (one sample per task): nothing to test
            return stats.untestable(float("nan"), 0)
        if both.empty:
            raise ValueError(f"use {self.name!r}: the two configurations share no unit to pair")
        if self.perplexity:
            return stats.paired_perplexity(both["nll_a"], both["scored_tokens_a"], both["nll_b"],
                                           both["scored_tokens_b"], n_min=n_min, permutations=PERMUTATIONS)
        return stats.paired(both[f"{self.metric}_a"], both[f"{self.metric}_b"], self.higher_is_better, n_min=n_min,
                            permutations=PERMUTATIONS)


USES = {
    "retrieve": Use("retrieve", "gold_loglik", True, "a fact from far back: the pooled retrieval mix",
                    reported=("gold_match",)),
    "continue": Use("continue", "ppl_cont", False, "the recent text: ppl_cont windows after a compressed prefix"),
}


def use_of(use: str | Use) -> Use:
    """A :class:`Use` or the name of one of :data:`USES`."""
    if isinstance(use, Use):
        return use
    if use not in USES:
        raise ValueError(f"use={use!r} is not one of {', '.join(USES)}")
    return USES[use]


def _use_frame(records_or_frame, use: Use) -> pd.DataFrame:
    frame = records_or_frame if isinstance(records_or_frame, pd.DataFrame) else sample_frame(records_or_frame)
    missing = {"configuration", "family", "class", "kept", "index", *use.columns} - set(frame.columns)
    if missing:
        raise ValueError(f"use {use.name!r} needs per-unit column(s) {sorted(missing)} (see sample_frame)")
    return frame.dropna(subset=list(use.values))


def _leader(frame: pd.DataFrame, use: Use, candidates: Sequence[str]) -> str:
    """The best of ``candidates`` on ``frame`` (ties: the smaller kept, then the label)."""
    sign = -1 if use.higher_is_better else 1
    keys = {c: (sign * use.estimate(frame[frame["configuration"] == c]),
                float(frame.loc[frame["configuration"] == c, "kept"].iloc[0]), c) for c in candidates}
    return min(keys, key=keys.get)


def _budget_rows(frame: pd.DataFrame, use: Use, budget: float, first: np.ndarray, tests: dict,
                 n_min: int) -> list[dict[str, Any]]:
    """One row per rival of the leader under ``budget`` (the leader chosen on half A, each pair tested on half B
    once: ``tests`` is shared across budgets), or one row when nothing or one configuration is under it."""
    info = frame.groupby("configuration", sort=True).agg(cls=("class", "first"), kept=("kept", "first"))
    candidates = list(info.index[(info["cls"] != "full") & (info["kept"] <= budget + 1e-12)])
    base = {"use": use.name, "budget": budget}
    if not candidates:
        return [{**base, "decision": "none under budget"}]
    a, b = frame[first], frame[~first]
    leader = _leader(a, use, candidates)
    head = {**base, "leader": leader, "class_leader": info.loc[leader, "cls"], "kept_leader": info.loc[leader, "kept"],
            "n_select": int((a["configuration"] == leader).sum())}
    rows = []
    for rival in (c for c in candidates if c != leader):
        key = frozenset((leader, rival))
        if key not in tests:
            tests[key] = (leader, use.confirm(b[b["configuration"] == leader], b[b["configuration"] == rival], n_min))
        oriented, t = tests[key]
        flip = -1.0 if oriented != leader else 1.0
        low, high = (t["low"], t["high"]) if flip > 0 else (-t["high"], -t["low"])
        rows.append({**head, "rival": rival, "class_rival": info.loc[rival, "cls"], "kept_rival": info.loc[rival, "kept"],
                     "leader_estimate": use.estimate(b[b["configuration"] == leader]),
                     "rival_estimate": use.estimate(b[b["configuration"] == rival]),
                     **{f"{side}_{m}": float(b.loc[b["configuration"] == c, m].mean())
                        for m in use.reported for side, c in (("leader", leader), ("rival", rival))},
                     "diff": flip * t["diff"], "ci_low": low, "ci_high": high, "p": t["p"], "n_confirm": int(t["n"]),
                     "_pair": key})
    return rows or [{**head, "decision": "only candidate"}]


def _decide(out: pd.DataFrame, use: Use, alpha: float, n_min: int) -> pd.DataFrame:
    """``decision`` per budget (``winner`` when the leader beats every rival: Holm p < ``alpha``, in its favour,
    n ≥ ``n_min``; else ``no decision``) and ``closest``: the rival that blocks it most (not beaten first, then
    the largest Holm p, then the smallest advantage)."""
    tested = out["p"].notna()
    sign = 1 if use.higher_is_better else -1
    favours = (sign * out["diff"]) > 0  # the leader scored better than the rival on half B
    out = out.assign(beaten=tested & (out["p_holm"] < alpha) & (out["n_confirm"] >= n_min) & favours, closest=False)
    for _, group in out[tested].groupby("budget", sort=False):
        out.loc[group.index, "decision"] = "winner" if group["beaten"].all() else "no decision"
        order = group.assign(advantage=sign * group["diff"]).sort_values(
            ["beaten", "p_holm", "advantage"], ascending=[True, False, True])
        out.loc[order.index[0], "closest"] = True
    out.loc[~tested, "closest"] = ~out[~tested].duplicated("budget")  # one row per budget shown
    out.loc[~tested & out["rival"].notna(), "decision"] = "too few"  # a single unit on half B: nothing to test
    return out


def confirmations(records_or_frame, use: str | Use = "retrieve", budgets: Sequence[float] = BUDGETS,
                  n_min: int = stats.N_MIN, alpha: float = ALPHA) -> pd.DataFrame:
    """Every comparison behind :func:`best_at_budget`: one row per use × budget × rival of the budget's leader.

    The units are split once into halves A and B (:func:`crosskv.evidence.stats.halves`, stratified per task).
    Per budget, the leader is the best configuration on A among those with held kept ≤ budget (``full``
    excluded); on B it is tested against **every** other configuration under the budget, paired per unit. The
    Holm family is the set of distinct pairs over all budgets of this use (a pair under several budgets is
    tested once); ``p_holm`` is its adjusted p. Columns: use, metric, budget, decision, leader, class_leader,
    kept_leader, rival, class_rival, kept_rival, leader_estimate, rival_estimate (on B), ``leader_<m>``/``rival_<m>``
    for the use's reported metrics, diff (leader − rival on B), ci_low, ci_high, p, p_holm, n_select (leader's
    units on A), n_confirm (paired units on B), beaten, closest, selection.
    """
    use = use_of(use)
    frame = _use_frame(records_or_frame, use)
    first = stats.halves(frame["index"].to_numpy())
    tests: dict = {}
    out = pd.DataFrame([row for budget in budgets for row in _budget_rows(frame, use, budget, first, tests, n_min)])
    out = out.reindex(columns=list(dict.fromkeys([*out.columns, "decision", "rival", "diff", "p", "n_select",
                                                  "n_confirm", "_pair"]))).astype({"decision": object})
    tested = out["p"].notna()
    family = pd.Series({key: t["p"] for key, (_, t) in tests.items() if t["p"] == t["p"]}, dtype=float)
    adjusted = stats.holm(family)["p_holm"] if len(family) else {}
    out["p_holm"] = [adjusted[key] if ok else np.nan for key, ok in zip(out["_pair"], tested)]
    out = _decide(out.drop(columns="_pair"), use, alpha, n_min)
    contexts = frame["context"].dropna().unique() if "context" in frame else []
    out.insert(1, "metric", tables.metric_label(use.metric, contexts[0] if len(contexts) == 1 else None))
    out["selection"] = [_selection(s, c) for s, c in zip(out["n_select"], out["n_confirm"])]
    return out


def _selection(n_select: float, n_confirm: float) -> str:
    """``"selected on A (n=…), confirmed on B (n=…)"`` (or what of it happened)."""
    if pd.isna(n_select):
        return ""
    if pd.isna(n_confirm):
        return f"selected on A (n={int(n_select)}), no rival"
    return f"selected on A (n={int(n_select)}), confirmed on B (n={int(n_confirm)})"


DECISION_COLUMNS = ("use", "metric", "budget", "decision", "leader", "class_leader", "kept_leader", "rival",
                    "class_rival", "kept_rival", "leader_estimate", "rival_estimate", "diff", "ci_low", "ci_high", "p",
                    "p_holm", "n_select", "n_confirm", "rivals", "beaten", "selection")


def best_at_budget(records_or_frame, use: str | Use = "retrieve", budgets: Sequence[float] = BUDGETS,
                   n_min: int = stats.N_MIN, alpha: float = ALPHA) -> pd.DataFrame:
    """Decisions that survive their own test: per budget of ``use``, the leader selected on half A, confirmed on
    half B against every rival under the budget (:func:`confirmations`), one row naming the **closest** rival.

    ``decision``: ``winner`` (every rival beaten: Holm-adjusted p < ``alpha`` and the difference in the leader's
    favour), ``no decision`` (some rival not beaten: the row names it), ``only candidate`` (nothing to test
    against) or ``none under budget``. ``rivals`` counts the rivals, ``beaten`` how many the leader beat.
    ``records_or_frame``: a :func:`sample_frame` of the use's records (or what it takes)."""
    every = confirmations(records_or_frame, use, budgets, n_min, alpha)
    counts = every[every["p"].notna()].groupby("budget").agg(rivals=("rival", "size"), beaten=("beaten", "sum"))
    best = every[every["closest"]].drop(columns=["beaten", "closest"]).join(counts, on="budget")
    reported = [c for c in best.columns if c.startswith(("leader_", "rival_")) and c not in DECISION_COLUMNS]
    best = best.reindex(columns=[*DECISION_COLUMNS, *reported]).reset_index(drop=True)
    return best.astype({c: "Int64" for c in ("n_select", "n_confirm", "rivals", "beaten")})


def decide(samples: Mapping[str, Any], budgets: Sequence[float] = BUDGETS, n_min: int = stats.N_MIN,
           alpha: float = ALPHA) -> pd.DataFrame:
    """:func:`best_at_budget` of several uses stacked: ``samples`` maps a use's name (:data:`USES`) to its
    :func:`sample_frame` (or records), e.g. ``{"retrieve": mix_records, "continue": ppl_records}``."""
    return pd.concat([best_at_budget(frame, name, budgets, n_min, alpha) for name, frame in samples.items()],
                     ignore_index=True)


def class_best(records_or_frame, use: str | Use = "retrieve", budgets: Sequence[float] = BUDGETS) -> pd.DataFrame:
    """Per budget and class (cross-layer, eviction, quantization, composition): the configuration with the best
    estimate on every unit (no test: a pointer for examples, not a decision). Columns: use, budget, class,
    configuration, kept, estimate, n."""
    use = use_of(use)
    frame = _use_frame(records_or_frame, use)
    rows = []
    for budget in budgets:
        under = frame[(frame["class"] != "full") & (frame["kept"] <= budget + 1e-12)]
        for cls, group in under.groupby("class", sort=True):
            best = _leader(group, use, sorted(group["configuration"].unique()))
            units = group[group["configuration"] == best]
            rows.append({"use": use.name, "budget": budget, "class": cls, "configuration": best,
                         "kept": float(units["kept"].iloc[0]), "estimate": use.estimate(units), "n": len(units)})
    return pd.DataFrame(rows, columns=["use", "budget", "class", "configuration", "kept", "estimate", "n"])


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


def _no_match(unmatched: dict, a: pd.Series, b: pd.Series, source: str, note: str) -> None:
    """Count one paper pair without a comparison of ours (one row per distinct pair of paper points)."""
    key = tuple(sorted([(a["family"], round(float(a["kept"]), 4)), (b["family"], round(float(b["kept"]), 4))]))
    row = unmatched.setdefault(key, {"a": f"{key[0][0]} @ {key[0][1]:.3g} (paper)",
                                     "b": f"{key[1][0]} @ {key[1][1]:.3g} (paper)", "papers": 0, "sources": set(),
                                     "notes": set(), "agreement": "no matching point"})
    row["papers"] += 1
    row["sources"].add(source)
    row["notes"].add(note)


def orderings(reference: pd.DataFrame, ours_accuracy: Sequence[Ours], ours_perplexity: Sequence[Ours] = (),
              metric: str = "score", tolerance: float = KEPT_TOLERANCE,
              equal_memory: float = stats.MATCH_TOLERANCE) -> pd.DataFrame:
    """The papers' pairwise orderings checked on our runs, **one row per distinct comparison** on our side.

    Every pair of rows of one paper table (paper, table, model, benchmark) whose families we run is matched to
    our runs within ``tolerance`` relative kept (:func:`match_point`); an ``X vs Y`` pair is compared only when
    our two points also lie within ``equal_memory`` relative held kept of each other (the notebooks' equal-memory
    rule, :func:`crosskv.evidence.report.matched`), else it is ``no matching point`` with a ``note`` naming both
    kepts. ``full vs X`` pairs (the uncompressed reference against a compressed cache, never at equal memory)
    are compared and counted apart. Paper pairs that land on the same two
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
                    _no_match(unmatched, a, b, source, f"no run of ours within {tolerance:.0%} of the paper's kept")
                    continue
                if oa.record is ob.record:
                    continue
                if "full" not in (oa.family, ob.family) and not stats.matched(oa.kept, ob.kept, equal_memory):
                    _no_match(unmatched, a, b, source, f"our points at kept {min(oa.kept, ob.kept):.3g} and "
                              f"{max(oa.kept, ob.kept):.3g} differ by more than {equal_memory:.0%}")
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
                     "agreement": row["agreement"], "note": "; ".join(sorted(row["notes"]))})
    columns = ["kind", "a", "b", "papers", "sources", "paper_says", "ours_kept_a", "ours_kept_b", "metric", "ours_diff",
               "ours_diff_lo", "ours_diff_hi", "n", "p", "ours_says", "agreement", "note"]
    return pd.DataFrame(rows, columns=columns)


AGREEMENTS = ("agree", "disagree", "undecided", "floor", "no matching point")


def orderings_tally(order: pd.DataFrame) -> pd.DataFrame:
    """Counts of :func:`orderings` rows by ``kind`` (rows) and ``agreement`` (columns). ``total`` counts the
    comparisons made (agree, disagree, undecided, floor); ``no matching point`` is shown beside it, outside it."""
    counts = pd.crosstab(order["kind"], order["agreement"]).reindex(columns=list(AGREEMENTS), fill_value=0)
    counts.loc["all"] = counts.sum()
    compared = [a for a in AGREEMENTS if a != "no matching point"]
    return counts.assign(total=counts[compared].sum(axis=1)).rename_axis(index="kind", columns=None).reset_index()


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
