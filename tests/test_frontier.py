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


def test_mix_record_pools_tasks_and_pairs():
    a = frontier.mix_record([rec("m", "t1", [1, 1], 0.5), rec("m", "t2", [0, 1], 0.3)])
    assert a["score"] == 0.75 and a["kept"] == pytest.approx(0.4) and a["task"] == "mix:t1+t2"
    b = frontier.mix_record([rec("n", "t2", [0, 0], 0.2), rec("n", "t1", [0, 0], 0.2)])
    from crosskv.evidence import stats
    assert stats.compare(a, b).diff.estimate == pytest.approx(0.75)
    with pytest.raises(ValueError, match="accuracy tasks only"):
        frontier.mix_record([ppl_rec("m", [1.0], 0.5)])
    with pytest.raises(ValueError, match="task twice"):
        frontier.mix_record([rec("m", "t1", [1], 0.5), rec("m", "t1", [1], 0.5)])


def test_pareto_front():
    df = pd.DataFrame({"kept": [1.0, 0.5, 0.5, 0.25, 0.1], "score": [0.9, 0.8, 0.7, 0.8, 0.1]})
    assert frontier.pareto(df).tolist() == [True, False, False, True, True]
    # lower-is-better metric (perplexity)
    assert frontier.pareto(df.assign(score=[1, 2, 3, 2, 9]), higher_is_better=False).tolist() == \
        [True, False, False, True, True]


def test_best_at_budget():
    df = pd.DataFrame({"family": ["A", "A", "B", "B"], "configuration": ["a1", "a2", "b1", "b2"],
                       "kept": [0.5, 0.1, 0.25, 0.04], "score": [0.9, 0.3, 0.6, 0.5],
                       "score_lo": [0.8, 0.2, 0.5, 0.4], "score_hi": [1, 0.4, 0.7, 0.6], "n": [4] * 4,
                       "decode_tok_s": [1.0] * 4})
    best = frontier.best_at_budget(df, budgets=(0.5, 0.25, 0.05, 0.02))
    overall = best[best.scope == "overall"].set_index("budget")
    assert overall.loc[0.5, "configuration"] == "a1"
    assert overall.loc[0.25, "configuration"] == "b1"
    assert overall.loc[0.05, "configuration"] == "b2"
    assert overall.loc[0.02, "family"] == "none" and math.isnan(overall.loc[0.02, "score"])
    fam = best[(best.scope == "family") & (best.budget == 0.25)].set_index("family")
    assert fam.loc["A", "configuration"] == "a2" and fam.loc["B", "configuration"] == "b1"


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


def test_orderings_agree_disagree_undecided():
    ref = frontier.paper_kept(pd.DataFrame({
        "paper": ["P"] * 3, "table": ["T"] * 3, "model": ["M"] * 3, "benchmark": ["B"] * 3,
        "method": ["Full", "SnapKV", "KVSharer"], "setting": [None, None, None],
        "compression": [1.0, 8.0, 0.25], "compression_convention": ["multiplier", "multiplier",
                                                                   "fraction_of_layers_shared"],
        "score": [90.0, 80.0, 85.0], "metric": ["accuracy"] * 3}))
    n = 40
    full = rec("full", "t", [1] * n, 1.0)
    snap = rec("s", "t", [0] * n, 0.125)
    sharer = rec("k", "t", [1, 0] * (n // 2), 0.75)
    ours = [frontier.Ours("full", 1.0, full), frontier.Ours("SnapKV", 0.125, snap),
            frontier.Ours("KVSharer", 0.75, sharer)]
    out = frontier.orderings(ref, ours).set_index(["a", "b"])["agreement"]
    assert out[("Full", "SnapKV")] == "agree"
    assert out[("Full", "KVSharer")] == "agree"
    assert out[("SnapKV", "KVSharer")] == "agree"  # paper: KVSharer 85 > SnapKV 80; ours 0.5 > 0
    flipped = [frontier.Ours("full", 1.0, full), frontier.Ours("SnapKV", 0.125, rec("s", "t", [1] * n, 0.125)),
               frontier.Ours("KVSharer", 0.75, rec("k", "t", [0] * n, 0.75))]
    out = frontier.orderings(ref, flipped).set_index(["a", "b"])["agreement"]
    assert out[("SnapKV", "KVSharer")] == "disagree"
    assert out[("Full", "SnapKV")] == "undecided"  # identical scores: interval contains zero
