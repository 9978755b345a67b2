"""Tasks: a frozen :class:`TaskConfig` (the task's identity in result keys) and a registry of builders.

A task turns a config and a tokenizer into :class:`Sample` s. Every sample is split into the
compressible **context** part (chat-template prefix + instruction + haystack, run under
``runner.prefill``) and the **question** part (question + generation prompt + answer prefix, appended
exactly after compression). Kinds:

- ``generate``: greedy decoding of ``max_new_tokens`` after the question, scored against ``answers``;
- ``ppl``: teacher-forced perplexity of the whole window run under the method's prefill;
- ``ppl_cont``: the context is prefilled and compressed, then the ``question_ids`` (the continuation)
  are scored teacher-forced through the compressed cache.

Names: the RULER synthetic tasks (:mod:`crosskv.tasks.ruler`), ``ppl`` / ``ppl_cont``
(:mod:`crosskv.tasks.ppl`), ``jsonl:PATH`` (:mod:`crosskv.tasks.jsonl`), ``longbench:<task>`` and
``ruler_qa_1`` / ``ruler_qa_2`` (:mod:`crosskv.tasks.longbench`, need the hub).
"""
from crosskv.tasks.base import (FAMILIES, KINDS, TASKS, Sample, TaskConfig, TaskSpec, TaskUnavailableError,
                                chat_prompt, encode, get_task, make_task, plain_ids, register_family, register_task)
from crosskv.tasks import jsonl, longbench, ppl, ruler  # noqa: F401  (each registers its tasks)

__all__ = ["chat_prompt", "encode", "Sample", "TaskConfig", "TaskSpec", "TASKS", "TaskUnavailableError", "get_task", "make_task",
           "register_task", "register_family"]
