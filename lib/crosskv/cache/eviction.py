"""Token eviction for compositions: per-layer scores → one kept token set per *unit* of layers → evicted layers.

A unit is a set of layers that must hold the same tokens because they share something across
layers (an xKV group's token basis, a MiniCache pair's rows, a CommonKV group's merge); an
independent layer is a unit of one. While the context is prefilled, a scorer (a kvpress press:
:class:`crosskv.methods.peers.EvictionScorer`) records each layer's token scores ``(T,)`` and its budget.
:func:`token_sets` then pools the scores of a unit's layers (their mean) and keeps the top
``round(mean of the unit's budgets)`` tokens for the whole unit, so a unit's budget is the mean of its
layers' budgets (rounded half up).

Kept indices are absolute positions of the prompt. :class:`EvictedLayer` is a plain K/V layer after
eviction: it holds fewer rows than tokens seen, so positions and masks stay absolute.
"""
from __future__ import annotations

import logging

import torch
from transformers.cache_utils import DynamicLayer

from crosskv.cache.layer import HeldLayer
from crosskv.cache.quant import is_plain


log = logging.getLogger(__name__)


class EvictedLayer(HeldLayer):
    """A plain K/V layer after eviction: holds ``(B, H_kv, kept, d)`` exact rows but counts every token
    seen, so positions and masks stay absolute (bookkeeping, crop and reorder: the base's)."""

    plain_kv = True

    def __init__(self, layer: DynamicLayer, index: torch.Tensor):
        super().__init__()
        self.dtype, self.device, self.is_initialized = layer.keys.dtype, layer.keys.device, True
        self.seen = layer.get_seq_length()
        self.fix()  # tokens appended after eviction can be cropped again
        index = index.to(layer.keys.device)
        self.keys = layer.keys.index_select(-2, index)
        self.values = layer.values.index_select(-2, index)


def layer_kv(layer) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The K/V ``(B, H_kv, T, d)`` a cache layer currently attends with (``current_kv()`` if it defines one)."""
    if hasattr(layer, "current_kv"):
        return layer.current_kv()
    return getattr(layer, "keys", None), getattr(layer, "values", None)


def unit_budget(budgets: list[int]) -> int:
    """One budget for a unit of layers: the mean of its layers' budgets, rounded half up (at least 1)."""
    return max(1, int(sum(budgets) / len(budgets) + 0.5))


def token_sets(scores: dict[int, torch.Tensor], budgets: dict[int, int],
               units: list[tuple[int, ...]]) -> dict[int, torch.Tensor]:
    """Kept absolute positions per layer, one set per unit: ``{layer: (kept,) int64 ascending}``.

    ``scores[layer]`` ``(T,)``; a unit's scores are the mean of its layers' scores; it keeps the top
    :func:`unit_budget` tokens. Every layer of a unit must have been scored; layers in no unit are not evicted.
    """
    covered = [layer for unit in units for layer in unit]
    missing = sorted(set(covered) - set(scores))
    if missing or len(set(covered)) != len(covered):
        raise ValueError(f"units {units} overlap or hold unscored layers {missing}")
    kept = {}
    for unit in units:
        pooled = torch.stack([scores[i] for i in unit]).mean(0)  # (T,)
        keep = min(pooled.numel(), unit_budget([budgets[i] for i in unit]))
        index = pooled.topk(keep).indices.sort().values
        kept.update({i: index for i in unit})
    return kept


def holds_every_token(layer) -> bool:
    """True when ``layer`` holds a plain row for every token it has seen (:func:`crosskv.cache.quant.is_plain`:
    a ``DynamicLayer``, a plain layer, or an evicted or quantized layer after ``reset``)."""
    rows = layer.keys.shape[-2] if layer.is_initialized and layer.keys.numel() else 0
    return is_plain(layer) and rows == layer.get_seq_length()


def evict_plain(layer: DynamicLayer, index: torch.Tensor) -> EvictedLayer:
    """A layer holding every token seen as plain rows (:func:`holds_every_token`) reduced to the rows at
    ``index`` ``(kept,)``; anything else (a layer already evicted, compressed or quantized) is refused."""
    if not holds_every_token(layer):
        raise ValueError(f"cannot evict tokens from a {type(layer).__name__}: only layers holding every token "
                         "seen as plain rows (or caches defining evict_tokens) can be evicted")
    return EvictedLayer(layer, index)


def kept_fraction(kept: dict[int, torch.Tensor], tokens: int) -> float:
    """Mean fraction of context tokens kept per layer."""
    return sum(k.numel() for k in kept.values()) / (len(kept) * tokens) if kept else 1.0
