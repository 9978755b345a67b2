"""``kvsharer``: layer-wise dissimilar KV-cache sharing (KVSharer, Yang et al., 2024).

Offline, a greedy search (the paper's Algorithm 1) picks C *consumer* layers, each of which reuses
the K/V cache of an earlier *producer* layer: layer pairs are ranked by the distance of their
sample-averaged K and V on a small calibration set (most dissimilar first), and a pair is accepted
while the final hidden states of the sharing model stay close to the original's (cosine > T).
At inference a :class:`~crosskv.methods.kvsharer_cache.SharingCache` holds nothing for consumers: their
attention reads the producer's cache, which already holds the current tokens because the producer ran
earlier in the same forward (identical positions, so post-RoPE keys are reused as they are). This applies
in prefill and decode; per-layer lengths are tracked by counters, not by how many layers are stored
(the released dict cache's decode bug).

The modules, lowest first: :mod:`crosskv.methods.kvsharer_strategy` (the data: :class:`SharingStrategy`
and the search options), :mod:`crosskv.methods.kvsharer_cache` (the sharing cache),
:mod:`crosskv.methods.kvsharer_search` (the search, its calibration and its disk cache) and this module,
the method (its config and runner), which also re-exports the data and cache types as its public face.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from crosskv.core.capture import attention_modules
from crosskv.methods.base import MethodConfig, Runner, module_bytes, register, state_bytes
from crosskv.methods.kvsharer_cache import SharedLayer, SharingCache
from crosskv.methods.kvsharer_search import cached_search
from crosskv.methods.kvsharer_strategy import (CRITERIA, FORMAT, METRICS, ORDERS, SearchConfig, SearchOptions,
                                               SharingStrategy)

__all__ = ["CRITERIA", "FORMAT", "METRICS", "ORDERS", "KVSharer", "KVSharerRunner", "SearchConfig", "SearchOptions",
           "SharedLayer", "SharingCache", "SharingStrategy", "SkippedProjection", "consumer_projection_bytes"]


class SkippedProjection(nn.Module):
    """Stands in for a consumer layer's ``k_proj``/``v_proj`` while a :class:`KVSharerRunner` is applied.

    Returns an empty ``(…, 0)`` tensor instead of ``(…, H_kv·d)``: the projection is not computed, the
    attention reshapes it to zero KV heads, so RoPE (and Qwen3's k_norm) run on an empty tensor, and the
    consumer's :class:`SharedLayer` ignores it and returns the producer's K/V.
    """

    def __init__(self, original: nn.Linear):
        super().__init__()
        self.out_features = original.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], 0)


def consumer_projection_bytes(model, consumers) -> int:
    """Bytes of the ``k_proj``/``v_proj`` parameters of the ``consumers`` layers (from shapes)."""
    attns = attention_modules(model)
    return module_bytes(getattr(attns[layer], name) for layer in consumers for name in ("k_proj", "v_proj"))


class KVSharerRunner(Runner):
    """Runs the model with a :class:`SharingCache` built from a fixed strategy; while applied, consumer
    layers skip their key/value projections and RoPE (:class:`SkippedProjection`)."""

    def __init__(self, config: "KVSharer", model, tokenizer, strategy: SharingStrategy):
        super().__init__(config, model, tokenizer)
        self.strategy = strategy
        self.dropped_bytes = consumer_projection_bytes(model, strategy.mapping)

    def method_bytes(self) -> int:
        """Nothing added; minus the consumers' ``k_proj``/``v_proj`` weights, which a deployment can drop
        (their outputs are never used)."""
        return state_bytes(self) - self.dropped_bytes

    @contextlib.contextmanager
    def applied(self) -> Iterator["KVSharerRunner"]:
        """Replace every consumer's ``k_proj``/``v_proj`` with a :class:`SkippedProjection` (restored on exit)."""
        attns = attention_modules(self.model)
        replaced = []
        try:
            for layer in sorted(self.strategy.mapping):
                for name in ("k_proj", "v_proj"):
                    original = getattr(attns[layer], name)
                    replaced.append((attns[layer], name, original))
                    setattr(attns[layer], name, SkippedProjection(original))
            yield self
        finally:
            for attn, name, original in reversed(replaced):
                setattr(attn, name, original)

    def plain_layers(self) -> int:
        """The layers below the first consumer: the sharing changes nothing before it."""
        return self.strategy.first_consumer

    def new_cache(self) -> SharingCache:
        return SharingCache(self.model.config, self.strategy.mapping)


@register
@dataclass(frozen=True)
class KVSharer(MethodConfig, SearchOptions):
    """KVSharer: give ``strategy`` (a JSON file) or ``shared_layers``/``rate`` plus search options."""

    name = "kvsharer"
    description = "layer-wise dissimilar KV sharing: C consumer layers reuse an earlier layer's cache"

    strategy: str | None = None

    def __post_init__(self):
        if self.strategy is not None:
            if self.shared_layers is not None or self.rate is not None:
                raise ValueError(f"strategy={self.strategy!r} is a fixed strategy; do not also give "
                                 f"shared_layers={self.shared_layers} / rate={self.rate}")
            if not Path(self.strategy).is_file():  # checked when the config is made, before any model loads
                raise ValueError(f"strategy={self.strategy!r}: no such file")
            return
        self.search_config()  # validates the search options

    def resolve(self, model, tokenizer) -> SharingStrategy:
        """The strategy: loaded from ``strategy`` or searched (cached on disk)."""
        if self.strategy is not None:
            return SharingStrategy.load(self.strategy, model)
        return cached_search(model, tokenizer, self.search_config())

    def bind(self, model, tokenizer=None) -> KVSharerRunner:
        return KVSharerRunner(self, model, tokenizer, self.resolve(model, tokenizer))
