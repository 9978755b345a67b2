"""The bench's static decode mode, its ``recompiles`` column, and throughput at a fixed memory budget (random:tiny)."""
from __future__ import annotations

import pytest
import torch

from crosskv.methods.base import module_bytes
from crosskv.run import bench as bench_module
from crosskv.run.bench import GB, bench, fit_batch, step_inputs

XKV = "xkv:kept=0.5,group_size=2"  # test_contract's TINY_PARAMS for xkv
RECONSTRUCT = f"{XKV},attention=reconstruct"  # rebuilds K and V every step: no static layout


def isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


def check_static_rows(table) -> None:
    """full and xKV: static rows timed with no frame compiled in their timed steps, the full one holding a plain
    cache of its tokens (its buffers counted); xKV's reconstruct path refused by name."""
    table = table.set_index(["method", "mode"])
    for method in ("full", XKV):
        static = table.loc[(method, "static")]
        assert static["refused"] is None and static["decode_tok_s"] > 0, static["refused"]
        assert static["recompiles"] == 0, f"{method}: {static['recompiles']} frames compiled in the timed steps"
        assert static["held_bytes"] > 0 and isna(table.loc[(method, "eager"), "recompiles"])
    assert table.loc[("full", "static"), "kept"] == pytest.approx(1.0, abs=0.01)  # context, question, buffer rows
    refused = table.loc[(RECONSTRUCT, "static")]
    assert f"method {RECONSTRUCT!r}" in refused["refused"] and "no static layout" in refused["refused"]
    assert isna(refused["decode_tok_s"]) and table.loc[(RECONSTRUCT, "eager"), "refused"] is None


def test_static_rows_do_not_recompile_and_a_kind_without_a_layout_is_refused(random_tiny, monkeypatch):
    """Through dynamo with its eager backend: the guards, hence the recompiles, are the backend's business alone,
    and inductor's code generation (about 50 s cold here) is left to the ``slow`` test below."""
    model, tokenizer = random_tiny
    monkeypatch.setattr(bench_module, "compile_static",
                        lambda m: torch.compile(m, backend="eager", fullgraph=True, dynamic=False))
    torch._dynamo.reset()  # graphs of earlier tests must not count against the recompile limit
    check_static_rows(bench(model, tokenizer, ["full", XKV, RECONSTRUCT], contexts=(32,), repeats=2, warmup=1,
                            decode_tokens=3, modes=("eager", "static"), progress=False))


@pytest.mark.slow
def test_static_rows_under_reduce_overhead_do_not_recompile(random_tiny):
    """The same through :func:`crosskv.cache.static.compile_static` itself (inductor; no CUDA graphs on a CPU)."""
    model, tokenizer = random_tiny
    torch._dynamo.reset()
    check_static_rows(bench(model, tokenizer, ["full", XKV, RECONSTRUCT], contexts=(32,), repeats=1, warmup=1,
                            decode_tokens=3, modes=("eager", "static"), progress=False))


def test_step_inputs_are_the_absolute_positions_built_on_the_device():
    steps = step_inputs(10, 3, 2, "cpu", static=True)
    assert [s["position_ids"].tolist() for s in steps] == [[[10], [10]], [[11], [11]], [[12], [12]]]
    assert [s["cache_position"].tolist() for s in steps] == [[10], [11], [12]]
    assert all(s["cache_position"].dtype == torch.long for s in steps)
    assert set(step_inputs(0, 1, 1, "cpu")[0]) == {"position_ids"}


def test_fit_batch_is_the_largest_batch_within_the_budget():
    assert fit_batch(100, 10, 30) == 3 and fit_batch(99, 10, 30) == 2
    assert fit_batch(39, 10, 30) == 0 and fit_batch(5, 10, 30) == 0
    with pytest.raises(ValueError, match="row_bytes=0"):
        fit_batch(100, 10, 0)


def test_a_memory_budget_runs_each_method_at_the_batch_that_fits(random_tiny):
    model, tokenizer = random_tiny
    budget = (module_bytes([model]) + 8 * 2 ** 20) / GB  # the weights and 8 MiB: a few rows of T=32
    table = bench(model, tokenizer, ["full", XKV], contexts=(32,), repeats=1, warmup=0, decode_tokens=2,
                  memory_gb=budget, progress=False).set_index("method")
    for method, row in table.iterrows():
        fixed = module_bytes([model]) + row["method_bytes"]
        rows = row["row_mb"] * 2 ** 20
        assert row["fit_batch"] >= 1 and row["batch"] == row["fit_batch"] and row["memory_gb"] == budget
        assert fixed + row["fit_batch"] * rows <= budget * GB < fixed + (row["fit_batch"] + 1) * rows, method
        assert row["refused"] is None and row["decode_tok_s"] > 0
    assert table.loc["full", "decode_vs_full"] == 1.0 and table.loc[XKV, "decode_vs_full"] > 0  # each at its batch


def test_a_budget_below_batch_one_is_refused_naming_the_budget(random_tiny):
    model, tokenizer = random_tiny
    table = bench(model, tokenizer, ["full"], contexts=(32,), repeats=1, warmup=0, decode_tokens=2, memory_gb=0.001,
                  progress=False)
    row = table.iloc[0]
    assert row["fit_batch"] == 0 and isna(row["decode_tok_s"])
    assert "method 'full': batch 1 needs" in row["refused"] and "memory_gb=0.001" in row["refused"]
    with pytest.raises(ValueError, match=r"batch_sizes \(given \(2,\)\)"):
        bench(model, tokenizer, ["full"], contexts=(32,), batch_sizes=(2,), memory_gb=1.0, progress=False)
    with pytest.raises(ValueError, match="memory_gb=0"):
        bench(model, tokenizer, ["full"], contexts=(32,), memory_gb=0, progress=False)
    with pytest.raises(ValueError, match="warmup=0: the static mode"):
        bench(model, tokenizer, ["full"], contexts=(32,), warmup=0, modes=("static",), progress=False)
    with pytest.raises(ValueError, match="decode_tokens=0: the static mode"):
        bench(model, tokenizer, ["full"], contexts=(32,), decode_tokens=0, modes=("static",), progress=False)


def test_cli_bench_parses_the_modes_and_the_memory_budget(capsys):
    from crosskv.integrations.cli import build_parser, main

    args = build_parser().parse_args(["bench", "--modes", "eager", "compiled", "static", "--memory-gb", "40",
                                      "--contexts", "32768"])
    assert args.modes == ["eager", "compiled", "static"] and args.memory_gb == 40.0 and args.batch_sizes is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--memory-gb", "0"])
    assert "--memory-gb: 0 is not a positive number" in capsys.readouterr().err
    assert main(["bench", "--model", "random:tiny", "--memory-gb", "1", "--batch-sizes", "2"]) == 2
    assert "--memory-gb 1.0 picks each method's batch: drop --batch-sizes" in capsys.readouterr().err
    assert main(["bench", "--model", "random:tiny", "--device", "cpu", "--contexts", "32", "--methods", "full",
                 "--memory-gb", "0.001", "--repeats", "1", "--warmup", "0", "--decode-tokens", "2"]) == 0
    assert "memory_gb=0.001" in capsys.readouterr().out
