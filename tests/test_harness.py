"""The harness: measured bytes, the prompt flow, the results store round trip, and full's NIAH score."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from transformers import DynamicCache

from crosskv.run import harness
from crosskv.run import results
from crosskv.cache.storage import kv_bytes
from crosskv.methods import make_method
from crosskv.tasks import make_task


def run(model_tok, task="niah_single_1", tmp=None, **kw):
    model, tok = model_tok
    kw.setdefault("context", 256)
    kw.setdefault("samples", 2)
    return harness.evaluate(model, tok, kw.pop("method", "full"), task, results_dir=tmp, progress=False,
                            store=tmp is not None, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_cache_bytes_formula_matches_a_real_dynamic_cache(tiny_model, dtype):
    model = copy.deepcopy(tiny_model[0]).to(dtype)  # a copy: a bf16 round trip would round the shared model's weights
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.arange(37).unsqueeze(0), past_key_values=cache, use_cache=True)
    assert kv_bytes(cache) == harness.full_cache_bytes(model, 37)
    assert kv_bytes(cache, float_bytes=2) == harness.full_cache_bytes(model, 37, element_size=2)


def test_full_keeps_everything_and_record_has_the_fields(tiny_model):
    rec = run(tiny_model, max_new_tokens=5)
    for field in ("score", "kv_bytes", "kv_bytes_full", "kept", "factor", "kept_16bit", "kv_bytes_end",
                  "kv_bytes_held", "kv_bytes_held_end", "kept_held", "kept_held_end", "prefill_s", "decode_tok_s", "seconds", "peak_mem_bytes", "versions", "details"):
        assert field in rec, field
    assert rec["kv_bytes"] == rec["kv_bytes_full"] and rec["kept"] == 1.0 and rec["factor"] == 1.0
    assert rec["kv_bytes_end"] == rec["kv_bytes_full_end"] > rec["kv_bytes"]
    assert rec["kv_bytes_held"] == rec["kv_bytes"] and rec["kv_bytes_held_end"] == rec["kv_bytes_end"]  # census
    assert rec["kept_held"] == 1.0
    assert rec["kept_16bit"] == 1.0 and rec["kv_bytes_16bit"] == rec["kv_bytes"] / 2  # float32 model
    for d in rec["details"]:
        fed = d["prompt_tokens"] + d["generated_tokens"] - 1  # the last token is never fed back
        assert d["kv_bytes_end"] == harness.full_cache_bytes(tiny_model[0], fed)
        assert d["kv_bytes"] == harness.full_cache_bytes(tiny_model[0], d["context_tokens"])
        assert 1 <= d["generated_tokens"] <= 5
    assert rec["peak_mem_bytes"] > 0 and rec["samples"] == 2


def test_decode_matches_generate(tiny_model):
    """The manual greedy loop with split prompt equals transformers' greedy generate on the joined prompt."""
    model, tok = tiny_model
    config = make_task("niah_single_1", 256, 1, max_new_tokens=6)
    (sample,) = config.spec.build(config, tok)
    detail = harness.run_generate(make_method("full").bind(model, tok), sample, stops=set())
    ids = torch.tensor([sample.context_ids + sample.question_ids])
    out = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert detail["prediction"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_settled_decoding_stops_early_with_the_same_score(tiny_model):
    """Decoding stops once every reference appears; the score equals a full-length decode's."""
    from crosskv.tasks.ruler import all_found, score_all

    model, tok = tiny_model
    config = make_task("niah_single_1", 256, 1, max_new_tokens=8)
    (sample,) = config.spec.build(config, tok)
    runner = make_method("full").bind(model, tok)
    whole = harness.run_generate(runner, sample, stops=set())
    sample.answers = [tok.decode(tok.encode(whole["prediction"], add_special_tokens=False)[:2]).strip()]
    early = harness.run_generate(runner, sample, stops=set(), settled=all_found)
    assert early["settled"] and not whole["settled"]
    assert early["generated_tokens"] < whole["generated_tokens"] == 8
    assert whole["prediction"].startswith(early["prediction"])
    assert score_all(early["prediction"], sample, config) == score_all(whole["prediction"], sample, config) == 1.0
    sample.answers = ["no such answer anywhere"]
    assert not harness.run_generate(runner, sample, stops=set(), settled=all_found)["settled"]


def test_stepwise_feed_equals_one_forward(tiny_model, monkeypatch):
    """Uneven per-layer lengths (PyramidKV) make ``feed`` append one token at a time; that path is exact."""
    model, _ = tiny_model
    ids = torch.arange(40).unsqueeze(0)

    def fed(stepwise: bool):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids[:, :30], past_key_values=cache, use_cache=True)
            monkeypatch.setattr(harness, "uneven", lambda c: stepwise)
            out = harness.feed(model, cache, ids[0, 30:].tolist(), 30, torch.device("cpu"), hidden=True)
            monkeypatch.undo()
        return out

    assert torch.allclose(fed(False), fed(True), atol=1e-5)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :30], past_key_values=cache, use_cache=True)
    assert not harness.uneven(cache)
    cache.layers[1].keys = cache.layers[1].keys[:, :, 1:]
    assert harness.uneven(cache)


def test_store_skips_completed_runs_unless_forced(tiny_model, tmp_path, monkeypatch):
    first = run(tiny_model, tmp=tmp_path, max_new_tokens=3)
    assert [p.name for p in tmp_path.iterdir()] == [f"{first['key']}.json"]

    def refuse(*args, **kwargs):
        raise AssertionError("a stored run was recomputed")

    monkeypatch.setattr(harness, "run_generate", refuse)
    again = run(tiny_model, tmp=tmp_path, max_new_tokens=3)
    assert again["key"] == first["key"] and again["created"] == first["created"]
    with pytest.raises(AssertionError, match="recomputed"):
        run(tiny_model, tmp=tmp_path, max_new_tokens=3, force=True)
    monkeypatch.undo()
    forced = run(tiny_model, tmp=tmp_path, max_new_tokens=3, force=True)
    assert forced["key"] == first["key"] and len(list(tmp_path.iterdir())) == 1
    other = run(tiny_model, tmp=tmp_path, max_new_tokens=3, seed=1)
    assert other["key"] != first["key"] and len(list(tmp_path.iterdir())) == 2
    df = results.load_records(tmp_path, task="niah_single_1")
    assert len(df) == 2 and set(df["seed"]) == {0, 1}


def test_interrupted_run_leaves_no_record(tiny_model, tmp_path, monkeypatch):
    calls = []

    def interrupted(runner, sample, stops, *settled):
        calls.append(sample.index)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(runner, sample, stops, *settled)

    real = harness.run_generate
    monkeypatch.setattr(harness, "run_generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model, tmp=tmp_path, max_new_tokens=3)
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_context_beyond_the_model_is_refused_before_running(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="max_position_embeddings=4096"):
        run(tiny_model, tmp=tmp_path, context=4090, samples=1)
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_bind_is_cached_per_model_and_config(tiny_model):
    model, tok = tiny_model
    a = harness.bind(model, tok, make_method("kvpress:snapkv", compression_ratio=0.25))
    assert harness.bind(model, tok, make_method("kvpress:snapkv", compression_ratio="0.25")) is a
    assert harness.bind(model, tok, make_method("kvpress:snapkv", compression_ratio=0.5)) is not a


@pytest.mark.parametrize("method", ["full", "svd"])
def test_a_bound_model_is_freed_once_the_caller_drops_it(tiny_model, method):
    import gc
    import weakref

    template, tok = tiny_model
    model = copy.deepcopy(template)
    runner = harness.bind(model, tok, make_method(method))
    assert harness.bind(model, tok, make_method(method)) is runner
    assert harness.bind(copy.deepcopy(model), tok, make_method(method)) is not runner  # a copy binds afresh
    alive = weakref.ref(model)
    del model, runner
    gc.collect()
    assert alive() is None


def test_perplexity_tasks_agree_with_a_direct_forward(tiny_model):
    model, tok = tiny_model
    rec = run(tiny_model, "ppl_cont", context=64, samples=1, continuation=16)
    (sample,) = make_task("ppl_cont", 64, 1, continuation=16).spec.build(make_task("ppl_cont", 64, 1, continuation=16), tok)
    ids = torch.tensor([sample.context_ids + sample.question_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    nll = torch.nn.functional.cross_entropy(logits[63:79], ids[0, 64:80], reduction="sum")
    assert rec["score"] == pytest.approx(math.exp(float(nll) / 16), rel=1e-4)
    plain = run(tiny_model, "ppl", context=64, samples=1)
    assert plain["details"][0]["scored_tokens"] == 63 and plain["higher_is_better"] is False


@pytest.mark.slow
def test_full_finds_the_needle_at_2k(model16):
    """The issue's acceptance test: full ≥ 0.8 on niah_single_2, 2K context, 10 samples (bfloat16 default)."""
    rec = harness.evaluate(*model16, "full", "niah_single_2", context=2048, samples=10, store=False,
                           progress=False, max_new_tokens=16)
    assert rec["score"] >= 0.8, [(d["prediction"], d["answers"]) for d in rec["details"]]
    assert rec["kv_bytes"] == rec["kv_bytes_full"]


# --- results keyed by content ----------------------------------------------------------------------------

def test_changed_library_code_recomputes_and_unchanged_is_served(tiny_model, tmp_path, monkeypatch):
    from crosskv.core import fingerprint

    first = run(tiny_model, tmp=tmp_path, max_new_tokens=2, samples=1)
    assert first["code"] == fingerprint.code_fingerprint() and "git_dirty" in first and "git_head" in first
    monkeypatch.setattr(harness, "run_generate", lambda *a, **k: pytest.fail("an unchanged run was recomputed"))
    assert run(tiny_model, tmp=tmp_path, max_new_tokens=2, samples=1)["created"] == first["created"]
    monkeypatch.undo()
    monkeypatch.setattr(fingerprint, "code_fingerprint", lambda: "edited-method-source")
    second = run(tiny_model, tmp=tmp_path, max_new_tokens=2, samples=1)
    assert second["key"] != first["key"] and second["code"] == "edited-method-source"
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_code_fingerprint_follows_the_package_sources(tmp_path, monkeypatch):
    import shutil

    from crosskv.core import fingerprint

    package = tmp_path / "crosskv"
    shutil.copytree(fingerprint.PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(fingerprint, "PACKAGE_DIR", package)
    fingerprint.code_fingerprint.cache_clear()
    try:
        before = fingerprint.code_fingerprint()
        fingerprint.code_fingerprint.cache_clear()
        assert fingerprint.code_fingerprint() == before
        method = package / "methods" / "full.py"
        method.write_text(method.read_text() + "\n# a changed method\n")
        fingerprint.code_fingerprint.cache_clear()
        assert fingerprint.code_fingerprint() != before
    finally:
        fingerprint.code_fingerprint.cache_clear()


def test_model_fingerprint_sees_weights_and_is_cached(tiny_model):
    from crosskv.core import fingerprint

    model = copy.deepcopy(tiny_model[0])  # fresh: the shared model's cached value may predate other tests' aliasing
    model.__dict__.pop("_crosskv_fingerprint", None)
    value = fingerprint.model_fingerprint(model)
    assert model.__dict__["_crosskv_fingerprint"] == value
    clone = copy.deepcopy(model)
    clone.__dict__.pop("_crosskv_fingerprint", None)
    assert fingerprint.model_fingerprint(clone) == value
    other = copy.deepcopy(model)
    other.__dict__.pop("_crosskv_fingerprint", None)
    with torch.no_grad():
        other.model.layers[1].self_attn.v_proj.weight[3, 5] += 1.0
    assert fingerprint.model_fingerprint(other) != fingerprint.model_fingerprint(model)


def test_file_parameters_are_keyed_by_content(tmp_path):
    from crosskv.core import fingerprint

    task = tmp_path / "prompts.jsonl"
    task.write_text('{"context": "a", "question": "b", "answers": ["c"]}\n')
    ident = lambda: results.identity("m", "f32", "full", {}, {"task": f"jsonl:{task}"}, device_type="cpu")  # noqa: E731
    first = ident()
    assert first["files"] == {"task.task": fingerprint.file_digest(task)}
    task.write_text('{"context": "a", "question": "b", "answers": ["d"]}\n')
    assert results.run_key(ident()) != results.run_key(first)


def test_torn_record_is_recomputed_and_replaced_with_a_warning(tiny_model, tmp_path, caplog):
    first = run(tiny_model, tmp=tmp_path, max_new_tokens=2, samples=1)
    path = tmp_path / f"{first['key']}.json"
    path.write_text(path.read_text()[:50])
    with caplog.at_level("WARNING", logger="crosskv.run.results"):
        again = run(tiny_model, tmp=tmp_path, max_new_tokens=2, samples=1)
    assert str(path) in caplog.text
    assert again["key"] == first["key"] and json.loads(path.read_text())["key"] == first["key"]
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert results.load_records(tmp_path).empty


def test_stored_record_from_another_machine_serves_scores_not_timings(tiny_model, tmp_path, monkeypatch):
    first = run(tiny_model, tmp=tmp_path, max_new_tokens=2, samples=1)
    assert first["machine"] == results.machine_name("cpu") and first["device_type"] == "cpu"
    assert first["decode_tok_s"] is not None and first["prefill_s"] is not None
    assert run(tiny_model, tmp=tmp_path, max_new_tokens=2, samples=1)["prefill_s"] == first["prefill_s"]
    monkeypatch.setattr(results, "machine_name", lambda device_type: "another host · cpu: other, 64 cores")
    again = run(tiny_model, tmp=tmp_path, max_new_tokens=2, samples=1)
    assert again["key"] == first["key"] and again["score"] == first["score"]
    assert again["prefill_s"] is None and again["decode_tok_s"] is None and again["seconds"] is None
    assert again["details"][0]["prefill_s"] is None and again["timings_dropped"] == first["machine"]


def test_records_carry_method_bytes(tiny_model, tmp_path):
    from crosskv.methods.kvsharer import SharingStrategy

    strategy = SharingStrategy({1: 0}, num_layers=2).save(tmp_path / "s.json")
    record = run(tiny_model, max_new_tokens=2, samples=1, method=make_method("kvsharer", strategy=str(strategy)))
    attn = tiny_model[0].model.layers[1].self_attn
    dropped = sum(p.numel() * p.element_size() for m in (attn.k_proj, attn.v_proj) for p in m.parameters())
    assert record["method_bytes"] == -dropped < 0
    assert run(tiny_model, max_new_tokens=2, samples=1)["method_bytes"] == 0
