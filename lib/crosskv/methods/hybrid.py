"""``kvsharer_xkv``: a hybrid no paper tried — KVSharer's layer sharing, then xKV over the layers that still store.

KVSharer (:mod:`crosskv.methods.kvsharer`) picks C consumer layers that store nothing and attend with an
earlier producer's cache. The L − C producers still hold full K/V; here they are compressed as xKV does
(:mod:`crosskv.methods.svd`): consecutive *producers* (in layer order, skipping consumers) form groups of
``group_size`` that share one low-rank token basis of their pre-RoPE keys (and one of their values), each
layer keeping its own factors. A consumer attends with exactly what its producer attends with — the
rebuilt prefix plus the exact tail (a :class:`~crosskv.methods.kvsharer.SharedLayer` reads a compressed
producer through its ``attend_kv``) — so the two compressions compose without any
approximation beyond each one's own: with C = 0 this is xKV over all layers, at lossless rank it is
KVSharer alone.

``cache.reset()`` forgets the producers' bases, factors and tails and gives every consumer a fresh view; a
batch of different sequences is refused at compression (naming ``kvsharer_xkv``), as xKV refuses it.

Memory: ``kept ≈ (L − C)/L · kept_xkv``, where ``kept`` (the xKV target) applies to every group of producers.
"""
from __future__ import annotations

from dataclasses import dataclass

from transformers.cache_utils import CacheLayerMixin

from crosskv.core.capture import KVShape, Rotary, kv_shape
from crosskv.methods.base import register, state_bytes
from crosskv.methods.kvsharer import KVSharer, SearchOptions, SharedLayer, SharingStrategy, consumer_projection_bytes
from crosskv.methods.svd import XKV, LowRankCache, LowRankRunner


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
class SharedXKV(XKV, SearchOptions):
    """KVSharer (``shared_layers`` consumers, searched; or a ``strategy`` file) + xKV over the producers."""

    name = "kvsharer_xkv"
    description = "hybrid: KVSharer consumers reuse a producer; xKV groups of G over the producer layers"
    plain_prefill = False  # consumers read their producer's K/V during the prefill

    shared_layers: int | None = 8
    strategy: str | None = None

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
        if self.strategy is not None:
            return KVSharer(strategy=self.strategy)
        return KVSharer(**self.search_options())

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
        self.dropped_bytes = consumer_projection_bytes(model, strategy.mapping)

    def method_bytes(self) -> int:
        """Nothing added (the SVD is of the cache, not of weights); minus the consumers' ``k_proj``/``v_proj``
        weights, which a deployment can drop (consumer layers read their producer's cache)."""
        return state_bytes(self) - self.dropped_bytes

    def plain_layers(self) -> int:
        """The layers below the first consumer (xKV compresses only after the prefill)."""
        return self.strategy.first_consumer

    def new_cache(self) -> "SharedLowRankCache":
        return SharedLowRankCache(self.config, self.shape, self.rotary, self.hybrid.name, self.strategy.mapping)


class SharedLowRankCache(LowRankCache):
    """xKV's cache over the producer groups, with each consumer layer a :class:`SharedLayer` view of its producer
    (``mapping``: consumer → producer); :meth:`reset` gives consumers fresh views of their reset producers."""

    def __init__(self, config: ProducerGroups, shape: KVShape, rotary: Rotary, method: str, mapping: dict[int, int]):
        super().__init__(config, shape, rotary, method)
        self.mapping = dict(mapping)
        for consumer in self.mapping:
            self.layers[consumer] = self.fresh_layer(consumer)
            self.layers[consumer].layer_idx = consumer

    def fresh_layer(self, index: int) -> CacheLayerMixin:
        """A consumer's view of its producer (an earlier layer, already reset), else a plain layer."""
        if index in self.mapping:
            return SharedLayer(self.layers[self.mapping[index]], self.mapping[index])
        return super().fresh_layer(index)
