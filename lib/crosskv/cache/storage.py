"""What a cache reports it stores: :func:`stored_tensors` yields every tensor a cache keeps (a custom cache
defines ``stored_tensors()``), :func:`kv_bytes` sums them. :mod:`crosskv.cache.census` checks it independently.
"""
from __future__ import annotations

from typing import Iterator

import torch
from transformers import Cache


def layer_tensors(layer) -> Iterator[torch.Tensor]:
    """Every tensor one cache layer keeps: its ``stored()`` if it defines one (a quantized layer), else K and V."""
    if hasattr(layer, "stored"):
        yield from layer.stored()
        return
    for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
        if tensor is not None and tensor.numel():
            yield tensor


def stored_tensors(cache: Cache) -> Iterator[torch.Tensor]:
    """Every tensor ``cache`` keeps. Custom caches define ``stored_tensors()``; plain caches hold their layers'."""
    if hasattr(cache, "stored_tensors"):
        yield from cache.stored_tensors()
        return
    for layer in cache.layers:
        yield from layer_tensors(layer)


def kv_bytes(cache: Cache, float_bytes: int | None = None) -> int:
    """Bytes held by ``cache`` (each storage counted once).

    ``float_bytes=2`` counts every floating tensor as 16-bit (the papers' baseline) whatever its dtype;
    integer tensors (packed quantized codes) always count at their real size.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in stored_tensors(cache):
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        size = float_bytes if (float_bytes and tensor.is_floating_point()) else tensor.element_size()
        total += tensor.numel() * size
    return total
