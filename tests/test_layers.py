"""The package's layering (``[tool.importlinter]`` in pyproject.toml): no module imports from a layer above its own,
the forbidden and independence contracts hold, importing a low module loads nothing above it, and no two
modules import each other (directly or through others)."""
import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(contracts)} kept, 0 broken" in done.stdout


def loaded_after(code: str) -> set[str]:
    """The modules of crosskv (and kvpress) a fresh interpreter holds after running ``code``."""
    script = f"{code}\nimport sys\nprint(' '.join(m for m in sys.modules if m.split('.')[0] in ('crosskv', 'kvpress')))"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def test_loading_a_model_module_loads_nothing_above_core():
    loaded = loaded_after("import crosskv.core.models")
    assert {m for m in loaded if not m.startswith("crosskv.core")} == {"crosskv"}, loaded


def test_a_task_loads_no_method():
    loaded = loaded_after("import crosskv.tasks; crosskv.tasks.make_task('niah_single_1', samples=2)")
    assert not {m for m in loaded if m.startswith(("crosskv.methods", "crosskv.run", "kvpress"))}, loaded


def test_public_names_resolve_on_first_use():
    assert loaded_after("import crosskv") == {"crosskv"}
    loaded = loaded_after("import crosskv; assert callable(crosskv.evaluate) and callable(crosskv.make_method); "
                          "assert set(crosskv.__all__) <= set(dir(crosskv))")
    assert "crosskv.run.harness" in loaded and "kvpress" not in loaded
    done = subprocess.run([sys.executable, "-c", "import crosskv; crosskv.no_such_name"], capture_output=True,
                          text=True)
    assert "module 'crosskv' has no attribute 'no_such_name'" in done.stderr


def import_graph() -> dict[str, set[str]]:
    """``{module: crosskv modules it imports}``, every import statement counted (at module level or in a function)."""
    graph = grimp.build_graph("crosskv", cache_dir=None)
    return {m: {i for i in graph.find_modules_directly_imported_by(m) if i.startswith("crosskv")}
            for m in graph.modules if m.startswith("crosskv")}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (each holds an import circle), Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in sorted(graph.get(module, ())):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_cycle_finder_finds_a_circle_through_a_third_module():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_between_crosskv_modules():
    assert cycles(import_graph()) == []
