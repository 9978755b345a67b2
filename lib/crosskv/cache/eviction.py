"""Token eviction for compositions: kvpress scores → one kept token set per *unit* of layers → evicted caches.

A unit is a set of layers that must hold the same tokens because they share something across
layers (an xKV group's token basis, a MiniCache pair's rows, a CommonKV group's merge); an
independent layer is a unit of one. While the context is prefilled, :class:`EvictionScorer` records
each layer's token scores (a kvpress press's ``score``, averaged over batch and KV heads → ``(T,)``)
and its budget (``compute_n_kept``, or PyramidKV's ``get_layer_budget``). :func:`token_sets` then pools
the scores of a unit's layers (their mean) and keeps the top ``round(mean of the unit's budgets)``
tokens for the whole unit, so a unit's budget is the mean of its layers' budgets (rounded half up).

Kept indices are absolute positions of the prompt. :class:`EvictedLayer` is a plain K/V layer after
eviction: it holds fewer rows than tokens seen, so positions and masks stay absolute.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers.cache_utils import DynamicLayer

from crosskv.cache.attention import unwrap_kvpress
from crosskv.cache.layer import HeldLayer
from crosskv.core.capture import rotary_aliases


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Eviction:
    """A kvpress scorer press usable for eviction: its class name and whether it takes ``window_size``."""

    press_class: str
    windowed: bool
    description: str


EVICTIONS: dict[str, Eviction] = {
    "snapkv": Eviction("SnapKVPress", True, "attention of the context's last window (uniform budget)"),
    "pyramidkv": Eviction("PyramidKVPress", True, "SnapKV scores, pyramid-shaped per-layer budgets"),
    "knorm": Eviction("KnormPress", False, "smallest key norms kept"),
    "streaming_llm": Eviction("StreamingLLMPress", False, "first n_sink (4) and most recent tokens kept"),
    "expected_attention": Eviction("ExpectedAttentionPress", False, "attention expected from future queries"),
}


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


def make_press(evict: str, ratio: float, window_size: int):
    """The kvpress press for ``evict`` at ``compression_ratio=ratio``."""
    import kvpress  # lazy: importing kvpress patches transformers' attention functions

    unwrap_kvpress()  # a run already inside installed() keeps reading compressed prefixes

    spec = EVICTIONS[evict]
    kwargs = {"compression_ratio": ratio}
    if spec.windowed:
        kwargs["window_size"] = window_size
    return getattr(kvpress, spec.press_class)(**kwargs)


class EvictionScorer:
    """Records, per layer, the press's token scores ``(T,)`` and budget during the context prefill."""

    def __init__(self, model, evict: str, ratio: float, window_size: int = 64):
        self.press = make_press(evict, ratio, window_size)
        self.model, self.ratio = model, ratio
        self.scores: dict[int, torch.Tensor] = {}
        self.budgets: dict[int, int] = {}

    def budget(self, module, tokens: int) -> int:
        from kvpress.utils import compute_n_kept

        if hasattr(self.press, "get_layer_budget"):
            return max(1, min(tokens, self.press.get_layer_budget(module, tokens)))
        return compute_n_kept(tokens, self.ratio)

    def hook(self, module, args, kwargs, output):
        cache = kwargs["past_key_values"]
        keys, values = layer_kv(cache.layers[module.layer_idx])
        if keys is None:  # a layer that stores nothing (a KVSharer consumer)
            return output
        if module.layer_idx in self.scores:
            raise ValueError("eviction scores the whole context in one prefill forward; this prefill ran in chunks")
        scores = self.press.score(module, kwargs["hidden_states"], keys, values, None, kwargs)  # (B, H_kv, T)
        self.scores[module.layer_idx] = scores.float().mean(dim=(0, 1))  # (T,)
        self.budgets[module.layer_idx] = self.budget(module, keys.shape[-2])
        return output

    @contextlib.contextmanager
    def hooks(self) -> Iterator["EvictionScorer"]:
        """The press's own context (its model set-up, e.g. ``rotary_emb`` for expected attention) with
        :meth:`hook` registered on every attention layer in place of the press's compressing hook."""
        self.press.forward_hook = self.hook
        with rotary_aliases(self.model), self.press(self.model):
            yield self


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


def evict_plain(layer: DynamicLayer, index: torch.Tensor) -> EvictedLayer:
    """A plain ``DynamicLayer`` reduced to the rows at ``index`` ``(kept,)``; anything else is refused."""
    if type(layer) is not DynamicLayer:
        raise ValueError(f"cannot evict tokens from a {type(layer).__name__}: only plain DynamicLayer rows "
                         "(or caches defining evict_tokens) can be evicted")
    return EvictedLayer(layer, index)


def kept_fraction(kept: dict[int, torch.Tensor], tokens: int) -> float:
    """Mean fraction of context tokens kept per layer."""
    return sum(k.numel() for k in kept.values()) / (len(kept) * tokens) if kept else 1.0
