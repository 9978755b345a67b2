"""Clients that cannot break it: every ``generate`` option through ``crosskv.compressed`` works exactly or is
refused naming it; token ids, devices and dtypes are checked at the entry points; uneven caches are fed in
steps; the method bytes of every method on a model's shape."""
from __future__ import annotations

import logging

import pytest
import torch

import crosskv
from crosskv.core.models import load_model, resolve_device, resolve_dtype
from crosskv.methods import make_method
from crosskv.methods.kvsharer import SharingStrategy
from crosskv.run import harness
from crosskv.run.session import compressed
from crosskv.tasks import Sample

NEW = 6


@pytest.fixture(scope="module")
def tiny():
    """``random:tiny`` (4 layers, GQA 4/2, head_dim 16) in float32 → (model, tokenizer)."""
    return load_model("random:tiny", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def assistant():
    """A second ``random:tiny`` (its own weights object) as the assistant model of assisted decoding."""
    return load_model("random:tiny", device="cpu", dtype=torch.float32)[0]


@pytest.fixture(scope="module")
def prompt():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(100, 1000, (1, 48), generator=generator), torch.randint(100, 1000, (1, 5), generator=generator)


def methods(tmp_path_factory) -> dict[str, tuple]:
    """label → (config, lossless, uneven): one configuration per method family, lossless where one exists."""
    strategy = str(SharingStrategy({3: 2, 1: 0}, num_layers=4).save(tmp_path_factory.mktemp("s") / "s.json"))
    return {
        "full": (make_method("full"), True, False),
        "xkv_lossless": (make_method("xkv", group_size=2, rank_k=64, rank_v=64), True, False),
        "svd_lossless": (make_method("svd", rank_k=32, rank_v=32), True, False),
        "xkv": (make_method("xkv", kept=0.3, group_size=2), False, False),
        "minicache": (make_method("minicache", start_layer=0), False, False),
        "kvsharer": (make_method("kvsharer", strategy=strategy), False, False),
        "kvsharer_xkv": (make_method("kvsharer_xkv", strategy=strategy, kept=0.5, group_size=2), False, False),
        "commonkv": (make_method("commonkv", group_size=2, rank_ratio=0.5, weights="uniform", recent_tokens=8),
                     False, False),
        "quant4": (make_method("compose", base="full", bits=4, group_size=8, residual=8), False, False),
        "snapkv": (make_method("compose", base="full", evict="snapkv", evict_ratio=0.5, window_size=8), False, False),
        "pyramidkv": (make_method("compose", base="xkv", base_params="group_size=2;kept=0.5", evict="pyramidkv",
                                  evict_ratio=0.5, window_size=8), False, True),
    }


OPTIONS = {  # label → (generate kwargs, None if it must work, else the option the refusal names)
    "greedy": ({}, None),
    "sampling": ({"do_sample": True, "top_k": 5}, None),
    "beams": ({"num_beams": 2}, "num_beams=2"),
    "beam_groups": ({"num_beams": 2, "num_beam_groups": 2, "diversity_penalty": 0.5}, "num_beams=2"),
    "return_sequences": ({"do_sample": True, "num_return_sequences": 2}, "num_return_sequences=2"),
    "contrastive": ({"penalty_alpha": 0.6, "top_k": 4}, "penalty_alpha=0.6"),
    "static_cache": ({"cache_implementation": "static"}, "cache_implementation='static'"),
    "no_cache": ({"use_cache": False}, "use_cache=False"),
    "assistant": ("assistant", None),
    "prompt_lookup": ({"prompt_lookup_num_tokens": 3}, None),
    "own_mask": ({"attention_mask": None}, "attention_mask"),
}


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    return methods(tmp_path_factory)


def plain(model, context, question, **kwargs):
    ids = torch.cat([context, question], 1)
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, **kwargs)


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("label", ["full", "xkv_lossless", "svd_lossless", "xkv", "minicache", "kvsharer",
                                   "kvsharer_xkv", "commonkv", "quant4", "snapkv", "pyramidkv"])
def test_every_generate_option_works_exactly_or_is_refused_by_name(tiny, assistant, prompt, configs, label, option):
    model, tok = tiny
    context, question = prompt
    method, lossless, uneven = configs[label]
    kwargs, refused = OPTIONS[option]
    if kwargs == "assistant":
        kwargs = {"assistant_model": assistant}
    assisted = option in ("assistant", "prompt_lookup")
    if uneven and assisted:
        refused = kwargs and next(iter(kwargs))
    with compressed(model, method, tok) as c:
        c.prefill(context)
        if refused:
            with pytest.raises(ValueError, match=f"{method.name}.*{refused}"):
                c.generate(question, max_new_tokens=NEW, **kwargs)
            return
        torch.manual_seed(0)
        got = c.generate(question, max_new_tokens=NEW, **kwargs)
        torch.manual_seed(0)
        greedy_here = c.generate(question, max_new_tokens=NEW, **({"do_sample": True, "top_k": 5}
                                                                   if option == "sampling" else {}))
    torch.manual_seed(0)
    uncompressed = plain(model, context, question, **({"do_sample": True, "top_k": 5} if option == "sampling" else {}))
    if lossless:
        assert torch.equal(got, uncompressed)
    else:  # a lossy cache: the option decodes exactly as the method's own greedy (or seeded sampled) decoding
        assert torch.equal(got, greedy_here)
    if label == "pyramidkv" and option == "greedy":  # uneven: the question is fed stepwise, as the harness does
        assert harness.uneven(c.cache)
        sample = Sample(0, context[0].tolist(), question[0].tolist(), max_new_tokens=NEW)
        want = harness.run_generate(harness.bind(model, tok, method), sample, harness.stop_ids(model, tok))
        assert tok.decode(got[0, context.shape[1] + question.shape[1]:], skip_special_tokens=True) == want["prediction"]


def test_batched_prompts_are_refused_at_the_wrapper_and_in_a_raw_generate(tiny, prompt):
    model, tok = tiny
    context, question = prompt
    with compressed(model, "xkv", tok) as c:
        c.prefill(context)
        with pytest.raises(ValueError, match=r"shape \(2, 5\).*batches"):
            c.generate(question.repeat(2, 1), max_new_tokens=2)
        ids = torch.cat([context, question], 1)
        for kwargs in ({"num_beams": 2}, {"num_return_sequences": 2, "do_sample": True}):
            with pytest.raises(ValueError, match="batch of 2 sequences"):
                model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=c.cache, max_new_tokens=2,
                               **kwargs)
        with pytest.raises(ValueError, match="batch of 2 sequences"):
            model.generate(ids.repeat(2, 1), past_key_values=c.cache, max_new_tokens=2)
        with pytest.raises(ValueError, match=r"shape \(2, 48\)"):
            c.prefill(context.repeat(2, 1))


def test_a_cache_counting_held_tokens_is_refused_after_the_options(tiny, prompt):
    model, tok = tiny
    context, question = prompt
    with compressed(model, make_method("kvpress:snapkv", compression_ratio=0.5, window_size=8), tok) as c:
        c.prefill(context)
        with pytest.raises(ValueError, match="num_beams=2"):
            c.generate(question, max_new_tokens=2, num_beams=2)
        with pytest.raises(ValueError, match="counts held"):
            c.generate(question, max_new_tokens=2)


# --- item 2: ids, devices, dtypes at the entry points ---------------------------------------------------

@pytest.mark.parametrize("ids,message", [
    ([5, 60000, 7], r"context_ids: token id 60000 at \(0, 1\) is >= vocab 49157"),
    ([5, -1], r"token id -1 at \(0, 1\) is negative"),
    (torch.tensor([1.5, 2.0]), "integer dtype; got torch.float32"),
    (torch.tensor([True, False]), "integer dtype; got torch.bool"),
    ([], r"non-empty.*shape \(1, 0\)"),
    ("abc", "token ids"),
])
def test_bad_context_ids_are_refused_naming_the_value(tiny, ids, message):
    model, tok = tiny
    with compressed(model, "full", tok) as c:
        with pytest.raises(ValueError, match=message):
            c.prefill(ids)


def test_question_ids_beyond_the_vocabulary_are_refused_in_generate_and_raw_calls(tiny, prompt):
    model, tok = tiny
    context, question = prompt
    with compressed(model, "xkv", tok) as c:
        c.prefill(context)
        with pytest.raises(ValueError, match="question_ids: token id 50000"):
            c.generate([3, 50000], max_new_tokens=2)
        ids = torch.cat([context, torch.tensor([[3, 50000]])], 1)
        with pytest.raises(ValueError, match="input_ids: token id 50000"):
            model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=c.cache, max_new_tokens=2)


def test_ids_on_another_device_or_dtype_are_converted(tiny, prompt):
    model, tok = tiny
    context, question = prompt
    with compressed(model, "full", tok) as c:
        want = c.prefill(context).generate(question, max_new_tokens=3)
        got = c.prefill(context.to(torch.int32).tolist()).generate(question[0].to(torch.int16), max_new_tokens=3)
    assert torch.equal(got, want)


def test_devices_and_dtypes_are_checked_naming_the_value(caplog):
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="'gpu0' is not a torch device"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="float17"):
        resolve_dtype("float17")
    assert resolve_dtype("auto") is None and resolve_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="'meta' holds no weights"):
        load_model("smollm2-135m", device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda:0' is not available: this machine has no CUDA"):
            resolve_device("cuda:0")
        with caplog.at_level(logging.WARNING, logger="crosskv.core.models"):
            assert resolve_device("cuda:0", fallback=True) == torch.device("cpu")
        assert "device 'cuda:0' is not available" in caplog.text and "using cpu" in caplog.text


def test_a_meta_model_is_refused_by_compressed():
    model, tok = load_model("random:tiny", device="meta")
    with pytest.raises(ValueError, match="meta device"):
        with compressed(model, "full", tok):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
def test_lmeval_model_falls_back_from_cuda_and_says_so(caplog):
    pytest.importorskip("lm_eval")
    from crosskv.integrations.lmeval import CrossKVLM

    with caplog.at_level(logging.WARNING, logger="crosskv.core.models"):
        lm = CrossKVLM(pretrained="random:tiny", method="full", device="cuda:0", dtype="float32")
    assert lm._device == torch.device("cpu") and "cuda:0" in caplog.text and "using cpu" in caplog.text
    with pytest.raises(ValueError, match="dtype 'float17'"):
        CrossKVLM(pretrained="random:tiny", method="full", device="cpu", dtype="float17")


def test_lmeval_scores_on_an_uneven_cache_as_stepwise_feeding(tiny):
    """lm-eval loglikelihood through a PyramidKV composition: fed stepwise, equal to a token-by-token forward."""
    pytest.importorskip("lm_eval")
    from crosskv.integrations.lmeval import CrossKVLM

    model, tok = tiny
    lm = CrossKVLM.__new__(CrossKVLM)
    lm.model, lm.tokenizer, lm._device, lm.chat, lm.question_tokens = model, tok, torch.device("cpu"), False, None
    lm.method = make_method("compose", base="full", evict="pyramidkv", evict_ratio=0.5, window_size=8)
    lm.split = "\n\nQuestion:"
    prompt = "Once upon a time " * 20 + "\n\nQuestion: where?\nAnswer:"
    total, greedy = lm.score_continuation(prompt, " Far away")
    context, question = lm.context_question(prompt)
    target = lm.encode(" Far away", first=False)
    with torch.no_grad(), compressed(model, lm.method, tok) as c:
        c.prefill(context)
        assert harness.uneven(c.cache)
        logits = []
        for i, token in enumerate(question + target):
            out = model(input_ids=torch.tensor([[token]]), past_key_values=c.cache,
                        position_ids=torch.tensor([[len(context) + i]]))
            logits.append(out.logits[0, -1])
    logprobs = torch.stack(logits[len(question) - 1:-1]).float().log_softmax(-1)
    want = float(logprobs.gather(-1, torch.tensor(target)[:, None]).sum())
    assert total == pytest.approx(want, abs=1e-4)


def test_kvpress_pipeline_checks_ids_and_feeds_uneven_caches_stepwise(tiny, monkeypatch):
    from transformers import pipeline

    from crosskv.integrations import kvpress as integration

    model, tok = tiny
    crosskv.as_press("full")
    pipe = pipeline("crosskv-text-generation", model=model, tokenizer=tok)
    context = "Once upon a time there was a cache. " * 8
    method = make_method("compose", base="full", evict="pyramidkv", evict_ratio=0.5, window_size=8)
    answer = pipe(context, question="Where was it?", press=crosskv.as_press(method), max_new_tokens=4)["answer"]
    ids = pipe.preprocess(context, questions=["Where was it?"], answer_prefix="", max_context_length=10 ** 9)
    sample = Sample(0, ids["context_ids"][0].tolist(), ids["questions_ids"][0][0].tolist(), max_new_tokens=4)
    want = harness.run_generate(harness.bind(model, tok, method), sample, harness.stop_ids(model, tok))
    assert answer == want["prediction"]
    monkeypatch.setattr(integration, "vocab_size", lambda model: 50)  # a model smaller than its tokenizer
    with pytest.raises(ValueError, match="context_ids: token id .* >= vocab 50"):
        pipe(context, question="q?", press=crosskv.as_press("full"), max_new_tokens=2)


# --- item 3: output paths and file parameters before any work ---------------------------------------------

def _no_work(monkeypatch):
    from crosskv.core import models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", refuse)


@pytest.mark.parametrize("argv", [
    ["eval", "--method", "full", "--task", "ppl", "--out", "MISSING/dir/x.jsonl"],
    ["bench", "--out", "MISSING/b.csv"],
    ["search", "--rate", "0.25", "--out", "MISSING/s.json"],
    ["overhead", "--out", "MISSING/o.csv"],
])
def test_an_output_file_in_a_missing_folder_fails_at_once_naming_it(capsys, tmp_path, monkeypatch, argv):
    from crosskv.integrations import cli

    _no_work(monkeypatch)
    argv = [a.replace("MISSING", str(tmp_path / "missing")) for a in argv]
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"folder {tmp_path / 'missing'}" in err and "does not exist" in err
    assert not (tmp_path / "missing").exists()


def test_output_paths_that_are_folders_or_under_files_are_refused(capsys, tmp_path, monkeypatch):
    from crosskv.integrations import cli

    _no_work(monkeypatch)
    plain_file = tmp_path / "file"
    plain_file.write_text("x")
    for argv, message in ((["--out", str(tmp_path)], f"{tmp_path} is a directory"),
                          (["--results-dir", str(plain_file / "store")], f"{plain_file} is not a directory")):
        with pytest.raises(SystemExit):
            cli.main(["eval", "--method", "full", "--task", "ppl", *argv])
        assert message in capsys.readouterr().err


def test_a_missing_strategy_file_fails_before_the_model_loads(capsys, tmp_path, monkeypatch):
    from crosskv.integrations import cli

    _no_work(monkeypatch)
    missing = tmp_path / "nope.json"
    for method, key in (("kvsharer", "strategy"), ("kvsharer_xkv", "strategy"), ("compose", "base_params")):
        value = f"strategy={missing}" if key == "base_params" else str(missing)
        extra = ["--set", "base=kvsharer"] if method == "compose" else []
        code = cli.main(["eval", "--method", method, *extra, "--set", f"{key}={value}", "--task", "ppl"])
        assert code == 2 and f"strategy='{missing}': no such file" in capsys.readouterr().err


def test_figures_check_every_parameter_file_before_the_first_notebook(monkeypatch, tmp_path):
    from crosskv.evidence import figures

    stems = [nb.stem for nb in figures.notebooks()]
    ran = []
    monkeypatch.setattr(figures, "execute", lambda nb, *a, **k: ran.append(nb))
    monkeypatch.setattr(figures, "load_profile", lambda profile: {stems[-1]: {"not_a_parameter": 1}})
    with pytest.raises(ValueError, match=f"{stems[-1]}.*not_a_parameter.*smoke.yaml"):
        figures.run("smoke", build_root=tmp_path)
    assert ran == []
    monkeypatch.setattr(figures, "load_profile", lambda profile: {})
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        figures.run("smoke", build_root=blocker)
    assert ran == []


# --- item 4: method bytes ---------------------------------------------------------------------------------

def _projection_bytes(model, layers) -> int:
    attns = [layer.self_attn for layer in model.model.layers]
    return sum(p.numel() * p.element_size() for i in layers for m in (attns[i].k_proj, attns[i].v_proj)
               for p in m.parameters())


def test_method_bytes_of_every_method_but_commonkv(tiny, configs, tmp_path):
    model, tok = tiny
    dropped = _projection_bytes(model, [3, 1])  # the consumers of the fixture's strategy
    want = {"full": 0, "xkv_lossless": 0, "svd_lossless": 0, "xkv": 0, "minicache": 0, "quant4": 0, "snapkv": 0,
            "pyramidkv": 0, "kvsharer": -dropped, "kvsharer_xkv": -dropped}
    for label, value in want.items():
        assert harness.bind(model, tok, configs[label][0]).method_bytes() == value, label
    for name in ("kvpress:snapkv", "kvpress:pyramidkv", "kvpress:knorm", "kvpress:streaming_llm",
                 "kvpress:expected_attention"):
        assert make_method(name).bind(model, tok).method_bytes() == 0, name
    strategy = configs["kvsharer"][0].strategy
    composed = make_method("compose", base="kvsharer", base_params=f"strategy={strategy}", evict="snapkv",
                           evict_ratio=0.5, bits=4)
    assert composed.bind(model, tok).method_bytes() == -dropped  # sum of stages: only the base adds or drops


def test_method_bytes_from_shapes_on_the_meta_device(capsys, tmp_path):
    from crosskv.integrations import cli

    strategy = SharingStrategy({3: 2}, num_layers=4).save(tmp_path / "s.json")
    code = cli.main(["overhead", "--model", "random:tiny", "--device", "meta", "--methods", "full", "xkv",
                     f"kvsharer:strategy={strategy}", "--out", str(tmp_path / "o.csv")])
    assert code == 0
    import pandas as pd

    table = pd.read_csv(tmp_path / "o.csv").set_index("method")
    real, _ = load_model("random:tiny", device="cpu")
    assert table.loc["full", "method_bytes"] == 0 and table.loc["xkv", "method_bytes"] == 0
    assert table.loc[f"kvsharer:strategy={strategy}", "method_bytes"] == -_projection_bytes(real, [3])
    tensors = list(real.parameters()) + list(real.buffers())
    assert table.loc["full", "model_bytes"] == sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.slow
def test_method_bytes_on_the_llama_8b_shape(tmp_path):
    from crosskv.run.bench import overhead

    model, tok = load_model("random:llama-3.1-8b", device="meta")
    strategy = SharingStrategy({c: c - 1 for c in range(31, 16, -2)}, num_layers=32).save(tmp_path / "s.json")
    table = overhead(model, tok, ["full", "xkv:kept=0.25", "svd:kept=0.25", "minicache",
                                  f"kvsharer:strategy={strategy}"]).set_index("method")
    per_consumer = 2 * 4096 * 8 * 128 * 2  # k_proj + v_proj, 4096 → H_kv·d = 1024, bfloat16
    assert table.loc[f"kvsharer:strategy={strategy}", "method_bytes"] == -8 * per_consumer
    assert (table.drop(index=f"kvsharer:strategy={strategy}")["method_bytes"] == 0).all()
