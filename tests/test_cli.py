"""The CLI: list, eval's JSON line, and clean exit-2 errors (no traceback, no result file)."""
from __future__ import annotations

import json

import pytest

from crosskv.integrations import cli
from crosskv.methods import REGISTRY


def call(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_shows_every_method_parameter_and_task(capsys):
    code, out, _ = call(capsys, "list")
    assert code == 0
    for name in REGISTRY:
        assert f"  {name}:" in out
    assert "compression_ratio: float = 0.5" in out and "window_size: int = 64" in out
    for task in ("niah_single_2", "niah_multiquery", "vt", "cwe", "fwe", "ppl", "ppl_cont", "jsonl:PATH",
                 "longbench:<task>", "ruler_qa_1"):
        assert task in out
    assert "like for like" in out


@pytest.mark.parametrize("argv, message", [
    (["--method", "nope", "--task", "ppl"], "unknown method 'nope'"),
    (["--method", "full", "--set", "rank=3", "--task", "ppl"], "unknown parameter(s) rank"),
    (["--method", "kvpress:snapkv", "--set", "compression_ratio=lots", "--task", "ppl"], "compression_ratio='lots'"),
    (["--method", "kvpress:snapkv", "--set", "compression_ratio", "--task", "ppl"], "--set expects key=value"),
    (["--method", "full", "--task", "niah_single_9"], "unknown task 'niah_single_9'"),
    (["--method", "full", "--task", "ppl", "--opt", "depth=3"], "unknown option(s) depth"),
    (["--method", "commonkv", "--set", "seed=-2", "--task", "ppl"], "seed=-2 must be >= 0"),
    (["--method", "kvsharer", "--set", "shared_layers=2", "--set", "seed=-3", "--task", "ppl"], "seed=-3"),
])
def test_usage_errors_exit_2_with_one_line(capsys, tmp_path, argv, message):
    code, out, err = call(capsys, "eval", *argv, "--results-dir", str(tmp_path))
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_eval_prints_a_json_line_and_stores_it(capsys, tmp_path):
    data = tmp_path / "set.jsonl"
    data.write_text(json.dumps({"input": "Say the word blue.", "answers": ["blue"]}) + "\n"
                    + json.dumps({"input": "What is 1+1? Answer with a digit.", "answers": ["2"]}) + "\n")
    store, out_file = tmp_path / "store", tmp_path / "runs.jsonl"
    argv = ["eval", "--method", "full", "--task", f"jsonl:{data}", "--samples", "2", "--opt", "max_new_tokens=8",
            "--results-dir", str(store), "--out", str(out_file), "--threads", "1"]
    code, out, _ = call(capsys, *argv)
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    for field in ("model", "method", "params", "task", "context", "samples", "seed", "score", "kv_bytes",
                  "kv_bytes_full", "kept", "prefill_s", "decode_tok_s", "seconds"):
        assert field in summary, field
    assert summary["samples"] == 2 and summary["kept"] == 1.0 and 0 <= summary["score"] <= 1
    assert json.loads(out_file.read_text().splitlines()[-1]) == summary
    assert [p.name for p in store.iterdir()] == [f"{summary['key']}.json"]


@pytest.mark.slow
@pytest.mark.parametrize("extra, message", [
    (["--task", "niah_single_1", "--context", "9000"], "max_position_embeddings=8192"),
    (["--task", "jsonl:BAD"], "bad.jsonl:2: not valid JSON"),
])
def test_run_errors_exit_2_without_result(capsys, tmp_path, extra, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input": "hi", "answers": ["a"]}) + "\n{oops\n")
    extra = [e.replace("BAD", str(bad)) for e in extra]
    store = tmp_path / "store"
    code, out, err = call(capsys, "eval", "--method", "full", *extra, "--samples", "1", "--results-dir", str(store))
    assert code == 2 and out == "" and message in err and "Traceback" not in err
    assert not store.exists()


@pytest.mark.parametrize("argv, message", [
    (["eval", "--method", "full", "--task", "ppl", "--threads", "0"], "argument --threads: 0 is not a positive integer"),
    (["eval", "--method", "full", "--task", "ppl", "--samples", "0"], "argument --samples: 0 is not a positive integer"),
    (["eval", "--method", "full", "--task", "ppl", "--context", "-5"], "argument --context: -5 is not a positive"),
    (["eval", "--method", "full", "--task", "ppl", "--context", "0"], "argument --context: 0 is not a positive integer"),
    (["eval", "--method", "full", "--task", "ppl", "--seed", "-1"], "argument --seed: -1 is not a non-negative"),
    (["eval", "--method", "full", "--task", "ppl", "--samples", "two"], "argument --samples: 'two' is not an integer"),
    (["bench", "--repeats", "0"], "argument --repeats: 0 is not a positive integer"),
    (["bench", "--contexts", "-5"], "argument --contexts: -5 is not a positive integer"),
    (["search", "--shared-layers", "2", "--threads", "0", "--out", "x.json"], "argument --threads: 0"),
    (["search", "--shared-layers", "-1", "--out", "x.json"], "argument --shared-layers: -1"),
    (["search", "--rate", "nan", "--out", "x.json"], "argument --rate: 'nan' is not a finite number"),
])
def test_out_of_range_numbers_are_refused_by_every_command(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:  # argparse's usage error
        cli.main(argv)
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and out == "" and message in err and "Traceback" not in err


def test_eval_of_a_damaged_model_folder_names_the_file(capsys, tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "model"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)
    (weights,) = folder.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    code, out, err = call(capsys, "eval", "--model", str(folder), "--method", "full", "--task", "ppl",
                          "--results-dir", str(tmp_path / "store"))
    assert code == 2 and out == "" and f"damaged weights file {weights}" in err and "Traceback" not in err
