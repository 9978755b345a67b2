"""Decode attention on the chosen tokens of a factored prefix (``selective`` reconstruction), one launch per layer.

Given, per KV head, the ``K`` prefix tokens a scorer chose (``index`` ``(B, H_kv, K)``, e.g.
:func:`crosskv.methods.selective.select_tokens`), only those keys are rebuilt, ``RoPE(basis_k[t]·factor_k)``
at their own cos/sin rows, and attended together with the exact tail; their values enter in factored
form, ``(P·basis_v[index])·factor_v``. The kernel is :mod:`.triton_factored`'s, reading tokens through
``index``. :func:`selective_decode_attention` runs it when :func:`.launch.use_kernel` says so, else
:func:`selective_decode_attention_eager` (the chosen rows rebuilt densely).
"""
from __future__ import annotations

import torch

from crosskv.core import rotary

from crosskv.cache.kernels.combine import default_scale, dense_decode_attention, tail_partial
from crosskv.cache.kernels.factored import BLOCK_T, absorb_values, check_factored, run_factored_kernel
from crosskv.cache.kernels.launch import use_kernel


def check_index(q: torch.Tensor, index: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``index`` is integer ``(B, H_kv, K)`` for ``q`` ``(B, H_kv, g, d)``
    (its values, prefix positions ``0…T_c−1``, are not checked: that would wait for the device)."""
    if index.dim() != 3 or tuple(index.shape[:2]) != tuple(q.shape[:2]) or index.is_floating_point():
        raise ValueError(f"index has shape {tuple(index.shape)} and dtype {index.dtype}; expected integer "
                         f"(B, H_kv, K) with (B, H_kv) = {tuple(q.shape[:2])}")


def selective_decode_attention(q: torch.Tensor, basis_k: torch.Tensor, factor_k: torch.Tensor,
                               basis_v: torch.Tensor, factor_v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                               index: torch.Tensor, tail_k: torch.Tensor, tail_v: torch.Tensor,
                               scale: float | None = None, bias: torch.Tensor | None = None,
                               block_t: int = BLOCK_T, splits: int | None = None) -> torch.Tensor:
    """One decode step over the ``index`` tokens of a factored prefix and the exact tail: ``(B, H_kv, g, d)``.

    Shapes as :func:`.factored.factored_decode_attention` (``bias`` ``(B, T_c + t)`` indexed by prefix
    position, then tail); ``index`` ``(B, H_kv, K)`` distinct prefix positions per KV head.
    """
    check_factored(q, basis_k, factor_k, cos, sin)
    check_factored(q, basis_v, factor_v, cos, sin)
    check_index(q, index)
    scale = default_scale(q, scale)
    if not use_kernel(q):
        return selective_decode_attention_eager(q, basis_k, factor_k, basis_v, factor_v, cos, sin, index, tail_k,
                                                tail_v, scale, bias)
    tokens = basis_k.shape[1]
    prefix_bias = None if bias is None else bias[:, :tokens]
    partial = run_factored_kernel(q, basis_k, factor_k, basis_v, cos, sin, scale=scale, index=index,
                                  bias=prefix_bias, block_t=block_t, splits=splits)
    tail_bias = None if bias is None else bias[:, tokens:]
    return absorb_values(partial, factor_v, tail_partial(q, tail_k, tail_v, scale, tail_bias)).to(q.dtype)


def selective_decode_attention_eager(q, basis_k, factor_k, basis_v, factor_v, cos, sin, index, tail_k, tail_v,
                                     scale: float | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of :func:`selective_decode_attention`: the chosen keys and values rebuilt densely, one softmax."""
    b, h, k = index.shape
    batch = torch.arange(b, device=index.device)[:, None, None]
    keys = _rows(basis_k, factor_k, batch, index)                                   # (B, H, K, d) pre-RoPE
    keys = rotary.apply(keys, cos.float()[index], sin.float()[index])
    values = _rows(basis_v, factor_v, batch, index)
    full_bias = None
    if bias is not None:
        tokens = basis_k.shape[1]
        picked = bias[:, :tokens][batch, index]                                      # (B, H, K)
        tail = bias[:, tokens:][:, None].expand(b, h, -1)                            # (B, H, t)
        full_bias = torch.cat([picked, tail], dim=-1)[:, :, None]                    # (B, H, 1, K + t)
    return dense_decode_attention(q, keys, values, tail_k, tail_v, default_scale(q, scale), full_bias)


def _rows(basis: torch.Tensor, factor: torch.Tensor, batch: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``basis[index] @ factor_h`` per KV head: ``(B, H, K, d)`` float32."""
    b, rank, _ = factor.shape
    per_head = factor.float().view(b, rank, index.shape[1], -1).transpose(1, 2)     # (B, H, r, d)
    return basis.float()[batch, index] @ per_head
