"""KIVI-style asymmetric quantization of whatever a cache stores, as a post-compression step.

Codes are stored for real: ``uint8`` tensors packing 4 (2-bit), 2 (4-bit) or 1 (8-bit) values per
byte, plus one float16 scale and zero per group of ``group_size`` values. The codes, scales (and the
float residual window) are *all* the cache holds: a :class:`QTensor` takes the place of a float
tensor in a storage object and is dequantized on access, inside the forward that needs it, so no
dequantized copy survives a step.

- Plain K/V layers (``full``, evicted layers, layers outside a method's range, KVSharer producers)
  become :class:`KiviLayer`: keys quantized per channel (groups run along the token axis), values per
  token (groups run along the channel axis); the ``residual`` most recent prompt tokens stay float.
- A method's own tensors (xKV/SVD bases and factors, MiniCache directions, magnitudes and retained
  rows, CommonKV latents) are quantized by the cache's ``quantize_(spec)``, per row of their last axis
  (CommonKV keeps its ``residual`` most recent latents float).

Tokens appended after compression (question, decoded) are stored exactly, the same convention as
every cross-layer method here. :func:`quantize_cache` sets ``cache.quant_storage = "real"``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Union

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
        """The float tensor (original shape and dtype), unpacked through a 256-entry table of each byte's codes."""
        codes = _unpack_table(self.bits, self.codes.device)[self.codes.int()].flatten(-2)  # (*rest, G, group_size)
        values = torch.addcmul(self.zero.float(), codes, self.scale.float())
        values = values.flatten(-2)[..., :self.length]
        return values.movedim(-1, self.axis).to(self.dtype)


def _unpack_table(bits: int, device: torch.device) -> torch.Tensor:
    """``(256, 8 // bits)`` float32: the codes packed in each possible byte, lowest bits first."""
    shifts = torch.arange(8 // bits, dtype=torch.uint8, device=device) * bits
    byte = torch.arange(256, dtype=torch.uint8, device=device)
    return ((byte[:, None] >> shifts) & (2 ** bits - 1)).float()


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
    shifts = torch.arange(per, dtype=torch.uint8, device=x.device) * bits
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


Stored = Union[torch.Tensor, QTensor]


def dense(x: Stored | None) -> torch.Tensor | None:
    """The float tensor behind ``x``: ``x`` itself, or a :class:`QTensor` dequantized now (a per-step temporary)."""
    return x.dequantize() if isinstance(x, QTensor) else x


def parts(x: Stored | None) -> Iterator[torch.Tensor]:
    """The tensors ``x`` holds: codes, scale and zero of a :class:`QTensor`, else ``x`` itself (if non-empty)."""
    if isinstance(x, QTensor):
        yield from x.tensors()
    elif x is not None and x.numel():
        yield x


def quantize_rows(x: Stored | None, spec: "QuantSpec") -> Stored | None:
    """Quantize a floating ``x`` per row of its last axis (method tensors: bases, factors, directions…);
    already quantized, integer or empty tensors are returned unchanged."""
    if x is None or isinstance(x, QTensor) or not x.is_floating_point() or not x.numel():
        return x
    return quantize(x, spec.bits, spec.group_size, axis=-1)


class KiviLayer(DynamicLayer):
    """A plain K/V layer whose prompt prefix is held as codes only: keys per channel, values per token.

    ``keys``/``values`` ``(B, H, t, d)`` hold the float tail (residual window + appended tokens);
    ``qkeys``/``qvalues`` the quantized prefix of ``n_q`` tokens, dequantized on every :meth:`update`.
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
        self.keys, self.values = keys[..., n_q:, :].clone(), values[..., n_q:, :].clone()

    def update(self, key_states, value_states, cache_kwargs=None):
        self.seen += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.current_kv()

    def current_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``(B, H, n_q + t, d)`` for attention: the prefix dequantized now, then the float tail."""
        if self.qkeys is None:
            return self.keys, self.values
        return (torch.cat([self.qkeys.dequantize(), self.keys], dim=-2),
                torch.cat([self.qvalues.dequantize(), self.values], dim=-2))

    def held(self) -> int:
        return self.n_q + self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        held = self.held()
        return held + cache_position.shape[0], self.seen - held

    def crop(self, max_length: int) -> None:
        """Drop the newest float tokens down to ``max_length`` seen (only tokens appended after quantization)."""
        max_length = self.seen + max_length if max_length < 0 else max_length
        if max_length >= self.seen:
            return
        if max_length < self.quantized_at:
            raise ValueError(f"cannot crop to {max_length} tokens: the first {self.quantized_at} were quantized")
        keep = self.keys.shape[-2] - (self.seen - max_length)
        self.keys, self.values = self.keys[..., :keep, :].clone(), self.values[..., :keep, :].clone()  # no view pins the old storage
        self.seen = max_length

    def stored(self) -> Iterator[torch.Tensor]:
        for q in (self.qkeys, self.qvalues):
            yield from parts(q)
        yield from parts(self.keys)
        yield from parts(self.values)


def is_plain(layer) -> bool:
    """A layer holding plain K/V rows: exactly ``DynamicLayer``, or a class marked ``plain_kv`` (after eviction)."""
    return type(layer) is DynamicLayer or getattr(type(layer), "plain_kv", False)


def quantize_plain_layers(cache, spec: QuantSpec) -> int:
    """Replace every initialized plain K/V layer of ``cache`` by a :class:`KiviLayer`; layers that read another
    layer's cache (a ``producer`` attribute: KVSharer's consumers) are pointed at the replacement.
    Returns how many layers were replaced."""
    replaced = {}
    for idx, layer in enumerate(cache.layers):
        if is_plain(layer) and layer.is_initialized and layer.keys.numel():
            cache.layers[idx] = replaced[id(layer)] = KiviLayer(layer, spec)
    for layer in cache.layers:
        producer = getattr(layer, "producer", None)
        if producer is not None and id(producer) in replaced:
            layer.producer = replaced[id(producer)]
    return len(replaced)


def quantize_cache(cache, spec: QuantSpec) -> str:
    """Quantize ``cache`` in place after its method's compression: the cache's own ``quantize_(spec)`` when it
    defines one (method tensors + its plain layers), else every plain K/V layer. Returns (and sets
    ``cache.quant_storage`` to) ``"real"``: codes and scales are all that is held."""
    if hasattr(type(cache), "quantize_"):
        cache.quantize_(spec)
    else:
        quantize_plain_layers(cache, spec)
    cache.quant_storage = "real"
    return cache.quant_storage
