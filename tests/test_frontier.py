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
        "SnapKV → xKV G=4 → KIVI 4-bit"
    assert frontier.family_of(rec("kvsharer_xkv", "t", [1], 0.2, {"group_size": 2})) == "KVSharer + xKV G=2"
    assert frontier.family_of(rec("selective", "t", [1], 0.25, {"base": "xkv", "base_params": "group_size=2;kept=0.25",
                                                               "top_k": 64})) == "selective xKV G=2 k=64"
    assert frontier.family_of(rec("selective", "t", [1], 0.25, {"base": "svd", "base_params": "",
                                                               "top_k": 256})) == "selective Single SVD k=256"
    assert frontier.family_of(rec("minicache", "t", [1], 0.9, {"retention": "code"})) == "MiniCache (code reading)"


def test_composition_reads_as_a_method_and_commonkv_names_its_ranks_and_weights():
    xkv_kivi = {"base": "xkv", "evict": "none", "evict_ratio": 0.0, "bits": 4, "residual": 32}
    assert frontier.composition_label(xkv_kivi) == "xKV G=4 → KIVI 4-bit"
    snap = {"base": "full", "evict": "snapkv", "evict_ratio": 0.75, "bits": 2}
    assert frontier.composition_label(snap) == "SnapKV 0.75 → KIVI 2-bit"
    assert frontier.composition_label(snap, ratios=False) == "SnapKV → KIVI 2-bit"
    assert frontier.family_class("xKV G=4 → KIVI 4-bit") == "composition" and frontier.family_class("KIVI 4-bit") == "quantization"
    stacked = {"base": "commonkv", "base_params": "ranks=fisher;weights=uniform", "evict": "snapkv", "evict_ratio": 0.5, "bits": 4}
    assert frontier.composition_label(stacked) == "SnapKV 0.5 → CommonKV (Fisher ranks, uniform weights) → KIVI 4-bit"
    fisher = frontier.family_of(rec("commonkv", "t", [1], 0.6, {"ranks": "fisher", "weights": "sensitivity"}))
    uniform = frontier.family_of(rec("commonkv", "t", [1], 0.6, {"weights": "uniform"}))
    assert fisher == "CommonKV (Fisher ranks, sensitivity weights)" == frontier.PAPER_FAMILIES["CommonKV"]
    assert uniform == "CommonKV (uniform ranks, uniform weights)"  # 05's CommonKV is not 04's: two names


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
    assert row["metric_label"] == "accuracy@256" and row["pooled"] is None
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
    assert out["family"].tolist() == ["xKV G=4", "KVSharer", "CommonKV (Fisher ranks, sensitivity weights)", "Single SVD"]
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
    sharer = rec("k", "t", [1] * (n - 4) + [0] * 4, 0.13)
    ours = [frontier.Ours("full", 1.0, full), frontier.Ours("SnapKV", 0.12, snap),
            frontier.Ours("KVSharer", 0.13, sharer)]  # within 10 % of each other and 25 % of the papers' 0.125
    out = frontier.orderings(_reference(models=("M1", "M2", "M3"), kvsharer_compression=0.875), ours)
    assert len(out) == 3 and out["papers"].tolist() == [3, 3, 3]  # three paper models, one row per comparison
    rows = out.set_index(["a", "b"])
    assert rows.loc[("full @ 1", "SnapKV @ 0.12"), "kind"] == "full vs X"
    assert rows.loc[("full @ 1", "SnapKV @ 0.12"), "agreement"] == "agree"
    assert rows.loc[("KVSharer @ 0.13", "SnapKV @ 0.12"), "kind"] == "X vs Y"
    assert rows.loc[("KVSharer @ 0.13", "SnapKV @ 0.12"), "paper_says"] == "a better"
    assert rows.loc[("KVSharer @ 0.13", "SnapKV @ 0.12"), "agreement"] == "agree"
    tally = frontier.orderings_tally(out).set_index("kind")
    assert tally.loc["full vs X", "agree"] == 2 and tally.loc["X vs Y", "agree"] == 1 and tally.loc["all", "total"] == 3


def test_orderings_compare_x_vs_y_only_at_equal_memory():
    n = 40
    ours = [frontier.Ours("full", 1.0, rec("full", "t", [1] * n, 1.0)),
            frontier.Ours("SnapKV", 0.125, rec("s", "t", [0, 1] * (n // 2), 0.125)),
            frontier.Ours("KVSharer", 0.75, rec("k", "t", [1] * (n - 4) + [0] * 4, 0.75))]
    out = frontier.orderings(_reference(), ours).set_index(["a", "b"])
    far = out.loc[("KVSharer @ 0.75 (paper)", "SnapKV @ 0.125 (paper)")]  # both matched to the paper, 6× apart
    assert far["agreement"] == "no matching point" and "0.125 and 0.75 differ by more than 10%" in far["note"]
    assert out.loc[("full @ 1", "SnapKV @ 0.125"), "agreement"] == "agree"  # full vs X: counted apart, compared
    tally = frontier.orderings_tally(out.reset_index()).set_index("kind")
    assert tally.loc["X vs Y", "no matching point"] == 1 and tally.loc["X vs Y", "total"] == 0
    assert tally.loc["all", "total"] == 2  # the unmatched pair is outside the total


def test_orderings_report_floors_and_unmatched_points():
    n = 40
    zeros = [frontier.Ours("full", 1.0, rec("full", "t", [0] * n, 1.0)),
             frontier.Ours("SnapKV", 0.125, rec("s", "t", [0] * n, 0.125)),
             frontier.Ours("KVSharer", 0.5, rec("k", "t", [0] * n, 0.5))]  # paper's KVSharer at 0.75: > 25 % away
    out = frontier.orderings(_reference(), zeros)
    assert out.set_index(["a", "b"]).loc[("full @ 1", "SnapKV @ 0.125"), "agreement"] == "floor"
    unmatched = out[out["agreement"] == "no matching point"]
    assert len(unmatched) == 2 and all("KVSharer @ 0.75 (paper)" in (a, b) for a, b in zip(unmatched.a, unmatched.b))
    assert set(unmatched["note"]) == {"no run of ours within 25% of the paper's kept"}
    assert frontier.match_point(zeros, "KVSharer", 0.6) is zeros[2]  # within 25 % of 0.6
    assert frontier.match_point(zeros, "KVSharer", 0.75) is None


def _gold_rec(method, kept, loglik, params=None):
    details = [{"index": i, "score": None, "gold_loglik": v, "gold_match": int(v > -1)} for i, v in enumerate(loglik)]
    return {"method": method, "params": params or {}, "task": "mix", "context": 256, "seed": 0, "metric": "accuracy",
            "higher_is_better": True, "kept": kept, "details": details, "key": method}


def _mix(records):
    """The records as one configuration each over two pooled tasks (the split is stratified per task)."""
    from crosskv.evidence import stats
    out = {}
    for label, r in records.items():
        half = len(r["details"]) // 2
        parts = [{**r, "task": t, "details": [{**d, "index": d["index"] - k * half} for d in r["details"][k * half:(k + 1) * half]]}
                 for k, t in enumerate(("t1", "t2"))]
        out[label] = stats.pool(parts)
    return out


def _records(n=120, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    base = rng.normal(-1.0, 0.5, n)
    return _mix({"full": _gold_rec("full", 1.0, base + 0.5),
                 "xkv": _gold_rec("xkv", 0.24, base + 0.3, {"group_size": 4}),
                 "snap": _gold_rec("kvpress:snapkv", 0.25, base + 0.3 + rng.normal(0, 0.01, n)),
                 "kivi": _gold_rec("compose", 0.2, base - 0.4, {"base": "full", "evict": "none", "bits": 2}),
                 "stream": _gold_rec("kvpress:streaming_llm", 0.1, base - 1.0)})


def test_best_at_budget_selects_on_a_confirms_on_b_against_every_rival():
    out = frontier.best_at_budget(_records(), "retrieve", budgets=(0.5, 0.25, 0.125, 0.01)).set_index("budget")
    tie = out.loc[0.5]  # xkv and snap are one configuration to within noise: no decision, snap named
    assert tie["decision"] == "no decision" and {tie["leader"], tie["rival"]} == {"xkv", "snap"}
    assert tie["rivals"] == 3 and tie["beaten"] == 2 and tie["p_holm"] >= frontier.ALPHA
    assert tie["n_select"] == tie["n_confirm"] == 60 and tie["ci_low"] <= tie["diff"] <= tie["ci_high"]
    assert tie["selection"] == "selected on A (n=60), confirmed on B (n=60)" and tie["metric"] == "gold_loglik@256"
    assert {"leader_gold_match", "rival_gold_match"} <= set(out.columns)
    assert out.loc[0.125, "decision"] == "only candidate" and out.loc[0.125, "leader"] == "stream"
    assert out.loc[0.01, "decision"] == "none under budget"
    clear = frontier.best_at_budget({k: v for k, v in _records().items() if k != "snap"}, budgets=(0.5, 0.25))
    assert (clear["decision"] == "winner").all() and (clear["leader"] == "xkv").all()
    assert (clear["p_holm"] < frontier.ALPHA).all() and (clear["diff"] > 0).all()


def test_every_winner_has_holm_p_below_alpha_and_each_pair_is_tested_once():
    import numpy as np
    from crosskv.evidence import stats
    winners_seen = 0
    for seed in range(2):
        records = _records(n=60, seed=seed)
        for chosen in (records, {k: v for k, v in records.items() if k != "snap"}):
            every = frontier.confirmations(chosen, budgets=frontier.BUDGETS)
            winners = every[every["decision"] == "winner"]
            assert (winners["p_holm"] < frontier.ALPHA).all() and winners["beaten"].all()
            winners_seen += len(winners)
            tested = every.dropna(subset=["p"])
            pairs = tested.assign(pair=[frozenset(x) for x in zip(tested["leader"], tested["rival"])]).drop_duplicates("pair")
            assert len(pairs) < len(tested)  # the same pair falls under several budgets …
            holm = stats.holm(pairs["p"].reset_index(drop=True))["p_holm"].to_numpy()  # … and enters Holm once
            assert np.allclose(np.sort(holm), np.sort(pairs["p_holm"].to_numpy()))
    assert winners_seen  # the rule was exercised


def test_a_leader_that_loses_on_the_confirmation_half_is_no_winner():
    import numpy as np
    from crosskv.evidence import stats
    n = 80
    index = np.arange(n)
    first = stats.halves(index)
    lucky = np.where(first, 0.0, -2.0) + np.linspace(0, 0.01, n)  # best on A, far worse on B
    steady = np.full(n, -1.0) + np.linspace(0, 0.01, n)
    records = {"lucky": _gold_rec("xkv", 0.2, lucky), "steady": _gold_rec("kvpress:snapkv", 0.2, steady)}
    row = frontier.best_at_budget(records, budgets=(0.25,)).iloc[0]
    assert row["leader"] == "lucky" and row["rival"] == "steady"
    assert row["p_holm"] < frontier.ALPHA and row["diff"] < 0  # separated, in the rival's favour
    assert row["decision"] == "no decision" and row["beaten"] == 0


def test_continue_use_decides_on_window_perplexity_lower_is_better():
    import numpy as np
    rng = np.random.default_rng(1)
    nll = rng.normal(30, 3, 60)
    records = {"full": ppl_rec("full", nll, 1.0), "snap": ppl_rec("kvpress:snapkv", nll + 1, 0.25),
               "xkv": ppl_rec("xkv", nll + 3 + rng.normal(0, 0.3, 60), 0.24)}
    row = frontier.best_at_budget(records, "continue", budgets=(0.5,)).iloc[0]
    assert row["decision"] == "winner" and row["leader"] == "snap" and row["rival"] == "xkv"
    assert row["diff"] < 0 and row["ci_high"] < 0 and row["leader_estimate"] < row["rival_estimate"]
    assert row["metric"] == "ppl_cont@256" and row["n_confirm"] == 30
    both = frontier.decide({"retrieve": _records(), "continue": records}, budgets=(0.5,))
    assert both["use"].tolist() == ["retrieve", "continue"]
    with pytest.raises(ValueError, match="is not one of"):
        frontier.best_at_budget(records, "summarise")
    with pytest.raises(ValueError, match="per-unit"):
        frontier.best_at_budget(pd.DataFrame({"kept": [0.1], "score": [1.0]}))
    with pytest.raises(ValueError, match="together"):
        frontier.sample_frame([records["snap"], _gold_rec("xkv", 0.2, [0.0])])


def test_class_best_points_at_each_class_under_a_budget():
    best = frontier.class_best(_records(), budgets=(0.25,)).set_index("class")
    assert best.loc["eviction", "configuration"] == "snap" and best.loc["quantization", "configuration"] == "kivi"
    assert "full" not in best.index and (best["n"] == 120).all()


def test_pool_status_keeps_floor_and_ceiling_tasks_apart():
    def full(task, matches):
        r = _gold_rec("full", 1.0, [0.0] * len(matches))
        for d, m in zip(r["details"], matches):
            d["gold_match"] = m
        return {**r, "task": task}
    status = frontier.pool_status({"floor": full("floor", [0] * 20), "mid": full("mid", [1, 0] * 10),
                                   "ceiling": full("ceiling", [1] * 20)}).set_index("task")
    assert status["status"].to_dict() == {"floor": "floor", "mid": "pooled", "ceiling": "ceiling"}
    assert status["pooled"].to_dict() == {"floor": False, "mid": True, "ceiling": False}
    assert status.loc["mid", "full_gold_match_lo"] <= 0.5 <= status.loc["mid", "full_gold_match_hi"]
    assert frontier.pool_label(0.25) == frontier.pool_label(0.9) == "pooled"  # the band is closed
    df = frontier.tidy([full("mid", [1, 0] * 10), full("floor", [0] * 20)], metric="gold_match",
                       pooled=status["pooled"].to_dict())
    assert df["pooled"].tolist() == [True, False]
    with pytest.raises(ValueError, match="band"):
        frontier.pool_label(0.5, band=(0.9, 0.25))
