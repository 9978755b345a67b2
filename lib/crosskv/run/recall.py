"""How well selective reconstruction's latent scorer picks tokens on real caches (recall against exact keys).

:func:`scorer_recall_study` runs each :class:`~crosskv.methods.selective.Selective` configuration the
harness's way on held-out essay windows (prefill the window, compress, append a question, greedy
decode) and, at every decode step and compressed layer, compares the scorer's choice with an oracle
that ranks the same tokens by exact ``q·RoPE(K)`` (:func:`~crosskv.methods.selective.scorer_recall`).
The unit is a sample: layers and steps are averaged within it. A diagnostic, not a method: the probe
computes every key exactly, so it is slow.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
from transformers import AttentionInterface

from crosskv.core.data import heldout_windows
from crosskv.methods.selective import ATTENTION, Selective, scorer_recall, selective_attention

log = logging.getLogger(__name__)

QUESTION = "\n\nWhich sentence above matters most, and why?"


@contextlib.contextmanager
def _probed(found: list[tuple[float, float]]) -> Iterator[None]:
    """Selective attention that also appends ``(recall, mass)`` for each decode-step layer to ``found``."""

    def probe(module, query, key, value, attention_mask, scaling=None, **kwargs):
        prefix, selection = getattr(value, "crosskv_prefix", None), getattr(value, "crosskv_selection", None)
        if prefix is not None and selection is not None and query.shape[2] == 1:
            b, hq, _, d = query.shape
            q = query.reshape(b, key.shape[1], hq // key.shape[1], d)
            found.append(scorer_recall(q, selection.unrotate(q), prefix, selection,
                                       scaling if scaling is not None else d ** -0.5))
        return selective_attention(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    AttentionInterface.register(ATTENTION, probe)
    try:
        yield
    finally:
        AttentionInterface.register(ATTENTION, selective_attention)


@torch.no_grad()
def scorer_recall_study(model, tokenizer, configs: dict[str, Selective], context: int = 2048, samples: int = 4,
                        steps: int = 4, seed: int = 0) -> list[dict[str, Any]]:
    """One row per configuration × sample: ``configuration``, ``sample``, ``recall``, ``mass`` (means over
    the sample's decode steps and compressed layers), ``context``, ``steps``, ``top_k``, ``score_rank``."""
    device = next(model.parameters()).device
    windows = heldout_windows(tokenizer, n=samples, length=context, seed=seed).to(device)
    question = tokenizer(QUESTION, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
    rows = []
    for label, config in configs.items():
        runner = config.bind(model, tokenizer)
        for sample, window in enumerate(windows):
            found: list[tuple[float, float]] = []
            with runner.applied(), _probed(found):
                cache = runner.new_cache()
                with runner.prefill(cache):
                    model(window[None], past_key_values=cache)
                runner.compress(cache)
                logits = model(question, past_key_values=cache).logits
                for _ in range(steps):
                    logits = model(logits[:, -1:].argmax(-1), past_key_values=cache).logits
            recall, mass = (sum(x) / len(found) for x in zip(*found))
            rows.append({"configuration": label, "sample": sample, "recall": recall, "mass": mass,
                         "context": context, "steps": steps, "top_k": config.top_k, "score_rank": config.score_rank})
            log.info("%s sample %d: recall %.3f, mass %.3f", label, sample, recall, mass)
    return rows
