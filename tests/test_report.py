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
