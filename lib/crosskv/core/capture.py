"""The one adapter over transformers internals: decoder layers, RoPE undo/redo, K/V/hidden capture.

Everything that depends on how transformers lays out a decoder (``model.model.layers[i].self_attn``,
``model.model.rotary_emb``) or on its cache classes lives here, so an upgrade touches one module.
RoPE is undone and redone from absolute positions with the model's own rotary embedding; nothing
relies on ``sin``/``cos`` reaching ``Cache.update`` (transformers stopped passing them in 5.5).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from transformers import DynamicCache

from crosskv.core import rotary


def decoder(model):
    """The bare decoder (``model.model`` for a ``*ForCausalLM``)."""
    return getattr(model, "model", model)


def decoder_layers(model) -> list:
    return list(decoder(model).layers)


@contextlib.contextmanager
def rotary_aliases(model) -> Iterator[None]:
    """Inside: every attention module has a ``rotary_emb`` (kvpress's presses read it there; ``press(model)``
    hangs the decoder's on each and leaves it). On exit the modules that had none lose it again, so the model
    is as it was (its fingerprint reads its buffers, the aliases' included)."""
    base = decoder(model)
    added = [layer.self_attn for layer in base.layers if not hasattr(layer.self_attn, "rotary_emb")]
    try:
        for module in added:
            module.rotary_emb = base.rotary_emb
        yield
    finally:
        for module in added:
            if "rotary_emb" in module._modules:
                del module.rotary_emb


def attention_modules(model) -> list:
    return [layer.self_attn for layer in decoder_layers(model)]


@dataclass(frozen=True)
class KVShape:
    """Per-layer KV geometry: ``layers`` L, ``kv_heads`` H_kv, ``head_dim`` d, ``hidden`` D."""

    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    heads: int

    @property
    def width(self) -> int:
        """Features of one layer's K (or V) per token: H_kv·d."""
        return self.kv_heads * self.head_dim


def kv_shape(model_or_config) -> KVShape:
    cfg = getattr(model_or_config, "config", model_or_config)
    cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return KVShape(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, cfg.hidden_size, cfg.num_attention_heads)


class Rotary(rotary.Rotary):
    """RoPE at absolute positions with ``model``'s own rotary embedding (:class:`crosskv.core.rotary.Rotary`):
    ``rotate(k, positions)`` equals what the model applies to keys; ``unrotate`` is its exact inverse."""

    def __init__(self, model):
        super().__init__(decoder(model).rotary_emb)


@dataclass
class Capture:
    """Per-layer activations, each ``(L, B, H_kv, T, d)``; ``hidden`` is ``(L+1, B, T, D)`` (embeddings first).

    With ``average=True`` the batch axis has size 1 and holds the mean over all captured samples.
    """

    keys: torch.Tensor | None = None          # post-RoPE, as the cache holds them
    keys_pre_rope: torch.Tensor | None = None
    values: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    samples: int = 0
    fields: tuple[str, ...] = field(default=("keys", "keys_pre_rope", "values", "hidden"))


def _stack_kv(cache: DynamicCache) -> tuple[torch.Tensor, torch.Tensor]:
    keys = torch.stack([layer.keys for layer in cache.layers])      # (L, B, H, T, d)
    values = torch.stack([layer.values for layer in cache.layers])  # (L, B, H, T, d)
    return keys, values


@torch.no_grad()
def run_with_cache(model, input_ids: torch.Tensor) -> tuple[DynamicCache, tuple[torch.Tensor, ...]]:
    """One forward of ``input_ids`` ``(B, T)`` with a fresh ``DynamicCache``; returns it and the hidden states."""
    cache = DynamicCache(config=model.config)
    out = model(input_ids=input_ids.to(model.device), past_key_values=cache, use_cache=True,
                output_hidden_states=True)
    return cache, out.hidden_states


@torch.no_grad()
def capture(model, batches: Iterable[torch.Tensor], average: bool = False,
            fields: tuple[str, ...] = ("keys", "keys_pre_rope", "values", "hidden"),
            dtype: torch.dtype = torch.float32) -> Capture:
    """Run ``model`` over token batches ``(B, T)`` and collect per-layer K/V/hidden states.

    Returns a :class:`Capture` whose tensors are ``(L, N, H_kv, T, d)`` (``N`` = all samples), or with
    ``average=True`` the running mean over samples ``(L, 1, H_kv, T, d)`` without holding them all.
    All batches must have the same length ``T``. Tensors are returned in ``dtype`` on the CPU.
    """
    rotary = Rotary(model)
    sums: dict[str, torch.Tensor] = {}
    parts: dict[str, list[torch.Tensor]] = {f: [] for f in fields}
    samples = 0
    for ids in batches:
        cache, hidden = run_with_cache(model, ids)
        keys, values = _stack_kv(cache)
        got = {}
        if "keys" in fields:
            got["keys"] = keys
        if "keys_pre_rope" in fields:
            positions = torch.arange(keys.shape[-2], device=keys.device)
            got["keys_pre_rope"] = rotary.unrotate(keys.flatten(0, 1), positions).view_as(keys)
        if "values" in fields:
            got["values"] = values
        if "hidden" in fields:
            got["hidden"] = torch.stack(hidden)  # (L+1, B, T, D)
        batch = ids.shape[0]
        samples += batch
        for name, tensor in got.items():
            batch_axis = 1
            tensor = tensor.to("cpu", dtype)
            if average:
                total = tensor.sum(dim=batch_axis, keepdim=True)
                sums[name] = total if name not in sums else sums[name] + total
            else:
                parts[name].append(tensor)
    result = Capture(samples=samples, fields=tuple(fields))
    for name in fields:
        value = sums[name] / samples if average else torch.cat(parts[name], dim=1)
        setattr(result, name, value)
    return result
