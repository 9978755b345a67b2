"""Bootstrap intervals and paired comparisons (crosskv.evidence.stats) and rendered verdicts (crosskv.evidence.report)."""
import math

import numpy as np
import pytest

from crosskv.evidence import report
from crosskv.evidence import stats


def _run(method, scores, task="niah", nll=None):
    if nll is None:
        details = [{"index": i, "score": s} for i, s in enumerate(scores)]
        return {"method": method, "task": task, "context": 1024, "seed": 0, "details": details,
                "metric": "accuracy", "higher_is_better": True}
    details = [{"index": i, "nll": a, "scored_tokens": t} for i, (a, t) in enumerate(nll)]
    return {"method": method, "task": task, "context": 1024, "seed": 0, "details": details,
            "metric": "perplexity", "higher_is_better": False}


def test_mean_interval_covers_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small = stats.mean_ci(rng.integers(0, 2, 20))
    large = stats.mean_ci(rng.integers(0, 2, 400))
    assert small.lo <= small.estimate <= small.hi
    assert (large.hi - large.lo) < (small.hi - small.lo)


def test_interval_is_seeded_and_repeatable():
    values = [0, 1, 1, 0, 1, 1, 1, 0]
    assert stats.mean_ci(values, seed=3) == stats.mean_ci(values, seed=3)


def test_perplexity_interval_matches_pooled_estimate():
    record = _run("full", None, task="ppl", nll=[(100.0, 50), (120.0, 50), (90.0, 50)])
    iv = stats.interval(record)
    assert iv.estimate == pytest.approx(math.exp(310 / 150))
    assert iv.lo <= iv.estimate <= iv.hi and iv.n == 3


def test_paired_comparison_calls_only_clear_differences():
    a = _run("a", [1] * 40)
    b = _run("b", [0] * 40)
    same = _run("c", [1, 0] * 20)
    clear = stats.compare(a, b)
    assert clear.verdict == "better" and clear.diff.excludes(0)
    assert "a is better than b" in clear.sentence and "n = 40" in clear.sentence
    assert stats.compare(b, a).verdict == "worse"
    assert stats.compare(same, _run("d", [0, 1] * 20)).verdict == "tie"


def test_lower_perplexity_is_better():
    low = _run("low", None, task="ppl", nll=[(100.0 + i, 50) for i in range(24)])
    high = _run("high", None, task="ppl", nll=[(130.0 + i, 50) for i in range(24)])
    assert stats.compare(low, high).verdict == "better"


def test_pairing_refuses_different_samples():
    a, b = _run("a", [1, 0, 1]), _run("b", [1, 0])
    with pytest.raises(ValueError, match="different samples"):
        stats.compare(a, b)
    with pytest.raises(ValueError, match="different task"):
        stats.compare(a, _run("b", [1, 0, 1], task="other"))


def test_table_has_interval_columns_and_verdicts_render():
    a, b = _run("a", [1] * 24), _run("b", [0, 1] * 12)
    df = stats.table([a, b], columns=("method", "task"))
    assert {"score", "score_lo", "score_hi", "n"} <= set(df.columns)
    rows = report.verdicts([stats.compare(a, b)])
    assert rows.loc[0, "verdict"] in {"better", "tie"}
    assert report.bullets(["x", "", "y"]) == "- x\n- y"
    assert report.seconds([3.0, 1.0, 2.0]).startswith("1–3 s (median 2")


def test_pool_averages_a_mix_and_pairs_with_another_pool():
    a = stats.pool([_run("x", [1, 1, 0, 1], task="t1"), _run("x", [0, 0, 1, 0], task="t2")])
    b = stats.pool([_run("y", [0, 1, 0, 0], task="t1"), _run("y", [0, 0, 0, 0], task="t2")])
    assert stats.interval(a).estimate == pytest.approx(4 / 8) and stats.interval(a).n == 8
    assert a["task"] == b["task"] == "mix:t1@1024+t2@1024"
    assert stats.compare(a, b).diff.estimate == pytest.approx(3 / 8)
    with pytest.raises(ValueError, match="different task"):
        stats.compare(a, stats.pool([_run("y", [0] * 4, task="t1")]))
    swapped = stats.pool([_run("y", [0, 0, 0, 0], task="t2"), _run("y", [0, 1, 0, 0], task="t1")])
    assert stats.compare(a, swapped).diff.estimate == pytest.approx(3 / 8)
    assert stats.compare(a, b).verdict == "too few"
    with pytest.raises(ValueError, match="twice"):
        stats.pool([_run("x", [1]), _run("x", [1])])
    with pytest.raises(ValueError, match="cannot mix"):
        stats.pool([_run("x", [1]), _run("p", None, task="ppl", nll=[(1.0, 2)])])


def test_versus_picks_the_sentence_the_interval_supports():
    iv = stats.Interval(0.5, 0.4, 0.6, 20)
    assert report.versus(iv, 0.1, "above", "below", "neither").startswith("above (")
    assert report.versus(iv, 0.9, "above", "below", "neither").startswith("below (")
    assert report.versus(iv, 0.5, "above", "below", "neither").startswith("neither (")
    assert "n = 20" in report.versus(iv, 0.5, "a", "b", "c")


def test_paired_gives_bca_interval_permutation_p_and_verdict():
    rng = np.random.default_rng(0)
    b = rng.normal(0, 1, 60)
    a = b + 0.8 + rng.normal(0, 0.3, 60)
    out = stats.paired(a, b)
    assert set(out) == {"diff", "low", "high", "n", "p", "verdict"}
    assert out["low"] < out["diff"] < out["high"] and out["low"] > 0 and out["p"] < 0.01
    assert out["verdict"] == "better" and stats.paired(a, b, higher_is_better=False)["verdict"] == "worse"
    from scipy.stats import bootstrap
    ref = bootstrap((a - b,), np.mean, method="BCa", n_resamples=stats.RESAMPLES,
                    random_state=np.random.default_rng(0)).confidence_interval
    assert (out["low"], out["high"]) == pytest.approx((ref.low, ref.high))
    noise = stats.paired(b + rng.normal(0, 1, 60), b)
    assert noise["verdict"] == "tie" and noise["p"] > 0.05
    assert stats.paired(a[:10], b[:10])["verdict"] == "too few"
    assert stats.paired(a[:10], b[:10], n_min=5)["verdict"] == "better"
    with pytest.raises(ValueError, match="one length"):
        stats.paired(a, b[:5])


def test_sign_flip_p_is_exact_for_small_n():
    # 6 positive differences: the exact two-sided sign-flip p is 2 / 2**6
    assert stats.permutation_p([1, 2, 3, 4, 5, 6], [0] * 6) == pytest.approx(2 / 64)
    assert stats.permutation_p([1, 1], [1, 1]) == 1.0


def test_constant_differences_give_a_point_interval():
    out = stats.paired([1.0] * 30, [0.0] * 30)
    assert out["low"] == out["high"] == out["diff"] == 1.0 and out["verdict"] == "better"


def test_holm_adjusts_a_family():
    df = stats.holm([0.01, 0.04, 0.03])
    assert df["p_holm"].tolist() == pytest.approx([0.03, 0.06, 0.06])
    assert df["reject"].tolist() == [True, False, False]
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        stats.holm([0.5, 1.5])


def test_min_detectable_effect_falls_with_n():
    assert stats.min_detectable_effect(1.0, 100) == pytest.approx(0.283, abs=0.005)  # ≈ (1.96 + 0.84) / 10
    assert stats.min_detectable_effect(1.0, 400) < stats.min_detectable_effect(1.0, 100)
    assert stats.min_detectable_effect([0, 2, 0, 2], 100) == pytest.approx(
        stats.min_detectable_effect(float(np.std([0, 2, 0, 2], ddof=1)), 100))
    with pytest.raises(ValueError, match="n=1"):
        stats.min_detectable_effect(1.0, 1)


def test_per_sequence_collapses_layers_to_independent_units():
    import pandas as pd
    frame = pd.DataFrame({"sequence": [0, 0, 1, 1, 2, 2], "layer": [0, 1] * 3, "err": [1, 3, 2, 4, 0, 2],
                          "method": ["x"] * 6})
    out = stats.per_sequence(frame, "err", by=("method",))
    assert out["err"].tolist() == [2, 3, 1] and len(out) == 3
    with pytest.raises(ValueError, match="lacks"):
        stats.per_sequence(frame, "missing")


def test_gold_metrics_of_a_record_pair_and_skip_undecoded_samples():
    details = [{"index": i, "score": (1.0 if i < 2 else None), "gold_loglik": -0.1 * i, "gold_match": 1}
               for i in range(4)]
    record = {"method": "m", "task": "t", "context": 1, "seed": 0, "details": details}
    assert stats.interval(record).n == 2 and stats.interval(record, metric="gold_loglik").n == 4
    with pytest.raises(ValueError, match="not one of"):
        stats.interval(record, metric="bogus")


def test_halves_split_each_task_evenly_and_the_same_way_every_time():
    index = np.concatenate([np.arange(25), stats.POOL_STRIDE + np.arange(10)])
    first = stats.halves(index)
    assert first[:25].sum() == 13 and first[25:].sum() == 5  # ⌈m/2⌉ per task: stratified
    assert first.tolist() == stats.halves(index).tolist()  # fixed
    assert first[:25].tolist() != [i % 2 == 0 for i in range(25)]  # not the generation order
    repeated = np.concatenate([index, index[::-1]])  # two configurations' rows: one split per sample
    assert stats.halves(repeated).tolist() == first.tolist() + first[::-1].tolist()
    with pytest.raises(ValueError, match="1-d"):
        stats.halves(np.zeros((2, 2), int))


def test_paired_perplexity_matches_the_record_comparison():
    rng = np.random.default_rng(0)
    nll_a, nll_b = rng.normal(40, 4, 30), rng.normal(44, 4, 30)
    tokens = np.full(30, 16.0)
    a = _run("a", None, "ppl_cont", nll=list(zip(nll_a, tokens)))
    b = _run("b", None, "ppl_cont", nll=list(zip(nll_b, tokens)))
    out = stats.paired_perplexity(nll_a, tokens, nll_b, tokens)
    c = stats.compare(a, b)
    assert out["diff"] == pytest.approx(c.diff.estimate) and out["low"] == pytest.approx(c.diff.lo)
    assert out["p"] == pytest.approx(c.p) and out["n"] == 30 and out["verdict"] == c.verdict == "better"
    finer = stats.paired_perplexity(nll_a, tokens, nll_b, tokens, permutations=19_999)
    assert finer["p"] < out["p"]  # more sign flips resolve a smaller p
    with pytest.raises(ValueError, match="positive token count"):
        stats.paired_perplexity(nll_a, tokens * 0, nll_b, tokens)
