"""Run a test file's kernel comparisons in a child process under Triton's interpreter (``TRITON_INTERPRET=1`` must be
set before ``triton`` is first imported, so the comparisons cannot run in the parent pytest process)."""
from __future__ import annotations

import os
import subprocess
import sys


def run_interpreted(path: str, keyword: str) -> str:
    """``pytest -k keyword path`` in a ``TRITON_INTERPRET=1`` child (one thread) → its summary line; asserts it exited 0."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", keyword, path],
                           env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
    return child.stdout.strip().splitlines()[-1] if child.stdout.strip() else child.stderr[-2000:]
