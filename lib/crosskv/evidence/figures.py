"""Execute the numbered notebooks with papermill under a parameter profile (``make figures``).

Profiles are plain YAML files ``notebooks/params/<profile>.yaml`` mapping a notebook stem to its
parameters. Every notebook also receives ``figures_dir`` and ``results_dir``:

- ``cpu`` (default of ``make figures``): notebooks executed in place, figures into ``figures/``,
  results into ``data/results/``; the executed notebooks and figures are committed.
- ``smoke`` (tests): notebooks, figures and results under ``build/smoke/`` — never touches ``figures/``.
- ``gpu`` (a researcher's GPU box, real models): notebooks into ``build/gpu/``, figures into ``figures/gpu/``.
  Shrunk (``shrink_model``, ``crosskv figures --profile gpu --model random:tiny --shrink``): every parameter path
  of the gpu profile at the sizes of ``params/gpu-shrink.yaml`` on a small model, everything under
  ``build/gpu-shrunk/`` (``make test`` runs it, so that a GPU box never runs the gpu profile's paths first).

Incremental: each executed notebook records in its metadata a hash of its inputs (its source
cells, its parameters and the library's source); when that hash and the notebook's figures are
unchanged, it is skipped. ``FORCE=1`` (or ``force=True``) re-executes. Volatile metadata
(papermill timings, execution counts) is stripped so a re-run that changes nothing makes no diff; the
execution's wall time is kept (``seconds``), so the next run can schedule the longest notebooks first.

Parallel: ``jobs > 1`` executes that many notebooks at once, each in its own ``crosskv figures --only``
process whose kernel gets ``cores // min(jobs, notebooks)`` torch threads (``OMP_NUM_THREADS``, unless set), longest
first by their last recorded ``seconds`` (never executed: first), except that a notebook that reads
another's tables (:data:`READS`) starts only once that one has finished (and it is moved ahead of it in
the queue). Otherwise the notebooks share only the results store, whose records are written atomically,
so a configuration two notebooks need is at worst computed twice. A kernel that dies while starting (two
started at once can pick the same TCP port) is started again (:data:`KERNEL_STARTS`).
"""
from __future__ import annotations

import ast
import json
import logging
import os
import re
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import yaml

from crosskv.core import fingerprint
from crosskv.core.assets import PROJECT_ROOT

log = logging.getLogger(__name__)

NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
PARAMS_DIR = NOTEBOOKS_DIR / "params"
PROFILES = ("smoke", "cpu", "gpu")
SHRINK_FILE = PARAMS_DIR / "gpu-shrink.yaml"
FIGURE_PATTERN = re.compile(r"(?:fig|tab)_\d\d_[\w-]+\.(?:png|pdf|csv|md)")
# notebook number → the numbers of the notebooks whose figures/tables it reads (a test checks the sources)
READS = {"03": ("01",)}


@dataclass(frozen=True)
class Layout:
    """Where a profile writes executed notebooks, figures and results (absolute paths)."""

    notebooks: Path
    figures: Path
    results: Path


def layout(profile: str, build_root: Path | None = None, shrunk: bool = False) -> Layout:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    build = Path(build_root) if build_root else PROJECT_ROOT / "build"
    if shrunk:
        return Layout(build / "gpu-shrunk" / "notebooks", build / "gpu-shrunk" / "figures", build / "gpu-shrunk" / "results")
    if profile == "cpu":
        return Layout(NOTEBOOKS_DIR, PROJECT_ROOT / "figures", PROJECT_ROOT / "data" / "results")
    if profile == "gpu":
        return Layout(build / "gpu" / "notebooks", PROJECT_ROOT / "figures" / "gpu", PROJECT_ROOT / "data" / "results")
    return Layout(build / "smoke" / "notebooks", build / "smoke" / "figures", build / "smoke" / "results")


def notebooks() -> list[Path]:
    """The numbered notebooks in reading order."""
    return sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


def load_profile(profile: str) -> dict[str, dict]:
    return _load_params(PARAMS_DIR / f"{profile}.yaml", profile)


def load_shrink() -> dict[str, dict]:
    """``params/gpu-shrink.yaml``: per notebook, the sizes that replace the gpu profile's in a shrunk run; ``ValueError``
    naming a parameter whose value is not a size (an int, a float or a list of numbers)."""
    data = _load_params(SHRINK_FILE, "gpu (shrunk)")
    for stem, parameters in data.items():
        for name, value in parameters.items():
            if not _is_size(value):
                raise ValueError(f"{SHRINK_FILE}: {stem}.{name}={value!r} is not a size (an int, a float or a list "
                                 "of numbers); the shrunk run keeps the gpu profile's names and paths")
    return data


def _is_size(value) -> bool:
    if isinstance(value, list):
        return all(_is_size(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def shrunk_parameters(notebook: Path, model: str) -> dict:
    """What a shrunk gpu-profile run gives ``notebook`` beyond the gpu profile: its sizes and ``model``."""
    return {**load_shrink().get(notebook.stem, {}), "model": model}


def _load_params(path: Path, profile: str) -> dict[str, dict]:
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


def recorded_seconds(executed: Path) -> float | None:
    """Wall time of the notebook's last execution (``None``: never executed, or before it was recorded)."""
    if not executed.is_file():
        return None
    return json.loads(executed.read_text()).get("metadata", {}).get("crosskv", {}).get("seconds")


def strip_volatile(path: Path, inputs: str, outputs: list[str], seconds: float | None = None) -> None:
    """Remove timings/execution counts and record the input hash, written files and (when given) the
    execution's wall time in the metadata."""
    nb = json.loads(path.read_text())
    nb["metadata"].pop("papermill", None)
    nb["metadata"].pop("widgets", None)
    nb["metadata"]["crosskv"] = {"input_hash": inputs, "outputs": sorted(outputs),
                                 **({"seconds": round(seconds)} if seconds is not None else {})}
    for cell in nb["cells"]:
        cell.get("metadata", {}).pop("papermill", None)
        cell.get("metadata", {}).pop("execution", None)
        if cell["cell_type"] == "code":
            cell["execution_count"] = None
            for output in cell.get("outputs", []):
                if "execution_count" in output:
                    output["execution_count"] = None
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False, sort_keys=True) + "\n")


def _listing(folder: Path, number: str) -> dict[str, float]:
    """Modification times of the ``fig_NN_*`` / ``tab_NN_*`` files of notebook ``number`` (``NN``) in ``folder``
    (only its own: another notebook may be writing its files at the same time)."""
    if not folder.is_dir():
        return {}
    return {p.name: p.stat().st_mtime for p in folder.glob(f"*_{number}_*")
            if FIGURE_PATTERN.fullmatch(p.name)}


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


KERNEL_STARTS = 3  # attempts at starting a notebook's kernel
KERNEL_DIED = "Kernel died before replying to kernel_info"


def _papermill(notebook: Path, target: Path, parameters: dict) -> None:
    """``papermill.execute_notebook``, tried again (up to :data:`KERNEL_STARTS` times) when the kernel dies before
    it answers: two notebooks started at the same moment (``--jobs``) can pick the same free TCP port for their
    kernels ("Address already in use"). No cell has run then; any other error is raised at once."""
    import papermill

    for attempt in range(1, KERNEL_STARTS + 1):
        try:
            papermill.execute_notebook(str(notebook), str(target), parameters=parameters, kernel_name="python3",
                                       cwd=str(NOTEBOOKS_DIR), progress_bar=False, log_output=False)
            return
        except RuntimeError as err:
            if KERNEL_DIED not in str(err) or attempt == KERNEL_STARTS:
                raise
            log.warning("%s: its kernel died while starting (%s); starting another (%d of %d)", notebook.name, err,
                        attempt + 1, KERNEL_STARTS)
            time.sleep(attempt)


def execute(notebook: Path, profile: str = "cpu", force: bool = False, build_root: Path | None = None,
            extra: dict | None = None, shrink_model: str | None = None) -> Path:
    """Execute one notebook under ``profile`` (shrunk onto ``shrink_model`` when given: gpu profile only); returns
    the executed notebook's path (skipped if up to date)."""
    check_shrink(profile, shrink_model)
    where = layout(profile, build_root, shrunk=shrink_model is not None)
    if shrink_model is not None:
        extra = {**shrunk_parameters(notebook, shrink_model), **(extra or {})}
    parameters = checked_parameters(notebook, profile, extra)
    parameters.update(figures_dir=str(where.figures), results_dir=str(where.results))
    target = where.notebooks / notebook.name
    inputs = input_hash(notebook, {k: v for k, v in parameters.items() if k not in ("figures_dir", "results_dir")})
    if not force and _recorded_hash(target) == inputs and all((where.figures / f).is_file() for f in written_files(target)):
        log.info("%s is up to date (inputs %s)", notebook.name, inputs)
        return target
    where.notebooks.mkdir(parents=True, exist_ok=True)
    where.figures.mkdir(parents=True, exist_ok=True)
    number = notebook.stem[:2]
    before = _listing(where.figures, number)
    env_seed = os.environ.setdefault("SOURCE_DATE_EPOCH", "1700000000")
    os.environ["CROSSKV_PROFILE"] = profile  # the kernel inherits it: the notebook's provenance line names it
    log.info("executing %s (profile %s, SOURCE_DATE_EPOCH=%s)", notebook.name, profile, env_seed)
    started = time.perf_counter()
    _papermill(notebook, target, parameters)
    seconds = time.perf_counter() - started
    after = _listing(where.figures, number)
    outputs = [name for name, mtime in after.items() if before.get(name) != mtime]
    strip_volatile(target, inputs, outputs, seconds)
    log.info("executed %s in %.0f s", notebook.name, seconds)
    return target


class NotebookError(RuntimeError):
    """A notebook's execution failed (in parallel mode: its process exited non-zero)."""


def check_shrink(profile: str, shrink_model: str | None) -> None:
    """``ValueError`` unless a shrunk run is of the gpu profile (the one a researcher runs elsewhere first)."""
    if shrink_model is not None and profile != "gpu":
        raise ValueError(f"--shrink applies to the gpu profile, not {profile!r}")


def run(profile: str = "cpu", only: list[str] | None = None, force: bool = False,
        build_root: Path | None = None, jobs: int = 1, shrink_model: str | None = None) -> list[Path]:
    """Execute every numbered notebook (or those whose stem starts with one of ``only``): in order, or ``jobs``
    at a time (longest first, see the module docstring); shrunk onto ``shrink_model`` when given."""
    if jobs < 1:
        raise ValueError(f"jobs={jobs} must be at least 1")
    check_shrink(profile, shrink_model)
    force = force or os.environ.get("FORCE", "") not in ("", "0")
    selected = [nb for nb in notebooks() if not only or any(nb.stem.startswith(o) for o in only)]
    if not selected:
        raise ValueError(f"no notebook matches {only}")
    for notebook in selected:  # every parameter file and output folder is checked before the first notebook runs
        checked_parameters(notebook, profile, shrunk_parameters(notebook, shrink_model) if shrink_model else None)
    where = layout(profile, build_root, shrunk=shrink_model is not None)
    for folder in (where.notebooks, where.figures, where.results):
        check_writable(folder)
    if jobs == 1 or len(selected) == 1:
        return [execute(nb, profile, force=force, build_root=build_root, shrink_model=shrink_model) for nb in selected]
    threads = max(1, (os.cpu_count() or 1) // min(jobs, len(selected)))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    codes = _run_parallel(schedule(selected, where), jobs,
                          lambda notebook: _execute_apart(notebook, profile, force, build_root, env, shrink_model))
    failed = [f"{nb.stem} ({'not run: it reads a failed notebook' if code is None else f'exit {code}'})"
              for nb, code in codes.items() if code != 0]
    if failed:
        raise NotebookError(f"notebook(s) failed: {', '.join(failed)}; their errors are printed above")
    return [where.notebooks / nb.name for nb in selected]


def schedule(selected: list[Path], where: Layout) -> list[Path]:
    """``selected`` longest first by their last recorded execution seconds (never executed: first), each
    notebook's :data:`READS` moved just ahead of it."""
    def cost(notebook: Path) -> float:
        seconds = recorded_seconds(where.notebooks / notebook.name)
        return float("inf") if seconds is None else seconds

    by_number = {nb.stem[:2]: nb for nb in selected}
    queue: list[Path] = []
    for notebook in sorted(selected, key=cost, reverse=True):
        for needed in (*(by_number[n] for n in READS.get(notebook.stem[:2], ()) if n in by_number), notebook):
            if needed not in queue:
                queue.append(needed)
    return queue


def _run_parallel(queue: list[Path], jobs: int, execute_one) -> dict[Path, int | None]:
    """Run ``execute_one(notebook)`` → exit code on ``jobs`` threads, in ``queue`` order, each notebook once the
    notebooks it reads have finished → notebook → exit code (``None``: not run, a notebook it reads failed)."""
    selected = {nb.stem[:2] for nb in queue}
    codes: dict[Path, int | None] = {}
    pending, running = list(queue), {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            finished = {nb.stem[:2]: code for nb, code in codes.items()}
            for notebook in list(pending):
                reads = [n for n in READS.get(notebook.stem[:2], ()) if n in selected]
                if any(n in finished and finished[n] != 0 for n in reads):
                    pending.remove(notebook)
                    codes[notebook] = None
                elif len(running) < jobs and all(n in finished for n in reads):
                    pending.remove(notebook)
                    running[pool.submit(execute_one, notebook)] = notebook
            if pending and not running:
                raise NotebookError(f"cannot order {', '.join(nb.stem for nb in pending)}: READS forms a cycle")
            if running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    codes[running.pop(future)] = future.result()
    return codes


def _execute_apart(notebook: Path, profile: str, force: bool, build_root: Path | None, env: dict,
                   shrink_model: str | None = None) -> int:
    """Execute one notebook in its own ``python -m crosskv figures --only`` process → its exit code."""
    command = [sys.executable, "-m", "crosskv", "figures", "--profile", profile, "--only", notebook.stem]
    command += ["--model", shrink_model, "--shrink"] if shrink_model else []
    command += ["--force"] if force else []
    command += ["--build-root", str(build_root)] if build_root else []
    log.info("executing %s in its own process (%s torch threads)", notebook.name, env["OMP_NUM_THREADS"])
    return subprocess.run(command, env=env, check=False).returncode


def configure_cli(parser) -> None:
    """Arguments of ``python -m crosskv figures``."""
    parser.add_argument("--profile", default="cpu", choices=PROFILES)
    parser.add_argument("--only", nargs="*", help="notebook number prefixes, e.g. 01 03")
    parser.add_argument("--force", action="store_true", help="re-execute even when inputs are unchanged (or FORCE=1)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="notebooks executed at once, each in its own process with cores/jobs threads (default 1)")
    parser.add_argument("--build-root", type=Path, default=None,
                        help="where the smoke and gpu profiles write (default: build/ in the project)")
    parser.add_argument("--model", default=None, help="with --shrink: the model of the shrunk run (e.g. random:tiny)")
    parser.add_argument("--shrink", action="store_true",
                        help="gpu profile only: every parameter path at params/gpu-shrink.yaml's sizes on --model, "
                             "into build/gpu-shrunk/")


def run_cli(args) -> int:
    """``python -m crosskv figures [--profile cpu] [--only 02 ...] [--force] [--jobs N] [--build-root DIR]
    [--model M --shrink]``."""
    logging.getLogger("crosskv").setLevel(logging.INFO)
    if args.shrink != (args.model is not None):
        print("crosskv figures: error: --shrink and --model go together (--profile gpu --model random:tiny --shrink)",
              file=sys.stderr)
        return 2
    try:
        paths = run(args.profile, args.only, args.force, args.build_root, args.jobs, shrink_model=args.model)
    except NotebookError as err:
        print(f"crosskv figures: error: {err}", file=sys.stderr)
        return 1
    for path in paths:
        log.info("done: %s", path)
    return 0
