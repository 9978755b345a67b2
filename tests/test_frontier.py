"""The frontier helpers on small hand-made records and frames."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from crosskv.evidence import frontier


def rec(method, task, scores, kept, params=None, **extra):
    return {"method": method, "params": params or {}, "task": task, "context": 256, "seed": 0,
            "metric": "accuracy", "higher_is_better": True, "kept": kept, "decode_tok_s": 10.0,
            "details": [{"index": i, "score": s} for i, s in enumerate(scores)], "key": f"{method}{task}{kept}",
            **extra}


def ppl_rec(method, nll, kept):
    return {"method": method, "params": {}, "task": "ppl_cont", "context": 256, "seed": 0, "metric": "perplexity",
            "higher_is_better": False, "kept": kept, "key": method,
            "details": [{"index": i, "nll": v, "scored_tokens": 10} for i, v in enumerate(nll)]}


def test_family_labels():
    assert frontier.family_of(rec("kvpress:snapkv", "t", [1], 0.5)) == "SnapKV"
    assert frontier.family_of(rec("xkv", "t", [1], 0.5, {"group_size": 8})) == "xKV G=8"
    assert frontier.family_of(rec("compose", "t", [1], 0.3, {"base": "full", "evict": "none", "bits": 2})) == "KIVI 2-bit"
    assert frontier.family_of(rec("compose", "t", [1], 0.1, {"base": "xkv", "evict": "snapkv", "bits": 4})) == \
        "snapkv × xkv × 4-bit"
    assert frontier.family_of(rec("kvsharer_xkv", "t", [1], 0.2, {"group_size": 2})) == "KVSharer + xKV G=2"
    assert frontier.family_of(rec("selective", "t", [1], 0.25, {"base": "xkv", "base_params": "group_size=2;kept=0.25",
                                                               "top_k": 64})) == "selective xKV G=2 k=64"
    assert frontier.family_of(rec("selective", "t", [1], 0.25, {"base": "svd", "base_params": "",
                                                               "top_k": 256})) == "selective Single SVD k=256"
    assert frontier.family_of(rec("minicache", "t", [1], 0.9, {"retention": "code"})) == "MiniCache (code reading)"


def test_held_kept_prefers_census():
    assert frontier.held_kept({"kept": 0.3, "kept_held": 0.5}) == (0.5, "kept_held")
    assert frontier.held_kept({"kept": 0.3}) == (0.3, "kept")
    with pytest.raises(ValueError, match="neither"):
        frontier.held_kept({"method": "x"})


def test_tidy_rows_carry_interval_and_held_kept():
    df = frontier.tidy([rec("full", "a", [1, 0, 1, 1], 1.0, git_commit="abc", kept_held=1.01)])
    row = df.iloc[0]
    assert row["score"] == 0.75 and row["score_lo"] <= 0.75 <= row["score_hi"] and row["n"] == 4
    assert row["kept"] == 1.01 and row["kept_source"] == "kept_held" and row["kept_nominal"] == 1.0
    assert row["commit"] == "abc" and list(df.columns) == list(frontier.TIDY_COLUMNS)
    with pytest.raises(ValueError, match="2 configurations for 1 records"):
        frontier.tidy([rec("full", "a", [1], 1.0)], configurations=["x", "y"])


def test_tidy_and_summary_read_the_metric_asked_for_and_perplexity_as_it_is():
    gold = rec("full", "a", [None, None, None], 1.0)  # no greedy generation: exact match on no sample
    for detail, match in zip(gold["details"], [1, 0, 0]):
        detail["gold_match"] = match
    df = frontier.tidy([gold, ppl_rec("full", [20.0, 30.0], 1.0)], metric="gold_match")
    assert df["metric"].tolist() == ["gold_match", "perplexity"]
    assert df["score"].iloc[0] == pytest.approx(1 / 3) and df["n"].tolist() == [3, 2]
    assert df["score"].iloc[1] == pytest.approx(math.exp(2.5))
    run = frontier.Run("full", "full", {"a": gold, "ppl_cont": ppl_rec("full", [20.0, 30.0], 1.0)})
    assert frontier.summary([run], ["a"], metric="gold_match")["score"].iloc[0] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="no 'score' values"):
        frontier.summary([run], ["a"])  # exact match was never generated: refused, not a silent substitute


def test_pool_of_a_configuration_pairs_tasks_in_any_order():
    from crosskv.evidence import stats
    a = stats.pool([rec("m", "t1", [1, 1], 0.5), rec("m", "t2", [0, 1], 0.3)])
    assert a["score"] == 0.75 and a["kept"] == pytest.approx(0.4) and a["task"].startswith("mix:t1@")
    b = stats.pool([rec("n", "t2", [0, 0], 0.2), rec("n", "t1", [0, 0], 0.2)])
    assert stats.compare(a, b).diff.estimate == pytest.approx(0.75)
    with pytest.raises(ValueError, match="twice"):
        stats.pool([rec("m", "t1", [1], 0.5), rec("m", "t1", [1], 0.5)])


def test_pareto_front():
    df = pd.DataFrame({"kept": [1.0, 0.5, 0.5, 0.25, 0.1], "score": [0.9, 0.8, 0.7, 0.8, 0.1]})
    assert frontier.pareto(df).tolist() == [True, False, False, True, True]
    # lower-is-better metric (perplexity)
    assert frontier.pareto(df.assign(score=[1, 2, 3, 2, 9]), higher_is_better=False).tolist() == \
        [True, False, False, True, True]


def test_paper_kept_conventions():
    ref = pd.DataFrame({"method": ["xKV-4", "KVSharer", "CommonKV", "xKV"],
                        "setting": [None, "24 layers", None, "G=1 iso-compression"],
                        "compression": [8.0, 0.25, 0.375, 8.4],
                        "compression_convention": ["multiplier", "fraction_of_layers_shared",
                                                   "fraction_of_memory_removed", "multiplier"]})
    out = frontier.paper_kept(ref)
    assert out["kept"].tolist() == pytest.approx([0.125, 0.75, 0.625, 1 / 8.4])
    assert out["family"].tolist() == ["xKV G=4", "KVSharer", "CommonKV", "Single SVD"]
    with pytest.raises(ValueError, match="unknown compression convention"):
        frontier.paper_kept(ref.assign(compression_convention="bits"))


def _reference(models=("M",), kvsharer_compression=0.25):
    rows = []
    for model in models:
        rows += [dict(paper="P", table="T", model=model, benchmark="B", method=m, setting=None, compression=c,
                      compression_convention=conv, score=score, metric="accuracy")
                 for m, c, conv, score in (("Full", 1.0, "multiplier", 90.0), ("SnapKV", 8.0, "multiplier", 80.0),
                                           ("KVSharer", kvsharer_compression, "fraction_of_layers_shared", 85.0))]
    return frontier.paper_kept(pd.DataFrame(rows))


def test_orderings_count_each_comparison_once_and_full_apart():
    n = 40
    full = rec("full", "t", [1] * n, 1.0)
    snap = rec("s", "t", [0, 1] * (n // 2), 0.125)
    sharer = rec("k", "t", [1] * (n - 4) + [0] * 4, 0.75)
    ours = [frontier.Ours("full", 1.0, full), frontier.Ours("SnapKV", 0.12, snap),
            frontier.Ours("KVSharer", 0.75, sharer)]
    out = frontier.orderings(_reference(models=("M1", "M2", "M3")), ours)
    assert len(out) == 3 and out["papers"].tolist() == [3, 3, 3]  # three paper models, one row per comparison
    rows = out.set_index(["a", "b"])
    assert rows.loc[("full @ 1", "SnapKV @ 0.12"), "kind"] == "full vs X"
    assert rows.loc[("full @ 1", "SnapKV @ 0.12"), "agreement"] == "agree"
    assert rows.loc[("KVSharer @ 0.75", "SnapKV @ 0.12"), "kind"] == "X vs Y"
    assert rows.loc[("KVSharer @ 0.75", "SnapKV @ 0.12"), "paper_says"] == "a better"
    assert rows.loc[("KVSharer @ 0.75", "SnapKV @ 0.12"), "agreement"] == "agree"
    tally = frontier.orderings_tally(out).set_index("kind")
    assert tally.loc["full vs X", "agree"] == 2 and tally.loc["X vs Y", "agree"] == 1 and tally.loc["all", "total"] == 3


def test_orderings_report_floors_and_unmatched_points():
    n = 40
    zeros = [frontier.Ours("full", 1.0, rec("full", "t", [0] * n, 1.0)),
             frontier.Ours("SnapKV", 0.125, rec("s", "t", [0] * n, 0.125)),
             frontier.Ours("KVSharer", 0.5, rec("k", "t", [0] * n, 0.5))]  # paper's KVSharer at 0.75: > 25 % away
    out = frontier.orderings(_reference(), zeros)
    assert out.set_index(["a", "b"]).loc[("full @ 1", "SnapKV @ 0.125"), "agreement"] == "floor"
    unmatched = out[out["agreement"] == "no matching point"]
    assert len(unmatched) == 2 and all("KVSharer @ 0.75 (paper)" in (a, b) for a, b in zip(unmatched.a, unmatched.b))
    assert frontier.match_point(zeros, "KVSharer", 0.6) is zeros[2]  # within 25 % of 0.6
    assert frontier.match_point(zeros, "KVSharer", 0.75) is None


def _gold_rec(method, kept, loglik, params=None):
    details = [{"index": i, "score": None, "gold_loglik": v, "gold_match": int(v > -1)} for i, v in enumerate(loglik)]
    return {"method": method, "params": params or {}, "task": "mix", "context": 256, "seed": 0, "metric": "accuracy",
            "higher_is_better": True, "kept": kept, "details": details, "key": method}


def test_best_at_budget_names_a_winner_only_when_separated():
    import numpy as np
    rng = np.random.default_rng(0)
    base = rng.normal(-1.0, 0.5, 120)
    records = {"full": _gold_rec("full", 1.0, base + 0.5),
               "xkv": _gold_rec("xkv", 0.24, base + 0.3, {"group_size": 4}),
               "snap": _gold_rec("kvpress:snapkv", 0.25, base + 0.3 + rng.normal(0, 0.01, 120)),
               "kivi": _gold_rec("compose", 0.2, base - 0.4, {"base": "full", "evict": "none", "bits": 2}),
               "stream": _gold_rec("kvpress:streaming_llm", 0.1, base - 1.0)}
    out = frontier.best_at_budget(records, budgets=(0.5, 0.125, 0.01), metric="gold_loglik")
    d25 = out[(out.budget == 0.5) & (out.scope == "decision")].iloc[0]
    assert d25["winner"] == "" and set(d25["tied"].split("; ")) == {"xkv", "snap"} and d25["verdict"] == "tie"
    assert d25["n"] == 120 and d25["low"] <= d25["diff"] <= d25["high"]
    classes = out[(out.budget == 0.5) & (out.scope == "class")].set_index("class")
    assert set(classes.index) == {"cross-layer", "eviction", "quantization"}
    assert classes.loc["quantization", "leader"] == "kivi" and classes.loc["quantization", "verdict"] == "worse"
    d125 = out[(out.budget == 0.125) & (out.scope == "decision")].iloc[0]
    assert d125["winner"] == "stream" and d125["verdict"] == "only candidate"
    assert out[out.budget == 0.01].iloc[0]["verdict"] == "none under budget"
    clear = frontier.best_at_budget({k: records[k] for k in ("full", "xkv", "kivi")}, budgets=(0.5,))
    assert clear.iloc[0]["winner"] == "xkv" and clear.iloc[0]["verdict"] == "better"
    assert clear["p_holm"].dropna().ge(clear["p"].dropna()).all()
    with pytest.raises(ValueError, match="per-sample"):
        frontier.best_at_budget(pd.DataFrame({"kept": [0.1], "score": [1.0]}))
