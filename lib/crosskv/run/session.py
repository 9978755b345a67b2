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

**Generate options** (:meth:`Compressed.generate`; :data:`REFUSED_OPTIONS` lists each refusal's reason).
Greedy and sampled decoding, stop strings, streamers, logits processors and assisted decoding
(``assistant_model``, ``prompt_lookup_num_tokens``: candidates are verified against the compressed cache,
rejected ones cropped) work. Refused with a ``ValueError`` naming the option: ``num_beams`` > 1,
``num_return_sequences`` > 1, ``num_beam_groups`` > 1 and contrastive search (``penalty_alpha``) — the cache
holds one token set for one sequence and its layers cannot copy or reorder batch rows; ``cache_implementation``
(generate would build its own cache and ignore the compressed one); ``use_cache=False`` (the same); ``custom_generate``;
and ``input_ids``/``attention_mask``/``past_key_values``/``inputs_embeds`` (the wrapper supplies them). While the
block is open a forward pre-hook on the model also refuses, before attention runs, a call with a batch of more
than one sequence on the compressed cache (batched prompts, or beams through a raw ``model.generate``).
A cache whose layers hold different token counts (PyramidKV compositions) is fed its question one token at a
time (exact: a single query needs no mask); assisted decoding verifies several tokens at once and is refused there.
Token ids are checked at the entry points: an integer dtype, ``0 <= id < vocab`` (the embedding's rows), one sequence.
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


def vocab_size(model) -> int:
    """Rows of the model's input embedding: every token id must be below it."""
    return model.get_input_embeddings().num_embeddings


def check_ids(ids: torch.Tensor, vocab: int, what: str) -> None:
    """Raise ``ValueError`` naming the first token id of ``ids`` outside ``[0, vocab)``."""
    bad = (ids < 0) | (ids >= vocab)
    if bool(bad.any()):
        at = tuple(int(i) for i in bad.nonzero()[0])
        value = int(ids[at])
        raise ValueError(f"{what}: token id {value} at {at} is {'negative' if value < 0 else f'>= vocab {vocab}'} "
                         f"(valid ids are 0..{vocab - 1})")


def as_ids(ids: Any, device: torch.device, what: str, vocab: int | None = None) -> torch.Tensor:
    """``ids`` (list of ints, ``(T,)`` or ``(1, T)`` integer tensor) → ``(1, T)`` long tensor on ``device``.

    Refuses, naming the value: a non-integer dtype, more than one sequence, an empty one, and (with ``vocab``)
    an id outside ``[0, vocab)``.
    """
    try:
        tensor = torch.as_tensor(ids, device=device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{what} must be token ids (ints); got {type(ids).__name__}: {err}") from None
    if tensor.numel() == 0 and not isinstance(ids, torch.Tensor):
        tensor = tensor.long()  # an empty list has no dtype; its shape is refused below
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise ValueError(f"{what} must have an integer dtype; got {tensor.dtype}")
    tensor = tensor.to(device=device, dtype=torch.long)
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2 or tensor.shape[0] != 1 or tensor.shape[1] == 0:
        raise ValueError(f"{what} must be one non-empty sequence of token ids, (T,) or (1, T); got shape "
                         f"{tuple(tensor.shape)} (batches of several sequences are refused: a compressed cache "
                         "keeps one token set)")
    if vocab is not None:
        check_ids(tensor, vocab, what)
    return tensor


REFUSED_OPTIONS = {
    "num_beams": "beam search keeps several sequences; a compressed cache holds one and cannot reorder beams",
    "num_return_sequences": "several returned sequences need the cache copied per sequence, which compressed "
                            "layers do not support",
    "num_beam_groups": "diverse beam search keeps several sequences; a compressed cache holds one",
    "penalty_alpha": "contrastive search copies the cache per candidate, which compressed layers do not support",
    "cache_implementation": "generate would build its own cache and ignore the compressed one",
    "use_cache": "use_cache=False makes generate ignore the compressed cache",
    "custom_generate": "a custom decoding loop may copy or reorder the cache, which compressed layers do not support",
}
SUPPLIED = ("input_ids", "inputs", "attention_mask", "past_key_values", "inputs_embeds")
ASSISTED = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")


def refused_option(name: str, options: dict[str, Any], config) -> str | None:
    """The refused generate option among ``options`` (merged over ``config``, a ``GenerationConfig``), or None."""
    def value(key):
        return options[key] if key in options else getattr(config, key, None)

    for key in ("num_beams", "num_return_sequences", "num_beam_groups"):
        if (value(key) or 1) > 1:
            return f"{key}={value(key)}"
    if value("penalty_alpha"):
        return f"penalty_alpha={value('penalty_alpha')}"
    if value("cache_implementation") is not None:
        return f"cache_implementation={value('cache_implementation')!r}"
    if value("use_cache") is False:
        return "use_cache=False"
    if options.get("custom_generate") is not None:
        return f"custom_generate={options['custom_generate']!r}"
    return None


class Compressed:
    """A method bound to a model with its transforms installed; holds one compressed context at a time."""

    def __init__(self, runner: Runner, name: str | None = None):
        self.runner = runner
        self.name = name or runner.config.name  # the method as the caller named it (errors name it)
        self.model = runner.model
        self.device = next(self.model.parameters()).device
        if self.device.type == "meta":
            raise ValueError(f"method {self.name!r}: the model's parameters are on the meta device (no "
                             "weights loaded); load it on cpu or cuda")
        self.vocab = vocab_size(self.model)
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
        ids = as_ids(context_ids, self.device, "context_ids", self.vocab)
        cache = self.runner.new_cache()
        positions = torch.arange(ids.shape[1], device=self.device).unsqueeze(0)
        with self.runner.prefill(cache):
            self.model(input_ids=ids, past_key_values=cache, use_cache=True, position_ids=positions, logits_to_keep=1)
        self.runner.compress(cache)
        self._cache, self._checkpoint, self.context_ids = cache, layer_lengths(cache), ids
        log.debug("%s: compressed a context of %d tokens", self.name, ids.shape[1])
        return self

    def reset(self) -> None:
        """Crop the cache back to the compressed context (drop questions and answers appended since)."""
        rewind(self.cache, self._checkpoint)

    def check_positions(self) -> None:
        """Refuse a cache whose ``get_seq_length`` is not the context length (``generate`` would misplace tokens)."""
        seen, context = self.cache.get_seq_length(), self.context_ids.shape[1]
        if seen != context:
            raise ValueError(f"method {self.name!r}: its cache reports {seen} tokens for a context of "
                             f"{context} (it counts held, not seen tokens), so model.generate would give the question "
                             "wrong positions; use crosskv.run.harness or crosskv.integrations.kvpress, which pass positions")

    def check_options(self, options: dict[str, Any], uneven: bool) -> None:
        """Refuse, naming it, a ``generate`` option that cannot run exactly on this compressed cache."""
        name = self.name
        supplied = sorted(set(options) & set(SUPPLIED))
        if supplied:
            raise ValueError(f"method {name!r}: generate option(s) {', '.join(supplied)} are supplied by "
                             "Compressed.generate (context + question_ids, an all-ones mask, the compressed cache)")
        config = options.get("generation_config") or self.model.generation_config
        refused = refused_option(name, options, config)
        if refused:
            key = refused.split("=")[0]
            raise ValueError(f"method {name!r}: generate option {refused} is refused on a compressed cache: "
                             f"{REFUSED_OPTIONS[key]}")
        assisted = [k for k in ASSISTED if options.get(k) is not None]
        if uneven and assisted:
            raise ValueError(f"method {name!r}: generate option {assisted[0]} is refused on this cache: its layers "
                             "hold different token counts (per-layer eviction budgets), so the several candidate "
                             "tokens assisted decoding verifies at once cannot share one attention mask")

    def generate(self, question_ids: Any, **generate_kwargs: Any) -> Any:
        """``model.generate`` on context + question from the compressed cache (reset first); returns its output.

        ``question_ids``: ``(Q,)`` or ``(1, Q)``. The output is what ``model.generate`` returns: the sequences
        start with the context and question ids. Options that cannot run exactly are refused (module docstring).
        """
        from crosskv.run.harness import feed, uneven

        self.reset()
        stepwise = uneven(self.cache)
        self.check_options(generate_kwargs, stepwise)
        self.check_positions()
        question = as_ids(question_ids, self.device, "question_ids", self.vocab)
        ids = torch.cat([self.context_ids, question], dim=1)
        if stepwise and question.shape[1] > 1:  # all but the last question token, one at a time; generate the rest
            with torch.no_grad():
                feed(self.model, self.cache, question[0, :-1].tolist(), self.context_ids.shape[1], self.device)
        mask = torch.ones_like(ids)
        return self.model.generate(input_ids=ids, attention_mask=mask, past_key_values=self.cache, **generate_kwargs)

    def guard(self, module, args, kwargs) -> None:
        """Forward pre-hook: refuse a batch of several sequences, or ids outside the vocabulary, on this cache."""
        if self._cache is None or kwargs.get("past_key_values") is not self._cache:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        rows = ids if ids is not None else kwargs.get("inputs_embeds")
        if rows is not None and rows.shape[0] != 1:
            raise ValueError(f"method {self.name!r}: the model was called with a batch of "
                             f"{rows.shape[0]} sequences on a compressed cache holding one (batched prompts, "
                             "num_beams > 1 and num_return_sequences > 1 are refused: per-sequence token sets are "
                             "not implemented)")
        if ids is not None and ids.shape[-1] > 1:  # prompt chunks; decoded tokens come from the model's own head
            check_ids(ids, self.vocab, "input_ids")


def bound(model, method: MethodConfig | str, tokenizer=None) -> Runner:
    """``method`` (a config or a registered name) bound to ``model`` (cached per model and config)."""
    from crosskv.run.harness import bind

    config = method if isinstance(method, MethodConfig) else make_method(method)
    return bind(model, tokenizer, config)


@contextlib.contextmanager
def compressed(model, method: MethodConfig | str, tokenizer=None) -> Iterator[Compressed]:
    """Install ``method`` on ``model`` for the block and yield a :class:`Compressed` (see the module docstring)."""
    config = method if isinstance(method, MethodConfig) else make_method(method)
    runner = bound(model, config, tokenizer)
    with runner.applied():
        session = Compressed(runner, config.name)
        handle = model.register_forward_pre_hook(session.guard, with_kwargs=True)
        try:
            yield session
        finally:
            handle.remove()
