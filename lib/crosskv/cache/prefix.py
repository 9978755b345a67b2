"""Cache layers holding a compressed prompt prefix plus exactly stored later tokens (xKV, SVD, MiniCache).

A :class:`PrefixLayer` keeps the tokens that arrived since the last compression exactly in
``keys``/``values`` ``(B, H_kv, t, d)``. Once its method compresses it, the prefix of ``T_c`` tokens
lives only in the method's own tensors (bases, factors, directions, …), read on every step: handed
to attention through the channel of :mod:`crosskv.cache.attention` when the method
defines :meth:`PrefixLayer.compressed_prefix`, else rebuilt by :meth:`PrefixLayer.prefix_kv`; new
tokens (question, decoded) are appended exactly. Eviction before compression
(:meth:`PrefixLayer.evict`) drops prompt rows; seen and held tokens, crop, reorder and mask sizes are
the base's (:class:`~crosskv.cache.layer.HeldLayer`), so positions and masks stay absolute.
:class:`PrefixCache` is the container; its ``stored_tensors()`` yields every tensor held, each
shared tensor (a group's basis, a pair's direction) once, and its ``reset()`` releases them all (a new
cache's state: the next prompt is compressed anew).
"""
from __future__ import annotations

from typing import Iterator

import torch
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from crosskv.cache.attention import CompressedPrefix, compressed_kv
from crosskv.cache.eviction import evict_plain
from crosskv.cache.layer import HeldLayer
from crosskv.cache.plain import PlainLayer
from crosskv.cache.static import StaticRefused
from crosskv.cache.storage import layer_tensors
from crosskv.cache.quant import QuantSpec, quantize_plain_layers


class PrefixLayer(HeldLayer):
    """One layer: a compressed prefix (method-specific) + exact tail tokens (:class:`~crosskv.cache.layer.HeldLayer`)."""

    def prefix_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rebuilt prefix K and V, each ``(B, H_kv, T_c, d)`` (post-RoPE keys, as attention expects)."""
        raise NotImplementedError

    def prefix_tensors(self) -> Iterator[torch.Tensor]:
        """Tensors this layer alone holds for its prefix (shared group tensors are yielded by the cache)."""
        return iter(())

    def quantize_(self, spec: QuantSpec) -> None:
        """Replace the tensors this layer alone holds for its prefix by codes (none by default)."""

    def compressed_prefix(self) -> CompressedPrefix | None:
        """The prefix as attention reads it through the channel, or ``None`` to hand attention rebuilt K/V."""
        return None

    def attend_kv(self):
        """What attention reads: the channel pair (prefix + exact tail) when the layer has a
        :meth:`compressed_prefix`, else the rebuilt prefix concatenated with the exact tail."""
        if not self.prefix_len:
            return self.keys, self.values
        prefix = self.compressed_prefix()
        if prefix is not None:
            return compressed_kv(prefix, self.keys, self.values, self.layer_idx)
        keys, values = self.prefix_kv()
        return (torch.cat([keys.to(self.keys.dtype), self.keys], dim=-2),
                torch.cat([values.to(self.values.dtype), self.values], dim=-2))

    def frozen_prefix(self, capacity: int):
        """The compressed prefix and exact tail, frozen; refused when the layer rebuilds the prefix's K and V."""
        if self.prefix_len and self.compressed_prefix() is None:
            raise StaticRefused(f"layer {self.layer_idx} ({type(self).__name__}) rebuilds its prefix's K and V every "
                                "step (no compressed prefix, e.g. xKV attention='reconstruct'): no static layout")
        return super().frozen_prefix(capacity)

    def append(self, key_states, value_states) -> None:
        super().append(key_states, value_states)
        self.on_append()

    def on_append(self) -> None:
        """Hook run after new tokens were appended, before attention (strict compression)."""

    def evict(self, index: torch.Tensor) -> None:
        """Keep only the exact rows at ``index`` ``(kept,)`` (positions of the uncompressed prompt)."""
        if self.prefix_len or self.fixed:
            raise ValueError("eviction must precede compression and happen once")
        index = index.to(self.keys.device)
        self.keys, self.values = self.keys.index_select(-2, index), self.values.index_select(-2, index)
        self.fix()

    def take_tail(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove and return the exact tokens ``(B, H_kv, t, d)`` each (called when compressing them);
        the caller sets ``prefix_len`` to the tokens it now holds in its own form."""
        keys, values = self.keys, self.values
        # fresh empty tails: a zero-length view would pin the whole prompt's storage
        self.keys, self.values = keys.new_empty(*keys.shape[:-2], 0, keys.shape[-1]), \
            values.new_empty(*values.shape[:-2], 0, values.shape[-1])
        self.fix()
        return keys, values


class PrefixCache(Cache):
    """Container of per-layer caches (``PrefixLayer`` inside the compressed range, ``PlainLayer`` elsewhere).

    ``shared`` lists objects with ``tensors()`` and ``release()`` methods (a group's basis, a pair's direction)
    whose tensors several layers read; they are counted once by :meth:`stored_tensors` and dropped by
    :meth:`reset`.
    """

    def __init__(self, layers: list[CacheLayerMixin]):
        super().__init__(layers=layers)
        for index, layer in enumerate(layers):
            layer.layer_idx = index  # named in errors of the attention channel
        self.shared: list = []
        self.in_prefill = False

    def evict_tokens(self, positions: dict[int, torch.Tensor]) -> None:
        """Keep, per layer index, only the prompt rows at ``positions[layer]`` ``(n,)`` (absolute positions).

        Layers sharing an object in ``shared`` (a group, a pair) must keep one token set, or rows of
        different tokens would be combined: ``ValueError`` otherwise. Plain layers become
        :class:`~crosskv.cache.eviction.EvictedLayer`.
        """
        for shared in self.shared:
            sets = [positions.get(i) for i in shared.layers]
            if any(s is None for s in sets) or any(not torch.equal(s, sets[0]) for s in sets[1:]):
                raise ValueError(f"layers {shared.layers} share a compressed prefix but were given different "
                                 "token sets to keep")
        for idx, index in positions.items():
            layer = self.layers[idx]
            if isinstance(layer, PrefixLayer):
                layer.evict(index)
            else:
                self.layers[idx] = evict_plain(layer, index)
                self.layers[idx].layer_idx = idx

    def reset(self) -> None:
        """Forget every token, back to a new cache's state (a new prompt can be compressed again): every shared
        object's tensors (its ``release()``), every prefix layer's own tensors and exact tail (its
        :meth:`~crosskv.cache.layer.HeldLayer.reset`), and every other layer (plain, evicted, quantized) replaced
        by :meth:`fresh_layer`."""
        for shared in self.shared:
            shared.release()
        for index, layer in enumerate(self.layers):
            if isinstance(layer, PrefixLayer):
                layer.reset()
            else:
                self.layers[index] = self.fresh_layer(index)
                self.layers[index].layer_idx = index

    def fresh_layer(self, index: int) -> CacheLayerMixin:
        """A new cache's layer ``index`` outside the compressed range: a :class:`~crosskv.cache.plain.PlainLayer`."""
        return PlainLayer()

    def stored_tensors(self) -> Iterator[torch.Tensor]:
        for shared in self.shared:
            yield from shared.tensors()
        for layer in self.layers:
            if isinstance(layer, PrefixLayer):
                yield from layer.prefix_tensors()
            yield from layer_tensors(layer)

    def quantize_(self, spec: QuantSpec) -> None:
        """Store codes instead of floats: every shared object's and prefix layer's method tensors
        (their ``quantize_``), and every plain layer as a :class:`~crosskv.cache.quant.KiviLayer`."""
        for shared in self.shared:
            shared.quantize_(spec)
        for layer in self.layers:
            if isinstance(layer, PrefixLayer):
                layer.quantize_(spec)
        quantize_plain_layers(self, spec)

