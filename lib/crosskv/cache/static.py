"""The static decode layout: a cache's compressed context frozen, decode steps written in place.

:func:`freeze` turns a cache after its prefill, compression and any exact block (the question) into a
:class:`StaticDecodeCache` — the layout of transformers' ``StaticCache`` for every crosskv layer kind: per layer,

- the **context**, frozen as one read-only :class:`~crosskv.cache.attention.CompressedPrefix` (the layer's own
  :meth:`~crosskv.cache.layer.HeldLayer.frozen_prefix`: factors, merged directions, codes, evicted rows, the exact
  rows of the question), built once, so work a dynamic cache repeats every step (dequantizing a group's basis,
  RoPE tables of the prefix positions) is done once per decode, and its bytes are counted by the census;
- a **buffer** ``keys``/``values`` ``(B, H_kv, capacity, d)`` preallocated for ``capacity`` decode tokens, written in
  place at ``cache_position − start`` (``index_copy_``); the length lives in a device tensor (:attr:`StaticDecodeCache.length`).

Every shape is fixed and no Python state changes per step, so a decode step runs under
``torch.compile(mode="reduce-overhead", fullgraph=True, dynamic=False)`` (:func:`compile_static`) without
recompiling: the buffer rows a query may read (those written at or before its position) come from
``cache_position`` as a ``(q, capacity)`` bool handed to the ``crosskv`` attention with the pair, so attention
ignores the model's mask. A prefix that depends on the step (selective: RoPE at the query's position) is a
:class:`StepPrefix`, resolved from ``cache_position`` inside the step.

The source cache is never written: the appended tokens live in the buffer only, so dropping them is dropping the
static cache. A layer kind that cannot be frozen exactly raises :class:`StaticRefused` naming it (xKV's
``attention="reconstruct"``; a KIVI stream whose decode would quantize; sliding-window layers).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from crosskv.cache.attention import CompressedKV, CompressedPrefix, ConcatPrefix, ExactPrefix, compressed_kv


class StaticRefused(ValueError):
    """A cache layer kind has no exact static layout; the message names the method or layer kind."""


class StepPrefix:
    """A frozen context whose prefix depends on the step's absolute positions (:meth:`at`)."""

    length: int

    def at(self, positions: torch.Tensor) -> CompressedPrefix:
        """``positions`` ``(q,)`` long (the step's ``cache_position``) → the prefix its queries read."""
        raise NotImplementedError


@dataclass(frozen=True)
class ReadsProducer:
    """A consumer layer's frozen context: it reads layer ``index``'s (KVSharer; :class:`StaticConsumer`)."""

    index: int


def as_prefix(keys, values) -> CompressedPrefix:
    """What a layer's ``attend_kv`` returns (a channel pair or K/V tensors ``(B, H_kv, T, d)``) as one prefix."""
    if isinstance(keys, CompressedKV):
        if not keys.keys.shape[-2]:
            return keys.prefix
        return ConcatPrefix((keys.prefix, ExactPrefix(keys.keys, keys.values)))
    return ExactPrefix(keys, values)


def resolve(prefix, positions: torch.Tensor) -> CompressedPrefix:
    """``prefix`` with every :class:`StepPrefix` (alone or a :class:`ConcatPrefix` segment) read at ``positions``."""
    if isinstance(prefix, StepPrefix):
        return prefix.at(positions)
    if isinstance(prefix, ConcatPrefix) and any(isinstance(s, StepPrefix) for s in prefix.segments):
        return ConcatPrefix(tuple(resolve(s, positions) for s in prefix.segments))
    return prefix


def tensors_of(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``obj``'s dataclass fields, tuples and lists (a frozen prefix), recursively."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from tensors_of(item)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for field in dataclasses.fields(obj):
            yield from tensors_of(getattr(obj, field.name))


class StaticLayer(CacheLayerMixin):
    """One layer: a frozen context ``prefix`` and a buffer of ``capacity`` rows for positions ``start…``."""

    is_compileable = True
    is_sliding = False

    def __init__(self, prefix, like: torch.Tensor, start: int, capacity: int, length: torch.Tensor,
                 layer_idx: int):
        super().__init__()
        b, h, _, d = like.shape
        self.prefix, self.start, self.capacity, self.length, self.layer_idx = prefix, start, capacity, length, layer_idx
        self.keys = like.new_zeros(b, h, capacity, d)                              # (B, H_kv, capacity, d)
        self.values = like.new_zeros(b, h, capacity, d)
        self.rows = torch.arange(start, start + capacity, device=like.device)      # (capacity,) absolute positions
        self.dtype, self.device, self.is_initialized = like.dtype, like.device, True
        if not torch.compiler.is_compiling():  # fixed addresses: CUDA graphs read them in place, never copy them
            for tensor in (self.keys, self.values, self.rows, self.length, *tensors_of(prefix)):
                torch._dynamo.mark_static_address(tensor)

    def lazy_initialization(self, key_states, value_states) -> None:
        """Allocated at construction."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs=None):
        """Write the step's K/V ``(B, H_kv, q, d)`` at ``cache_kwargs["cache_position"]`` ``(q,)``; return the pair."""
        positions = cache_kwargs["cache_position"]
        self.keys.index_copy_(2, positions - self.start, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, positions - self.start, value_states.to(self.values.dtype))
        self.length.copy_(positions[-1] + 1)
        return self.read(positions)

    def read(self, positions: torch.Tensor):
        """The channel pair for queries at ``positions`` ``(q,)``: the context, then the buffer rows written at or
        before each query (``visible`` ``(q, capacity)``)."""
        visible = self.rows[None, :] <= positions[:, None]
        return compressed_kv(resolve(self.prefix, positions), self.keys, self.values, self.layer_idx, visible)

    def get_seq_length(self) -> int:
        return int(self.length)

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        """Fixed sizes (the ``crosskv`` attention masks the buffer itself): context rows + capacity, no offset."""
        return self.prefix.length + self.capacity, 0

    def get_max_cache_shape(self) -> int:
        return self.start + self.capacity

    def reset(self) -> None:
        """Forget the decoded tokens (the frozen context stays)."""
        self.keys.zero_()
        self.values.zero_()
        self.length.fill_(self.start)


class StaticConsumer(CacheLayerMixin):
    """A KVSharer consumer in the static layout: discards its own K/V and reads its producer's pair."""

    is_compileable = True
    is_sliding = False

    def __init__(self, producer: StaticLayer):
        super().__init__()
        self.producer = producer
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        """Nothing to allocate."""

    def update(self, key_states, value_states, cache_kwargs=None):
        return self.producer.read(cache_kwargs["cache_position"])

    def get_seq_length(self) -> int:
        return self.producer.get_seq_length()

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self.producer.get_mask_sizes(cache_position)

    def get_max_cache_shape(self) -> int:
        return self.producer.get_max_cache_shape()

    def reset(self) -> None:
        """The producer holds the data."""


class StaticDecodeCache(Cache):
    """The static layout of a frozen cache (:func:`freeze`): decode tokens at positions ``start … start+capacity−1``."""

    def __init__(self, layers: list[CacheLayerMixin], start: int, capacity: int, length: torch.Tensor):
        super().__init__(layers=layers)
        self.start, self.capacity, self.length = start, capacity, length

    def check_room(self, steps: int) -> None:
        """Raise ``ValueError`` unless ``steps`` more tokens fit (call outside the compiled step)."""
        used = self.get_seq_length() - self.start
        if used + steps > self.capacity:
            raise ValueError(f"the static cache holds {self.capacity} decode tokens after position {self.start}; "
                             f"{used} are used, {steps} more do not fit")


def _frozen(layer, capacity: int, index: int):
    if getattr(layer, "is_sliding", False):
        raise StaticRefused(f"layer {index} is a sliding-window layer: it has no static layout here")
    if hasattr(layer, "frozen_prefix"):
        return layer.frozen_prefix(capacity)
    if layer.keys is None:
        raise StaticRefused(f"layer {index} ({type(layer).__name__}) holds nothing: freeze a cache after its prefill")
    return ExactPrefix(layer.keys, layer.values)


def _template(layer) -> torch.Tensor:
    """A ``(B, H_kv, ·, d)`` tensor of the layer's K dtype and device: its exact rows, or its ``buffer_template()``
    (a layer that holds no exact rows, e.g. CommonKV's latents)."""
    if hasattr(layer, "buffer_template"):
        return layer.buffer_template()
    return layer.keys


def freeze(cache: Cache, capacity: int, start: int) -> StaticDecodeCache:
    """The static layout of ``cache`` (after prefill, compression and any exact block) with room for ``capacity``
    decode tokens at absolute positions ``start…`` (the tokens fed so far: a kvpress cache counts only the rows it
    kept); each step passes its absolute ``cache_position``. ``cache`` is not modified and must not be written while
    the static cache is used (it shares its stored tensors). Raises :class:`StaticRefused` naming a layer kind
    without an exact static layout."""
    if capacity < 1:
        raise ValueError(f"capacity={capacity} must be ≥ 1 decode token")
    if start < 1 or start < cache.get_seq_length():
        raise ValueError(f"start={start}: the first decode position must follow the {cache.get_seq_length()} tokens "
                         "the cache holds (freeze a cache after its prefill)")
    frozen = [_frozen(layer, capacity, index) for index, layer in enumerate(cache.layers)]
    templates = {i: _template(layer) for i, (layer, prefix) in enumerate(zip(cache.layers, frozen))
                 if not isinstance(prefix, ReadsProducer)}
    length = torch.full((), start, dtype=torch.long, device=templates[min(templates)].device)
    layers: list[CacheLayerMixin | None] = [None] * len(frozen)
    for index, template in templates.items():
        layers[index] = StaticLayer(frozen[index], template, start, capacity, length, index)
    for index, prefix in enumerate(frozen):
        if isinstance(prefix, ReadsProducer):
            producer = layers[prefix.index]
            if not isinstance(producer, StaticLayer):
                raise StaticRefused(f"layer {index} reads layer {prefix.index}, which is itself a consumer")
            layers[index] = StaticConsumer(producer)
    return StaticDecodeCache(layers, start, capacity, length)


def compile_static(model):
    """``model`` compiled for static decode steps: ``torch.compile(mode="reduce-overhead", fullgraph=True,
    dynamic=False)`` (CUDA graphs on a GPU; on a CPU reduce-overhead compiles without graphs)."""
    return torch.compile(model, mode="reduce-overhead", fullgraph=True, dynamic=False)
