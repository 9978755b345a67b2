"""The notebook runner: parameters parsing, input hashing, volatile-metadata stripping, table/figure writers."""
from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

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


def test_strip_volatile_keeps_the_execution_seconds(tmp_path):
    path = _notebook(tmp_path)
    assert figures.recorded_seconds(path) is None
    figures.strip_volatile(path, "abc", [], seconds=12.6)
    assert figures.recorded_seconds(path) == 13
    assert figures.recorded_seconds(tmp_path / "missing.ipynb") is None


def _executed(folder: Path, stem: str, seconds: float | None) -> Path:
    nb = nbformat.v4.new_notebook()
    if seconds is not None:
        nb.metadata["crosskv"] = {"input_hash": "x", "outputs": [], "seconds": seconds}
    path = folder / f"{stem}.ipynb"
    nbformat.write(nb, path)
    return path


def test_schedule_runs_the_longest_first_and_what_a_notebook_reads_before_it(tmp_path):
    where = figures.Layout(tmp_path, tmp_path, tmp_path)
    selected = [_executed(tmp_path, stem, seconds) for stem, seconds in
                [("01_a", 50), ("02_b", 1300), ("03_c", 3600), ("04_d", 800), ("05_e", 7700)]]
    assert [nb.stem for nb in figures.schedule(selected, where)] == ["05_e", "01_a", "03_c", "02_b", "04_d"]
    _executed(tmp_path, "04_d", None)  # never executed (or before seconds were recorded): first
    assert figures.schedule(selected, where)[0].stem == "04_d"
    assert [nb.stem for nb in figures.schedule(selected[2:], where)] == ["04_d", "05_e", "03_c"]  # 01 not selected


def test_parallel_runs_start_a_notebook_only_after_what_it_reads(tmp_path):
    queue = [tmp_path / f"{stem}.ipynb" for stem in ("05_e", "01_a", "03_c", "02_b")]
    events, lock = [], threading.Lock()

    def execute_one(notebook, fail=()):
        with lock:
            events.append(("start", notebook.stem[:2]))
        time.sleep(0.2 if notebook.stem[:2] == "01" else 0.05)
        with lock:
            events.append(("end", notebook.stem[:2]))
        return 1 if notebook.stem[:2] in fail else 0

    codes = figures._run_parallel(queue, 2, execute_one)
    assert set(codes.values()) == {0}
    assert events.index(("start", "03")) > events.index(("end", "01"))
    assert events[:2] == [("start", "05"), ("start", "01")]  # two at once, in queue order
    events.clear()
    codes = figures._run_parallel(queue, 2, lambda nb: execute_one(nb, fail=("01",)))
    assert {nb.stem[:2]: code for nb, code in codes.items()} == {"05": 0, "01": 1, "03": None, "02": 0}
    assert ("start", "03") not in events


def test_reads_declares_every_table_a_notebook_reads_from_another():
    for notebook in figures.notebooks():
        own = notebook.stem[:2]
        code = "".join("".join(c["source"]) for c in json.loads(notebook.read_text())["cells"]
                       if c["cell_type"] == "code")
        others = {n for n in re.findall(r"(?:fig|tab)_(\d\d)_", code) if n != own}
        assert others <= set(figures.READS.get(own, ())), (notebook.name, others)
    assert figures.READS == {"03": ("01",)}


def test_a_notebook_claims_only_its_own_figures(tmp_path):
    for name in ("fig_03_x.png", "tab_03_y.csv", "fig_05_z.png", "notes.txt"):
        (tmp_path / name).write_text("x")
    assert sorted(figures._listing(tmp_path, "03")) == ["fig_03_x.png", "tab_03_y.csv"]


def test_a_kernel_that_dies_while_starting_is_started_again(monkeypatch, tmp_path):
    import papermill

    calls = []

    def flaky(*args, **kwargs):
        calls.append(args)
        if len(calls) < figures.KERNEL_STARTS:
            raise RuntimeError(figures.KERNEL_DIED)

    monkeypatch.setattr(papermill, "execute_notebook", flaky)
    monkeypatch.setattr(figures.time, "sleep", lambda seconds: None)
    figures._papermill(Path("01_x.ipynb"), tmp_path / "out.ipynb", {})
    assert len(calls) == figures.KERNEL_STARTS
    def dying(*args, **kwargs):
        calls.append(args)
        raise RuntimeError(figures.KERNEL_DIED)

    calls.clear()
    monkeypatch.setattr(papermill, "execute_notebook", dying)
    with pytest.raises(RuntimeError, match="Kernel died"):  # the last attempt's failure is raised
        figures._papermill(Path("01_x.ipynb"), tmp_path / "out.ipynb", {})
    assert len(calls) == figures.KERNEL_STARTS

    def broken(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("a cell failed")

    calls.clear()
    monkeypatch.setattr(papermill, "execute_notebook", broken)
    with pytest.raises(RuntimeError, match="a cell failed"):  # any other error: no second attempt
        figures._papermill(Path("01_x.ipynb"), tmp_path / "out.ipynb", {})
    assert len(calls) == 1


def test_jobs_below_one_are_refused():
    with pytest.raises(ValueError, match="jobs=0 must be at least 1"):
        figures.run("smoke", jobs=0)


def test_unknown_profile():
    with pytest.raises(ValueError, match="unknown profile 'fast'"):
        figures.layout("fast")


def test_smoke_layout_never_targets_committed_figures(tmp_path):
    assert figures.layout("smoke", tmp_path).figures != figures.layout("cpu").figures


def test_shrink_file_holds_only_sizes_and_known_parameters():
    shrink = figures.load_shrink()
    gpu = figures.load_profile("gpu")
    for notebook in figures.notebooks():
        declared = figures.declared_parameters(notebook)
        unknown = set(shrink.get(notebook.stem, {})) - set(declared)
        assert not unknown, f"gpu-shrink.yaml sets undeclared parameters of {notebook.name}: {sorted(unknown)}"
        assert notebook.stem in gpu and notebook.stem in shrink, f"{notebook.name} is missing from a gpu parameter file"


def test_shrink_refuses_a_list_of_names(tmp_path, monkeypatch):
    bad = tmp_path / "gpu-shrink.yaml"
    bad.write_text("05_frontier:\n  tasks: [niah_single_2]\n")
    monkeypatch.setattr(figures, "SHRINK_FILE", bad)
    with pytest.raises(ValueError, match=r"05_frontier.tasks=\['niah_single_2'\] is not a size"):
        figures.load_shrink()


def test_shrink_applies_to_the_gpu_profile_only():
    with pytest.raises(ValueError, match="--shrink applies to the gpu profile, not 'cpu'"):
        figures.run("cpu", shrink_model="random:tiny")


def test_shrunk_run_keeps_the_gpu_paths_and_writes_apart(tmp_path):
    notebook = figures.notebooks()[-1]
    parameters = figures.checked_parameters(notebook, "gpu", figures.shrunk_parameters(notebook, "random:tiny"))
    gpu = figures.load_profile("gpu")[notebook.stem]
    assert parameters["model"] == "random:tiny"
    assert parameters["tasks"] == gpu["tasks"]  # names and paths stay the gpu profile's
    assert figures.layout("gpu", tmp_path, shrunk=True).figures.is_relative_to(tmp_path)


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
