"""The teacher-forced gold-answer metric and the shared prefill of evaluate_grid.

Gold scores are checked against a plain transformers ``DynamicCache`` forward; grid records against separate
``evaluate`` runs (same details, scores and bytes; timings differ by construction).
"""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from crosskv.core import capture
from crosskv.methods import make_method
from crosskv.methods.kvsharer import SharingStrategy
from crosskv.run import harness, prefix_replay
from crosskv.tasks import make_task

@pytest.fixture(scope="module")
def tiny_model(tiny_model):
    """A copy of the session's tiny model: binds and kvpress's press(model) here never touch the shared one
    (whose cached fingerprint other modules compare)."""
    import copy

    model, tok = tiny_model
    return copy.deepcopy(model), tok


TIMING = {"prefill_s", "compress_s", "decode_s", "gold_s", "continuation_s"}


def _reference_gold(model, tokenizer, sample):
    """gold_loglik / gold_match from a plain DynamicCache: prefill the context, then question + gold in one pass."""
    gold = harness.gold_ids(tokenizer, sample)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(torch.tensor([sample.context_ids]), past_key_values=cache, use_cache=True)
        forced = sample.question_ids + gold[:-1]
        logits = model(torch.tensor([forced]), past_key_values=cache, use_cache=True).logits[0]
    predictors = logits[len(sample.question_ids) - 1:].float()
    logp = torch.log_softmax(predictors, -1)[torch.arange(len(gold)), torch.tensor(gold)]
    return float(logp.mean()), int(bool((predictors.argmax(-1) == torch.tensor(gold)).all()))


def _strip(details):
    return [{k: v for k, v in d.items() if k not in TIMING} for d in details]


def _same_record(a, b):
    assert _strip(a["details"]) == _strip(b["details"])
    for field in ("score", "gold_loglik", "gold_match", "kv_bytes", "kv_bytes_held", "kept", "kept_held",
                  "kv_bytes_end", "key"):
        assert a.get(field) == b.get(field), field


def test_gold_ids_follow_the_answer_prefix(tiny_model):
    _, tok = tiny_model
    task = make_task("niah_single_2", context=128, samples=1)
    sample = task.spec.build(task, tok)[0]
    gold = harness.gold_ids(tok, sample)
    assert tok.decode(gold) == " " + ", ".join(sample.answers)
    sample.answers = []
    assert harness.gold_ids(tok, sample) == []


def test_gold_scores_definition():
    logits = torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    out = harness.gold_scores(logits, [1, 0])
    expected = float(torch.log_softmax(logits, -1)[[0, 1], [1, 0]].mean())
    assert out == {"gold_loglik": pytest.approx(expected), "gold_match": 1, "gold_tokens": 2}
    assert harness.gold_scores(logits, [1, 2])["gold_match"] == 0


def test_full_gold_scores_equal_a_plain_dynamic_cache(tiny_model):
    model, tok = tiny_model
    rec = harness.evaluate(model, tok, "full", "niah_multivalue", context=192, samples=3, store=False,
                           progress=False)
    task = make_task("niah_multivalue", context=192, samples=3)
    for sample, detail in zip(task.spec.build(task, tok), rec["details"]):
        loglik, match = _reference_gold(model, tok, sample)
        assert detail["gold_loglik"] == pytest.approx(loglik, abs=1e-5)
        assert detail["gold_match"] == match
    assert rec["gold_loglik"] == pytest.approx(sum(d["gold_loglik"] for d in rec["details"]) / 3)


@pytest.mark.parametrize("method", [make_method("full"), make_method("kvpress:pyramidkv", compression_ratio=0.5,
                                                                       window_size=16),
                                    make_method("compose", base="full", bits=4, group_size=16, residual=8)])
def test_generation_after_gold_equals_generation_alone(tiny_model, monkeypatch, method):
    """The gold pass is cropped away before decoding (also from evicted, uneven and quantized caches):
    predictions and end bytes equal a run without gold scoring."""
    model, tok = tiny_model
    common = dict(context=160, samples=2, store=False, progress=False, max_new_tokens=6)
    with_gold = harness.evaluate(model, tok, method, "niah_single_2", **common)
    monkeypatch.setattr(harness, "gold_ids", lambda tokenizer, sample: [])
    alone = harness.evaluate(model, tok, method, "niah_single_2", **common)
    assert [d["prediction"] for d in with_gold["details"]] == [d["prediction"] for d in alone["details"]]
    assert [d["kv_bytes_end"] for d in with_gold["details"]] == [d["kv_bytes_end"] for d in alone["details"]]
    assert alone["gold_loglik"] is None and with_gold["gold_loglik"] is not None


def test_generate_samples_scores_a_subset_and_is_keyed(tiny_model):
    model, tok = tiny_model
    rec = harness.evaluate(model, tok, "full", "niah_single_2", context=128, samples=3, store=False,
                           progress=False, generate_samples=1)
    assert [d["generated"] for d in rec["details"]] == [True, False, False]
    assert rec["scored_samples"] == 1 and rec["score"] == rec["details"][0]["score"]
    assert all(d["gold_loglik"] is not None for d in rec["details"])
    full = harness.evaluate(model, tok, "full", "niah_single_2", context=128, samples=3, store=False, progress=False)
    assert full["key"] != rec["key"] and full["scored_samples"] == 3
    with pytest.raises(ValueError, match="generate_samples=-1"):
        harness.evaluate(model, tok, "full", "niah_single_2", context=128, samples=1, store=False,
                         progress=False, generate_samples=-1)


def test_grid_records_equal_separate_runs_tiny(tiny_model, tmp_path):
    model, tok = tiny_model
    methods = {"full": make_method("full"), "svd": make_method("svd", kept=0.5),
               "xkv": make_method("xkv", kept=0.25, group_size=2),  # the selective base's eigh, shared
               "int4": make_method("compose", base="full", bits=4, group_size=16, residual=8),
               "snapkv": make_method("kvpress:snapkv", compression_ratio=0.5, window_size=16),
               "pyramid": make_method("kvpress:pyramidkv", compression_ratio=0.5, window_size=16),
               "expected": make_method("kvpress:expected_attention", compression_ratio=0.5, n_future_positions=16),
               "knorm": make_method("kvpress:knorm", compression_ratio=0.5),
               "selective": make_method("selective", base="xkv", base_params="group_size=2;kept=0.5", top_k="8",
                                        sinks="2", window="4"),
               "snap+int4": make_method("compose", base="full", evict="snapkv", evict_ratio=0.5, window_size=16,
                                        bits=4, group_size=16, residual=8)}
    common = dict(context=160, samples=2, progress=False, generate_samples=1)
    grid = harness.evaluate_grid(model, tok, methods, "niah_single_2", results_dir=tmp_path / "grid", **common)
    assert [grid[k]["prefill_shared"] for k in methods] == [9] * 9 + [1]  # compose with eviction: its own
    for label, config in methods.items():
        alone = harness.evaluate(model, tok, config, "niah_single_2", results_dir=tmp_path / "alone", **common)
        _same_record(grid[label], alone)
    again = harness.evaluate_grid(model, tok, methods, "niah_single_2", results_dir=tmp_path / "grid", **common)
    assert all(again[k]["created"] == grid[k]["created"] and again[k]["key"] == grid[k]["key"] for k in methods)


def test_grid_shares_perplexity_prefills_too(tiny_model):
    model, tok = tiny_model
    methods = {"full": make_method("full"), "minicache": make_method("minicache", start_layer=0),
               "selective": make_method("selective", base_params="group_size=2;kept=0.5", top_k="8", sinks="2",
                                        window="4")}
    common = dict(context=96, samples=2, progress=False, store=False, continuation=8)
    grid = harness.evaluate_grid(model, tok, methods, "ppl_cont", **common)
    for label, config in methods.items():
        _same_record(grid[label], harness.evaluate(model, tok, config, "ppl_cont", **common))


@pytest.fixture
def sharing(tmp_path):
    """KVSharer and the KVSharer + xKV hybrid on the tiny model: layer 1 reads layer 0 (first consumer: 1)."""
    strategy = str(SharingStrategy({1: 0}, num_layers=2).save(tmp_path / "s.json"))
    return {"kvsharer": make_method("kvsharer", strategy=strategy),
            "hybrid": make_method("kvsharer_xkv", strategy=strategy, shared_layers=None, group_size=1, kept=0.5)}


@pytest.mark.parametrize("task, options", [("niah_single_2", dict(context=160, generate_samples=1)),
                                           ("ppl_cont", dict(context=96, continuation=8))])
def test_grid_replays_the_layers_below_the_first_consumer(tiny_model, sharing, task, options):
    """KVSharer and its hybrid share the grid's plain prefill below their first consumer (layer 0 is not run
    again) and their records equal their own prefill's."""
    model, tok = tiny_model
    methods = {"full": make_method("full"), **sharing}
    common = dict(samples=2, progress=False, store=False, **options)
    lengths = []  # tokens of each forward through layer 0
    hook = capture.decoder_layers(model)[0].register_forward_hook(lambda m, args, out: lengths.append(out.shape[1]))
    try:
        grid = harness.evaluate_grid(model, tok, methods, task, **common)
    finally:
        hook.remove()
    assert [grid[k]["prefill_shared"] for k in methods] == [3, 3, 3]
    assert sum(n >= 64 for n in lengths) == 2  # one context forward per sample (appended blocks are shorter)
    for label, config in methods.items():
        _same_record(grid[label], harness.evaluate(model, tok, config, task, **common))


def test_a_lone_replaying_configuration_runs_its_own_prefill(tiny_model, sharing):
    """One KVSharer configuration alone saves less than the plain forward costs: no shared prefill."""
    model, tok = tiny_model
    grid = harness.evaluate_grid(model, tok, {"kvsharer": sharing["kvsharer"]}, "niah_single_2", context=128,
                                 samples=1, progress=False, store=False, generate_samples=0)
    assert grid["kvsharer"]["prefill_shared"] == 1


def test_sharers_rule():
    assert harness._sharers(["a"], {}, 30) == []  # one plain configuration: its own forward is the plain one
    assert harness._sharers(["a"], {"k": 11}, 30) == ["a", "k"]
    assert harness._sharers([], {"k": 11, "m": 15}, 30) == []  # 26/30 of a prefill saved < one plain forward
    assert harness._sharers([], {"k": 19, "m": 25}, 30) == ["k", "m"]
    assert harness._sharers(["a", "b"], {}, 30) == ["a", "b"]


def test_replayed_layers_refuse_a_bad_count_and_restore_the_model(tiny_model):
    model, _ = tiny_model
    before = list(capture.decoder_layers(model))
    with pytest.raises(ValueError, match="cannot replay 3 layers of a 2-layer decoder"):
        with prefix_replay.replayed_layers(model, 3, [], [], torch.zeros(1)):
            pass
    with prefix_replay.replayed_layers(model, 1, [None], [None], torch.zeros(1)):
        assert isinstance(capture.decoder_layers(model)[0], prefix_replay.ReplayedLayer)
    assert capture.decoder_layers(model) == before


def test_grid_seconds_count_a_share_of_each_shared_prefill(tiny_model, monkeypatch):
    """A shared prefill made to report 10 s: each of the n sharing configurations is charged 10/n s per sample."""
    model, tok = tiny_model
    real = harness.plain_prefill

    def slow_prefill(*args, **kwargs):
        prefill = real(*args, **kwargs)
        prefill.seconds = 10.0
        return prefill

    monkeypatch.setattr(harness, "plain_prefill", slow_prefill)
    methods = {"full": make_method("full"), "svd": make_method("svd", kept=0.5)}
    grid = harness.evaluate_grid(model, tok, methods, "niah_single_2", context=160, samples=2, progress=False,
                                 store=False, generate_samples=0)
    for label in methods:
        assert 2 * 10.0 / 2 <= grid[label]["seconds"] < 2 * 10.0 / 2 + 5.0, (label, grid[label]["seconds"])


@pytest.mark.parametrize("method", [
    make_method("svd", kept=0.5),
    make_method("selective", base="svd", base_params="kept=0.5", top_k="4", sinks="1", window="2")])
def test_gold_answer_is_forced_as_generation_feeds_it(tiny_model, method):
    """Every method forces question + answer in one forward: the cache reads a block as that many one-token
    steps itself (selective reconstruction included), so the harness needs no per-method feeding."""
    model, tok = tiny_model
    forwards = []  # tokens per forward

    def seen(module, args, kwargs):
        forwards.append(kwargs["input_ids"].shape[1])

    hook = model.register_forward_pre_hook(seen, with_kwargs=True)
    try:
        record = harness.evaluate(model, tok, method, "niah_single_2", context=160, samples=1, progress=False,
                                  store=False, generate_samples=0)
    finally:
        hook.remove()
    detail = record["details"][0]
    answer = detail["gold_tokens"] - 1  # answer tokens forced after the question
    assert answer >= 1
    assert forwards[-1] > answer, forwards


def test_grid_refuses_what_is_not_a_method(tiny_model):
    model, tok = tiny_model
    with pytest.raises(ValueError, match="'x' is a str"):
        harness.evaluate_grid(model, tok, {"x": "full"}, "niah_single_2", context=64, samples=1, store=False)
    with pytest.raises(ValueError, match="at least one"):
        harness.evaluate_grid(model, tok, {}, "niah_single_2", context=64, samples=1, store=False)


@pytest.mark.slow
def test_gold_and_grid_on_the_embedded_model(model16, tmp_path):
    """bfloat16 SmolLM2: full's gold scores equal a plain DynamicCache forward; a grid of five configurations
    (four sharing the prefill) gives the records of separate runs."""
    model, tok = model16
    task = make_task("niah_multikey_2", context=512, samples=2)
    rec = harness.evaluate(model, tok, "full", task, store=False, progress=False)
    for sample, detail in zip(task.spec.build(task, tok), rec["details"]):
        loglik, match = _reference_gold(model, tok, sample)
        assert detail["gold_loglik"] == pytest.approx(loglik, abs=1e-4)
        assert detail["gold_match"] == match
    methods = {"full": make_method("full"), "xkv": make_method("xkv", kept=0.25),
               "minicache": make_method("minicache", start_layer=20),
               "kivi2": make_method("compose", base="full", bits=2, residual=32),
               "streaming": make_method("kvpress:streaming_llm", compression_ratio=0.75)}
    grid = harness.evaluate_grid(model, tok, methods, task, results_dir=tmp_path, progress=False)
    assert [grid[k]["prefill_shared"] for k in methods] == [5, 5, 5, 5, 5]
    for label, config in methods.items():
        _same_record(grid[label], harness.evaluate(model, tok, config, task, store=False, progress=False))
