"""KVSharer's cache: consumer layers that hold nothing and read their producer layer's K/V.

A :class:`SharingCache` is a plain cache whose consumer layers are :class:`SharedLayer` views of an
earlier producer layer of the same cache; the producer runs earlier in the same forward, so it already
holds the current tokens (identical positions: post-RoPE keys are reused as they are).
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from transformers.cache_utils import CacheLayerMixin

from crosskv.cache.eviction import evict_plain
from crosskv.cache.layer import HeldLayer
from crosskv.cache.plain import PlainCache
from crosskv.cache.static import ReadsProducer
from crosskv.cache.storage import layer_tensors


class SharedLayer(HeldLayer):
    """Cache layer of a consumer: stores nothing and returns what its producer layer attends with.

    The producer runs earlier in the same forward, so on :meth:`update` it already holds the current
    tokens. The layer counts the tokens it has seen and checks that the producer saw exactly as many;
    it holds the producer's rows (:meth:`held`, so the mask sizes are the producer's), and crop, reset and
    batch reorder touch only its counter (the producer, an earlier layer of the same cache, does the data).
    A compressed, evicted or quantized producer (any :class:`~crosskv.cache.layer.HeldLayer`) is read through
    its :meth:`~crosskv.cache.layer.HeldLayer.attend_kv`.
    """

    def __init__(self, producer: CacheLayerMixin, producer_idx: int):
        super().__init__()
        self.producer = producer
        self.producer_idx = producer_idx

    def __repr__(self):
        return f"SharedLayer(producer={self.producer_idx})"

    @property
    def is_sliding(self) -> bool:
        return getattr(self.producer, "is_sliding", False)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate."""
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Discard this layer's own K/V ``(B, H_kv, t, d)``; return the producer's ``(B, H_kv, S, d)``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        seen = self.producer.get_seq_length()
        if seen != self.seen:
            raise RuntimeError(f"producer layer {self.producer_idx} has seen {seen} tokens but its consumer has "
                               f"seen {self.seen}: the producer must run before its consumer in every forward")
        if isinstance(self.producer, HeldLayer):
            return self.producer.attend_kv()
        return self.producer.keys, self.producer.values

    def frozen_prefix(self, capacity: int) -> ReadsProducer:
        """In the static layout a consumer reads its producer's frozen context and buffer."""
        return ReadsProducer(self.producer_idx)

    def held(self) -> int:
        """The producer's held tokens (the rows this layer attends to), less those it has seen beyond this layer:
        inside a forward the producer has already stored the new tokens, which this layer's mask adds itself."""
        held = self.producer.held() if isinstance(self.producer, HeldLayer) else self.producer.get_seq_length()
        return held - (self.producer.get_seq_length() - self.seen)

    def croppable(self) -> int:
        """Every token: the producer (cropped first, as an earlier layer) refuses what it cannot cut."""
        return self.seen

    def drop_newest(self, count: int) -> None:
        """Nothing held: only the counter moves."""

    def offload(self):
        """The producer owns the data."""

    def prefetch(self):
        """The producer owns the data."""


class SharingCache(PlainCache):
    """A plain cache (:class:`~crosskv.cache.plain.PlainCache`: producers are plain layers) whose consumer layers
    are :class:`SharedLayer` views of their producers."""

    def __init__(self, config, mapping: dict[int, int]):
        super().__init__(config)
        self.mapping = dict(mapping)
        self.check_mapping()
        self.share()

    def check_mapping(self) -> None:
        """Refuse an entry whose producer is not an earlier non-consumer layer of the same kind (full or sliding)."""
        layers = len(self.layers)
        for consumer, producer in self.mapping.items():
            if not (0 <= producer < consumer < layers):
                raise ValueError(f"sharing entry {consumer} → {producer} is invalid for {layers} layers")
            if producer in self.mapping:
                raise ValueError(f"sharing entry {consumer} → {producer}: layer {producer} is itself a consumer")
            if getattr(self.layers[producer], "is_sliding", False) != getattr(self.layers[consumer], "is_sliding", False):
                raise ValueError(f"sharing entry {consumer} → {producer} mixes a sliding-window and a full layer")

    def share(self) -> None:
        """Make each consumer's layer a :class:`SharedLayer` view of its producer's layer."""
        for consumer, producer in self.mapping.items():
            self.layers[consumer] = SharedLayer(self.layers[producer], producer)

    def reset(self) -> None:
        """Forget every token, as a new cache: fresh plain producer layers (an evicted or quantized producer goes
        back to a plain one, :meth:`PlainCache.reset`) and fresh consumer views of them."""
        super().reset()
        self.share()

    def evict_tokens(self, positions: dict[int, torch.Tensor]) -> None:
        """Evict prompt rows of producer layers (``positions[layer]``: the absolute positions to keep ``(n,)``);
        each consumer is re-pointed to its producer's evicted layer, so it reads the same rows and no stale copy
        stays alive."""
        consumers = sorted(set(positions) & set(self.mapping))
        if consumers:
            raise ValueError(f"layers {consumers} are KVSharer consumers: they read their producer's tokens and "
                             "cannot be evicted on their own")
        for idx, index in positions.items():
            self.layers[idx] = evict_plain(self.layers[idx], index)
        for consumer, producer in self.mapping.items():
            self.layers[consumer].producer = self.layers[producer]

    def stored_tensors(self) -> Iterator[torch.Tensor]:
        """K and V (or codes) of the producer layers (consumers hold nothing)."""
        for layer in self.layers:
            if isinstance(layer, SharedLayer) or not layer.is_initialized:
                continue
            yield from layer_tensors(layer)
