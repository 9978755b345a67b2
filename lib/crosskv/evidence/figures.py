"""Execute the numbered notebooks with papermill under a parameter profile (``make figures``).

Profiles are plain YAML files ``notebooks/params/<profile>.yaml`` mapping a notebook stem to its
parameters. Every notebook also receives ``figures_dir`` and ``results_dir``:

- ``cpu`` (default of ``make figures``): notebooks executed in place, figures into ``figures/``,
  results into ``data/results/``; the executed notebooks and figures are committed.
- ``smoke`` (tests): notebooks, figures and results under ``build/smoke/`` — never touches ``figures/``.
- ``gpu`` (a researcher's GPU box, real models): notebooks into ``build/gpu/``, figures into ``figures/gpu/``.

Incremental: each executed notebook records in its metadata a hash of its inputs (its source
cells, its parameters and the library's source); when that hash and the notebook's figures are
unchanged, it is skipped. ``FORCE=1`` (or ``force=True``) re-executes. Volatile metadata
(papermill timings, execution counts) is stripped so a re-run that changes nothing makes no diff.
"""
from __future__ import annotations

import ast
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from crosskv.core import fingerprint
from crosskv.core.assets import PROJECT_ROOT

log = logging.getLogger(__name__)

NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
PARAMS_DIR = NOTEBOOKS_DIR / "params"
PROFILES = ("smoke", "cpu", "gpu")
FIGURE_PATTERN = re.compile(r"(?:fig|tab)_\d\d_[\w-]+\.(?:png|pdf|csv|md)")


@dataclass(frozen=True)
class Layout:
    """Where a profile writes executed notebooks, figures and results (absolute paths)."""

    notebooks: Path
    figures: Path
    results: Path


def layout(profile: str, build_root: Path | None = None) -> Layout:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    build = Path(build_root) if build_root else PROJECT_ROOT / "build"
    if profile == "cpu":
        return Layout(NOTEBOOKS_DIR, PROJECT_ROOT / "figures", PROJECT_ROOT / "data" / "results")
    if profile == "gpu":
        return Layout(build / "gpu" / "notebooks", PROJECT_ROOT / "figures" / "gpu", PROJECT_ROOT / "data" / "results")
    return Layout(build / "smoke" / "notebooks", build / "smoke" / "figures", build / "smoke" / "results")


def notebooks() -> list[Path]:
    """The numbered notebooks in reading order."""
    return sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


def load_profile(profile: str) -> dict[str, dict]:
    path = PARAMS_DIR / f"{profile}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"parameter file {path} for profile {profile!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: expected a mapping notebook-stem → parameter mapping")
    known = {nb.stem for nb in notebooks()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: no notebook named {', '.join(unknown)} (notebooks: {', '.join(sorted(known))})")
    return data


def declared_parameters(notebook: Path) -> dict[str, object]:
    """Names and literal values assigned in the cell tagged ``parameters``."""
    nb = json.loads(Path(notebook).read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{notebook}: expected exactly one cell tagged 'parameters', found {len(cells)}")
    tree = ast.parse("".join(cells[0]["source"]))
    found = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            if isinstance(target, ast.Name):
                found[target.id] = ast.literal_eval(node.value)
    return found


def _source_cells(notebook: Path) -> list[tuple[str, str]]:
    nb = json.loads(notebook.read_text())
    return [(c["cell_type"], "".join(c["source"])) for c in nb["cells"]
            if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]


def input_hash(notebook: Path, parameters: dict) -> str:
    """Hash of everything an executed notebook depends on: its source, parameters and the library."""
    return fingerprint.digest({"source": _source_cells(notebook), "params": parameters,
                               "lib": fingerprint.code_fingerprint()})


def _recorded_hash(executed: Path) -> str | None:
    if not executed.is_file():
        return None
    return json.loads(executed.read_text()).get("metadata", {}).get("crosskv", {}).get("input_hash")


def written_files(executed: Path) -> list[str]:
    return json.loads(executed.read_text()).get("metadata", {}).get("crosskv", {}).get("outputs", [])


def strip_volatile(path: Path, inputs: str, outputs: list[str]) -> None:
    """Remove timings/execution counts and record the input hash and written files in the metadata."""
    nb = json.loads(path.read_text())
    nb["metadata"].pop("papermill", None)
    nb["metadata"].pop("widgets", None)
    nb["metadata"]["crosskv"] = {"input_hash": inputs, "outputs": sorted(outputs)}
    for cell in nb["cells"]:
        cell.get("metadata", {}).pop("papermill", None)
        cell.get("metadata", {}).pop("execution", None)
        if cell["cell_type"] == "code":
            cell["execution_count"] = None
            for output in cell.get("outputs", []):
                if "execution_count" in output:
                    output["execution_count"] = None
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False, sort_keys=True) + "\n")


def _listing(folder: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in folder.glob("*") if FIGURE_PATTERN.fullmatch(p.name)} if folder.is_dir() else {}


def checked_parameters(notebook: Path, profile: str, extra: dict | None = None) -> dict:
    """The parameters ``profile`` (and ``extra``) give ``notebook``; ``ValueError`` naming the parameter file
    and each parameter its parameters cell does not declare."""
    parameters = dict(load_profile(profile).get(notebook.stem, {}))
    parameters.update(extra or {})
    declared = declared_parameters(notebook)
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise ValueError(f"{notebook.name}: parameter(s) {', '.join(unknown)} of profile {profile!r} "
                         f"({PARAMS_DIR / (profile + '.yaml')}) are not declared in its parameters cell "
                         f"({', '.join(declared)})")
    return parameters


def check_writable(folder: Path) -> None:
    """``ValueError`` naming ``folder`` unless it is, or can be created as, a writable directory."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"output folder {folder}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {folder}: {existing} is not writable")


def execute(notebook: Path, profile: str = "cpu", force: bool = False, build_root: Path | None = None,
            extra: dict | None = None) -> Path:
    """Execute one notebook under ``profile``; returns the executed notebook's path (skipped if up to date)."""
    import papermill

    where = layout(profile, build_root)
    parameters = checked_parameters(notebook, profile, extra)
    parameters.update(figures_dir=str(where.figures), results_dir=str(where.results))
    target = where.notebooks / notebook.name
    inputs = input_hash(notebook, {k: v for k, v in parameters.items() if k not in ("figures_dir", "results_dir")})
    if not force and _recorded_hash(target) == inputs and all((where.figures / f).is_file() for f in written_files(target)):
        log.info("%s is up to date (inputs %s)", notebook.name, inputs)
        return target
    where.notebooks.mkdir(parents=True, exist_ok=True)
    where.figures.mkdir(parents=True, exist_ok=True)
    before = _listing(where.figures)
    env_seed = os.environ.setdefault("SOURCE_DATE_EPOCH", "1700000000")
    os.environ["CROSSKV_PROFILE"] = profile  # the kernel inherits it: the notebook's provenance line names it
    log.info("executing %s (profile %s, SOURCE_DATE_EPOCH=%s)", notebook.name, profile, env_seed)
    papermill.execute_notebook(str(notebook), str(target), parameters=parameters, kernel_name="python3",
                               cwd=str(NOTEBOOKS_DIR), progress_bar=False, log_output=False)
    after = _listing(where.figures)
    outputs = [name for name, mtime in after.items() if before.get(name) != mtime]
    strip_volatile(target, inputs, outputs)
    return target


def run(profile: str = "cpu", only: list[str] | None = None, force: bool = False,
        build_root: Path | None = None) -> list[Path]:
    """Execute every numbered notebook (or those whose stem starts with one of ``only``) in order."""
    force = force or os.environ.get("FORCE", "") not in ("", "0")
    selected = [nb for nb in notebooks() if not only or any(nb.stem.startswith(o) for o in only)]
    if not selected:
        raise ValueError(f"no notebook matches {only}")
    for notebook in selected:  # every parameter file and output folder is checked before the first notebook runs
        checked_parameters(notebook, profile)
    where = layout(profile, build_root)
    for folder in (where.notebooks, where.figures, where.results):
        check_writable(folder)
    return [execute(nb, profile, force=force, build_root=build_root) for nb in selected]



def configure_cli(parser) -> None:
    """Arguments of ``python -m crosskv figures``."""
    parser.add_argument("--profile", default="cpu", choices=PROFILES)
    parser.add_argument("--only", nargs="*", help="notebook number prefixes, e.g. 01 03")
    parser.add_argument("--force", action="store_true", help="re-execute even when inputs are unchanged (or FORCE=1)")


def run_cli(args) -> int:
    """``python -m crosskv figures [--profile cpu] [--only 02 ...] [--force]``."""
    logging.getLogger("crosskv").setLevel(logging.INFO)
    for path in run(args.profile, args.only, args.force):
        log.info("done: %s", path)
    return 0
