"""Run crosskv methods through kvpress's text-generation pipeline: :func:`as_press` + ``crosskv-text-generation``.

::

    pipe = pipeline("crosskv-text-generation", model=model, tokenizer=tokenizer)   # after ``import crosskv``
    pipe(context, questions=["…", "…"], press=crosskv.as_press(crosskv.make_method("xkv", kept=0.25)))

``crosskv-text-generation`` is kvpress's ``KVPressTextGenerationPipeline`` (same chat template, context /
question split, greedy decoding and multi-question loop) with two differences a crosskv method needs:
the method's model transforms (``runner.applied()``) stay installed while the answers are decoded, not only
during the context prefill, and the cache is cut back to the compressed context after each answer with
each layer's ``crop`` (kvpress slices ``layer.keys``, which does not rewind a compressed layer). kvpress's
own presses run through it unchanged. The stock ``kv-press-text-generation`` pipeline decodes outside the
press and cannot rewind compressed layers, so a :class:`CrossKVPress` refuses to run there.

Token ids are checked before the prefill (an id at or beyond the model's embedding rows, e.g. a tokenizer
larger than the model, is refused naming it). On a cache whose layers hold different token counts
(PyramidKV compositions) the question is fed one token at a time before the answer is decoded (exact:
a single query needs no mask; kvpress feeds the whole question in one forward, which needs one mask).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

from kvpress.pipeline import KVPressTextGenerationPipeline
from transformers import AutoModelForCausalLM, Cache
from transformers.pipelines import PIPELINE_REGISTRY

from crosskv.methods import MethodConfig, Runner, make_method
from crosskv.run.harness import feed, uneven
from crosskv.run.session import bound, check_ids, rewind, vocab_size

TASK = "crosskv-text-generation"


@dataclass(frozen=True)
class CrossKVPress:
    """A crosskv method as a kvpress press: ``press(model)`` is active while the pipeline prefills the context.

    Inside :class:`CrossKVPipeline` the context runs under ``runner.prefill`` and the cache is compressed
    (``runner.compress``) when the press context exits, exactly as the harness does.
    """

    method: MethodConfig
    _serving: dict = field(default_factory=dict, compare=False, repr=False)  # {"runner", "cache"} while served

    def __post_init__(self):
        if not isinstance(self.method, MethodConfig):
            raise ValueError(f"as_press needs a crosskv method config, got {type(self.method).__name__}")

    @contextlib.contextmanager
    def serving(self, model, tokenizer) -> Iterator[Cache]:
        """Bind the method, install its transforms and yield a new cache for one pipeline call."""
        runner = bound(model, self.method, tokenizer)
        with runner.applied():
            cache = runner.new_cache()
            self._serving.update(runner=runner, cache=cache)
            try:
                yield cache
            finally:
                self._serving.clear()

    @contextlib.contextmanager
    def __call__(self, model) -> Iterator[None]:
        runner: Runner | None = self._serving.get("runner")
        if runner is None or runner.model is not model:
            raise ValueError(f"crosskv press {self.method.name!r} runs only in pipeline({TASK!r}, …): the stock "
                             "kv-press-text-generation pipeline decodes outside the press and cannot rewind a "
                             "compressed cache between questions")
        cache = self._serving["cache"]
        with runner.prefill(cache):
            yield
        runner.compress(cache)


def as_press(method: MethodConfig | str) -> CrossKVPress:
    """``method`` (a config or a registered name) as a press for ``pipeline("crosskv-text-generation")``."""
    return CrossKVPress(method if isinstance(method, MethodConfig) else make_method(method))


class CrossKVPipeline(KVPressTextGenerationPipeline):
    """kvpress's pipeline, keeping a crosskv method installed while decoding and rewinding with ``crop``."""

    def _forward(self, input_tensors, max_new_tokens: int = 50, press=None, cache: Cache | None = None):
        if not isinstance(press, CrossKVPress):
            return super()._forward(input_tensors, max_new_tokens=max_new_tokens, press=press, cache=cache)
        if cache is not None:
            raise ValueError(f"crosskv press {press.method.name!r} builds its own cache (runner.new_cache()); "
                             f"pass cache=None, not a {type(cache).__name__}")
        vocab = vocab_size(self.model)
        check_ids(input_tensors["context_ids"], vocab, "context_ids")
        for question_ids in input_tensors["questions_ids"]:
            check_ids(question_ids, vocab, "questions_ids")
        with press.serving(self.model, self.tokenizer) as run_cache:
            return super()._forward(input_tensors, max_new_tokens=max_new_tokens, press=press, cache=run_cache)

    def generate_answer(self, question_ids, cache: Cache, context_length: int, max_new_tokens: int) -> str:
        """kvpress's greedy answer; on an uneven cache the question but its last token is fed one token at a time."""
        if question_ids.shape[1] > 1 and uneven(cache):
            feed(self.model, cache, question_ids[0, :-1].tolist(), context_length, self.model.device)
            context_length += question_ids.shape[1] - 1
            question_ids = question_ids[:, -1:]
        return super().generate_answer(question_ids, cache, context_length, max_new_tokens)

    def _remove_answer_from_cache(self, cache: Cache, cache_seq_lengths: list[int]) -> None:
        rewind(cache, cache_seq_lengths)


PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=CrossKVPipeline, pt_model=AutoModelForCausalLM)
