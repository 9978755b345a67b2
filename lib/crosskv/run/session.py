"""Use a compressed cache with plain transformers: compress a context once, then ``model.generate`` from it.

::

    with crosskv.compressed(model, crosskv.make_method("xkv", kept=0.25), tokenizer) as c:
        c.prefill(context_ids)                      # (1, T): runner.prefill + runner.compress, as the harness does
        out = model.generate(torch.cat([c.context_ids, question_ids], 1), past_key_values=c.cache,
                             max_new_tokens=32)    # generate needs the context ids too (it skips the cached part)
        c.reset()                                   # crop the cache back to the compressed context
        out2 = c.generate(other_question_ids, max_new_tokens=32, do_sample=True)   # the same, reset first

The method's model transforms (``runner.applied()``) stay installed for the whole ``with`` block, so every
decoding step runs as in :func:`crosskv.run.harness.run_generate`. Positions are absolute: ``generate`` counts
the cached tokens with ``cache.get_seq_length()``, which every crosskv cache reports as tokens *seen*
(evicted and merged ones included); a cache that reports tokens *held* instead (kvpress presses on a plain
``DynamicCache``) is refused for ``generate``. :func:`rewind` crops every layer back to its length after
compression; a layer that cannot be cropped exactly (tokens compressed after the context) raises
``ValueError``.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
from transformers import Cache

from crosskv.methods import MethodConfig, Runner, make_method

log = logging.getLogger(__name__)


def layer_lengths(cache: Cache) -> list[int]:
    """Each layer's ``get_seq_length()`` (a checkpoint for :func:`rewind`)."""
    return [layer.get_seq_length() for layer in cache.layers]


def rewind(cache: Cache, lengths: list[int]) -> None:
    """Crop every layer of ``cache`` back to ``lengths[i]`` tokens (a checkpoint from :func:`layer_lengths`).

    Each layer crops in the units of its own ``get_seq_length`` (tokens seen for crosskv layers, tokens held
    for plain layers after kvpress eviction), so the same call rewinds every cache type.
    """
    if len(lengths) != len(cache.layers):
        raise ValueError(f"checkpoint has {len(lengths)} layer lengths but the cache has {len(cache.layers)} layers")
    for idx, (layer, length) in enumerate(zip(cache.layers, lengths)):
        now = layer.get_seq_length()
        if now < length:
            raise ValueError(f"layer {idx} holds {now} tokens, fewer than the checkpoint's {length}")
        if now > length:
            layer.crop(length)


def as_ids(ids: Any, device: torch.device, what: str) -> torch.Tensor:
    """``ids`` (list of ints, ``(T,)`` or ``(1, T)`` tensor) → ``(1, T)`` long tensor on ``device``."""
    tensor = torch.as_tensor(ids, dtype=torch.long, device=device)
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2 or tensor.shape[0] != 1 or tensor.shape[1] == 0:
        raise ValueError(f"{what} must be one non-empty sequence of token ids, (T,) or (1, T); got shape "
                         f"{tuple(tensor.shape)}")
    return tensor


class Compressed:
    """A method bound to a model with its transforms installed; holds one compressed context at a time."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self.model = runner.model
        self.device = next(self.model.parameters()).device
        self._cache: Cache | None = None
        self._checkpoint: list[int] = []
        self.context_ids: torch.Tensor | None = None  # (1, T)

    @property
    def cache(self) -> Cache:
        """The compressed cache (pass it to ``model.generate`` as ``past_key_values``)."""
        if self._cache is None:
            raise RuntimeError("no compressed context yet: call prefill(context_ids) first")
        return self._cache

    @torch.no_grad()
    def prefill(self, context_ids: Any) -> "Compressed":
        """Run ``context_ids`` through the model under ``runner.prefill``, then ``runner.compress`` (a new cache)."""
        ids = as_ids(context_ids, self.device, "context_ids")
        cache = self.runner.new_cache()
        positions = torch.arange(ids.shape[1], device=self.device).unsqueeze(0)
        with self.runner.prefill(cache):
            self.model(input_ids=ids, past_key_values=cache, use_cache=True, position_ids=positions, logits_to_keep=1)
        self.runner.compress(cache)
        self._cache, self._checkpoint, self.context_ids = cache, layer_lengths(cache), ids
        log.debug("%s: compressed a context of %d tokens", self.runner.config.name, ids.shape[1])
        return self

    def reset(self) -> None:
        """Crop the cache back to the compressed context (drop questions and answers appended since)."""
        rewind(self.cache, self._checkpoint)

    def check_positions(self) -> None:
        """Refuse a cache whose ``get_seq_length`` is not the context length (``generate`` would misplace tokens)."""
        seen, context = self.cache.get_seq_length(), self.context_ids.shape[1]
        if seen != context:
            raise ValueError(f"method {self.runner.config.name!r}: its cache reports {seen} tokens for a context of "
                             f"{context} (it counts held, not seen tokens), so model.generate would give the question "
                             "wrong positions; use crosskv.run.harness or crosskv.integrations.kvpress, which pass positions")

    def generate(self, question_ids: Any, **generate_kwargs: Any) -> Any:
        """``model.generate`` on context + question from the compressed cache (reset first); returns its output.

        ``question_ids``: ``(Q,)`` or ``(1, Q)``. The output is what ``model.generate`` returns: the sequences
        start with the context and question ids. Every ``generate`` option works that needs no beam search.
        """
        self.reset()
        self.check_positions()
        question = as_ids(question_ids, self.device, "question_ids")
        ids = torch.cat([self.context_ids, question], dim=1)
        mask = torch.ones_like(ids)
        return self.model.generate(input_ids=ids, attention_mask=mask, past_key_values=self.cache, **generate_kwargs)


def bound(model, method: MethodConfig | str, tokenizer=None) -> Runner:
    """``method`` (a config or a registered name) bound to ``model`` (cached per model and config)."""
    from crosskv.run.harness import bind

    config = method if isinstance(method, MethodConfig) else make_method(method)
    return bind(model, tokenizer, config)


@contextlib.contextmanager
def compressed(model, method: MethodConfig | str, tokenizer=None) -> Iterator[Compressed]:
    """Install ``method`` on ``model`` for the block and yield a :class:`Compressed` (see the module docstring)."""
    runner = bound(model, method, tokenizer)
    with runner.applied():
        yield Compressed(runner)
