"""KIVI-style asymmetric quantization of whatever a cache stores, as a post-compression step.

Codes are stored for real: ``uint8`` tensors packing 4 (2-bit), 2 (4-bit) or 1 (8-bit) values per
byte, plus one float16 scale and zero per group of ``group_size`` values. Keys of a plain K/V cache
are quantized per channel (groups run along the token axis), values per token (groups run along the
channel axis); a latent cache (CommonKV) is quantized per token. The ``residual`` most recent prompt
tokens stay in full precision, and tokens appended after compression (question, decoded) are stored
exactly, the same convention as every cross-layer method here.

:func:`quantize_cache` stores codes for real where it can, and says which in ``cache.quant_storage``:

- ``"packed"`` — the cache defines ``quantize_(spec)`` (CommonKV keeps codes instead of latents), or every
  layer is a plain K/V layer (full, after eviction): each becomes a :class:`KiviLayer` (codes + float tail);
- ``"packed+simulated"`` / ``"simulated"`` — a method's own tensors (xKV/SVD bases and factors, MiniCache
  directions, KVSharer producers): plain layers still become :class:`KiviLayer` (not under KVSharer, whose
  consumers hold references to their producers), every other stored floating tensor is quantized per
  row of its last axis, its codes are kept and the dequantized values written back in place (the
  method attends with them). ``kv_bytes`` counts codes + scales for every tensor still held in that
  form and full floats for tensors the method creates later (conservative).

In the packed paths the dequantized floats are kept as a *working buffer* for attention (decode speed);
they are reported by ``working_tensors()`` and are not the stored cache.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers.cache_utils import DynamicLayer

BITS = (2, 4, 8)


@dataclass(frozen=True)
class QuantSpec:
    """``bits`` ∈ {2, 4, 8}; ``group_size`` values share a scale/zero; ``residual`` recent prompt tokens stay float."""

    bits: int = 4
    group_size: int = 32
    residual: int = 128

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"bits={self.bits} is not one of {BITS}")
        if self.group_size < 4 or self.group_size % 4:
            raise ValueError(f"group_size={self.group_size} must be a positive multiple of 4")
        if self.residual < 0:
            raise ValueError(f"residual={self.residual} must be >= 0")


@dataclass
class QTensor:
    """A tensor quantized in groups along ``axis``: packed ``codes`` (uint8) and float16 ``scale``/``zero``.

    ``codes`` is ``(*rest, n_groups, group_size·bits/8)``; ``scale``/``zero`` are ``(*rest, n_groups, 1)``
    where ``rest`` is the original shape without ``axis``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    axis: int
    length: int
    dtype: torch.dtype

    def tensors(self) -> Iterator[torch.Tensor]:
        yield from (self.codes, self.scale, self.zero)

    def dequantize(self) -> torch.Tensor:
        per = 8 // self.bits
        shifts = torch.arange(per, device=self.codes.device, dtype=torch.uint8) * self.bits
        codes = (self.codes.unsqueeze(-1) >> shifts) & (2 ** self.bits - 1)  # (*rest, G, bytes, per)
        codes = codes.flatten(-2).float()  # (*rest, G, group_size)
        values = codes * self.scale.float() + self.zero.float()
        values = values.flatten(-2)[..., :self.length]
        return values.movedim(-1, self.axis).to(self.dtype)


def _round_down_half(x: torch.Tensor) -> torch.Tensor:
    """float32 → float16, never above ``x``."""
    half = x.half()
    return torch.where(half.float() > x, torch.nextafter(half, torch.full_like(half, -torch.inf)), half)


def _round_up_half(x: torch.Tensor) -> torch.Tensor:
    """float32 → float16, never below ``x``."""
    half = x.half()
    return torch.where(half.float() < x, torch.nextafter(half, torch.full_like(half, torch.inf)), half)


def quantize(x: torch.Tensor, bits: int, group_size: int, axis: int = -1) -> QTensor:
    """Asymmetric min/max quantization of ``x`` in groups of ``group_size`` consecutive values along ``axis``.

    Every value is within half a step (``scale/2``) of its reconstruction: the float16 zero is rounded
    down and the scale up, and codes are computed from the stored (rounded) zero and scale.
    """
    if bits not in BITS:
        raise ValueError(f"bits={bits} is not one of {BITS}")
    axis = axis % x.dim()
    moved = x.movedim(axis, -1).float()
    length = moved.shape[-1]
    pad = (-length) % group_size
    if pad:
        moved = torch.cat([moved, moved[..., -1:].expand(*moved.shape[:-1], pad)], dim=-1)
    grouped = moved.unflatten(-1, (-1, group_size))  # (*rest, G, group_size)
    levels = 2 ** bits - 1
    zero = _round_down_half(grouped.amin(-1, keepdim=True))
    span = grouped.amax(-1, keepdim=True) - zero.float()
    scale = _round_up_half((span / levels).clamp_min(1e-5))
    codes = ((grouped - zero.float()) / scale.float()).round().clamp(0, levels).to(torch.uint8)
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.uint8) * bits
    packed = (codes.unflatten(-1, (-1, per)) << shifts).sum(-1, dtype=torch.uint8)  # (*rest, G, gs/per)
    return QTensor(packed, scale, zero, bits, axis, length, x.dtype)


def step_size(q: QTensor) -> torch.Tensor:
    """Each value's quantization step, broadcast back to the original shape (for error bounds)."""
    steps = q.scale.float().expand(*q.scale.shape[:-1], q.codes.shape[-1] * 8 // q.bits)
    return steps.flatten(-2)[..., :q.length].movedim(-1, q.axis)


def split_residual(x: torch.Tensor, residual: int, multiple: int = 1, axis: int = -2) -> int:
    """Tokens to quantize along ``axis`` of ``x``: all but the last ``residual``, rounded down to ``multiple``."""
    quantized = max(0, x.shape[axis] - residual)
    return quantized - quantized % multiple


class KiviLayer(DynamicLayer):
    """A plain K/V layer whose prompt prefix is held as codes: keys per channel, values per token.

    ``keys``/``values`` ``(B, H, t, d)`` hold the float tail (residual window + appended tokens);
    ``qkeys``/``qvalues`` the quantized prefix of ``n_q`` tokens.
    """

    def __init__(self, layer: DynamicLayer, spec: QuantSpec):
        super().__init__()
        keys, values = layer.keys, layer.values
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.seen = layer.get_seq_length()  # absolute tokens seen (more than held after eviction)
        self.quantized_at = self.seen  # tokens appended after quantization can be cropped again
        n_q = split_residual(keys, spec.residual, multiple=spec.group_size)
        self.n_q = n_q
        self.qkeys = quantize(keys[..., :n_q, :], spec.bits, spec.group_size, axis=-2) if n_q else None
        self.qvalues = quantize(values[..., :n_q, :], spec.bits, spec.group_size, axis=-1) if n_q else None
        self._prefix = (self.qkeys.dequantize(), self.qvalues.dequantize()) if n_q else None
        self.keys, self.values = keys[..., n_q:, :].clone(), values[..., n_q:, :].clone()

    def update(self, key_states, value_states, cache_kwargs=None):
        self.seen += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if self._prefix is None:
            return self.keys, self.values
        return torch.cat([self._prefix[0], self.keys], dim=-2), torch.cat([self._prefix[1], self.values], dim=-2)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        held = self.n_q + self.keys.shape[-2]
        return held + cache_position.shape[0], self.seen - held

    def crop(self, max_length: int) -> None:
        """Drop the newest float tokens down to ``max_length`` seen (only tokens appended after quantization)."""
        max_length = self.seen + max_length if max_length < 0 else max_length
        if max_length >= self.seen:
            return
        if max_length < self.quantized_at:
            raise ValueError(f"cannot crop to {max_length} tokens: the first {self.quantized_at} were quantized")
        keep = self.keys.shape[-2] - (self.seen - max_length)
        self.keys, self.values, self.seen = self.keys[..., :keep, :], self.values[..., :keep, :], max_length

    def stored(self) -> Iterator[torch.Tensor]:
        for q in (self.qkeys, self.qvalues):
            if q is not None:
                yield from q.tensors()
        yield from (self.keys, self.values)

    def working(self) -> Iterator[torch.Tensor]:
        if self._prefix is not None:
            yield from self._prefix


def _kivi_layers(cache) -> list[KiviLayer]:
    return [layer for layer in cache.layers if isinstance(layer, KiviLayer)]


def _kivi_stored(cache) -> Iterator[torch.Tensor]:
    for layer in cache.layers:
        if isinstance(layer, KiviLayer):
            yield from layer.stored()
        elif getattr(layer, "keys", None) is not None:
            yield from (t for t in (layer.keys, layer.values) if t.numel())


def _kivi_working(cache) -> Iterator[torch.Tensor]:
    for layer in _kivi_layers(cache):
        yield from layer.working()


def is_plain(layer) -> bool:
    """A layer holding plain K/V rows: exactly ``DynamicLayer``, or a class marked ``plain_kv`` (after eviction)."""
    return type(layer) is DynamicLayer or getattr(type(layer), "plain_kv", False)


def _to_kivi(cache, spec: QuantSpec) -> int:
    """Replace every initialized plain K/V layer by a :class:`KiviLayer` (unless other layers hold references
    to layer objects, as KVSharer's consumers do); returns how many were replaced."""
    if any(hasattr(layer, "producer") for layer in cache.layers):
        return 0
    replaced = 0
    for idx, layer in enumerate(cache.layers):
        if is_plain(layer) and layer.is_initialized and layer.keys.numel():
            cache.layers[idx] = KiviLayer(layer, spec)
            replaced += 1
    return replaced


def _class_stored(cache) -> Iterator[torch.Tensor]:
    """The cache class's own ``stored_tensors`` (bypassing an instance override), or the base accounting."""
    method = getattr(type(cache), "stored_tensors", None)
    if method is not None:
        yield from method(cache)
    else:
        yield from _kivi_stored(cache)


def _quantize_simulated(cache, spec: QuantSpec) -> None:
    """Fake-quantize every stored floating tensor not in a :class:`KiviLayer` in place (groups along its last
    axis), keep the codes, and count codes + scales for each tensor still held in that form."""
    def kivi_tails() -> set[int]:
        return {t.data_ptr() for layer in _kivi_layers(cache) for t in (layer.keys, layer.values)}

    held: dict[tuple[int, tuple[int, ...]], QTensor] = {}
    skip = kivi_tails()
    for tensor in list(_class_stored(cache)):
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if not tensor.is_floating_point() or not tensor.numel() or key in held or key[0] in skip:
            continue
        q = quantize(tensor, spec.bits, spec.group_size, axis=-1)
        tensor.copy_(q.dequantize())
        held[key] = q

    def simulated_stored(self) -> Iterator[torch.Tensor]:
        tails = kivi_tails()
        for layer in _kivi_layers(self):
            yield from layer.stored()
        for tensor in _class_stored(self):
            if tensor.data_ptr() in tails:
                continue
            q = held.get((tensor.data_ptr(), tuple(tensor.shape)))
            yield from (q.tensors() if q is not None else (tensor,))

    cache.stored_tensors = types.MethodType(simulated_stored, cache)


def quantize_cache(cache, spec: QuantSpec) -> str:
    """Quantize ``cache`` in place after its method's compression; returns (and sets ``cache.quant_storage`` to)
    the storage path: ``packed`` (all codes stored for real), ``packed+simulated`` or ``simulated``."""
    if hasattr(type(cache), "quantize_"):
        cache.quantize_(spec)
        path = "packed"
    else:
        replaced = _to_kivi(cache, spec)
        custom = hasattr(type(cache), "stored_tensors") or not all(
            isinstance(layer, KiviLayer) or not layer.is_initialized for layer in cache.layers)
        if custom:
            _quantize_simulated(cache, spec)
            path = "packed+simulated" if replaced else "simulated"
        else:
            cache.stored_tensors = types.MethodType(_kivi_stored, cache)
            path = "packed"
        if replaced:
            cache.working_tensors = types.MethodType(_kivi_working, cache)
    cache.quant_storage = path
    return path


def working_tensors(cache) -> Iterator[torch.Tensor]:
    """Float working buffers a cache keeps besides its stored tensors (dequantized/rebuilt K, V), if any."""
    if hasattr(cache, "working_tensors"):
        yield from cache.working_tensors()
