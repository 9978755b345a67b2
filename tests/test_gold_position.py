"""Gold-answer metrics where the model writes the answer: after a RULER answer prefix, or — on a task without one
(JSONL) — after the full cache's own greedy output up to the gold's first occurrence, shared by every configuration.
"""
from __future__ import annotations

import copy
import json

import pytest

from crosskv.methods import make_method
from crosskv.run import harness
from crosskv.tasks import make_task

PROMPTS = ["The access code for the Juniper vault is 9272-HW. What is the access code for the Juniper vault?",
           "The Cedar vault opens with 4410-KT. Which code opens the Cedar vault?"]


@pytest.fixture(scope="module")
def model(tiny_model):
    """A copy of the session's tiny model (binds hang on the model; the shared one stays untouched)."""
    model, tok = tiny_model
    return copy.deepcopy(model), tok


def _jsonl(path, answers: list[str]) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        for prompt, answer in zip(PROMPTS, answers):
            handle.write(json.dumps({"input": prompt, "answers": [answer]}) + "\n")
    return f"jsonl:{path}"


def _written(model, tok, task: str) -> list[str]:
    """The full cache's greedy output on each sample of ``task`` (its exact-match generation)."""
    record = harness.evaluate(model, tok, "full", task, samples=2, store=False, progress=False, max_new_tokens=12)
    return [d["prediction"] for d in record["details"]]


@pytest.fixture
def task(model, tmp_path):
    """A JSONL task without an answer prefix whose first sample's gold is a word inside the full cache's output
    (after several words: the lead is not empty) and whose second sample's gold the full cache never writes."""
    first, _ = _written(model[0], model[1], _jsonl(tmp_path / "probe.jsonl", ["unused", "unused"]))
    gold = first.split()[2]
    return _jsonl(tmp_path / "set.jsonl", [gold, "zz-never-written-zz"])


def test_gold_match_agrees_with_exact_match_on_the_full_cache(model, task):
    record = harness.evaluate(*model, "full", task, samples=2, store=False, progress=False, max_new_tokens=12)
    placed, unplaced = record["details"]
    assert [placed["gold_placement"], unplaced["gold_placement"]] == ["full_output", "question_end"]
    assert placed["gold_lead_tokens"] > 0 and unplaced["gold_lead_tokens"] == 0
    assert [d["gold_match"] for d in record["details"]] == [d["score"] for d in record["details"]] == [1, 0]
    assert record["gold_placement"] == "full_output" and record["gold_unplaced"] == 1


def test_without_the_lead_the_gold_would_not_be_reproduced(model, task, monkeypatch):
    """The placement matters: scored right after the question (no lead), full's gold_match drops to 0."""
    monkeypatch.setattr(harness, "gold_placement", lambda model, tok, task, sample, stops: harness.GoldPlacement(
        "question_end", [], harness.gold_ids(tok, sample)))
    record = harness.evaluate(*model, "full", task, samples=2, store=False, progress=False, max_new_tokens=12)
    assert [d["gold_match"] for d in record["details"]] == [0, 0]
    assert record["details"][0]["score"] == 1


def test_every_configuration_scores_the_same_placement(model, task):
    methods = {"full": make_method("full"), "svd": make_method("svd", kept=0.25)}
    grid = harness.evaluate_grid(*model, methods, task, samples=2, store=False, progress=False, generate_samples=0,
                                 max_new_tokens=12)
    for field in ("gold_placement", "gold_lead_tokens", "gold_tokens"):
        assert [d[field] for d in grid["full"]["details"]] == [d[field] for d in grid["svd"]["details"]], field
    alone = harness.evaluate(*model, methods["svd"], task, samples=2, store=False, progress=False,
                             generate_samples=0, max_new_tokens=12)
    assert [d["gold_loglik"] for d in alone["details"]] == [d["gold_loglik"] for d in grid["svd"]["details"]]


def test_a_task_with_an_answer_prefix_scores_right_after_it(model):
    record = harness.evaluate(*model, "full", make_task("niah_single_2", context=128, samples=1), store=False,
                              progress=False, generate_samples=0)
    detail = record["details"][0]
    assert detail["gold_placement"] == "answer_prefix" and detail["gold_lead_tokens"] == 0
    assert record["gold_placement"] == "answer_prefix" and record["gold_unplaced"] == 0


def test_a_tie_for_the_largest_logit_counts_as_reproduced():
    """bfloat16 logits often tie; greedy decoding may then pick the gold token, so the match counts it."""
    import torch

    tied = torch.tensor([[1.0, 3.0, 3.0]])
    assert harness.gold_scores(tied, [2])["gold_match"] == 1
    assert harness.gold_scores(tied, [0])["gold_match"] == 0
