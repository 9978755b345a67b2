"""Scale-out: `torchrun --nproc_per_node 2 python -m crosskv eval` shards samples and merges them on rank 0."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_two_process_run_merges_on_rank_0(tmp_path):
    store = tmp_path / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "crosskv", "eval", "--method", "full", "--task", "niah_single_1", "--context", "192",
           "--samples", "3", "--opt", "max_new_tokens=4", "--results-dir", str(store)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # only rank 0 prints
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["samples"] == 3
    files = list(store.iterdir())
    assert [f.name for f in files] == [f"{summary['key']}.json"]
    record = json.loads(files[0].read_text())
    assert [d["index"] for d in record["details"]] == [0, 1, 2]
    assert record["kept"] == 1.0
