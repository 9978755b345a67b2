"""Decode attention on a factored (low-rank) prefix without materialising its keys or values.

The prefix of ``T_c`` tokens is held as a token basis and per-layer factors (:mod:`crosskv.methods.svd`):
pre-RoPE keys ``basis_k (B, T_c, r_k) @ factor_k (B, r_k, H_kv·d)``, values ``basis_v @ factor_v``; RoPE is
applied at each token's absolute position with the rows ``cos``, ``sin`` ``(T_c, d)`` (any strides, e.g.
``FactoredPrefix.cos[0, 0].T``). The kernel (:mod:`.triton_factored`) rebuilds key tiles in registers and
absorbs the values, ``out = (P·basis_v)·factor_v``; the exact tail joins through a merged softmax
(:mod:`.combine`). Each public function runs the kernel when :func:`.launch.use_kernel` says so, else
its eager reference (``*_eager``, dense rebuild in float32) in this module.
"""
from __future__ import annotations

import torch

from crosskv.core import rotary
from crosskv.cache.kernels.combine import default_scale, dense_decode_attention, merge, tail_partial
from crosskv.cache.kernels.launch import LAUNCHES, block, precision, split_plan, use_kernel

BLOCK_T = 64  # tokens per tile on a GPU (untuned)


def check_factored(q: torch.Tensor, basis: torch.Tensor, factor: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the first shape that does not fit ``q`` ``(B, H_kv, g, d)``."""
    if q.dim() != 4:
        raise ValueError(f"q has shape {tuple(q.shape)}; expected (B, H_kv, g, d)")
    b, h, _, d = q.shape
    if d % 2:
        raise ValueError(f"head_dim={d} must be even for rotate-half RoPE")
    if basis.dim() != 3 or basis.shape[0] != b:
        raise ValueError(f"basis has shape {tuple(basis.shape)}; expected (B={b}, T_c, r)")
    if tuple(factor.shape) != (b, basis.shape[2], h * d):
        raise ValueError(f"factor has shape {tuple(factor.shape)}; expected (B, r, H_kv·d) = "
                         f"({b}, {basis.shape[2]}, {h * d})")
    for name, table in (("cos", cos), ("sin", sin)):
        if tuple(table.shape) != (basis.shape[1], d):
            raise ValueError(f"{name} has shape {tuple(table.shape)}; expected (T_c, d) = ({basis.shape[1]}, {d})")


def rope_keys(basis: torch.Tensor, factor: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              heads: int) -> torch.Tensor:
    """Eager: post-RoPE keys ``(B, H_kv, T, d)`` float32 from ``basis`` ``(B, T, r)``, ``factor`` ``(B, r, H_kv·d)``,
    ``cos``/``sin`` broadcastable to ``(B, H_kv, T, d)``."""
    b, t, _ = basis.shape
    pre = (basis.float() @ factor.float()).view(b, t, heads, -1).transpose(1, 2)
    return rotary.apply(pre, cos.float(), sin.float())


def plain_values(basis: torch.Tensor, factor: torch.Tensor, heads: int) -> torch.Tensor:
    """Eager: values ``(B, H_kv, T, d)`` float32 from ``basis`` ``(B, T, r)`` and ``factor`` ``(B, r, H_kv·d)``."""
    b, t, _ = basis.shape
    return (basis.float() @ factor.float()).view(b, t, heads, -1).transpose(1, 2)


def factored_decode_scores(q: torch.Tensor, basis: torch.Tensor, factor: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, block_t: int = BLOCK_T) -> torch.Tensor:
    """``q·RoPE(basis·factor)ᵀ`` ``(B, H_kv, g, T_c)`` float32, unscaled, from ``q`` ``(B, H_kv, g, d)``."""
    check_factored(q, basis, factor, cos, sin)
    if not use_kernel(q):
        return factored_decode_scores_eager(q, basis, factor, cos, sin)
    b, h, g, _ = q.shape
    scores = torch.empty(b, h, g, basis.shape[1], dtype=torch.float32, device=q.device)
    run_factored_kernel(q, basis, factor, basis, cos, sin, scale=1.0, scores=scores, block_t=block_t)
    return scores


def factored_decode_scores_eager(q: torch.Tensor, basis: torch.Tensor, factor: torch.Tensor, cos: torch.Tensor,
                                 sin: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`factored_decode_scores`: every key rebuilt densely."""
    return q.float() @ rope_keys(basis, factor, cos, sin, q.shape[1]).transpose(-1, -2)


def factored_decode_attention(q: torch.Tensor, basis_k: torch.Tensor, factor_k: torch.Tensor,
                              basis_v: torch.Tensor, factor_v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                              tail_k: torch.Tensor, tail_v: torch.Tensor, scale: float | None = None,
                              bias: torch.Tensor | None = None, block_t: int = BLOCK_T,
                              splits: int | None = None) -> torch.Tensor:
    """One decode step over a factored prefix and an exact tail: ``(B, H_kv, g, d)`` in ``q``'s dtype.

    ``tail_k``/``tail_v`` ``(B, H_kv, t, d)`` post-RoPE (``t`` may be 0); ``bias`` ``(B, T_c + t)`` additive
    (``-inf`` masks a token) or ``None``; ``scale`` defaults to ``d**-0.5``. One float32 softmax over the
    prefix and tail scores, as :func:`crosskv.cache.attention.crosskv_attention` computes it.
    """
    check_factored(q, basis_k, factor_k, cos, sin)
    check_factored(q, basis_v, factor_v, cos, sin)
    scale = default_scale(q, scale)
    if not use_kernel(q):
        return factored_decode_attention_eager(q, basis_k, factor_k, basis_v, factor_v, cos, sin, tail_k, tail_v,
                                               scale, bias)
    prefix_bias = None if bias is None else bias[:, :basis_k.shape[1]]
    partial = run_factored_kernel(q, basis_k, factor_k, basis_v, cos, sin, scale=scale, bias=prefix_bias,
                                  block_t=block_t, splits=splits)
    tail_bias = None if bias is None else bias[:, basis_k.shape[1]:]
    return absorb_values(partial, factor_v, tail_partial(q, tail_k, tail_v, scale, tail_bias)).to(q.dtype)


def factored_decode_attention_eager(q, basis_k, factor_k, basis_v, factor_v, cos, sin, tail_k, tail_v,
                                    scale: float | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of :func:`factored_decode_attention`: prefix K and V rebuilt densely, one softmax."""
    h = q.shape[1]
    keys = rope_keys(basis_k, factor_k, cos, sin, h)
    values = plain_values(basis_v, factor_v, h)
    full_bias = None if bias is None else bias[:, None, None, :]
    return dense_decode_attention(q, keys, values, tail_k, tail_v, default_scale(q, scale), full_bias)


def run_factored_kernel(q: torch.Tensor, basis_k: torch.Tensor, factor_k: torch.Tensor, basis_v: torch.Tensor,
                        cos: torch.Tensor, sin: torch.Tensor, scale: float, index: torch.Tensor | None = None,
                        bias: torch.Tensor | None = None, scores: torch.Tensor | None = None,
                        block_t: int = BLOCK_T, splits: int | None = None):
    """Launch :func:`.triton_factored.factored_kernel` once.

    With ``scores`` ``(B, H_kv, g, T_c)`` float32 given: fills it with raw scores (one tile per program), returns
    ``None``. Else returns the partial softmaxes ``(acc (B, H_kv, S, g, r_v), max, sum (B, H_kv, S, g))``, float32,
    over the prefix tokens (or the ``index`` ``(B, H_kv, K)`` chosen ones; ``bias`` ``(B, T_c)`` read at them).
    """
    from crosskv.cache.kernels.triton_factored import factored_kernel

    b, h, g, d = q.shape
    rank_k, rank_v = basis_k.shape[2], basis_v.shape[2]
    tokens = basis_k.shape[1] if index is None else index.shape[2]
    block_t = block(block_t)
    if scores is not None:
        splits = -(-tokens // block_t)
    n_splits, split_len = split_plan(tokens, block_t, b * h, splits)
    if scores is None:
        acc = torch.empty(b, h, n_splits, g, rank_v, dtype=torch.float32, device=q.device)
        top, total = torch.empty(b, h, n_splits, g, dtype=torch.float32, device=q.device), torch.empty(b, h, n_splits, g, dtype=torch.float32, device=q.device)
    else:
        acc = top = total = scores
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    index_t = q if index is None else index
    bias_t = q if bias is None else bias
    out_strides = (0, 0, 0, 0) if scores is None else scores.stride()
    acc_strides = acc.stride() if scores is None else (0,) * 5
    max_strides = top.stride() if scores is None else (0,) * 4
    LAUNCHES["factored"] += 1
    factored_kernel[(b, h, n_splits)](
        q, basis_k, factor_k, basis_v, cos, sin, index_t, bias_t, scores if scores is not None else acc, acc,
        top, total, tokens, rank_k, rank_v, g, split_len, scale,
        *q.stride(), *basis_k.stride(), *factor_k.stride(), *basis_v.stride(), *cos.stride(),
        *(index.stride() if index is not None else (0, 0, 0)), *(bias.stride() if bias is not None else (0, 0)),
        *out_strides, *acc_strides, *max_strides,
        HALF=d // 2, BLOCK_G=block(g), BLOCK_T=block_t, BLOCK_R=block(min(rank_k, 64)), BLOCK_DH=block(d // 2),
        BLOCK_RV=block(rank_v), HAS_INDEX=index is not None, HAS_BIAS=bias is not None,
        SCORES_ONLY=scores is not None, PRECISION=precision(q.dtype))
    return None if scores is not None else (acc, top, total)


def absorb_values(partial, factor_v: torch.Tensor, tail) -> torch.Tensor:
    """Merge the prefix's latent partials (``acc`` ``(B, H, S, g, r_v)``) with the tail's (:func:`.combine.merge`)
    and apply the value factor ``(B, r_v, H·d)`` once: ``(B, H, g, d)`` float32."""
    latent, tail_out = merge(partial, tail)                                         # (B, H, g, r_v), (B, H, g, d)
    b, h, _, rank_v = latent.shape
    per_head = factor_v.float().view(b, rank_v, h, -1).transpose(1, 2)              # (B, H, r_v, d)
    return latent @ per_head + tail_out
