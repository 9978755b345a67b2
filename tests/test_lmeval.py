"""The lm-evaluation-harness model ``crosskv`` on a tiny local task over the essays (offline)."""
from __future__ import annotations

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed: pip install -e .[lmeval]")

from crosskv.run import harness  # noqa: E402
from crosskv.core.data import heldout_text  # noqa: E402
from crosskv.integrations.lmeval import DEFAULT_SPLIT, CrossKVLM, cut_at_stops, split_prompt  # noqa: E402
from crosskv.methods import make_method  # noqa: E402
from crosskv.tasks import Sample  # noqa: E402

TASK = """task: crosskv_essays
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: generate_until
doc_to_text: "{{{{context}}}}\\n\\nQuestion: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


def test_split_prompt_and_stop_strings():
    assert split_prompt("a\n\nb\n\nQuestion: q", "\n\n") == ("a\n\nb", "\n\nQuestion: q")
    assert split_prompt("a\n\nQuestion: q\n\nAnswer:", DEFAULT_SPLIT) == ("a", "\n\nQuestion: q\n\nAnswer:")
    assert split_prompt("doc\n\nNow summarize.\n\nSummary:", DEFAULT_SPLIT) == ("doc\n\nNow summarize.", "\n\nSummary:")
    with pytest.raises(ValueError, match="split markers"):
        split_prompt("no marker here", DEFAULT_SPLIT)
    assert cut_at_stops("yes\nmore", ["\n"]) == "yes"


@pytest.mark.slow
def test_crosskv_model_in_lm_eval_answers_as_the_harness(model32, tmp_path):
    model, tok = model32
    data = tmp_path / "essays.jsonl"
    with data.open("w") as handle:
        for seed in range(2):
            doc = {"context": heldout_text(tok, 120, seed=seed), "question": "What is the essay about?", "answer": "x"}
            handle.write(json.dumps(doc) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "crosskv_essays.yaml").write_text(TASK.format(data=data))
    out = lm_eval.simple_evaluate(
        model="crosskv", model_args="pretrained=smollm2-135m,method=xkv,kept=0.3,dtype=float32,device=cpu",
        tasks=["crosskv_essays"], task_manager=lm_eval.tasks.TaskManager(include_path=str(tasks)),
        log_samples=True)
    logged = out["samples"]["crosskv_essays"]
    assert len(logged) == 2 and "exact_match,none" in out["results"]["crosskv_essays"]
    method = make_method("xkv", kept=0.3)
    runner, stops = harness.bind(model, tok, method), harness.stop_ids(model, tok)
    for entry in logged:
        prompt = entry["arguments"][0][0]  # (prompt, gen_kwargs) of the one request
        context, question = split_prompt(prompt, DEFAULT_SPLIT)
        sample = Sample(0, tok.encode(context), tok.encode(question, add_special_tokens=False), max_new_tokens=8)
        want = cut_at_stops(harness.run_generate(runner, sample, stops)["prediction"], ["\n"])
        assert entry["resps"][0][0] == want


@pytest.mark.slow
def test_loglikelihood_of_full_equals_a_plain_forward(tmp_path):
    lm = CrossKVLM(pretrained="smollm2-135m", method="full", dtype="float32", device="cpu")
    prompt, continuation = heldout_text(lm.tokenizer, 60) + "\n\nThe essay is about", " money and work"
    got, greedy = lm.score_continuation(prompt, continuation)
    context, question = split_prompt(prompt, DEFAULT_SPLIT)
    ids = lm.encode(context, True) + lm.encode(question, False)
    target = lm.encode(continuation, False)
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids + target])).logits[0, len(ids) - 1:-1].float().log_softmax(-1)
    want = float(logits.gather(-1, torch.tensor(target)[:, None]).sum())
    assert got == pytest.approx(want, abs=1e-3)
    assert greedy == bool((logits.argmax(-1) == torch.tensor(target)).all())
    with pytest.raises(ValueError, match="loglikelihood_rolling"):
        lm.loglikelihood_rolling([])


@pytest.mark.slow
def test_command_line_runs_the_crosskv_model(model32, tmp_path):
    import os
    import subprocess
    import sys

    data = tmp_path / "essays.jsonl"
    doc = {"context": heldout_text(model32[1], 80), "question": "What is the essay about?", "answer": "x"}
    data.write_text(json.dumps(doc) + "\n")
    (tmp_path / "crosskv_essays.yaml").write_text(TASK.format(data=data))
    command = [sys.executable, "-m", "crosskv.integrations.lmeval", "run", "--model", "crosskv", "--model_args",
               "pretrained=smollm2-135m,method=xkv,kept=0.3", "--device", "cpu", "--tasks", "crosskv_essays",
               "--include_path", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "crosskv_essays" in done.stdout and "exact_match" in done.stdout
