"""Notebooks: parameter files match the parameters cells; one papermill smoke run per notebook."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

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


def test_unknown_parameter_is_rejected(tmp_path):
    if not NOTEBOOKS:
        pytest.skip("no notebooks yet")
    with pytest.raises(ValueError, match="not declared"):
        figures.execute(NOTEBOOKS[0], "smoke", build_root=tmp_path, extra={"no_such_knob": 1})


def _finite_numbers(csv_path):
    df = pd.read_csv(csv_path)
    numbers = df.select_dtypes("number").to_numpy().ravel()
    return all(math.isfinite(x) for x in numbers if not pd.isna(x))


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_smoke_run_writes_figures_and_finite_results(notebook, tmp_path):
    executed = figures.execute(notebook, "smoke", build_root=tmp_path)
    where = figures.layout("smoke", tmp_path)
    outputs = figures.written_files(executed)
    assert any(name.endswith(".png") for name in outputs), f"{notebook.name} wrote no figure"
    for name in outputs:
        path = where.figures / name
        assert path.is_file() and path.stat().st_size > 0
        if name.endswith(".csv"):
            assert _finite_numbers(path), f"{name} holds non-finite numbers"
    nb = json.loads(executed.read_text())
    errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    check_executed(executed, where.figures)  # every written figure shown; score tables carry intervals
    assert all(c.get("execution_count") is None for c in nb["cells"] if c["cell_type"] == "code")
    # committed figures are never touched by a smoke run
    assert str(where.figures).startswith(str(tmp_path))
