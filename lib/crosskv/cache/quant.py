"""KIVI-style asymmetric quantization of whatever a cache stores, as a post-compression step.

Codes are stored for real: ``uint8`` tensors packing 4 (2-bit), 2 (4-bit) or 1 (8-bit) values per
byte, plus one float16 scale and zero per group of ``group_size`` values. The codes, scales (and the
float residual window) are *all* the cache holds: a :class:`QTensor` takes the place of a float
tensor in a storage object and is dequantized on access, inside the forward that needs it, so no
dequantized copy survives a step.

- Plain K/V layers (``full``, evicted layers, layers outside a method's range, KVSharer producers)
  become :class:`KiviLayer`: keys quantized per channel (groups run along the token axis), values per
  token (groups run along the channel axis); the ``residual`` most recent tokens stay float.
- A method's own tensors (xKV/SVD bases and factors, MiniCache directions, magnitudes and retained
  rows, CommonKV latents) are quantized by the cache's ``quantize_(spec)``, per row of their last axis
  (CommonKV keeps its ``residual`` most recent latents float).

A :class:`KiviLayer`'s context is immutable once quantized; tokens appended after it (question, decoded) form
a stream of their own, quantized as KIVI does (in whole groups once they leave the stream's float ``residual``
window, never across the context's boundary), so held bytes stay near their target over long generations.
Its contract: (a) a block of ``n`` appended tokens gives the logits of ``n`` one-token forwards (each query
reads each token through codes exactly where it would have, fed alone: :class:`MixedPrefix`); (b) cropping
back to the context drops the stream exactly, any number of times, and cropping into the stream's codes is
refused (``ValueError``); (c) ``reset`` forgets everything; (f) ``stored()`` yields every tensor kept, and
nothing else is kept. Attention reads codes without dequantizing them (:class:`QuantizedPrefix`). A method's
own tensors keep the cross-layer convention: tokens appended after compression are stored exactly.
:func:`quantize_cache` sets ``cache.quant_storage = "real"``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Union

import torch
from transformers.cache_utils import DynamicLayer

from crosskv.cache.attention import CompressedPrefix, ConcatPrefix, ExactPrefix, compressed_kv
from crosskv.cache.kernels.kivi import kivi_decode_attention
from crosskv.cache.kernels.launch import use_kernel
from crosskv.cache.layer import HeldLayer
from crosskv.cache.static import StaticRefused

BITS = (2, 4, 8)


@dataclass(frozen=True)
class QuantSpec:
    """``bits`` ∈ {2, 4, 8}; ``group_size`` values share a scale/zero; ``residual`` recent tokens stay float
    (a plain layer's tokens beyond it are quantized in whole groups: the context's, and the appended stream's
    on its own)."""

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

    @property
    def group_size(self) -> int:
        return self.codes.shape[-1] * 8 // self.bits

    def dequantize(self) -> torch.Tensor:
        """The float tensor (original shape and dtype)."""
        codes = unpack(self.codes, self.bits, torch.float32)  # (*rest, G, group_size)
        values = torch.addcmul(self.zero.float(), codes, self.scale.float())
        values = values.flatten(-2)[..., :self.length]
        return values.movedim(-1, self.axis).to(self.dtype)

    def map(self, fn) -> "QTensor":
        """``fn`` applied to codes, scale and zero (a batch-first map: reorder, repeat, select)."""
        return QTensor(fn(self.codes), fn(self.scale), fn(self.zero), self.bits, self.axis, self.length, self.dtype)

    def extend(self, other: "QTensor") -> "QTensor":
        """``self`` followed by ``other`` (quantized alike) along axis −2 of the original tensor (tokens).

        Grouped along that axis, ``self`` must fill whole groups; the groups are concatenated. Grouped along
        another axis, the rows are concatenated.
        """
        ndim = self.codes.dim() - 1
        if (self.axis, self.bits) != (other.axis, other.bits):
            raise ValueError(f"cannot extend a {self.bits}-bit axis-{self.axis} QTensor by a "
                             f"{other.bits}-bit axis-{other.axis} one")
        if self.axis == ndim - 2:
            if self.length % self.group_size:
                raise ValueError(f"cannot extend a QTensor of {self.length} values grouped by {self.group_size}")
            dim, length = -2, self.length + other.length
        else:
            dim, length = -3, self.length
        return QTensor(torch.cat([self.codes, other.codes], dim), torch.cat([self.scale, other.scale], dim),
                       torch.cat([self.zero, other.zero], dim), self.bits, self.axis, length, self.dtype)


def unpack(codes: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Packed ``codes`` ``(..., n)`` uint8 → ``(..., n·8/bits)`` integer codes in ``dtype``: the lowest ``bits`` of
    every byte first, then the next (the planar layout of :func:`quantize`). Each plane is one elementwise op over
    the bytes, which compilers vectorize (an interleaved layout's per-value shift does not)."""
    levels = 2 ** bits - 1
    planes = [(codes >> shift) & levels for shift in range(0, 8, bits)]
    return torch.cat(planes, dim=-1).to(dtype)


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
    # planar: byte j of a group holds values j, j + gs/per, j + 2·gs/per, … in its lowest bits upwards
    packed = (codes.unflatten(-1, (per, -1)) << shifts[:, None]).sum(-2, dtype=torch.uint8)  # (*rest, G, gs/per)
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


@dataclass(frozen=True)
class QuantizedPrefix(CompressedPrefix):
    """A KIVI layer's quantized tokens as attention reads them, on the codes.

    ``keys`` per channel: codes ``(B, H, d, G, ·)``, scale/zero ``(B, H, d, G, 1)`` (G groups of tokens);
    ``values`` per token: codes ``(B, H, T, G_d, ·)``, scale/zero ``(B, H, T, G_d, 1)``. Key scales are
    folded into the query and value scales into the attention weights, so the only full-size temporary
    per step is each tensor's unpacked codes (in the query dtype); zeros enter as one small product each.
    """

    keys: QTensor
    values: QTensor

    @property
    def length(self) -> int:
        return self.keys.length

    def scores(self, q: torch.Tensor) -> torch.Tensor:
        """``q`` ``(B, H, n, d)`` → ``q·Kᵀ`` ``(B, H, n, T)`` float32: per group, ``(q⊙scale)·codes + q·zero``."""
        k = self.keys
        b, h, n, _ = q.shape
        codes = unpack(k.codes.transpose(2, 3), k.bits, q.dtype)           # (B, H, G, d, gs)
        scale = k.scale.squeeze(-1).transpose(2, 3).unsqueeze(3).float()   # (B, H, G, 1, d)
        zero = k.zero.squeeze(-1).transpose(2, 3).unsqueeze(3).float()     # (B, H, G, 1, d)
        qf = q.unsqueeze(2).float()                                        # (B, H, 1, n, d)
        scores = ((qf * scale).to(q.dtype) @ codes).float()                # (B, H, G, n, gs)
        scores = scores + (qf * zero).sum(-1, keepdim=True)
        return scores.transpose(2, 3).reshape(b, h, n, -1)[..., :k.length]

    def apply(self, probs: torch.Tensor) -> torch.Tensor:
        """``probs`` ``(B, H, n, T)`` → ``probs·V`` ``(B, H, n, d)``: per channel group, ``(P⊙scale)·codes + P·zero``."""
        v = self.values
        b, h, n, _ = probs.shape
        codes = unpack(v.codes.transpose(2, 3), v.bits, probs.dtype)       # (B, H, G_d, T, gs)
        scale = v.scale.squeeze(-1).transpose(2, 3).unsqueeze(3).float()   # (B, H, G_d, 1, T)
        pf = probs.float()
        out = ((pf.unsqueeze(2) * scale).to(probs.dtype) @ codes).float()  # (B, H, G_d, n, gs)
        zero = pf @ v.zero.squeeze(-1).float()                             # (B, H, n, G_d)
        out = out.transpose(2, 3) + zero.unsqueeze(-1)                     # (B, H, n, G_d, gs)
        return out.reshape(b, h, n, -1)[..., :v.length].to(probs.dtype)

    def fuses(self, q: torch.Tensor) -> bool:
        """Where the KIVI kernel runs (:func:`~crosskv.cache.kernels.launch.use_kernel`)."""
        return use_kernel(q)

    def decode(self, q, tail_k, tail_v, scale, bias):
        """The KIVI kernel: attention on the packed codes, dequantized in registers."""
        return kivi_decode_attention(q, self.keys, self.values, tail_k, tail_v, scale, bias)


def quantized_count(appended: int, spec: QuantSpec) -> int:
    """Tokens of an appended stream of ``appended`` tokens held as codes: whole groups beyond the float ``residual``."""
    beyond = max(0, appended - spec.residual)
    return beyond - beyond % spec.group_size


@dataclass(frozen=True)
class MixedPrefix(CompressedPrefix):
    """Tokens that a block's own queries read in two forms: query ``j`` reads token ``i`` through its codes where
    ``coded[j, i]``, else as the float row (as it would have, fed alone, when the token was still in the window).

    ``codes``: :class:`QuantizedPrefix` of the ``m`` tokens; ``keys``/``values`` ``(B, H, m, d)`` their float rows;
    ``coded`` ``(n, m)`` bool for the block's ``n`` queries (attention rows are ordered (group, query)).
    """

    codes: QuantizedPrefix
    keys: torch.Tensor
    values: torch.Tensor
    coded: torch.Tensor

    @property
    def length(self) -> int:
        return self.keys.shape[-2]

    def rows(self, n_rows: int) -> torch.Tensor:
        """``coded`` for every attention row ``(g·n, m)``: row ``r`` is query ``r mod n``."""
        return self.coded.repeat(n_rows // self.coded.shape[0], 1)

    def scores(self, q: torch.Tensor) -> torch.Tensor:
        exact = (q @ self.keys.transpose(-1, -2)).float()                  # (B, H, g·n, m)
        return torch.where(self.rows(q.shape[-2]), self.codes.scores(q), exact)

    def apply(self, probs: torch.Tensor) -> torch.Tensor:
        coded = self.rows(probs.shape[-2])                                 # (g·n, m)
        exact = probs.masked_fill(coded, 0) @ self.values.to(probs.dtype)  # (B, H, g·n, d)
        return self.codes.apply(probs.masked_fill(~coded, 0)) + exact


class KiviLayer(HeldLayer):
    """A plain K/V layer held as codes, KIVI-style: keys per channel, values per token.

    The **context** (the rows held when the layer is built) is immutable: its oldest whole groups beyond the
    ``residual`` window are codes (``qkeys``/``qvalues``), the rest float rows (``residual_keys``/``residual_values``
    ``(B, H, r, d)``, ``residual ≤ r < residual + group_size``), fixed for good. Tokens appended after it form a
    stream of their own, quantized on its own by the same rule (never across the context's boundary): codes
    ``appended_qkeys``/``appended_qvalues`` for its oldest whole groups, its newest tokens float in the
    base's exact tail ``keys``/``values``. So:

    - a block of ``n`` appended tokens gives what ``n`` one-token forwards give: query ``j`` reads the stream's
      tokens through codes exactly where it would have, fed alone (:class:`MixedPrefix` for the tokens that
      change form inside the block). Groups the block's last query read as codes are stored as codes when the
      next block is appended (so between forwards the float tail holds up to one block more than the window);
    - :meth:`crop` to the context length drops the whole stream (the layer is then byte for byte as built),
      any number of times; cropping elsewhere works inside the stream's float tail and raises ``ValueError``
      where tokens would need un-quantizing; :meth:`reset` forgets everything (the layer then holds plain rows,
      quantized as a new context by the next compression, as on a fresh cache);
    - :meth:`stored` yields every tensor kept, and nothing else is kept (slices are copied).

    Attention reads the codes through :class:`QuantizedPrefix` (the ``crosskv`` attention); :meth:`current_kv`
    dequantizes them.
    """

    def __init__(self, layer: DynamicLayer, spec: QuantSpec):
        super().__init__()
        self.dtype, self.device, self.is_initialized = layer.keys.dtype, layer.keys.device, True
        self.spec = spec
        self.seen = layer.get_seq_length()  # absolute tokens seen (more than held after eviction)
        keys, values = layer.keys, layer.values                              # (B, H, T, d)
        coded = split_residual(keys, spec.residual, multiple=spec.group_size)
        self.qkeys, self.qvalues = self.quantize_kv(keys[..., :coded, :], values[..., :coded, :])
        self.residual_keys, self.residual_values = keys[..., coded:, :].clone(), values[..., coded:, :].clone()
        self.context_rows = keys.shape[-2]
        self.appended_qkeys: QTensor | None = None
        self.appended_qvalues: QTensor | None = None
        self.keys, self.values = self.empty_rows(keys), self.empty_rows(values)
        self.prefix_len = self.context_rows
        self.block = 0  # tokens of the last append (the block attention reads next)
        self.plain_kv = False  # True after reset: plain rows until quantize_plain_layers builds a new context
        self.fix()

    @staticmethod
    def empty_rows(x: torch.Tensor) -> torch.Tensor:
        """A fresh ``(B, H, 0, d)`` tensor like ``x`` (a zero-length view would pin ``x``'s storage)."""
        return x.new_empty(*x.shape[:-2], 0, x.shape[-1])

    def quantize_kv(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[QTensor | None, QTensor | None]:
        """``(B, H, t, d)`` K per channel and V per token as codes (``None`` for ``t = 0``)."""
        if not keys.shape[-2]:
            return None, None
        bits, group = self.spec.bits, self.spec.group_size
        return quantize(keys, bits, group, axis=-2), quantize(values, bits, group, axis=-1)

    # --- the appended stream -------------------------------------------------------------------------------
    def appended(self) -> int:
        """Tokens appended after the context."""
        return self.seen - self.fixed

    def appended_coded(self) -> int:
        """Tokens of the appended stream stored as codes."""
        return 0 if self.appended_qkeys is None else self.appended_qkeys.length

    def flush(self) -> None:
        """Store as codes the stream's whole groups beyond its float window (what its last query read as codes)."""
        n = quantized_count(self.appended(), self.spec) - self.appended_coded()
        if n <= 0:
            return
        qk, qv = self.quantize_kv(self.keys[..., :n, :], self.values[..., :n, :])
        if self.appended_qkeys is not None:
            qk, qv = self.appended_qkeys.extend(qk), self.appended_qvalues.extend(qv)
        self.appended_qkeys, self.appended_qvalues = qk, qv
        self.keys, self.values = self.keys[..., n:, :].clone(), self.values[..., n:, :].clone()
        self.prefix_len += n

    def append(self, key_states, value_states) -> None:
        if not self.plain_kv:
            self.flush()
        super().append(key_states, value_states)
        self.block = key_states.shape[-2]

    def mixed(self, count: int) -> MixedPrefix:
        """The oldest ``count`` float-tail tokens, which the last block's queries read as codes from some query on."""
        spec, end = self.spec, self.appended()
        first = self.appended_coded()                                       # stream index of the first one
        steps = torch.arange(end - self.block + 1, end + 1, device=self.keys.device)  # tokens appended at each query
        coded_upto = (steps - spec.residual).clamp_min(0) // spec.group_size * spec.group_size  # (n,)
        index = torch.arange(first, first + count, device=self.keys.device)                      # (m,)
        keys, values = self.keys[..., :count, :], self.values[..., :count, :]
        return MixedPrefix(QuantizedPrefix(*self.quantize_kv(keys, values)), keys, values,
                           index[None, :] < coded_upto[:, None])

    def attend_kv(self):
        """The channel pair: context codes, context float rows, stream codes, the tokens changing form inside the
        last block (:class:`MixedPrefix`), then the float tail; plain K/V when nothing is quantized."""
        if self.plain_kv:
            return self.keys, self.values
        count = max(0, quantized_count(self.appended(), self.spec) - self.appended_coded()) if self.block else 0
        if self.qkeys is None and self.appended_qkeys is None and not count:
            return self.current_kv()
        segments = []
        if self.qkeys is not None:
            segments.append(QuantizedPrefix(self.qkeys, self.qvalues))
        if self.residual_keys.shape[-2]:
            segments.append(ExactPrefix(self.residual_keys, self.residual_values))
        if self.appended_qkeys is not None:
            segments.append(QuantizedPrefix(self.appended_qkeys, self.appended_qvalues))
        if count:
            segments.append(self.mixed(count))
        return compressed_kv(ConcatPrefix(tuple(segments)), self.keys[..., count:, :], self.values[..., count:, :],
                             self.layer_idx)

    def current_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``(B, H, held, d)`` as stored: codes dequantized now, float rows as they are, in token order."""
        keys = [dense(self.qkeys), self.residual_keys, dense(self.appended_qkeys), self.keys]
        values = [dense(self.qvalues), self.residual_values, dense(self.appended_qvalues), self.values]
        keys, values = [k for k in keys if k is not None], [v for v in values if v is not None]
        if len(keys) == 1:
            return keys[0], values[0]
        return torch.cat(keys, dim=-2), torch.cat(values, dim=-2)

    def frozen_prefix(self, capacity: int):
        """Context and stream frozen, for ``capacity`` decode tokens kept float in the static buffer: refused when
        the dynamic layer would quantize stream tokens within them (the static layout never re-codes)."""
        if not self.plain_kv and quantized_count(self.appended() + capacity, self.spec):
            room = self.spec.residual + self.spec.group_size - 1 - self.appended()
            raise StaticRefused(
                f"the KiviLayer of layer {self.layer_idx} would quantize its appended stream within {capacity} decode "
                f"tokens ({self.appended()} appended, residual {self.spec.residual}, group {self.spec.group_size}); "
                f"the static layout keeps decoded tokens float: at most {max(room, 0)} fit")
        return super().frozen_prefix(capacity)

    # --- editing -----------------------------------------------------------------------------------------
    def check_crop(self, max_length: int) -> None:
        """Allowed: the context length (drops the whole stream) or a point inside the stream's float tail."""
        coded = self.fixed + self.appended_coded()
        if max_length != self.fixed and max_length < coded:
            raise ValueError(
                f"cannot crop the KiviLayer of layer {self.layer_idx} to {max_length} tokens: its context holds "
                f"{self.fixed} tokens and the first {coded} of the {self.seen} seen are quantized; crop to the "
                f"context ({self.fixed}) or to at least {coded}")

    def drop_newest(self, count: int) -> None:
        """Cut the newest ``count`` tokens: float tail rows, or the whole appended stream (codes too)."""
        self.block = 0
        if count <= self.tail_len():
            super().drop_newest(count)
            return
        self.appended_qkeys = self.appended_qvalues = None
        self.keys, self.values = self.empty_rows(self.keys), self.empty_rows(self.values)
        self.prefix_len = self.context_rows

    def map_prefix(self, fn) -> None:
        for name in ("qkeys", "qvalues", "appended_qkeys", "appended_qvalues"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).map(fn))
        if self.residual_keys is not None:
            self.residual_keys, self.residual_values = fn(self.residual_keys), fn(self.residual_values)

    def release_prefix(self) -> None:
        """Forget the context and the stream: the layer then holds plain rows (:func:`is_plain`) until
        :func:`quantize_plain_layers` quantizes a new context, as on a fresh cache."""
        self.qkeys = self.qvalues = self.appended_qkeys = self.appended_qvalues = None
        self.residual_keys = self.residual_values = None
        self.context_rows = self.block = 0
        self.plain_kv = True

    def stored(self) -> Iterator[torch.Tensor]:
        for x in (self.qkeys, self.qvalues, self.residual_keys, self.residual_values,
                  self.appended_qkeys, self.appended_qvalues, self.keys, self.values):
            yield from parts(x)


def is_plain(layer) -> bool:
    """A layer holding plain K/V rows: exactly ``DynamicLayer``, or one marked ``plain_kv`` (a class: after
    eviction; an instance: a :class:`KiviLayer` after ``reset``)."""
    return type(layer) is DynamicLayer or getattr(layer, "plain_kv", False)


def quantize_plain_layers(cache, spec: QuantSpec) -> int:
    """Replace every initialized plain K/V layer of ``cache`` by a :class:`KiviLayer`; layers that read another
    layer's cache (a ``producer`` attribute: KVSharer's consumers) are pointed at the replacement.
    Returns how many layers were replaced."""
    replaced = {}
    for idx, layer in enumerate(cache.layers):
        if is_plain(layer) and layer.is_initialized and layer.keys.numel():
            cache.layers[idx] = replaced[id(layer)] = KiviLayer(layer, spec)
            cache.layers[idx].layer_idx = idx
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
