"""Notebook page helpers: provenance, the answer/Findings page, equal-memory claims, the palette table."""
from __future__ import annotations

import logging

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
import pytest

from crosskv.core.fingerprint import code_fingerprint
from crosskv.evidence import frontier, plotting, report
from crosskv.run import results


def _record(scores, kept, method="m"):
    return {"method": method, "task": "t", "metric": "accuracy", "higher_is_better": True, "kept": kept,
            "details": [{"index": i, "score": s} for i, s in enumerate(scores)], "key": method, "code": "f00"}


def test_provenance_names_commit_fingerprint_profile_machine(monkeypatch):
    monkeypatch.setenv(report.PROFILE_ENV, "smoke")
    info = report.provenance()
    assert info["code_fingerprint"] == code_fingerprint()
    assert info["profile"] == "smoke" and info["machine"] and info["commit"]
    line = report.provenance_line(info)
    assert code_fingerprint() in line and "smoke" in line


def test_dirty_flag_looks_only_at_library_and_pyproject():
    assert results.DIRTY_PATHS == ("lib", "pyproject.toml")


def test_page_fills_answer_once_and_collects_library_warnings(capsys):
    page = report.page("99")
    logging.getLogger("crosskv.probe").warning("latent wider than K+V")
    logging.getLogger("crosskv.probe").warning("latent wider than K+V")
    assert page.notes == ["latent wider than K+V (×2)"]
    page.close("X holds less.", ["a finding"])
    out = capsys.readouterr()
    assert "latent wider" not in out.err  # collected, not printed to stderr
    assert out.out.count("### Findings") == 1 and "**Answer:** X holds less." in out.out
    assert "latent wider than K+V (×2)" in out.out and code_fingerprint() in out.out
    with pytest.raises(RuntimeError, match="already shown"):
        page.close("again", [])
    empty = report.page("98")
    with pytest.raises(ValueError, match="answer is empty"):
        empty.close("  ", [])
    empty.close("Now answered.", [])
    assert logging.getLogger("crosskv").propagate


def test_equal_memory_refuses_unmatched_kept():
    a, b = _record([1, 1, 0, 1], 0.243, "xkv"), _record([0, 0, 0, 1], 0.776, "minicache")
    with pytest.raises(ValueError, match=r"kept 0\.243.*kept 0\.776"):
        report.equal_memory(a, b, "xKV", "MiniCache")
    c = report.equal_memory(a, _record([0, 1, 0, 1], 0.26, "svd"), "xKV", "Single SVD")
    assert "kept 0.243" in c.a and "kept 0.260" in c.b
    done, refused = report.at_equal_memory([(a, b, "xKV", "MiniCache"), (a, a, "xKV", "xKV again")])
    assert len(done) == 1 and refused == ["Not compared: xKV (kept 0.243) and MiniCache (kept 0.776) differ by more "
                                          "than 10% relative kept."]
    assert report.matched(1.0, 0.91) and not report.matched(1.0, 0.89)
    with pytest.raises(ValueError, match="positive"):
        report.matched(0.0, 0.5)


def test_show_returns_nothing(capsys):
    assert report.show("text", title="T") is None
    assert capsys.readouterr().out.startswith("### T")


def test_palette_one_table_fixed_style_per_family():
    table = plotting.FAMILIES
    assert table.index.is_unique and not table.duplicated(["color", "marker"]).any()
    groups = table.groupby("group")["color"].apply(set)
    assert all(not (groups[a] & groups[b]) for a in groups.index for b in groups.index if a != b)
    assert (table.groupby("panel").size() <= 8).all()
    assert plotting.family_for("xKV G=4 @0.25") == "xKV G=4"
    assert plotting.family_for("MiniCache paper from 15") == "MiniCache (paper reading)"
    assert plotting.family_for("SnapKV 0.75 → CommonKV → 4-bit") == "composition"
    assert table.loc["Selective reconstruction", "group"] == "cross-layer"
    with pytest.raises(ValueError, match="no family"):
        plotting.family_for("mystery method")
    styles = plotting.series_styles(["CommonKV r=0.8", "CommonKV r=0.6", "Single SVD @0.25"])
    assert styles["CommonKV r=0.8"]["color"] != styles["CommonKV r=0.6"]["color"]
    assert styles["Single SVD @0.25"] == plotting.style_of("Single SVD")


def test_frontier_small_multiples_clip_perplexity_and_mark_off_scale():
    matplotlib.use("Agg")
    rows = [{"family": "full", "kept": 1.0, "score": 10.0, "score_lo": 9.0, "score_hi": 11.0, "n": 8}]
    rows += [{"family": f, "kept": k, "score": s, "score_lo": s * 0.9, "score_hi": s * 1.1, "n": 8}
             for f, k, s in (("CommonKV", 0.9, 3.4e4), ("xKV G=4", 0.25, 14.0), ("SnapKV", 0.25, 12.0))]
    df = pd.DataFrame(rows).assign(higher_is_better=False, front=False)
    fig = plotting.frontier(df, "perplexity")
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == [plotting.SHARING, plotting.LOW_RANK, plotting.EVICTION]
    assert axes[0].get_ylim()[1] < 100  # CommonKV's 3.4e4 does not stretch the axis
    assert any("3.4e+04" in t.get_text() for t in axes[0].texts)  # but is marked with its value
    assert all(ax.get_legend() is not None for ax in axes)
    plt.close(fig)


def test_tidy_fingerprint_column_is_the_records_code_fingerprint():
    df = frontier.tidy([_record([1, 0], 0.5)])
    assert list(df["fingerprint"]) == ["f00"]


def test_commonkv_widths_from_published_shapes():
    from crosskv.evidence import structure

    shapes = {n: structure.shape_of(n) for n in ("llama-3.1-8b", "mistral-7b", "qwen2.5-7b")}
    df = structure.commonkv_widths(shapes, [(1.0, 1.0), (0.4, 0.0)]).set_index(["model", "rank_ratio"])
    assert df.loc[("llama-3.1-8b", 1.0), "kv_width"] == 2 * 8 * 128 and df.loc[("llama-3.1-8b", 1.0), "latent_width"] == 4096
    assert df.loc[("llama-3.1-8b", 1.0), "break_even_rank_ratio"] == 0.5
    assert df.loc[("qwen2.5-7b", 1.0), "kv_width"] == 2 * 4 * 128
    assert not df.loc[("mistral-7b", 1.0), "unmerged_entry_saves"] and df.loc[("mistral-7b", 0.4), "unmerged_entry_saves"]
    assert df.loc[("llama-3.1-8b", 0.4), "nominal_kept"] == pytest.approx(0.4 * 4096 / 2048 / 4)
    with pytest.raises(ValueError, match="unknown model shape"):
        structure.shape_of("gpt-5")


def test_detectable_effect_on_the_gold_metric_and_on_windows():
    a = _record([1, 0, 1, 1, 0, 1], 0.5)
    for i, d in enumerate(a["details"]):
        d["gold_loglik"] = -0.1 * i
    b = {**a, "details": [{"index": i, "score": 1, "gold_loglik": -0.5} for i in range(6)]}
    assert report.retrieval_metric(a) == "gold_loglik" and report.retrieval_metric(_record([1], 0.5)) == "score"
    line = report.detectable(a, b, "a vs b")
    assert "gold_loglik at n = 6 samples" in line
    window = {"task": "ppl_cont", "metric": "perplexity", "higher_is_better": False,
              "details": [{"index": i, "nll": 10.0 + i, "scored_tokens": 8} for i in range(4)]}
    other = {**window, "details": [{"index": i, "nll": 11.0 + 1.3 * i, "scored_tokens": 8} for i in range(4)]}
    assert "n = 4 windows" in report.detectable(window, other, "ppl")
    with pytest.raises(ValueError, match="not on the same"):
        report.detectable(window, {**other, "details": other["details"][:3]}, "ppl")


def test_metric_labels_carry_the_context():
    assert report.metric_label("ppl", 512) == "ppl@512" and report.metric_label("ppl_cont", 2048) == "ppl_cont@2K"
    assert report.metric_label("gold_match", 32768) == "gold_match@32K" and report.metric_label("ppl", 1000) == "ppl@1000"
    assert report.metric_label("ppl_cont", None) == "ppl_cont"  # a mix of contexts: no single context to name
    with pytest.raises(ValueError, match="positive"):
        report.context_label(0)


def _decisions():
    def row(use, budget, decision, leader, cls, rival=None, **numbers):
        base = {"use": use, "metric": "gold_loglik@2K" if use == "retrieve" else "ppl_cont@2K", "budget": budget,
                "decision": decision, "leader": leader, "class_leader": cls, "kept_leader": budget * 0.98,
                "n_select": 50, "n_confirm": 50 if rival else None, "rivals": 3 if rival else None,
                "beaten": (3 if decision == "winner" else 2) if rival else None}
        if rival:
            base.update(rival=rival, class_rival="eviction", kept_rival=budget * 0.99, leader_estimate=-0.7,
                        rival_estimate=-0.8, diff=0.1, ci_low=0.05, ci_high=0.15, p=0.001, p_holm=0.004, **numbers)
        return base
    return pd.DataFrame([
        row("retrieve", 0.5, "winner", "xKV G=4 · kept=0.5", "cross-layer", "SnapKV · ratio=0.5"),
        row("retrieve", 0.05, "only candidate", "xKV G=4 · kept=0.05", "cross-layer"),
        row("continue", 0.5, "winner", "SnapKV · ratio=0.5", "eviction", "xKV G=4 · kept=0.5"),
        row("continue", 0.05, "only candidate", "xKV G=4 · kept=0.05", "cross-layer"),
    ])


def test_uses_answer_states_both_uses_and_where_they_disagree():
    decisions = _decisions()
    answer = report.uses_answer(decisions)
    assert answer.index("**Retrieve**") < answer.index("**Continue**")
    assert "**xKV G=4 · kept=0.5** (kept 0.490), ahead of all 3 rivals" in answer
    assert "difference +0.1 [+0.05, +0.15], Holm p = 0.004" in answer and "gold_loglik@2K" in answer
    assert "The uses disagree at 1 of 2 budgets" in answer and "retrieve → xKV G=4 · kept=0.5 (cross-layer, decided)" in answer
    assert report.MECHANISMS["eviction"] in answer and report.MECHANISMS["cross-layer"] in answer
    same = decisions.assign(leader=decisions["leader"].where(decisions["budget"] != 0.5, "xKV G=4 · kept=0.5"),
                            class_leader="cross-layer")
    assert "The uses agree at every budget both reach" in report.uses_answer(same)
    with pytest.raises(ValueError, match="none of the uses"):
        report.uses_answer(decisions.assign(use="other"))


def test_an_answer_naming_a_configuration_outside_its_table_is_caught():
    decisions = _decisions()
    names = ["xKV G=4 · kept=0.5", "xKV G=4 · kept=0.05", "SnapKV · ratio=0.5", "KVSharer · C=8", "KVSharer + xKV G=4"]
    assert report.answer_names_missing(report.uses_answer(decisions), decisions, names) == []
    assert report.answer_names_missing("KVSharer · C=8 wins.", decisions, names) == ["KVSharer · C=8"]
    assert report.answer_names_missing("the KVSharer + xKV G=4 hybrid", decisions) == ["KVSharer + xKV G=4"]
    assert report.answer_names_missing("xKV G=4 and SnapKV lead.", decisions) == []  # families backed by their rows


def test_dodge_spreads_only_series_that_collide():
    x = plotting.dodge([0.25, 0.25, 0.5, 0.9], ["a", "b", "a", "a"])
    assert x[0] < 0.25 < x[1] and x[2] == pytest.approx(0.5) and x[3] == pytest.approx(0.9)
    assert abs(x[1] / x[0] - 1) < 0.05  # a nudge, not a move


def test_floor_rows_give_each_family_at_zero_its_own_row():
    df = pd.DataFrame({"family": ["KVSharer", "CommonKV", "xKV G=4", "MiniCache"], "score": [0.0, 0.0, 0.3, 0.0],
                       "score_hi": [0.0, 0.0, 0.4, 0.05]})
    assert plotting.floor_rows(df, 0.05) == {"KVSharer": -0.05, "CommonKV": -0.1}
    assert plotting.floor_rows(df.iloc[:1], 0.05) == {}


def test_charts_keep_legends_titles_and_labels_apart():
    matplotlib.use("Agg")
    fig, axes = plt.subplots(1, 3, figsize=(6, 2.5))
    d = pd.DataFrame({"x": [0, 1, 0, 1], "y": [0.1, 0.9, 0.2, 0.8], "G": ["G=1", "G=1", "G=4", "G=4"]})
    for ax in axes:
        plotting.lines(d, "x", "y", hue="G", ax=ax, title="keys (post-RoPE) (mean of 20 sequences)", legend=ax is axes[-1])
    assert [ax.get_legend() is not None for ax in axes] == [False, False, True]
    assert "\n" in axes[0].get_title()  # wrapped to its 2-inch panel
    plt.close(fig)
    fig, axes = plt.subplots(2, 2, figsize=(6, 5))
    for ax in axes.flat:
        plotting.lines(d, "x", "y", hue="G", ax=ax)
    fig.draw_without_rendering()
    for ax in axes.flat:  # right in the last column, below in the last row, inside otherwise: never under a panel
        box = ax.get_legend().get_window_extent()
        assert not any(box.overlaps(other.get_window_extent()) for other in axes.flat if other is not ax)
    plt.close(fig)
    rows = [{"family": "full", "kept": 1.0, "score": 25.0, "score_lo": 22.0, "score_hi": 28.0, "n": 32}]
    rows += [{"family": f, "kept": k, "score": s, "score_lo": s * 0.9, "score_hi": s * 1.1, "n": 32}
             for f, k, s in (("CommonKV", 0.556, 203.0), ("KVSharer", 0.55, 127.0), ("xKV G=4", 0.25, 27.0),
                             ("xKV G=4", 0.5, 26.0), ("SnapKV", 0.25, 25.0), ("SnapKV", 0.5, 24.5))]
    fig = plotting.frontier(pd.DataFrame(rows).assign(higher_is_better=False, front=False), "ppl_cont@2K")
    fig.draw_without_rendering()
    boxes = [t.get_window_extent() for t in fig.axes[0].texts]
    assert len(boxes) == 2 and not boxes[0].overlaps(boxes[1])  # "203" and "127" readable
    plt.close(fig)
    rows = [{"family": "full", "kept": 1.0, "score": 0.34, "score_lo": 0.25, "score_hi": 0.44, "n": 100}]
    rows += [{"family": f, "kept": k, "score": 0.0, "score_lo": 0.0, "score_hi": 0.0, "n": 100}
             for f, k in (("KVSharer", 0.75), ("CommonKV", 0.556), ("MiniCache (paper reading)", 0.775))]
    fig = plotting.frontier(pd.DataFrame(rows).assign(higher_is_better=True, front=False), "gold_match@2K")
    heights = {round(float(line.get_ydata()[0]), 4) for line in fig.axes[0].lines if len(line.get_ydata()) == 1}
    assert len(heights) == 3 and max(heights) < 0  # three families at 0, three rows under the axis
    plt.close(fig)
