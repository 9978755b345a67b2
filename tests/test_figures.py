"""The notebook runner: parameters parsing, input hashing, volatile-metadata stripping, table/figure writers."""
from __future__ import annotations

import json

import matplotlib.pyplot as plt
import nbformat
import pandas as pd
import pytest

from crosskv.evidence import figures
from crosskv.evidence import plotting
from crosskv.evidence import tables


def _notebook(tmp_path, params_src="model: str = 'm'  # a model\nn: int = 3\n"):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(params_src)
    cell.metadata["tags"] = ["parameters"]
    out = nbformat.v4.new_code_cell("print(n)", execution_count=7)
    out.outputs = [nbformat.v4.new_output("stream", text="3\n")]
    out.metadata["papermill"] = {"duration": 1.5}
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), cell, out]
    nb.metadata["papermill"] = {"start_time": "now"}
    path = tmp_path / "01_t.ipynb"
    nbformat.write(nb, path)
    return path


def test_declared_parameters(tmp_path):
    assert figures.declared_parameters(_notebook(tmp_path)) == {"model": "m", "n": 3}
    with pytest.raises(ValueError):  # computed values do not belong in the parameters cell
        figures.declared_parameters(_notebook(tmp_path, "n = len('abc')\n"))


def test_input_hash_tracks_source_and_parameters(tmp_path):
    path = _notebook(tmp_path)
    a = figures.input_hash(path, {"n": 3})
    assert a == figures.input_hash(path, {"n": 3})
    assert a != figures.input_hash(path, {"n": 4})
    b = figures.input_hash(_notebook(tmp_path, "model: str = 'm'\nn: int = 5\n"), {"n": 3})
    assert a != b


def test_strip_volatile_removes_timings_and_counts(tmp_path):
    path = _notebook(tmp_path)
    figures.strip_volatile(path, "abc", ["fig_01_x.png"])
    nb = json.loads(path.read_text())
    assert "papermill" not in nb["metadata"]
    assert nb["metadata"]["crosskv"] == {"input_hash": "abc", "outputs": ["fig_01_x.png"]}
    assert all(c.get("execution_count") is None for c in nb["cells"] if c["cell_type"] == "code")
    assert all("papermill" not in c["metadata"] for c in nb["cells"])
    first = path.read_bytes()
    figures.strip_volatile(path, "abc", ["fig_01_x.png"])
    assert path.read_bytes() == first


def test_unknown_profile():
    with pytest.raises(ValueError, match="unknown profile 'fast'"):
        figures.layout("fast")


def test_smoke_layout_never_targets_committed_figures(tmp_path):
    assert figures.layout("smoke", tmp_path).figures != figures.layout("cpu").figures


def test_savefig_is_byte_stable(tmp_path):
    plotting.style()
    digests = []
    for run in range(2):
        fig, ax = plt.subplots()
        plotting.lines(pd.DataFrame({"x": [1, 2, 3], "y": [3, 1, 2], "h": ["a", "a", "b"]}), "x", "y", hue="h", ax=ax)
        paths = plotting.savefig(fig, "fig_01_probe", tmp_path / str(run))
        plt.close(fig)
        digests.append([p.read_bytes() for p in paths])
    assert digests[0] == digests[1]
    with pytest.raises(ValueError, match="must start with 'fig_NN_'"):
        plotting.savefig(plt.figure(), "probe", tmp_path)


def test_figures_and_tables_carry_their_commit(tmp_path):
    from PIL import Image

    from crosskv.run import results

    fig, ax = plt.subplots()
    ax.plot([1, 2], [2, 1])
    png, pdf = plotting.savefig(fig, "fig_01_probe", tmp_path, commit="abc123+dirty")
    plt.close(fig)
    assert Image.open(png).text["Comment"] == "crosskv commit abc123+dirty"
    assert b"crosskv commit abc123+dirty" in pdf.read_bytes()
    csv, md = tables.save_table(pd.DataFrame({"x": [1.5]}), "tab_01_probe", tmp_path, commit="abc123")
    assert list(pd.read_csv(csv)["commit"]) == ["abc123"]
    assert md.read_text().rstrip().endswith("crosskv commit abc123</sub>")
    csv, md = tables.save_table(pd.DataFrame({"x": [1.5]}), "tab_01_probe", tmp_path)
    assert list(pd.read_csv(csv)["commit"]) == [results.git_commit() or "unknown"]


def test_tables_and_paper_reference(tmp_path):
    ref = tables.paper_numbers("xKV", model="Llama-3.1-8B-Instruct", table="Table 1 (ICML 2026 version)")
    assert set(ref["method"]) >= {"Full", "xKV-4", "Single SVD", "MiniCache"}
    assert (ref["source"] == "2nd").all()
    ours = pd.DataFrame({"method": ["full"], "score": [0.9]})
    both = tables.side_by_side(ours, ref, on="method", ours_label="ours: SmolLM2-135M", reference_label="paper")
    assert list(both["origin"]).count("paper") == len(ref)
    csv, md = tables.save_table(both, "tab_01_probe", tmp_path)
    assert pd.read_csv(csv).shape[0] == len(both) and "|" in md.read_text()
    with pytest.raises(ValueError, match="unknown reference column"):
        tables.paper_numbers(nope=1)
