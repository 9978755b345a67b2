"""random:<shape> models, the speed/memory benchmark, and CUDA correctness of the decode fast path (``gpu``)."""
from __future__ import annotations

import logging

import pytest
import torch

from conftest import drive
from crosskv.core.fingerprint import code_fingerprint
from crosskv.run.bench import COLUMNS, bench, measure, parse_method, rebuild_gemms
from crosskv.core.capture import kv_shape
from crosskv.methods import make_method
from crosskv.core.models import RANDOM_SHAPES, load_model, random_config


@pytest.fixture(scope="module")
def tiny(random_tiny):
    return random_tiny


def test_random_model_is_seeded_and_fits_the_tokenizer(tiny):
    model, tokenizer = tiny
    again, _ = load_model("random:tiny", device="cpu", dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert model.config.vocab_size >= len(tokenizer)
    ids = torch.tensor([tokenizer("a short check").input_ids])
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("shape,layers,kv_heads,head_dim,billions", [
    ("llama-3.1-8b", 32, 8, 128, 8.03), ("qwen2.5-7b", 28, 4, 128, 7.62), ("mistral-7b", 32, 8, 128, 7.3)])
def test_random_shapes_have_the_published_geometry(shape, layers, kv_heads, head_dim, billions):
    from transformers import AutoModelForCausalLM

    config = random_config(shape, vocab=49157)
    shape_ = kv_shape(config)
    assert (shape_.layers, shape_.kv_heads, shape_.head_dim) == (layers, kv_heads, head_dim)
    with torch.device("meta"):  # no memory: parameter count only
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, rel=0.02)


def test_unknown_random_shape_names_the_value():
    with pytest.raises(ValueError, match="'llama-9'"):
        load_model("random:llama-9", device="cpu")
    assert "tiny" in RANDOM_SHAPES


def test_evaluate_warns_that_random_scores_are_meaningless(tiny, caplog):
    import crosskv

    model, tokenizer = tiny
    with caplog.at_level(logging.WARNING, logger="crosskv.run.harness"):
        crosskv.evaluate(model, tokenizer, "full", "niah_single_2", context=128, samples=1, store=False,
                         progress=False, max_new_tokens=2)
    assert "meaningless" in caplog.text


def test_parse_method_specs():
    assert parse_method("xkv:kept=0.25,group_size=2") == make_method("xkv", kept=0.25, group_size=2)
    assert parse_method("kvpress:knorm:compression_ratio=0.3") == make_method("kvpress:knorm", compression_ratio=0.3)
    assert parse_method("full") == make_method("full")
    with pytest.raises(ValueError, match="'xkv:kept'"):
        parse_method("xkv:kept")


def test_bench_rows_columns_and_ratios(tiny):
    model, tokenizer = tiny
    methods = ["full", "svd:kept=0.25", "xkv:kept=0.5,group_size=2,attention=reconstruct"]
    table = bench(model, tokenizer, methods, contexts=(64, 96), batch_sizes=(1, 2), repeats=2, warmup=1,
                  decode_tokens=2, progress=False)
    assert list(table.columns) == list(COLUMNS)
    assert len(table) == len(methods) * 2 * 2
    assert (table["threads"] == torch.get_num_threads()).all() and table["machine"].str.len().min() > 0
    full = table[table["method"] == "full"]
    assert (full["decode_vs_full"] == 1.0).all() and full["kept"].eq(1.0).all()
    svd = table[table["method"] == "svd:kept=0.25"]
    assert (svd["kept"] < 0.5).all() and (svd["rebuild_gmac"] > 0).all() and (svd["floor_tok_s"] > 0).all()
    assert table[table["method"].str.contains("reconstruct")]["rebuild_gmac"].isna().all()
    assert (table["decode_tok_s"] > 0).all() and (table["peak_mem_mb"] > 0).all()
    assert (table["code"] == code_fingerprint()).all() and table["commit"].str.len().min() >= 40  # traceable rows


def test_held_bytes_are_the_census_not_the_methods_accounting(tiny):
    """``held_bytes`` counts what the census finds: a runner whose cache keeps a tensor its ``stored_tensors``
    does not list (here 1000 float32 scratch values) is charged for it; a plain cache is its 2·L·H_kv·T·d floats."""
    from crosskv.methods import Runner

    class Hoarding(Runner):
        def compress(self, cache):
            cache.scratch = torch.ones(1000)  # held between steps, absent from kv_bytes

    model, tokenizer = tiny
    shape = kv_shape(model)
    generator = torch.Generator().manual_seed(0)
    context, question = torch.randint(100, 20000, (1, 40), generator=generator), torch.tensor([[5, 6, 7]])
    plain = 2 * shape.layers * shape.kv_heads * 40 * shape.head_dim * 4
    assert measure(Runner(make_method("full"), model, tokenizer), context, question, 1)["held_bytes"] == plain
    assert measure(Hoarding(make_method("full"), model, tokenizer), context, question, 1)["held_bytes"] == plain + 4000


def test_rebuild_floor_counts_every_layer_in_range(tiny):
    model, _ = tiny
    shape = kv_shape(model)
    gemms = rebuild_gemms(make_method("xkv", group_size=2, rank_k=8, rank_v=8), model, 100)
    assert gemms == [(100, 8, shape.width)] * shape.layers
    assert rebuild_gemms(make_method("full"), model, 100) == []


def test_bench_refuses_unknown_mode(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="compile"):
        bench(model, tokenizer, ["full"], contexts=(32,), modes=("compile",), progress=False)


def test_cli_bench_writes_csv(tmp_path, capsys):
    import pandas as pd

    from crosskv.integrations.cli import main

    out = tmp_path / "bench.csv"
    assert main(["bench", "--model", "random:tiny", "--device", "cpu", "--contexts", "48", "--methods", "full",
                 "svd:kept=0.5", "--repeats", "1", "--warmup", "0", "--decode-tokens", "2", "--out", str(out)]) == 0
    assert "svd:kept=0.5" in capsys.readouterr().out
    assert list(pd.read_csv(out)["method"]) == ["full", "svd:kept=0.5"]


# --- CUDA correctness of the paths this module benchmarks (skipped without a GPU) -----------------

@pytest.mark.gpu
@pytest.mark.parametrize("params", [dict(name="svd", rank_k=32, rank_v=32),
                                    dict(name="xkv", group_size=2, rank_k=64, rank_v=64)])
def test_cuda_full_rank_lowrank_decode_equals_plain_cache(params):
    model, tokenizer = load_model("random:tiny", device="cuda", dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(100, 20000, (1, 96), generator=generator).cuda()
    question = torch.randint(100, 20000, (1, 3), generator=generator).cuda()
    want, _ = drive(model, make_method("full"), context, question, tokenizer=tokenizer)
    params = dict(params)
    got, _ = drive(model, make_method(params.pop("name"), **params), context, question, tokenizer=tokenizer)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-3), (a - b).abs().max()


@pytest.mark.gpu
def test_cuda_bench_runs_on_the_gpu():
    model, tokenizer = load_model("random:tiny", device="cuda", dtype=torch.bfloat16)
    table = bench(model, tokenizer, ["full", "xkv:kept=0.25,group_size=2"], contexts=(256,), repeats=1,
                  decode_tokens=4, progress=False)
    assert (table["device"] == "cuda:0").all() and (table["peak_mem_mb"] > 0).all()


@pytest.mark.slow
def test_the_gpu_script_runs_every_stage_on_a_tiny_model(tmp_path):
    """`.ci/gpu` (`make gpu`) on the CPU with random:tiny and short contexts: every stage exits 0 and writes
    its CSV, so the one command a lent GPU runs has not rotted since the last lease."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pandas as pd

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "GPU_MODEL": "random:tiny",
           "GPU_DEVICE": "cpu", "GPU_SHORT": "96", "GPU_LONG": "128", "GPU_REPEATS": "1", "GPU_DECODE": "2",
           "GPU_MEMORY_GB": "0.02", "GPU_STATIC": "full"}  # one reduce-overhead compile (test_bench_modes has more)
    done = subprocess.run(["bash", str(root / ".ci" / "gpu")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    stages = (tmp_path / "stages.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in stages] == [
        "stage pytest_gpu", "stage bench_short_eager", "stage bench_short_static", "stage bench_memory",
        "stage bench_long_eager"]
    assert all("rc=0 " in line for line in stages), stages
    static = pd.read_csv(tmp_path / "bench_short_static.csv")
    assert set(static["mode"]) == {"static"} and static["decode_tok_s"].notna().all()
    assert (static["recompiles"] == 0).all()
    memory = pd.read_csv(tmp_path / "bench_memory.csv")
    assert (memory["fit_batch"] >= 1).all() and memory["decode_tok_s"].notna().all()
    assert len(pd.read_csv(tmp_path / "bench_short_eager.csv")) == 6


def test_bench_names_the_attention_path_it_took(random_tiny):
    """On CPU (no kernel forced) every decode takes the eager path, and the table says so."""
    model, tokenizer = random_tiny
    table = bench(model, tokenizer, methods=["full", "xkv:group_size=2,kept=0.5"], contexts=(64,), repeats=1,
                        warmup=0, decode_tokens=2, progress=False)
    assert set(table["path"]) == {"eager"}
