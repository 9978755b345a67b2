"""lm-evaluation-harness model ``crosskv``: score a crosskv method with lm-eval's tasks (optional extra ``lmeval``).

::

    python -m crosskv.integrations.lmeval run --model crosskv \\
        --model_args pretrained=meta-llama/Llama-3.1-8B-Instruct,method=xkv,kept=0.25 \\
        --tasks longbench_hotpotqa --apply_chat_template

``python -m crosskv.integrations.lmeval`` is lm-eval's own command line with the ``crosskv`` model registered (lm-eval
0.4.13 does not discover models from other packages, so its ``lm_eval`` script does not know it); from
Python, ``import crosskv.integrations.lmeval`` then ``lm_eval.simple_evaluate(model="crosskv", …)``.

``pretrained``: a crosskv model alias or a local folder / hub id (:func:`crosskv.load_model`); ``method``: a
registered method name; every other model argument is a parameter of that method (``kept=0.25``).

**Which part of a request is compressed.** lm-eval hands over one prompt string. ``split`` lists markers
separated by ``|`` (backslash escapes decoded); the first marker the prompt contains cuts it at that
marker's *last* occurrence: the text before is the compressible context (run under the method's prefill and
compressed), the marker and the rest are appended exactly, like the question in crosskv's harness. The
default ``\\n\\nQuestion:|\\n\\nQuery:|\\n\\nThe following is an abstract.|\\n\\n`` fits lm-eval's LongBench
prompts: the QA tasks end ``…\\n\\nQuestion: {question}\\nAnswer:`` (or ``Query:``), the summaries
``…\\n\\nNow, write a one-page summary…\\n\\nSummary:``; for the few-shot tasks (trec, triviaqa, samsum) and
code completion the cut is the last blank line, inside the examples or code. RULER's NIAH prompts put the
question after one newline: use ``split=\\nWhat``; ``question_tokens=N`` makes the last N tokens the question
instead. A prompt with none of the markers is refused. For ``loglikelihood`` requests the same split
applies to the context and the continuation is scored teacher-forced through the compressed cache;
``loglikelihood_rolling`` is refused (use crosskv's ``ppl`` tasks).

``device``: a device this machine lacks (lm-eval's default ``cuda:0`` on a CPU machine) falls back to the
available one with a warning, as lm-eval's own HF model does; ``dtype``: bfloat16, float16, float32 or auto.
Token ids are checked against the model's vocabulary before any forward. On a cache whose layers hold
different token counts (PyramidKV compositions) questions and continuations are fed one token at a time.
"""
from __future__ import annotations

import codecs
import logging
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from crosskv.run.harness import force, max_positions
from crosskv.methods import make_method
from crosskv.core.models import load_model, resolve_device, resolve_dtype
from crosskv.run.session import as_ids, compressed

log = logging.getLogger(__name__)


DEFAULT_SPLIT = "\n\nQuestion:|\n\nQuery:|\n\nThe following is an abstract.|\n\n"


def split_prompt(prompt: str, split: str) -> tuple[str, str]:
    """``prompt`` → (context, question) at the last occurrence of the first ``|``-separated marker it contains."""
    for marker in split.split("|"):
        at = prompt.rfind(marker) if marker else -1
        if at > 0:
            return prompt[:at], prompt[at:]
    raise ValueError(f"prompt contains none of the split markers {split!r} after its start (prompt ends "
                     f"{prompt[-80:]!r}); pass split=… or question_tokens=N in --model_args")


def cut_at_stops(text: str, stops: list[str]) -> str:
    """``text`` up to the first occurrence of any stop string (lm-eval's convention)."""
    for stop in stops:
        if stop and stop in text:
            text = text[:text.index(stop)]
    return text


@register_model("crosskv")
class CrossKVLM(LM):
    """A crosskv method on a transformers model, one request at a time (batch size 1)."""

    def __init__(self, pretrained: str = "smollm2-135m", method: str = "full", device: str | None = None,
                 dtype: str | None = None, split: str = DEFAULT_SPLIT, question_tokens: int | None = None,
                 batch_size: Any = 1, max_batch_size: Any = None, **method_params: Any):
        super().__init__()
        if str(batch_size) not in ("1", "auto"):
            raise ValueError(f"batch_size={batch_size!r}: the crosskv model runs one request at a time (use 1)")
        if question_tokens is not None and int(question_tokens) < 1:
            raise ValueError(f"question_tokens={question_tokens!r} must be a positive token count")
        if not split and question_tokens is None:
            raise ValueError("split is empty: give a marker or question_tokens=N")
        self.method = make_method(method, **method_params)
        self.model, self.tokenizer = load_model(pretrained, device=resolve_device(device or None, fallback=True),
                                                dtype=resolve_dtype(dtype or None))
        self.pretrained, self.split = pretrained, codecs.decode(str(split), "unicode_escape")  # "\\n" → newline
        self.question_tokens = None if question_tokens is None else int(question_tokens)
        self.chat = False
        self._device = next(self.model.parameters()).device

    # --- prompt handling
    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        self.chat = True
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def encode(self, text: str, first: bool) -> list[int]:
        """Token ids of ``text``; the tokenizer's special tokens (BOS) only on the first part of a plain prompt."""
        return self.tokenizer.encode(text, add_special_tokens=first and not self.chat)

    def context_question(self, prompt: str) -> tuple[list[int], list[int]]:
        """``prompt`` → (compressible context ids, exactly appended question ids)."""
        if self.question_tokens is not None:
            ids = self.encode(prompt, first=True)
            if len(ids) <= self.question_tokens:
                raise ValueError(f"prompt of {len(ids)} tokens is not longer than question_tokens={self.question_tokens}")
            return ids[:-self.question_tokens], ids[-self.question_tokens:]
        context, question = split_prompt(prompt, self.split)
        return self.encode(context, first=True), self.encode(question, first=False)

    def check_length(self, tokens: int) -> None:
        """Refuse a request longer than the model's positions (crosskv does not truncate lm-eval's prompts)."""
        limit = max_positions(self.model)
        if limit is not None and tokens > limit:
            raise ValueError(f"request needs {tokens} positions, beyond the model's max_position_embeddings={limit}")

    # --- requests
    def generate_until(self, requests) -> list[str]:
        answers = []
        for request in requests:
            prompt, gen_kwargs = request.args
            answers.append(self.generate_one(prompt, dict(gen_kwargs)))
        return answers

    @torch.no_grad()
    def generate_one(self, prompt: str, gen_kwargs: dict[str, Any]) -> str:
        stops = gen_kwargs.pop("until", None) or []
        stops = [stops] if isinstance(stops, str) else list(stops)
        max_new = int(gen_kwargs.pop("max_gen_toks", 256))
        do_sample = bool(gen_kwargs.pop("do_sample", False))
        if not do_sample:
            gen_kwargs.pop("temperature", None)
        context, question = self.context_question(prompt)
        self.check_length(len(context) + len(question) + max_new)
        with compressed(self.model, self.method, self.tokenizer) as c:
            c.prefill(context)
            out = c.generate(question, max_new_tokens=max_new, do_sample=do_sample,
                             stop_strings=stops or None, tokenizer=self.tokenizer, **gen_kwargs)
        new = out[0, len(context) + len(question):]
        return cut_at_stops(self.tokenizer.decode(new, skip_special_tokens=True), stops)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return [self.score_continuation(*request.args) for request in requests]

    @torch.no_grad()
    def score_continuation(self, prompt: str, continuation: str) -> tuple[float, bool]:
        """Summed log-probability of ``continuation`` after the compressed ``prompt`` and whether it is greedy."""
        context, question = self.context_question(prompt)
        target = self.encode(continuation, first=False)
        if not target:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens")
        self.check_length(len(context) + len(question) + len(target))
        if not question:
            raise ValueError("the split left no exact question part to predict the first continuation token from")
        with compressed(self.model, self.method, self.tokenizer) as c:
            c.prefill(context)
            as_ids(question + target, self._device, "question + continuation ids", c.vocab)  # refuses ids off the vocabulary
            hidden = force(self.model, c.cache, question, target, len(context), self._device, hidden=True)  # (Q+M, D)
            logits = self.model.get_output_embeddings()(hidden[len(question) - 1:-1])  # (M, vocab)
        logprobs = logits.float().log_softmax(-1)  # (len(target), vocab)
        wanted = torch.tensor(target, device=logprobs.device)
        total = float(logprobs.gather(-1, wanted[:, None]).sum())
        return total, bool((logprobs.argmax(-1) == wanted).all())

    def loglikelihood_rolling(self, requests) -> list[float]:
        raise ValueError("the crosskv lm-eval model does not score loglikelihood_rolling (perplexity) requests: "
                         "there is no context/question split to compress; use crosskv's ppl tasks")


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
