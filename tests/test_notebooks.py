"""Notebooks: parameter files match the parameters cells; one papermill smoke run per notebook."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from crosskv.core.fingerprint import code_fingerprint
from crosskv.evidence import figures
from test_evidence import check_executed

NOTEBOOKS = figures.notebooks()


@pytest.mark.parametrize("profile", figures.PROFILES)
def test_every_parameter_file_key_is_declared(profile):
    params = figures.load_profile(profile)
    for notebook in NOTEBOOKS:
        declared = figures.declared_parameters(notebook)
        for required in ("model", "dtype", "figures_dir", "results_dir"):
            assert required in declared, f"{notebook.name} does not declare {required}"
        unknown = set(params.get(notebook.stem, {})) - set(declared)
        assert not unknown, f"{profile}.yaml sets undeclared parameters of {notebook.name}: {sorted(unknown)}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_notebook_defaults_are_the_cpu_profile(notebook):
    """Opening a notebook in JupyterLab reproduces the committed (cpu profile) numbers: every parameter the
    cpu profile sets has that value as the notebook's own default."""
    declared = figures.declared_parameters(notebook)
    profile = figures.load_profile("cpu").get(notebook.stem, {})
    differ = {name: (declared[name], value) for name, value in profile.items() if declared.get(name) != value}
    assert not differ, f"{notebook.name}: defaults (notebook, cpu profile) differ: {differ}"


def test_unknown_parameter_is_rejected(tmp_path):
    if not NOTEBOOKS:
        pytest.skip("no notebooks yet")
    with pytest.raises(ValueError, match="not declared"):
        figures.execute(NOTEBOOKS[0], "smoke", build_root=tmp_path, extra={"no_such_knob": 1})


def _outputs(nb):
    return [(i, o) for i, c in enumerate(nb["cells"]) for o in c.get("outputs", [])]


def _text(output, kind="text/plain"):
    return "".join(output.get("data", {}).get(kind, ""))


def provenance_of(nb) -> dict:
    """The provenance ``report.page`` recorded in an executed notebook (the output metadata under ``crosskv``)."""
    found = [o["metadata"]["crosskv"] for _, o in _outputs(nb) if "code_fingerprint" in o.get("metadata", {}).get("crosskv", {})]
    assert len(found) == 1, f"expected one provenance output, found {len(found)}"
    return found[0]


def hygiene_problems(nb, name: str) -> list[str]:
    """What makes an executed notebook unfit to read: stderr output, echoed strings or paths, a missing
    title/question/answer/provenance opening, Findings shown other than once."""
    problems = []
    cells = nb["cells"]
    first = "".join(cells[0]["source"]) if cells else ""
    if not cells or cells[0]["cell_type"] != "markdown" or not first.startswith("# ") or "Question" not in first:
        problems.append(f"{name}: the first cell is not a Markdown title with the question")
    opening = next((c for c in cells if c["cell_type"] == "code"), None)
    if opening is None or "report.page(" not in "".join(opening["source"]):
        problems.append(f"{name}: the first code cell does not open the page (report.page: provenance and answer)")
    else:
        answers = [_text(o, "text/markdown") for o in opening.get("outputs", []) if "**Answer:**" in _text(o, "text/markdown")]
        if len(answers) != 1 or "rendered from this run's results when" in answers[0]:
            problems.append(f"{name}: the opening cell holds no rendered answer")
    for i, output in _outputs(nb):
        if output.get("output_type") == "stream" and output.get("name") == "stderr":
            problems.append(f"{name} cell {i}: stderr output {''.join(output['text'])[:120]!r}")
        if output.get("output_type") == "execute_result":
            plain = _text(output).lstrip()
            if plain[:1] in "'\"" or plain.startswith("[PosixPath(") or plain.startswith("None"):
                problems.append(f"{name} cell {i}: echoed value {plain[:80]!r}")
    findings = sum(_text(o, "text/markdown").startswith("### Findings") for _, o in _outputs(nb))
    if findings != 1:
        problems.append(f"{name}: Findings shown {findings} times (expected once)")
    return problems


def _committed(notebook):
    """The committed notebook; it must have been executed (`make figures`)."""
    nb = json.loads(notebook.read_text())
    assert any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), (
        f"{notebook.name} is committed unexecuted: run `make figures`")
    return nb


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_committed_notebook_is_clean_and_opens_with_its_answer(notebook):
    assert not hygiene_problems(_committed(notebook), notebook.name)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_committed_notebook_was_executed_with_this_library(notebook):
    recorded = provenance_of(_committed(notebook))
    assert recorded["code_fingerprint"] == code_fingerprint(), (
        f"{notebook.name} was executed with library {recorded['code_fingerprint']}, the library is now "
        f"{code_fingerprint()}: re-run `make figures`")
    assert recorded["profile"] == "cpu"


def test_hygiene_check_catches_problems():
    bad = {"cells": [{"cell_type": "code", "source": ["x"], "outputs": [
        {"output_type": "stream", "name": "stderr", "text": ["warn"]},
        {"output_type": "execute_result", "data": {"text/plain": ["'### Answer'"]}}]}]}
    problems = " ".join(hygiene_problems(bad, "nb"))
    for expected in ("title", "open the page", "stderr", "echoed", "Findings shown 0"):
        assert expected in problems


def _finite_numbers(csv_path):
    df = pd.read_csv(csv_path)
    numbers = df.select_dtypes("number").to_numpy().ravel()
    return all(math.isfinite(x) for x in numbers if not pd.isna(x))


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    """Every notebook executed once under the smoke profile into one build, two at a time as `make figures`
    runs them (each in its own process; 03 only after 01, whose adjacent-layer table it reads)."""
    root = tmp_path_factory.mktemp("smoke")
    figures.run("smoke", build_root=root, jobs=2)
    return root


def check_run(executed, where, root, hygiene: bool = True) -> None:
    """An executed notebook of a run into ``root``: its recorded time, its own figures written (non-empty, finite
    tables, every one shown; score tables with intervals), no error output, this library, and (``hygiene``) clean
    cells."""
    assert figures.recorded_seconds(executed) is not None
    outputs = figures.written_files(executed)
    assert any(name.endswith(".png") for name in outputs), f"{executed.name} wrote no figure"
    assert all(name[4:6] == executed.stem[:2] for name in outputs), outputs  # only its own, though run in parallel
    for name in outputs:
        path = where.figures / name
        assert path.is_file() and path.stat().st_size > 0
        if name.endswith(".csv"):
            assert _finite_numbers(path), f"{name} holds non-finite numbers"
    nb = json.loads(executed.read_text())
    errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    check_executed(executed, where.figures, pool_band=False)  # every written figure shown; score tables carry intervals
    assert not hygiene or not hygiene_problems(nb, executed.name)
    assert provenance_of(nb)["code_fingerprint"] == code_fingerprint()
    assert all(c.get("execution_count") is None for c in nb["cells"] if c["cell_type"] == "code")
    # committed figures are never touched by a run into a build
    assert str(where.figures).startswith(str(root))


@pytest.mark.slow
@pytest.mark.smoke_profile
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_smoke_run_writes_figures_and_finite_results(notebook, smoke_root):
    where = figures.layout("smoke", smoke_root)
    check_run(where.notebooks / notebook.name, where, smoke_root)


@pytest.fixture(scope="module")
def shrunk_gpu_root(tmp_path_factory):
    """Every notebook executed once with every parameter path of the gpu profile, shrunk onto random:tiny
    (``crosskv figures --profile gpu --model random:tiny --shrink``), two at a time."""
    root = tmp_path_factory.mktemp("gpu-shrunk")
    figures.run("gpu", build_root=root, jobs=2, shrink_model="random:tiny")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_shrunk_gpu_profile_runs_every_notebook(notebook, shrunk_gpu_root):
    where = figures.layout("gpu", shrunk_gpu_root, shrunk=True)
    # random weights at tiny sizes: stderr warnings are not checked (04's figure cell gets matplotlib's FutureWarning
    # "Calling float on a single element" from a one-element array); the smoke run and the committed notebooks are
    check_run(where.notebooks / notebook.name, where, shrunk_gpu_root, hygiene=False)


def _answer(nb) -> str:
    opening = next(c for c in nb["cells"] if c["cell_type"] == "code")
    return next(_text(o, "text/markdown") for o in opening.get("outputs", []) if "**Answer:**" in _text(o, "text/markdown"))


def test_frontier_answer_names_only_configurations_of_its_table():
    """05's Answer names configurations (``family · configuration``) only where tab_05_best_at_budget holds them."""
    from crosskv.evidence import report

    notebook = next(nb for nb in NOTEBOOKS if nb.stem.startswith("05"))
    answer = _answer(_committed(notebook))
    figures_dir = figures.layout("cpu").figures
    tidy = pd.read_csv(figures_dir / "tab_05_frontier.csv")
    every = set(tidy["family"] + " · " + tidy["configuration"].astype(str))
    best = pd.read_csv(figures_dir / "tab_05_best_at_budget.csv")
    assert not report.answer_names_missing(answer, best, names=every)
    assert {"use", "decision", "p_holm", "selection"} <= set(best.columns)
    winners = best[best["decision"] == "winner"]
    assert (winners["p_holm"] < 0.05).all(), winners
