"""Hub tasks: ``longbench:<task>`` (LongBench v1, English) and RULER ``ruler_qa_1`` / ``ruler_qa_2``.

Both load through ``datasets`` and raise :class:`~crosskv.tasks.TaskUnavailableError` with a clear
message when the hub is unreachable (as on the embedded setup). LongBench tasks supported, with the
official prompts, generation lengths and metrics: narrativeqa, qasper, multifieldqa_en, hotpotqa,
2wikimqa, musique, triviaqa (qa_f1); gov_report, qmsum, multi_news, samsum (ROUGE-L); trec
(classification). Contexts longer than ``context`` tokens are truncated in the middle, as LongBench
does. The context part (compressed) ends before the question; for the few-shot tasks (trec,
triviaqa, samsum) the examples are the context and the final query is the question.

RULER qa: SQuAD (qa_1) or HotpotQA (qa_2) dev questions; the gold paragraph(s) are mixed with
other questions' paragraphs until the prompt reaches ``context`` tokens; ``string_match_part``.

Gold-answer metrics: RULER qa ends with RULER's answer prefix " Answer:"; LongBench's prompts end with the chat
turn, so the gold is scored after the full cache's own greedy output up to the gold's first occurrence
(:class:`crosskv.run.harness.GoldPlacement`).
"""
from __future__ import annotations

import random

from crosskv.tasks.base import (Sample, TaskConfig, TaskSpec, TaskUnavailableError, chat_prompt, encode,
                                register_family, register_task)
from crosskv.tasks.scoring import classification, qa_f1, rouge_l, string_match_part

_QA = ("Answer the question based on the given passages. Only give me the answer and do not output any other "
       "words.\n\nThe following are given passages.\n{context}\n\n", "Answer the question based on the given "
       "passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:")
LONGBENCH = {  # task: (context template, question template, max new tokens, metric)
    "narrativeqa": ("You are given a story, which can be either a novel or a movie script, and a question. Answer "
                    "the question asconcisely as you can, using a single phrase if possible. Do not provide any "
                    "explanation.\n\nStory: {context}\n\n", "Now, answer the question based on the story "
                    "asconcisely as you can, using a single phrase if possible. Do not provide any explanation."
                    "\n\nQuestion: {input}\n\nAnswer:", 128, "qa_f1"),
    "qasper": ("You are given a scientific article and a question. Answer the question as concisely as you can, "
               "using a single phrase or sentence if possible. If the question cannot be answered based on the "
               "information in the article, write \"unanswerable\". If the question is a yes/no question, answer "
               "\"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n",
               " Answer the question based on the above article as concisely as you can, using a single phrase or "
               "sentence if possible. If the question cannot be answered based on the information in the article, "
               "write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
               "\"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:", 128, "qa_f1"),
    "multifieldqa_en": ("Read the following text and answer briefly.\n\n{context}\n\n", "Now, answer the following "
                        "question based on the above text, only give me the answer and do not output any other "
                        "words.\n\nQuestion: {input}\nAnswer:", 64, "qa_f1"),
    "hotpotqa": (*_QA, 32, "qa_f1"),
    "2wikimqa": (*_QA, 32, "qa_f1"),
    "musique": (*_QA, 32, "qa_f1"),
    "gov_report": ("You are given a report by a government agency. Write a one-page summary of the report."
                   "\n\nReport:\n{context}\n\n", "Now, write a one-page summary of the report.\n\nSummary:", 512,
                   "rouge_l"),
    "qmsum": ("You are given a meeting transcript and a query containing a question or instruction. Answer the "
              "query in one or more sentences.\n\nTranscript:\n{context}\n\n", "Now, answer the query based on the "
              "above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:", 512, "rouge_l"),
    "multi_news": ("You are given several news articles. Write a one-page summary of all news. \n\nNews:\n"
                   "{context}\n\n", "Now, write a one-page summary of all the news.\n\nSummary:", 512, "rouge_l"),
    "trec": ("Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n",
             "{input}", 64, "classification"),
    "triviaqa": ("Answer the question based on the given passage. Only give me the answer and do not output any "
                 "other words. The following are some examples.\n\n{context}\n\n", "{input}", 32, "qa_f1"),
    "samsum": ("Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n",
               "{input}", 128, "rouge_l"),
}
QA_TEMPLATE = ("Answer the question based on the given documents. Only give me the answer and do not output any "
               "other words.\n\nThe following are given documents.\n\n{context}\n\n", "Answer the question based on "
               "the given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}")
QA_ANSWER_PREFIX = " Answer:"


def load_hub_dataset(*args, **kwargs):
    """``datasets.load_dataset`` with a clear error when the hub cannot be reached."""
    try:
        import datasets

        return datasets.load_dataset(*args, **kwargs)
    except Exception as err:  # datasets raises several types offline
        raise TaskUnavailableError(f"dataset {args[0]!r} needs the Hugging Face hub, which is not reachable here "
                                   f"({type(err).__name__}: {str(err)[:200]}); the RULER synthetic tasks, ppl, "
                                   "ppl_cont and jsonl:PATH work offline") from err


def truncate_middle(ids: list[int], budget: int) -> list[int]:
    """LongBench's middle truncation: keep the first and last ``budget // 2`` tokens."""
    if len(ids) <= budget:
        return ids
    half = budget // 2
    return ids[:half] + ids[len(ids) - (budget - half):]


def longbench_task(task: str) -> TaskSpec:
    if task not in LONGBENCH:
        raise ValueError(f"unknown LongBench task {task!r}; supported: {', '.join(LONGBENCH)}")
    before, after, max_new, metric = LONGBENCH[task]

    def build(config: TaskConfig, tokenizer, indices=None) -> list[Sample]:
        rows = load_hub_dataset("THUDM/LongBench", task, split="test")
        chosen = range(min(config.samples, len(rows))) if indices is None else indices
        samples = []
        for i in chosen:
            row = rows[i]
            question = after.format(input=row["input"])
            empty_ctx, empty_q = chat_prompt(tokenizer, before.format(context=""), question)
            budget = config.context - len(empty_ctx) - len(empty_q)
            context = tokenizer.decode(truncate_middle(encode(tokenizer, row["context"]), max(budget, 0)))
            ctx, q = chat_prompt(tokenizer, before.format(context=context), question)
            samples.append(Sample(i, ctx, q, list(row["answers"]), config.option("max_new_tokens") or max_new,
                                  {"all_classes": row.get("all_classes")}))
        return samples

    def score(prediction: str, sample: Sample, config: TaskConfig) -> float:
        if metric == "classification":
            return classification(prediction.lstrip("\n").split("\n")[0], sample.answers, sample.info["all_classes"])
        if task in ("trec", "triviaqa", "samsum"):
            prediction = prediction.lstrip("\n").split("\n")[0]
        return qa_f1(prediction, sample.answers) if metric == "qa_f1" else rouge_l(prediction, sample.answers)

    return TaskSpec(f"longbench:{task}", "generate", metric, f"LongBench {task} (hub)", build, score,
                    {"max_new_tokens": (int, 0)})


def build_ruler_qa(config: TaskConfig, tokenizer, indices=None) -> list[Sample]:
    """RULER qa: gold paragraph(s) shuffled among distractor paragraphs up to ``context`` tokens."""
    if config.name == "ruler_qa_1":
        rows = load_hub_dataset("rajpurkar/squad", split="validation")
        items = [(r["question"], r["answers"]["text"], [r["context"]]) for r in rows]
    else:
        rows = load_hub_dataset("hotpotqa/hotpot_qa", "distractor", split="validation")
        items = [(r["question"], [r["answer"]], ["".join(s) for s in r["context"]["sentences"]]) for r in rows]
    pool = list(dict.fromkeys(doc for _, _, docs in items for doc in docs))
    chosen = range(config.samples) if indices is None else indices
    return [qa_sample(config, tokenizer, i, items[i], pool) for i in chosen]


def qa_sample(config: TaskConfig, tokenizer, index: int, item: tuple[str, list[str], list[str]],
              pool: list[str]) -> Sample:
    """One RULER qa prompt: documents ``Document i:`` (gold among distractors) then the question."""
    question, answers, gold = item
    rng = random.Random(f"{config.name}:{config.seed}:{index}")
    distractors = [d for d in rng.sample(pool, min(len(pool), 400)) if d not in gold]
    query = QA_TEMPLATE[1].format(query=question)
    docs = list(gold)
    ctx, q = [], []
    for doc in distractors:
        trial = docs + [doc]
        order = random.Random(f"{config.name}:{config.seed}:{index}:order").sample(trial, len(trial))
        text = "\n\n".join(f"Document {j + 1}:\n{d}" for j, d in enumerate(order))
        c, qq = chat_prompt(tokenizer, QA_TEMPLATE[0].format(context=text), query, QA_ANSWER_PREFIX)
        if len(c) + len(qq) > config.context:
            break
        docs, ctx, q = trial, c, qq
    if not ctx:
        raise ValueError(f"{config.name}: context={config.context} cannot hold the gold document(s)")
    return Sample(index, ctx, q, answers, config.option("max_new_tokens"), {"documents": len(docs)})


def score_part(prediction: str, sample: Sample, config: TaskConfig) -> float:
    return string_match_part(prediction, sample.answers)


register_family("longbench", longbench_task)
for _name, _data in (("ruler_qa_1", "SQuAD"), ("ruler_qa_2", "HotpotQA")):
    register_task(TaskSpec(_name, "generate", "string_match_part", f"RULER qa on {_data} (hub)", build_ruler_qa,
                           score_part, {"max_new_tokens": (int, 32)}, answer_prefix=True))
