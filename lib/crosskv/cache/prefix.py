"""Cache layers holding a compressed prompt prefix plus exactly stored later tokens (xKV, SVD, MiniCache).

A :class:`PrefixLayer` keeps the tokens that arrived since the last compression exactly in
``keys``/``values`` ``(B, H_kv, t, d)``. Once its method compresses it, the prefix of ``T_c`` tokens
lives only in the method's own tensors (bases, factors, directions, …) and is rebuilt on every
``update`` by :meth:`PrefixLayer.prefix_kv`; new tokens (question, decoded) are appended exactly.
Eviction before compression (:meth:`PrefixLayer.evict`) drops prompt rows; the layer counts them in
``dropped`` so its sequence length, positions and masks stay absolute.
:class:`PrefixCache` is the container; its ``stored_tensors()`` yields every tensor held, each
shared tensor (a group's basis, a pair's direction) once.
"""
from __future__ import annotations

from typing import Iterator

import torch
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

from crosskv.cache.storage import layer_tensors
from crosskv.cache.eviction import evict_plain
from crosskv.cache.quant import QuantSpec, quantize_plain_layers


class PrefixLayer(DynamicLayer):
    """One layer: a compressed prefix (method-specific, rebuilt on demand) + exact tail tokens."""

    def __init__(self):
        super().__init__()
        self.prefix_len = 0  # T_c: tokens held in compressed form
        self.dropped = 0     # tokens seen but evicted (not held)

    def prefix_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rebuilt prefix K and V, each ``(B, H_kv, T_c, d)`` (post-RoPE keys, as attention expects)."""
        raise NotImplementedError

    def prefix_tensors(self) -> Iterator[torch.Tensor]:
        """Tensors this layer alone holds for its prefix (shared group tensors are yielded by the cache)."""
        return iter(())

    def quantize_(self, spec: QuantSpec) -> None:
        """Replace the tensors this layer alone holds for its prefix by codes (none by default)."""

    def attend_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V handed to the attention function: rebuilt prefix followed by the exact tail."""
        if not self.prefix_len:
            return self.keys, self.values
        keys, values = self.prefix_kv()
        return (torch.cat([keys.to(self.keys.dtype), self.keys], dim=-2),
                torch.cat([values.to(self.values.dtype), self.values], dim=-2))

    def update(self, key_states, value_states, cache_kwargs=None):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.on_append()
        return self.attend_kv()

    def on_append(self) -> None:
        """Hook run after new tokens were appended, before attention (strict compression)."""

    def tail_len(self) -> int:
        return 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]

    def held(self) -> int:
        """Tokens attention reads: the compressed prefix plus the exact tail."""
        return self.prefix_len + self.tail_len()

    def get_seq_length(self) -> int:
        return self.held() + self.dropped

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self.held() + cache_position.shape[0], self.dropped

    def evict(self, index: torch.Tensor) -> None:
        """Keep only the exact rows at ``index`` ``(kept,)`` (positions of the uncompressed prompt)."""
        if self.prefix_len or self.dropped:
            raise ValueError("eviction must precede compression and happen once")
        tokens = self.tail_len()
        index = index.to(self.keys.device)
        self.keys, self.values = self.keys.index_select(-2, index), self.values.index_select(-2, index)
        self.dropped = tokens - index.numel()

    def take_tail(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove and return the exact tokens ``(B, H_kv, t, d)`` each (called when compressing them)."""
        keys, values = self.keys, self.values
        # fresh empty tails: a zero-length view would pin the whole prompt's storage
        self.keys, self.values = keys.new_empty(*keys.shape[:-2], 0, keys.shape[-1]), \
            values.new_empty(*values.shape[:-2], 0, values.shape[-1])
        return keys, values

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self.get_seq_length() + max_length
        if max_length < self.prefix_len + self.dropped:
            raise ValueError(f"cannot crop to {max_length} tokens inside the compressed prefix of "
                             f"{self.prefix_len + self.dropped}")
        super().crop(max_length - self.prefix_len - self.dropped)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("compressed caches do not support beam search")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("compressed caches do not support beam search")


class PrefixCache(Cache):
    """Container of per-layer caches (``PrefixLayer`` inside the compressed range, ``DynamicLayer`` elsewhere).

    ``shared`` lists objects with a ``tensors()`` method (a group's basis, a pair's direction) whose
    tensors several layers read; they are counted once by :meth:`stored_tensors`.
    """

    def __init__(self, layers: list[CacheLayerMixin]):
        super().__init__(layers=layers)
        for index, layer in enumerate(layers):
            layer.layer_idx = index  # named in errors of the attention channel
        self.shared: list = []
        self.in_prefill = False

    def evict_tokens(self, kept: dict[int, torch.Tensor]) -> None:
        """Keep, per layer index, only the prompt rows at ``kept[layer]`` ``(kept,)`` (absolute positions).

        Layers sharing an object in ``shared`` (a group, a pair) must keep one token set, or rows of
        different tokens would be combined: ``ValueError`` otherwise. Plain layers become
        :class:`~crosskv.cache.eviction.EvictedLayer`.
        """
        for shared in self.shared:
            sets = [kept.get(i) for i in shared.layers]
            if any(s is None for s in sets) or any(not torch.equal(s, sets[0]) for s in sets[1:]):
                raise ValueError(f"layers {shared.layers} share a compressed prefix but were given different "
                                 "token sets to keep")
        for idx, index in kept.items():
            layer = self.layers[idx]
            if isinstance(layer, PrefixLayer):
                layer.evict(index)
            else:
                self.layers[idx] = evict_plain(layer, index)

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

