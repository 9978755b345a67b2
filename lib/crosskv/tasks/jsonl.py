"""``jsonl:PATH``: a user's own prompts, one JSON record per line.

Each record has ``input`` (the user message) or ``messages`` (a chat list of ``{"role", "content"}``),
and ``answers`` (a list of strings, or one string); other keys are ignored. ``--samples N`` takes the
first N records. The chat-templated prompt up to the generation prompt is the compressible context:
unlike the RULER tasks there is no marked question, so methods compress the question too (all
methods alike). Scoring: ``match=part`` (any answer found, default) or ``all`` (fraction found),
case-insensitive unless ``case_sensitive=true``. The prompt has no answer prefix: the gold-answer metrics score the
gold after the full cache's own greedy output up to the gold's first occurrence
(:class:`crosskv.run.harness.GoldPlacement`), so "The access code is 9272-HW." reproduces the gold "9272-HW".
"""
from __future__ import annotations

import json
from pathlib import Path

from crosskv.tasks.base import Sample, TaskConfig, TaskSpec, encode, plain_ids, register_family
from crosskv.tasks.scoring import string_match_all, string_match_part


def read_records(path: str | Path, limit: int | None = None) -> list[dict]:
    """The first ``limit`` records of a jsonl file; every line is validated, and a bad one raises
    ``ValueError`` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"jsonl task file {str(path)!r} does not exist")
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
            records.append(_validate(record, where))
    if not records:
        raise ValueError(f"jsonl task file {str(path)!r} holds no records")
    return records[:limit]


def _validate(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not (isinstance(messages, list) and messages
                and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    elif not isinstance(record.get("input"), str):
        raise ValueError(f"{where}: a record needs 'input' (a string) or 'messages' (a chat list)")
    answers = record.get("answers")
    if isinstance(answers, str):
        answers = [answers]
    if not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
        raise ValueError(f"{where}: 'answers' must be a non-empty list of strings")
    messages = record.get("messages") or [{"role": "user", "content": record["input"]}]
    return {"messages": messages, "answers": answers}


def _prompt(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(context_ids, question_ids): the templated conversation, then the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        text = "\n".join(m["content"] for m in messages)
        return plain_ids(tokenizer(text, add_special_tokens=True)), []
    without = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    with_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not with_prompt.startswith(without):
        return encode(tokenizer, with_prompt), []
    return encode(tokenizer, without), encode(tokenizer, with_prompt[len(without):])


def jsonl_task(path: str) -> TaskSpec:
    def build(config: TaskConfig, tokenizer, indices=None) -> list[Sample]:
        if config.option("match") not in ("part", "all"):
            raise ValueError(f"match={config.option('match')!r} must be 'part' or 'all'")
        records = read_records(path, config.samples)
        chosen = range(len(records)) if indices is None else [i for i in indices if i < len(records)]
        samples = []
        for i in chosen:
            ctx, q = _prompt(tokenizer, records[i]["messages"])
            samples.append(Sample(i, ctx, q, records[i]["answers"], config.option("max_new_tokens")))
        return samples

    def score(prediction: str, sample: Sample, config: TaskConfig) -> float:
        scorer = string_match_all if config.option("match") == "all" else string_match_part
        return scorer(prediction, sample.answers, case_sensitive=config.option("case_sensitive"))

    return TaskSpec(f"jsonl:{path}", "generate", "string_match", f"user prompts from {path}", build, score,
                    {"match": (str, "part"), "case_sensitive": (bool, False), "max_new_tokens": (int, 64)})


register_family("jsonl", jsonl_task)
