"""crosskv.evidence.records: held kept with fallback, per-task and pooled rows with intervals, value records for paired checks."""
from __future__ import annotations

import pytest

from crosskv.evidence import records as evidence
from crosskv.evidence import stats


def record(task, scores, kept=0.5, kept_held=None, method="m"):
    details = [{"index": i, "score": s} for i, s in enumerate(scores)]
    return {"method": method, "task": task, "context": 64, "seed": 0, "metric": "accuracy", "higher_is_better": True,
            "kept": kept, "kept_held": kept_held, "details": details}


def test_held_kept_prefers_the_census_and_falls_back():
    assert evidence.held_kept(record("a", [1], kept=0.5, kept_held=0.6)) == 0.6
    assert evidence.held_kept(record("a", [1], kept=0.5)) == 0.5
    assert evidence.kept_source([record("a", [1], kept_held=0.6), record("b", [1])]) == "reported"
    with pytest.raises(ValueError, match="neither kept_held nor kept"):
        evidence.held_kept({"method": "m", "task": "a"})


def test_score_rows_add_a_pooled_mix_row_with_interval_and_n():
    runs = {"x": [record("a", [1, 0, 1, 1], kept_held=0.3), record("b", [0, 0, 1, 0], kept_held=0.5)]}
    rows = evidence.score_rows(runs)
    mix = rows[rows.task == "mix"].iloc[0]
    assert mix.n == 8 and mix.score == pytest.approx(0.5)
    assert mix.score_lo <= mix.score <= mix.score_hi
    assert mix.kept == pytest.approx(0.4)
    assert set(rows.task) == {"a", "b", "mix"}


def test_score_rows_read_the_metric_asked_for_and_perplexity_as_perplexity():
    gold = record("a", [None, None, None], kept_held=0.3)
    for d, g in zip(gold["details"], [1, 0, 1]):
        d["gold_match"] = g
    ppl = {"method": "m", "task": "ppl_cont", "context": 64, "seed": 0, "metric": "perplexity",
           "higher_is_better": False, "kept": 0.3, "details": [{"index": i, "nll": 2.0, "scored_tokens": 4}
                                                                for i in range(3)]}
    rows = evidence.score_rows({"x": [gold, gold | {"task": "b"}, ppl]}, metric="gold_match").set_index("task")
    assert rows.loc["mix", "score"] == pytest.approx(2 / 3) and rows.loc["mix", "n"] == 6
    assert rows.loc["ppl_cont", "score"] == pytest.approx(stats.interval(ppl).estimate)
    with pytest.raises(ValueError, match="has no 'score' values"):
        evidence.score_rows({"x": [gold]})  # nothing decoded: exact match by generation has no samples


def test_pooled_records_pair_across_methods():
    a = stats.pool([record("a", [1] * 12), record("b", [1] * 12)])
    b = stats.pool([record("a", [0] * 12), record("b", [0] * 12)])
    assert stats.compare(a, b).verdict == "better"


def test_values_record_pairs_units_for_compare():
    lower = evidence.values_record([0.1, 0.2, 0.1, 0.15, 0.12] * 5, "error", higher_is_better=False)
    higher = evidence.values_record([0.3, 0.4, 0.35, 0.3, 0.33] * 5, "error", higher_is_better=False)
    assert stats.compare(lower, higher).verdict == "better"
    assert stats.compare(evidence.values_record([0.1] * 5, "error", False),
                         evidence.values_record([0.3] * 5, "error", False)).verdict == "too few"
    with pytest.raises(ValueError, match="at least one value"):
        evidence.values_record([], "error")
