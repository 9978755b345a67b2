"""How well selective reconstruction's latent scorer picks tokens on real caches (recall against exact keys).

:func:`scorer_recall_study` runs each :class:`~crosskv.methods.selective.Selective` configuration the
harness's way on held-out essay windows (prefill the window, compress, append a question, greedy
decode) and, at every decode step and compressed layer, compares the scorer's choice with an oracle
that ranks the same tokens by exact ``q·RoPE(K)`` (:func:`~crosskv.methods.selective.scorer_recall`).
The unit is a sample: layers and steps are averaged within it. A diagnostic, not a method: the probe
rebuilds every key exactly, so it is slow.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from crosskv.cache.attention import CompressedKV, crosskv_attention
from crosskv.core.data import heldout_windows
from crosskv.methods.selective import Selective, SelectivePrefix, scorer_recall

log = logging.getLogger(__name__)

PROBE = "crosskv_recall_probe"
QUESTION = "\n\nWhich sentence above matters most, and why?"


@contextlib.contextmanager
def _probed(model, found: list[tuple[float, float]]) -> Iterator[None]:
    """Run ``model`` under the crosskv attention, appending ``(recall, mass)`` of each decode-step layer."""

    def probe(module, query, key, value, attention_mask, **kwargs):
        if isinstance(key, CompressedKV) and isinstance(key.prefix, SelectivePrefix) and key.prefix.steps == 1:
            b, hq, _, d = query.shape
            found.append(scorer_recall(key.prefix, query.reshape(b, key.keys.shape[1], -1, d)))
        return crosskv_attention(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(PROBE, probe)
    AttentionMaskInterface.register(PROBE, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(PROBE)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def scorer_recall_study(model, tokenizer, configs: dict[str, Selective], context: int = 2048, samples: int = 4,
                        steps: int = 4, seed: int = 0) -> list[dict[str, Any]]:
    """One row per configuration × sample: ``configuration``, ``sample``, ``recall``, ``mass`` (means over
    the sample's decode steps and compressed layers), ``context``, ``steps``, ``top_k``, ``score_rank``,
    ``score_frequencies``."""
    device = next(model.parameters()).device
    windows = heldout_windows(tokenizer, n=samples, length=context, seed=seed).to(device)
    question = tokenizer(QUESTION, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
    rows = []
    for label, config in configs.items():
        runner = config.bind(model, tokenizer)
        for sample, window in enumerate(windows):
            found: list[tuple[float, float]] = []
            with runner.applied(), _probed(model, found):
                cache = runner.new_cache()
                with runner.prefill(cache):
                    model(window[None], past_key_values=cache)
                runner.compress(cache)
                logits = model(question, past_key_values=cache).logits
                for _ in range(steps):
                    logits = model(logits[:, -1:].argmax(-1), past_key_values=cache).logits
            recall, mass = (sum(x) / len(found) for x in zip(*found))
            rows.append({"configuration": label, "sample": sample, "recall": recall, "mass": mass,
                         "context": context, "steps": steps, "top_k": config.top_k, "score_rank": config.score_rank,
                         "score_frequencies": config.score_frequencies})
            log.info("%s sample %d: recall %.3f, mass %.3f", label, sample, recall, mass)
    return rows
