"""Plain (uncompressed) cache storage that keeps the cache contract: :class:`PlainLayer` and :class:`PlainCache`.

transformers' ``DynamicLayer`` stores every token's K/V ``(B, H_kv, T, d)`` but breaks two promises of the
contract (:mod:`crosskv.cache.layer`): its ``reset`` zeroes the rows and keeps their length (a new prompt would
attend to zero rows), and its ``crop`` keeps views that pin the longer storage (held bytes exceed the rows
kept). A :class:`PlainLayer` forgets every token on reset and copies the kept rows on crop; a
:class:`PlainCache` is the ``DynamicCache`` of the model's config built from them, and its reset gives back
fresh plain layers (forgetting any eviction or quantization a composition applied to them). ``full``, the
kvpress presses and KVSharer's producers store their rows this way.
"""
from __future__ import annotations

from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin, DynamicLayer


class PlainLayer(DynamicLayer):
    """A ``DynamicLayer`` whose :meth:`reset` forgets every token and whose :meth:`crop` copies the kept rows."""

    plain_kv = True  # its rows can be evicted (crosskv.cache.eviction) and quantized (crosskv.cache.quant)

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens (negative: drop that many), as copies: no view pins the longer
        storage."""
        length = self.get_seq_length()
        max_length = length + max_length if max_length < 0 else max_length
        if max_length >= length:
            return
        self.keys = self.keys[..., :max_length, :].clone()
        self.values = self.values[..., :max_length, :].clone()

    def reset(self) -> None:
        """Forget every token: nothing held, and the next update starts a new sequence (any batch size)."""
        self.keys = self.values = None
        self.is_initialized = False


def plain_layers(config) -> list[CacheLayerMixin]:
    """The layers of a new ``DynamicCache`` for the model ``config``, each full-attention one a :class:`PlainLayer`
    (sliding-window layers stay transformers' own)."""
    return [PlainLayer() if type(layer) is DynamicLayer else layer for layer in DynamicCache(config=config).layers]


class PlainCache(DynamicCache):
    """The plain cache of a model ``config``: :class:`PlainLayer` storage; :meth:`reset` builds fresh layers."""

    def __init__(self, config):
        super().__init__(config=config)
        self.model_config = config
        self.layers[:] = plain_layers(config)

    def reset(self) -> None:
        """Forget every token, as a new cache: every layer (evicted, quantized or plain) replaced by a fresh
        plain one."""
        self.layers[:] = plain_layers(self.model_config)
