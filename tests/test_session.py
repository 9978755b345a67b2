"""crosskv.compressed: model.generate from a compressed context, several questions per context, cropping."""
from __future__ import annotations

import pytest
import torch

import crosskv
from crosskv.run import harness
from crosskv.core.data import heldout_text
from crosskv.methods import make_method
from crosskv.methods.kvsharer import SharingStrategy
from crosskv.run.session import compressed, layer_lengths, rewind
from crosskv.tasks import Sample

FULL_RANK_XKV = dict(group_size=4, rank_k=768, rank_v=768)  # G·H_kv·d of the embedded model: lossless
NEW = 10


@pytest.fixture(scope="module")
def prompt(model32):
    """(context ids (1, T), two questions (1, Q)) from a held-out essay."""
    _, tok = model32
    context = tok(heldout_text(tok, 160) + "\n\nQuestion: what is the essay about?", return_tensors="pt").input_ids
    questions = [tok(text, return_tensors="pt", add_special_tokens=False).input_ids
                 for text in (" Answer in one word:", "\nAnswer: The essay")]
    return context, questions


def plain_generate(model, context, question, **kwargs):
    ids = torch.cat([context, question], 1)
    return model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("method", [make_method("full"), make_method("xkv", **FULL_RANK_XKV)], ids=["full", "xkv_full_rank"])
def test_lossless_methods_generate_exactly_as_plain_generate(model32, prompt, method):
    model, tok = model32
    context, (question, _) = prompt
    want = plain_generate(model, context, question, max_new_tokens=NEW, do_sample=False)
    with crosskv.compressed(model, method, tok) as c:
        c.prefill(context)
        got = c.generate(question, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.slow
def test_raw_generate_from_the_cache_equals_the_wrapper(model32, prompt):
    model, tok = model32
    context, (question, _) = prompt
    method = make_method("xkv", kept=0.3)
    with compressed(model, method, tok) as c:
        c.prefill(context)
        raw = model.generate(torch.cat([c.context_ids, question], 1), past_key_values=c.cache,
                             max_new_tokens=NEW, do_sample=False)
        c.reset()
        wrapped = c.generate(question, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(raw, wrapped)


@pytest.mark.slow
@pytest.mark.parametrize("name,params", [
    ("xkv", dict(kept=0.3)), ("minicache", {}), ("compose", dict(base="full", evict="snapkv", evict_ratio=0.5, window_size=16)),
])
def test_compressing_method_answers_as_the_harness(model32, prompt, name, params):
    model, tok = model32
    context, (question, _) = prompt
    method = make_method(name, **params)
    sample = Sample(0, context[0].tolist(), question[0].tolist(), max_new_tokens=NEW)
    want = harness.run_generate(harness.bind(model, tok, method), sample, harness.stop_ids(model, tok))
    with compressed(model, method, tok) as c:
        c.prefill(context)
        out = c.generate(question, max_new_tokens=NEW, do_sample=False)
    assert tok.decode(out[0, context.shape[1] + question.shape[1]:], skip_special_tokens=True) == want["prediction"]


@pytest.mark.slow
def test_questions_in_a_row_answer_as_each_alone(model32, prompt):
    model, tok = model32
    context, questions = prompt
    method = make_method("xkv", kept=0.3)
    alone = []
    for question in questions:
        with compressed(model, method, tok) as c:
            alone.append(c.prefill(context).generate(question, max_new_tokens=NEW, do_sample=False))
    with compressed(model, method, tok) as c:
        c.prefill(context)
        checkpoint = layer_lengths(c.cache)
        in_a_row = [c.generate(question, max_new_tokens=NEW, do_sample=False) for question in questions]
        c.reset()
        assert layer_lengths(c.cache) == checkpoint
    for got, want in zip(in_a_row, alone):
        assert torch.equal(got, want)


@pytest.mark.slow
def test_sampling_and_stop_strings(model32, prompt):
    model, tok = model32
    context, (question, _) = prompt
    with compressed(model, make_method("xkv", kept=0.3), tok) as c:
        c.prefill(context)
        torch.manual_seed(1)
        first = c.generate(question, max_new_tokens=NEW, do_sample=True, top_k=20)
        torch.manual_seed(1)
        again = c.generate(question, max_new_tokens=NEW, do_sample=True, top_k=20)
        greedy = c.generate(question, max_new_tokens=NEW, do_sample=False)
        text = tok.decode(greedy[0, context.shape[1] + question.shape[1]:])
        stop = text.strip()[:3]
        stopped = c.generate(question, max_new_tokens=NEW, do_sample=False, stop_strings=[stop], tokenizer=tok)
    assert torch.equal(first, again)
    assert stopped.shape[1] < greedy.shape[1] and stop in tok.decode(stopped[0, context.shape[1] + question.shape[1]:])


def test_a_cache_counting_held_tokens_is_refused_for_generate(tiny_model):
    model, tok = tiny_model
    context = torch.randint(100, 1000, (1, 80), generator=torch.Generator().manual_seed(0))
    with compressed(model, make_method("kvpress:knorm", compression_ratio=0.5), tok) as c:
        c.prefill(context)
        with pytest.raises(ValueError, match="kvpress:knorm"):
            c.generate(context[:, :3], max_new_tokens=2)


def test_bad_ids_are_refused(tiny_model):
    model, tok = tiny_model
    with compressed(model, "full", tok) as c:
        with pytest.raises(RuntimeError, match="prefill"):
            c.cache
        with pytest.raises(ValueError, match="shape"):
            c.prefill(torch.ones(2, 5, dtype=torch.long))


@pytest.mark.parametrize("name,params", [
    ("full", {}), ("kvsharer", {}), ("compose", dict(base="full", evict="snapkv", evict_ratio=0.5, window_size=8)),
    ("compose", dict(base="full", bits=4, group_size=8, residual=8)), ("xkv", dict(kept=0.5, group_size=2)),
    ("minicache", dict(start_layer=0)), ("commonkv", dict(group_size=2, rank_ratio=0.5, weights="uniform", recent_tokens=8)),
    ("commonkv", dict(group_size=2, attend="buffer", weights="uniform", recent_tokens=8)),
])
def test_every_cache_type_rewinds_to_the_compressed_context(tiny_model, tmp_path, name, params):
    """After compression, append a question and answer tokens, rewind: the next forward matches a fresh cache."""
    model, tok = tiny_model
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(100, 1000, (1, 48), generator=generator)
    extra = torch.randint(100, 1000, (1, 6), generator=generator)
    probe = torch.randint(100, 1000, (1, 3), generator=generator)
    if name == "kvsharer":
        params = dict(strategy=str(SharingStrategy({1: 0}, num_layers=2).save(tmp_path / "s.json")))
    method = make_method(name, **params)

    def probe_logits(c, before=None):
        c.prefill(context)
        if before is not None:
            checkpoint = layer_lengths(c.cache)
            pos = torch.arange(48, 54).unsqueeze(0)
            model(input_ids=before, past_key_values=c.cache, position_ids=pos)
            rewind(c.cache, checkpoint)
            assert layer_lengths(c.cache) == checkpoint
        pos = torch.arange(48, 51).unsqueeze(0)
        return model(input_ids=probe, past_key_values=c.cache, position_ids=pos).logits

    with torch.no_grad(), compressed(model, method, tok) as c:
        fresh = probe_logits(c)
        rewound = probe_logits(c, before=extra)
    torch.testing.assert_close(rewound, fresh)
