"""Cache layers holding a compressed prompt prefix plus exactly stored later tokens (xKV, SVD, MiniCache).

A :class:`PrefixLayer` keeps the tokens that arrived since the last compression exactly in
``keys``/``values`` ``(B, H_kv, t, d)``. Once its method compresses it, the prefix of ``T_c`` tokens
lives only in the method's own tensors (bases, factors, directions, …) and is rebuilt on every
``update`` by :meth:`PrefixLayer.prefix_kv`; new tokens (question, decoded) are appended exactly.
:class:`PrefixCache` is the container; its ``stored_tensors()`` yields every tensor held, each
shared tensor (a group's basis, a pair's direction) once.
"""
from __future__ import annotations

from typing import Iterator

import torch
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

from crosskv.methods.base import layer_tensors
from crosskv.methods.quant import QuantSpec, quantize_plain_layers


class PrefixLayer(DynamicLayer):
    """One layer: a compressed prefix (method-specific, rebuilt on demand) + exact tail tokens."""

    def __init__(self):
        super().__init__()
        self.prefix_len = 0  # T_c: tokens held in compressed form

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

    def get_seq_length(self) -> int:
        return self.prefix_len + self.tail_len()

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
        if max_length < self.prefix_len:
            raise ValueError(f"cannot crop to {max_length} tokens inside the compressed prefix of {self.prefix_len}")
        super().crop(max_length - self.prefix_len)

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
        self.shared: list = []
        self.in_prefill = False

    def stored_tensors(self) -> Iterator[torch.Tensor]:
        for shared in self.shared:
            yield from shared.tensors()
        for layer in self.layers:
            if isinstance(layer, PrefixLayer):
                yield from layer.prefix_tensors()
            yield from layer_tensors(layer)

    def quantize_(self, spec: QuantSpec) -> None:
        """Store codes instead of floats: every shared object's and prefix layer's method tensors
        (their ``quantize_``), and every plain layer as a :class:`~crosskv.methods.quant.KiviLayer`."""
        for shared in self.shared:
            shared.quantize_(spec)
        for layer in self.layers:
            if isinstance(layer, PrefixLayer):
                layer.quantize_(spec)
        quantize_plain_layers(self, spec)

