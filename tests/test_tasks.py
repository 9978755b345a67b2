"""Tasks and scorers: RULER generation (determinism, needles, depth, length), jsonl, hub-task errors."""
from __future__ import annotations

import json
import re

import pytest

from crosskv.tasks import TaskUnavailableError, get_task, make_task
from crosskv.tasks import longbench, ruler, scoring
from crosskv.tasks.jsonl import read_records

RULER_TASKS = [*ruler.NIAH_TASKS, "vt", "cwe", "fwe"]


def build(tokenizer, name, context=1024, samples=2, seed=0, **options):
    config = make_task(name, context, samples, seed, **options)
    return config, config.spec.build(config, tokenizer)


def text_of(tokenizer, sample):
    return (tokenizer.decode(sample.context_ids, clean_up_tokenization_spaces=False),
            tokenizer.decode(sample.question_ids, clean_up_tokenization_spaces=False))


# --- scorers ---------------------------------------------------------------------------------------

def test_string_match_all_counts_the_fraction_found():
    assert scoring.string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert scoring.string_match_all("ABC", ["abc"]) == 1.0
    assert scoring.string_match_all("ABC", ["abc"], case_sensitive=True) == 0.0


def test_string_match_part_needs_any_reference():
    assert scoring.string_match_part("Paris, France", ["London", "paris"]) == 1.0
    assert scoring.string_match_part("Rome", ["London", "Paris"]) == 0.0


def test_qa_f1_normalises_articles_and_punctuation():
    assert scoring.qa_f1("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert scoring.qa_f1("tower of london", ["eiffel tower"]) == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert scoring.qa_f1("nothing", ["eiffel tower"]) == 0.0


def test_rouge_l_uses_the_longest_common_subsequence():
    assert scoring.rouge_l("a b c d", ["a b c d"]) == 1.0
    assert scoring.rouge_l("a x b y", ["a b"]) == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert scoring.rouge_l("", ["a b"]) == 0.0


def test_classification_divides_by_the_classes_named():
    classes = ["Person", "Location", "Number"]
    assert scoring.classification("Location", ["Location"], classes) == 1.0
    assert scoring.classification("Location or Person", ["Location"], classes) == 0.5
    assert scoring.classification("Number", ["Location"], classes) == 0.0


def test_perplexity_is_exp_mean_nll():
    assert scoring.perplexity(2.0 * 4, 4) == pytest.approx(7.389056, rel=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        scoring.perplexity(1.0, 0)


# --- configs ----------------------------------------------------------------------------------------

def test_make_task_fills_and_coerces_options():
    config = make_task("niah_single_2", 2048, 10, 0, depth="50")
    assert dict(config.options) == {"answer_format": "ruler", "depth": 50.0, "keys": None, "max_new_tokens": 128,
                                    "values": None}
    assert make_task("niah_single_2").params() == make_task("niah_single_2").params()
    assert make_task("niah_single_2", seed=1).params() != make_task("niah_single_2").params()


@pytest.mark.parametrize("call, message", [
    (lambda: make_task("niah_single_9"), "unknown task 'niah_single_9'"),
    (lambda: make_task("niah_single_2", colour="red"), "unknown option"),
    (lambda: make_task("niah_single_2", max_new_tokens="many"), "max_new_tokens='many'"),
    (lambda: make_task("ppl", samples=0), "samples=0"),
    (lambda: get_task("longbench:nope"), "unknown LongBench task 'nope'"),
])
def test_bad_task_configs_raise(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


# --- RULER synthetic ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", RULER_TASKS)
def test_ruler_task_is_deterministic_has_its_answers_and_length(tokenizer, name):
    _, first = build(tokenizer, name)
    _, again = build(tokenizer, name)
    _, other = build(tokenizer, name, seed=1)
    assert [s.context_ids for s in first] == [s.context_ids for s in again]
    assert first[0].context_ids != first[1].context_ids
    assert first[0].context_ids != other[0].context_ids
    for sample in first:
        assert abs(sample.prompt_tokens - 1024) <= 0.02 * 1024
        context, question = text_of(tokenizer, sample)
        assert sample.answers
        if name.startswith("niah"):
            for needle in sample.info["needles"]:
                assert context.count(needle) == 1, needle
            for answer in sample.answers:
                assert answer in context and answer not in question
            assert question.rstrip().endswith("provided text is") or question.rstrip().endswith("provided text are")
        elif name == "vt":
            for statement in sample.info["chain"]:
                assert statement.strip() in context
            assert all(f"VAR {v}" in context for v in sample.answers)
        elif name == "cwe":
            counted = re.findall(r"\d+\. ([a-z]+)", context.split("Memorize the ones that appear most often.")[-1])
            counts = {w: counted.count(w) for w in set(counted)}
            assert all(counts[w] == sample.info["freq_cw"] for w in sample.answers)
            assert max(c for w, c in counts.items() if w not in sample.answers) < sample.info["freq_cw"]
        elif name == "fwe":
            words = context.split("Find the three most frequently appeared coded words.")[-1].split()
            counts = {w: words.count(w) for w in set(words) if w != "...."}
            top = sorted(counts.values(), reverse=True)[:3]
            assert [counts[w] for w in sample.answers] == top


def test_single_needle_prompt_uses_ruler_singular_wording(tokenizer):
    _, (sample,) = build(tokenizer, "niah_single_2", samples=1)
    context, question = text_of(tokenizer, sample)
    assert "A special magic number is hidden within the following text." in context
    assert "What is the special magic number for" in question
    assert "One of the special magic numbers for" in context  # the needle keeps RULER's plural


@pytest.mark.parametrize("depth", [0.0, 25.0, 50.0, 90.0])
def test_needle_sits_at_the_requested_depth(tokenizer, depth):
    _, samples = build(tokenizer, "niah_single_2", context=2048, samples=2, depth=depth)
    for sample in samples:
        assert sample.info["depths"] == [depth]
        assert sample.info["positions"][0] == pytest.approx(depth / 100, abs=0.04)
        assert abs(sample.prompt_tokens - 2048) <= 0.02 * 2048


def test_default_depths_come_from_the_ruler_grid(tokenizer):
    _, samples = build(tokenizer, "niah_multikey_1", context=2048, samples=3)
    for sample in samples:
        depths = sample.info["depths"]
        assert len(depths) == 4 and len(set(depths)) == 4 and set(depths) <= set(ruler.DEPTHS)
        order = sorted(range(4), key=lambda i: depths[i])
        assert sorted(sample.info["positions"]) == [sample.info["positions"][i] for i in order]


@pytest.mark.parametrize("name", ["niah_multivalue", "niah_multiquery"])
def test_answers_are_listed_query_by_query_in_text_order(tokenizer, name):
    _, samples = build(tokenizer, name, samples=3)
    for sample in samples:
        context, question = text_of(tokenizer, sample)
        if name == "niah_multivalue":
            assert sample.answers == sorted(sample.answers, key=context.index)
        else:  # one value per query: the question's order of keys
            keys = [n.split(" for ")[1].split(" is: ")[0] for n in sample.info["needles"]]
            value_of = {n.split(" is: ")[1].rstrip("."): k for n, k in zip(sample.info["needles"], keys)}
            assert sample.answers == sorted(sample.answers, key=lambda v: question.index(value_of[v]))


def test_list_answer_format_ends_the_prefix_with_a_bullet(tokenizer):
    _, (plain,) = build(tokenizer, "niah_multivalue", samples=1)
    _, (listed,) = build(tokenizer, "niah_multivalue", samples=1, answer_format="list")
    assert text_of(tokenizer, listed)[1].endswith("provided text are:\n\n*")
    assert listed.answers == plain.answers
    assert listed.info["gold_separator"] == "\n* " and plain.info["gold_separator"] == ", "


@pytest.mark.parametrize("variant", list(ruler.NIAH_VARIANTS))
def test_a_variant_builds_its_base_task_with_its_options(tokenizer, variant):
    base, defaults = ruler.NIAH_VARIANTS[variant]
    config, samples = build(tokenizer, variant, samples=1)
    _, expected = build(tokenizer, base, samples=1, **defaults)
    assert dict(config.options).items() >= defaults.items()
    assert [(s.context_ids, s.question_ids, s.answers, s.info) for s in samples] == \
        [(s.context_ids, s.question_ids, s.answers, s.info) for s in expected]


def test_keys_option_sets_the_number_of_needles(tokenizer):
    _, samples = build(tokenizer, "niah_single_2", samples=2, keys=3)
    for sample in samples:
        context, _ = text_of(tokenizer, sample)
        assert len(sample.info["needles"]) == 3 and len(sample.answers) == 1
        assert all(context.count(needle) == 1 for needle in sample.info["needles"])


@pytest.mark.parametrize("options, message", [(dict(answer_format="json"), "answer_format='json' is not one of"),
                                              (dict(keys=0), "keys=0 is fewer than its 1 queried key(s)"),
                                              (dict(values=0), "values=0 must be at least 1"),
                                              (dict(keys=7, values=6), "keys=7 x values=6 needles exceed")])
def test_bad_niah_options_raise(tokenizer, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build(tokenizer, "niah_single_2", samples=1, **options)


def test_multiquery_asks_for_every_key(tokenizer):
    _, (sample,) = build(tokenizer, "niah_multiquery", samples=1)
    _, question = text_of(tokenizer, sample)
    assert len(sample.answers) == 4 and question.count(",") >= 3 and ", and " in question


def test_context_too_short_for_the_prompt_raises(tokenizer):
    with pytest.raises(ValueError, match="too short"):
        build(tokenizer, "cwe", context=200, samples=1)


def test_sample_subset_equals_the_full_build(tokenizer):
    config, samples = build(tokenizer, "niah_single_1", context=512, samples=4)
    part = config.spec.build(config, tokenizer, [1, 3])
    assert [s.context_ids for s in part] == [samples[1].context_ids, samples[3].context_ids]


# --- perplexity windows -----------------------------------------------------------------------------

def test_ppl_cont_splits_one_window(tokenizer):
    _, (plain,) = build(tokenizer, "ppl", context=128, samples=1)
    _, (cont,) = build(tokenizer, "ppl_cont", context=128, samples=1, continuation=32)
    assert len(plain.context_ids) == 128 and not plain.question_ids
    assert len(cont.context_ids) == 128 and len(cont.question_ids) == 32


# --- jsonl ------------------------------------------------------------------------------------------

def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_reads_input_and_messages_and_scores(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "set.jsonl", [
        json.dumps({"input": "What is 2+2?", "answers": ["4", "four"], "id": 7}),
        json.dumps({"messages": [{"role": "user", "content": "Capital of France?"}], "answers": "Paris"}),
        json.dumps({"input": "third", "answers": ["x"]}),
    ])
    config, samples = build(tokenizer, f"jsonl:{path}", samples=2)
    assert len(samples) == 2
    context, question = text_of(tokenizer, samples[0])
    assert "What is 2+2?" in context and "assistant" in question
    assert samples[1].answers == ["Paris"]
    spec = config.spec
    assert spec.score("It is PARIS.", samples[1], config) == 1.0
    strict = make_task(f"jsonl:{path}", samples=2, case_sensitive="true", match="all")
    assert spec.score("It is PARIS.", samples[1], strict) == 0.0
    assert spec.score("four, or 4", samples[0], strict) == 1.0


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"answers": ["a"]}), "a record needs 'input'"),
    (json.dumps({"input": "q"}), "'answers' must be"),
    (json.dumps({"messages": "hi", "answers": ["a"]}), "'messages' must be"),
])
def test_bad_jsonl_line_names_the_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps({"input": "ok", "answers": ["a"]}), "", line])
    with pytest.raises(ValueError, match=re.escape(f"bad.jsonl:3: {message}")):
        read_records(path)


def test_missing_jsonl_file_raises(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_records(tmp_path / "none.jsonl")


# --- hub tasks ----------------------------------------------------------------------------------------

def test_hub_tasks_fail_clearly_offline(tokenizer, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    for name in ("longbench:hotpotqa", "ruler_qa_1"):
        config = make_task(name, 1024, 1)
        with pytest.raises(TaskUnavailableError, match="needs the Hugging Face hub"):
            config.spec.build(config, tokenizer)


def test_truncate_middle_keeps_both_ends():
    assert longbench.truncate_middle(list(range(10)), 4) == [0, 1, 8, 9]
    assert longbench.truncate_middle([1, 2], 4) == [1, 2]


def test_ruler_qa_prompt_holds_the_gold_document_within_the_context(tokenizer):
    config = make_task("ruler_qa_1", 512, 1)
    pool = [f"Distractor paragraph number {i} talks about nothing in particular." for i in range(200)]
    sample = longbench.qa_sample(config, tokenizer, 0, ("Who wrote it?", ["Ada"], ["Ada wrote the gold note."]), pool)
    context, question = text_of(tokenizer, sample)
    assert "Ada wrote the gold note." in context and "Question: Who wrote it?" in question
    assert 0.9 * 512 <= sample.prompt_tokens <= 512 and sample.info["documents"] > 5


def test_task_mix_is_registered_tasks_with_families():
    from crosskv.tasks import get_task
    from crosskv.tasks.mix import FULL_MIX, TASK_MIX, family

    assert {family(t) for t in FULL_MIX} >= {"single key", "multi-key", "multi-value", "variable tracking", "aggregation"}
    assert {family(t) for t in TASK_MIX} >= {"single key", "multi-key", "multi-value"}
    for task in FULL_MIX + TASK_MIX:
        assert get_task(task).kind == "generate"


def test_task_mix_is_where_the_full_cache_is_informative():
    """Every task of the cpu mix has a measured full-cache gold_match in [0.25, 0.9] on at least 25 samples."""
    from crosskv.tasks.mix import GOLD_MATCH_2K, TASK_MIX

    assert len(TASK_MIX) >= 4
    for task in TASK_MIX:
        score, samples = GOLD_MATCH_2K[task]
        assert 0.25 <= score <= 0.9 and samples >= 25, (task, score, samples)
