"""``kvsharer_xkv``: a hybrid no paper tried — KVSharer's layer sharing, then xKV over the layers that still store.

KVSharer (:mod:`crosskv.methods.kvsharer`) picks C consumer layers that store nothing and attend with an
earlier producer's cache. The L − C producers still hold full K/V; here they are compressed as xKV does
(:mod:`crosskv.methods.svd`): consecutive *producers* (in layer order, skipping consumers) form groups of
``group_size`` that share one low-rank token basis of their pre-RoPE keys (and one of their values), each
layer keeping its own factors. A consumer attends with exactly what its producer attends with — the
rebuilt prefix plus the exact tail (:class:`ProducerView`) — so the two compressions compose without any
approximation beyond each one's own: with C = 0 this is xKV over all layers, at lossless rank it is
KVSharer alone.

Memory: ``kept ≈ (L − C)/L · kept_xkv``, where ``kept`` (the xKV target) applies to every group of producers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from crosskv.core.capture import KVShape, kv_shape
from crosskv.methods.base import register
from crosskv.methods.kvsharer import KVSharer, SharedLayer, SharingStrategy
from crosskv.cache.prefix import PrefixLayer
from crosskv.methods.svd import XKV, LowRankCache, LowRankRunner


class ProducerView(SharedLayer):
    """A consumer of a (possibly compressed) producer: returns the K/V the producer attends with."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Discard this layer's own K/V ``(B, H_kv, t, d)``; return the producer's ``(B, H_kv, S, d)``."""
        super().update(key_states, value_states, cache_kwargs)  # counts tokens, checks the producer ran first
        if isinstance(self.producer, PrefixLayer):
            return self.producer.attend_kv()
        return self.producer.keys, self.producer.values


@dataclass(frozen=True)
class ProducerGroups(XKV):
    """xKV whose groups are runs of ``group_size`` consecutive entries of ``layers`` (the producers)."""

    layers: tuple[int, ...] = ()

    def groups(self, shape: KVShape) -> list[tuple[int, ...]]:
        if any(not 0 <= i < shape.layers for i in self.layers):
            raise ValueError(f"producer layers {self.layers} lie outside the model's {shape.layers} layers")
        return [tuple(self.layers[i:i + self.group_size]) for i in range(0, len(self.layers), self.group_size)]


@register
@dataclass(frozen=True)
class SharedXKV(XKV):
    """KVSharer (``shared_layers`` consumers, searched; or a ``strategy`` file) + xKV over the producers."""

    name = "kvsharer_xkv"
    description = "hybrid: KVSharer consumers reuse a producer; xKV groups of G over the producer layers"
    plain_prefill = False  # consumers read their producer's K/V during the prefill

    shared_layers: int | None = 8
    strategy: str | None = None
    metric: str = "euclidean"
    order: str = "dissimilar"
    threshold: float = 0.5
    criterion: str = "cosine"
    max_kl: float = 0.1
    calibration_samples: int = 30
    calibration_length: int = 64
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.strict:
            raise ValueError("strict=True is not supported by kvsharer_xkv (consumers would read a group "
                             "compressed mid-forward); use strict=False")
        if self.start_layer != 0 or self.end_layer is not None:
            raise ValueError(f"start_layer={self.start_layer}/end_layer={self.end_layer}: kvsharer_xkv groups "
                             "every producer layer; the range cannot be restricted")
        self.sharer()  # validates the sharing options

    def sharer(self) -> KVSharer:
        """The KVSharer config of the sharing part."""
        options = dict(metric=self.metric, order=self.order, threshold=self.threshold, criterion=self.criterion,
                       max_kl=self.max_kl, calibration_samples=self.calibration_samples,
                       calibration_length=self.calibration_length, seed=self.seed)
        if self.strategy is not None:
            return KVSharer(strategy=self.strategy)
        return KVSharer(shared_layers=self.shared_layers, **options)

    def check(self, shape: KVShape) -> None:
        """Ranks ≤ a group's width; the group size is checked against the producers when bound."""
        width = self.group_size * shape.width
        for field in ("rank_k", "rank_v"):
            value = getattr(self, field)
            if value is not None and value > width:
                raise ValueError(f"{field}={value} exceeds the group width {width}")

    def bind(self, model, tokenizer=None) -> "SharedXKVRunner":
        strategy = self.sharer().resolve(model, tokenizer)
        producers = tuple(strategy.producers)
        if self.group_size > len(producers):
            raise ValueError(f"group_size={self.group_size} exceeds the {len(producers)} producer layers left "
                             f"after {len(strategy.mapping)} consumers")
        grouping = ProducerGroups(group_size=self.group_size, rank_k=self.rank_k, rank_v=self.rank_v,
                                  kept=self.kept, attention=self.attention, layers=producers)
        grouping.check(kv_shape(model))
        return SharedXKVRunner(self, model, tokenizer, grouping, strategy)


class SharedXKVRunner(LowRankRunner):
    """xKV's runner over the producer groups, with consumer layers viewing their producers."""

    def __init__(self, config: SharedXKV, model, tokenizer, grouping: ProducerGroups, strategy: SharingStrategy):
        super().__init__(grouping, model, tokenizer)
        self.hybrid = config
        self.strategy = strategy

    def new_cache(self) -> LowRankCache:
        cache = LowRankCache(self.config, self.shape, self.rotary)
        for consumer, producer in self.strategy.mapping.items():
            cache.layers[consumer] = ProducerView(cache.layers[producer], producer)
        return cache
