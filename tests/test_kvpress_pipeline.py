"""crosskv methods through kvpress's text-generation pipeline (``crosskv-text-generation`` + ``as_press``)."""
from __future__ import annotations

import pytest
from transformers import pipeline

import crosskv
from crosskv.run import harness
from crosskv.core.data import heldout_text
from crosskv.integrations.kvpress import CrossKVPress
from crosskv.methods import make_method
from crosskv.tasks import Sample

NEW = 10
QUESTIONS = ["What is the essay about?", "Who is the author talking to?"]


@pytest.fixture(scope="module")
def pipes(model32):
    model, tok = model32
    crosskv.as_press("full")  # registers crosskv-text-generation
    return (pipeline("kv-press-text-generation", model=model, tokenizer=tok),
            pipeline("crosskv-text-generation", model=model, tokenizer=tok))


@pytest.fixture(scope="module")
def context(model32):
    return heldout_text(model32[1], 160)


@pytest.mark.slow
def test_full_rank_xkv_answers_as_the_plain_pipeline(pipes, context):
    plain, ours = pipes
    press = crosskv.as_press(make_method("xkv", group_size=4, rank_k=768, rank_v=768))
    want = plain(context, questions=QUESTIONS, max_new_tokens=NEW)["answers"]
    assert ours(context, questions=QUESTIONS, press=press, max_new_tokens=NEW)["answers"] == want
    assert ours(context, questions=QUESTIONS, max_new_tokens=NEW)["answers"] == want  # no press: kvpress's path


@pytest.mark.slow
def test_compressing_method_answers_as_the_harness_on_the_pipeline_ids(model32, pipes, context):
    model, tok = model32
    _, ours = pipes
    method = make_method("xkv", kept=0.3)
    answers = ours(context, questions=QUESTIONS, press=crosskv.as_press(method), max_new_tokens=NEW)["answers"]
    ids = ours.preprocess(context, questions=QUESTIONS, answer_prefix="", max_context_length=10**9)
    runner, stops = harness.bind(model, tok, method), harness.stop_ids(model, tok)
    for answer, question_ids in zip(answers, ids["questions_ids"]):
        sample = Sample(0, ids["context_ids"][0].tolist(), question_ids[0].tolist(), max_new_tokens=NEW)
        assert answer == harness.run_generate(runner, sample, stops)["prediction"]


@pytest.mark.slow
def test_questions_in_a_row_answer_as_each_alone(pipes, context):
    _, ours = pipes
    press = crosskv.as_press(make_method("xkv", kept=0.3))
    together = ours(context, questions=QUESTIONS, press=press, max_new_tokens=NEW)["answers"]
    assert together == [ours(context, question=q, press=press, max_new_tokens=NEW)["answer"] for q in QUESTIONS]


def test_the_stock_pipeline_and_a_foreign_cache_are_refused(tiny_model):
    from transformers import DynamicCache

    model, tok = tiny_model
    press = crosskv.as_press("full")
    stock = pipeline("kv-press-text-generation", model=model, tokenizer=tok)
    with pytest.raises(ValueError, match="crosskv-text-generation"):
        stock("some context", question="q?", press=press, max_new_tokens=2)
    ours = pipeline("crosskv-text-generation", model=model, tokenizer=tok)
    with pytest.raises(ValueError, match="cache=None"):
        ours("some context", question="q?", press=press, cache=DynamicCache(), max_new_tokens=2)
    with pytest.raises(ValueError, match="method config"):
        CrossKVPress("full")
