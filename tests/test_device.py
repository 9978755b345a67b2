"""Device hygiene: every tensor factory in ``lib/crosskv`` names its device, so tensors follow their inputs."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import crosskv

LIBRARY = Path(crosskv.__file__).parent
FACTORIES = {"arange", "zeros", "ones", "empty", "full", "tensor", "as_tensor", "eye", "linspace", "logspace",
             "randn", "rand", "randint", "randperm", "normal", "tril_indices", "triu_indices", "empty_strided"}
# modules allowed to build CPU tensors without naming a device, and why
ALLOWED = {
    "core/data.py": "token ids of the corpus and seeded calibration windows are CPU data; callers move them to the model",
}


def factories_without_device(source: str) -> list[tuple[int, str]]:
    """``(line, name)`` of every ``torch.<factory>(...)`` call in ``source`` without a ``device=`` argument."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                and node.func.attr in FACTORIES and not any(k.arg == "device" for k in node.keywords)):
            found.append((node.lineno, f"torch.{node.func.attr}"))
    return sorted(found)


def test_the_scanner_finds_a_factory_without_device():
    source = "import torch\nx = torch.arange(4)\ny = torch.zeros(3, device=z.device)\nw = z.new_zeros(2)\n"
    assert factories_without_device(source) == [(2, "torch.arange")]


@pytest.mark.parametrize("path", sorted(p.relative_to(LIBRARY).as_posix() for p in LIBRARY.rglob("*.py")))
def test_every_library_tensor_factory_names_its_device(path):
    if path in ALLOWED:
        pytest.skip(f"{path}: {ALLOWED[path]}")
    missing = factories_without_device((LIBRARY / path).read_text())
    assert not missing, f"{path}: tensor factories without device=: {missing}"
