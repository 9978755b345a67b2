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
    low = _run("low", None, task="ppl", nll=[(100.0 + i, 50) for i in range(10)])
    high = _run("high", None, task="ppl", nll=[(130.0 + i, 50) for i in range(10)])
    assert stats.compare(low, high).verdict == "better"


def test_pairing_refuses_different_samples():
    a, b = _run("a", [1, 0, 1]), _run("b", [1, 0])
    with pytest.raises(ValueError, match="different samples"):
        stats.compare(a, b)
    with pytest.raises(ValueError, match="different task"):
        stats.compare(a, _run("b", [1, 0, 1], task="other"))


def test_table_has_interval_columns_and_verdicts_render():
    a, b = _run("a", [1] * 10), _run("b", [0, 1] * 5)
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
    assert a["task"] == b["task"] == "t1@1024+t2@1024"
    assert stats.compare(a, b).diff.estimate == pytest.approx(3 / 8)
    with pytest.raises(ValueError, match="different task"):
        stats.compare(a, stats.pool([_run("y", [0] * 4, task="t1")]))
    with pytest.raises(ValueError, match="cannot mix"):
        stats.pool([_run("x", [1]), _run("p", None, task="ppl", nll=[(1.0, 2)])])


def test_versus_picks_the_sentence_the_interval_supports():
    iv = stats.Interval(0.5, 0.4, 0.6, 20)
    assert report.versus(iv, 0.1, "above", "below", "neither").startswith("above (")
    assert report.versus(iv, 0.9, "above", "below", "neither").startswith("below (")
    assert report.versus(iv, 0.5, "above", "below", "neither").startswith("neither (")
    assert "n = 20" in report.versus(iv, 0.5, "a", "b", "c")
