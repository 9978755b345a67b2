"""Decode attention on a KIVI-quantized prefix, straight from its packed codes.

The prefix is a :class:`crosskv.cache.quant.QuantizedPrefix`'s pair of :class:`~crosskv.cache.quant.QTensor`:
``keys`` ``(B, H_kv, T_c, d)`` quantized per channel (groups along the tokens: codes ``(B, H_kv, d, G, ·)``),
``values`` per token (groups along the channels: codes ``(B, H_kv, T_c, G_d, ·)``), float16 scale and zero.
The kernel (:mod:`.triton_kivi`) dequantizes tiles in registers; the exact tail joins through a merged
softmax (:mod:`.combine`). :func:`kivi_decode_attention` runs the kernel when :func:`.launch.use_kernel`
says so, else :func:`kivi_decode_attention_eager` (codes dequantized densely).
"""
from __future__ import annotations

import torch

from crosskv.cache.kernels.combine import default_scale, dense_decode_attention, merge, tail_partial
from crosskv.cache.kernels.launch import LAUNCHES, block, precision, split_plan, use_kernel

# ``QTensor`` below is crosskv.cache.quant's (annotations only: that module dispatches to this one, and the kernel
# reads a QTensor's fields without importing it)

BLOCK_T = 64  # tokens per tile on a GPU (untuned)


def check_kivi(q: torch.Tensor, keys: QTensor, values: QTensor) -> None:
    """Raise ``ValueError`` naming what does not fit ``q`` ``(B, H_kv, g, d)``: KIVI layouts, bits, sizes."""
    if q.dim() != 4:
        raise ValueError(f"q has shape {tuple(q.shape)}; expected (B, H_kv, g, d)")
    b, h, _, d = q.shape
    if keys.axis != 2 or keys.codes.dim() != 5 or tuple(keys.codes.shape[:3]) != (b, h, d):
        raise ValueError(f"keys: axis={keys.axis}, codes {tuple(keys.codes.shape)}; expected per-channel "
                         f"groups along the tokens (axis 2), codes ({b}, {h}, {d}, G, ·)")
    if values.axis != 3 or values.codes.dim() != 5 or tuple(values.codes.shape[:3]) != (b, h, keys.length):
        raise ValueError(f"values: axis={values.axis}, codes {tuple(values.codes.shape)}; expected per-token "
                         f"groups along the channels (axis 3), codes ({b}, {h}, {keys.length}, G_d, ·)")
    if values.length != d:
        raise ValueError(f"values hold {values.length} channels; q has head_dim {d}")
    if keys.bits != values.bits:
        raise ValueError(f"keys have {keys.bits} bits and values {values.bits}; the kernel reads one width")


def kivi_decode_attention(q: torch.Tensor, keys: QTensor, values: QTensor, tail_k: torch.Tensor,
                          tail_v: torch.Tensor, scale: float | None = None, bias: torch.Tensor | None = None,
                          block_t: int = BLOCK_T, splits: int | None = None) -> torch.Tensor:
    """One decode step over a quantized prefix and an exact tail: ``(B, H_kv, g, d)`` in ``q``'s dtype.

    ``tail_k``/``tail_v`` ``(B, H_kv, t, d)`` (``t`` may be 0); ``bias`` ``(B, T_c + t)`` additive or ``None``;
    ``scale`` defaults to ``d**-0.5``. One float32 softmax over prefix and tail scores.
    """
    check_kivi(q, keys, values)
    scale = default_scale(q, scale)
    if not use_kernel(q):
        return kivi_decode_attention_eager(q, keys, values, tail_k, tail_v, scale, bias)
    prefix_bias = None if bias is None else bias[:, :keys.length]
    partial = run_kivi_kernel(q, keys, values, scale, prefix_bias, block_t, splits)
    tail_bias = None if bias is None else bias[:, keys.length:]
    prefix_out, tail_out = merge(partial, tail_partial(q, tail_k, tail_v, scale, tail_bias))
    return (prefix_out + tail_out).to(q.dtype)


def kivi_decode_attention_eager(q: torch.Tensor, keys: QTensor, values: QTensor, tail_k: torch.Tensor,
                                tail_v: torch.Tensor, scale: float | None = None,
                                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of :func:`kivi_decode_attention`: codes dequantized densely, one softmax."""
    full_bias = None if bias is None else bias[:, None, None, :]
    return dense_decode_attention(q, keys.dequantize(), values.dequantize(), tail_k, tail_v,
                                  default_scale(q, scale), full_bias)


def run_kivi_kernel(q: torch.Tensor, keys: QTensor, values: QTensor, scale: float, bias: torch.Tensor | None,
                    block_t: int = BLOCK_T, splits: int | None = None):
    """Launch :func:`.triton_kivi.kivi_kernel` once: partial softmaxes ``(acc (B, H, S, g, d), max, sum (B, H, S, g))``
    float32 over the ``T_c`` quantized tokens (``bias`` ``(B, T_c)`` or ``None``)."""
    from crosskv.cache.kernels.triton_kivi import kivi_kernel

    b, h, g, d = q.shape
    tokens = keys.length
    block_t = block(block_t)
    n_splits, split_len = split_plan(tokens, block_t, b * h, splits)
    acc = torch.empty(b, h, n_splits, g, d, dtype=torch.float32, device=q.device)
    top, total = torch.empty(b, h, n_splits, g, dtype=torch.float32, device=q.device), torch.empty(b, h, n_splits, g, dtype=torch.float32, device=q.device)
    k_scale, k_zero = _same_strides(keys.scale[..., 0], keys.zero[..., 0])      # (B, H, d, G)
    v_scale, v_zero = _same_strides(values.scale[..., 0], values.zero[..., 0])  # (B, H, T, G_d)
    LAUNCHES["kivi"] += 1
    kivi_kernel[(b, h, n_splits)](
        q, keys.codes, k_scale, k_zero, values.codes, v_scale, v_zero, q if bias is None else bias,
        acc, top, total, tokens, d, g, split_len, scale,
        *q.stride(), *keys.codes.stride(), *k_scale.stride(), *values.codes.stride(), *v_scale.stride(),
        *((0, 0) if bias is None else bias.stride()), *acc.stride(), *top.stride(),
        BITS=keys.bits, K_GROUP=keys.group_size, V_GROUP=values.group_size, BLOCK_G=block(g),
        BLOCK_T=block_t, BLOCK_D=block(d), HAS_BIAS=bias is not None, PRECISION=precision(q.dtype))
    return acc, top, total


def _same_strides(scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale`` and ``zero`` laid out alike (the kernel reads both with one set of strides)."""
    if scale.stride() == zero.stride():
        return scale, zero
    return scale.contiguous(), zero.contiguous()
