"""Perplexity tasks on held-out windows (disjoint from every calibration set).

- ``ppl``: each window of ``context`` tokens runs under the method's prefill; teacher-forced
  perplexity over its ``context - 1`` predictions. Post-prefill compression cannot show here.
- ``ppl_cont``: the first ``context`` tokens are prefilled and compressed, then the next
  ``continuation`` tokens (default 256) are fed teacher-forced through the compressed cache and only
  their predictions are scored — the perplexity that actually sees the compression.

``score`` is the perplexity over all scored tokens of all samples (lower is better).
"""
from __future__ import annotations

from crosskv.core import data
from crosskv.tasks.base import Sample, TaskConfig, TaskSpec, register_task


def build_ppl(config: TaskConfig, tokenizer, indices=None) -> list[Sample]:
    windows = data.heldout_windows(tokenizer, config.samples, config.context, config.seed, config.option("corpus"))
    chosen = range(config.samples) if indices is None else indices
    return [Sample(i, windows[i].tolist(), [], info={"scored": config.context - 1}) for i in chosen]


def build_ppl_cont(config: TaskConfig, tokenizer, indices=None) -> list[Sample]:
    extra = config.option("continuation")
    if extra < 1:
        raise ValueError(f"continuation={extra} must be at least 1 token")
    windows = data.heldout_windows(tokenizer, config.samples, config.context + extra, config.seed,
                                   config.option("corpus"))
    chosen = range(config.samples) if indices is None else indices
    return [Sample(i, windows[i, :config.context].tolist(), windows[i, config.context:].tolist(),
                   info={"scored": extra}) for i in chosen]


register_task(TaskSpec("ppl", "ppl", "perplexity",
                       "teacher-forced perplexity of held-out windows run under the method's prefill",
                       build_ppl, options={"corpus": (str, "essays")}, higher_is_better=False))
register_task(TaskSpec("ppl_cont", "ppl_cont", "perplexity",
                       "perplexity of the next `continuation` tokens given a compressed `context`-token prefix",
                       build_ppl_cont, options={"corpus": (str, "essays"), "continuation": (int, 256)},
                       higher_is_better=False))
