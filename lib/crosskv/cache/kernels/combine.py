"""Eager pieces around the kernels: the exact tail's partial softmax, merging partial softmaxes, dense reference.

A kernel over a compressed prefix returns, per token split ``s``, a *partial softmax*: ``acc_s = Σ_t
exp(x_t − m_s)·v_t``, its maximum ``m_s`` and sum ``l_s = Σ_t exp(x_t − m_s)`` over the split's scaled
scores ``x_t``. The exact tail (tokens appended after compression) is one more partial. Weights
``w_p = exp(m_p − M) / Σ_p exp(m_p − M)·l_p`` (``M`` the largest ``m_p``) turn them into one softmax over
the concatenated scores: ``out = Σ_p w_p·acc_p``.
"""
from __future__ import annotations

import torch


def default_scale(q: torch.Tensor, scale: float | None) -> float:
    """The softmax scale: ``scale``, or ``d**-0.5`` for ``q`` ``(..., d)``."""
    return q.shape[-1] ** -0.5 if scale is None else scale


def tail_partial(q: torch.Tensor, tail_k: torch.Tensor, tail_v: torch.Tensor, scale: float,
                 bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact tail's partial softmax, float32: ``(acc (B, H, g, d), max (B, H, g), sum (B, H, g))``.

    ``q`` ``(B, H, g, d)``; ``tail_k``/``tail_v`` ``(B, H, t, d)`` (``t`` may be 0); ``bias`` ``(B, t)`` additive or ``None``.
    """
    scores = (q.float() @ tail_k.float().transpose(-1, -2)) * scale          # (B, H, g, t)
    if bias is not None:
        scores = scores + bias.float()[:, None, None, :]
    top = scores.amax(-1) if scores.shape[-1] else scores.new_full(scores.shape[:-1], float("-inf"))
    probs = torch.exp(scores - _finite(top)[..., None])
    return probs @ tail_v.float(), top, probs.sum(-1)


def merge_weights(maxes: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """``maxes``, ``sums`` ``(..., P)`` of ``P`` partial softmaxes → weights ``(..., P)`` (see module docstring)."""
    top = _finite(maxes.amax(-1, keepdim=True))
    rescale = torch.exp(maxes - top)
    return rescale / (rescale * sums).sum(-1, keepdim=True)


def merge(partial, tail) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax from the prefix's split partials and the tail's partial.

    ``partial`` ``(acc (B, H, S, g, X), max (B, H, S, g), sum (B, H, S, g))`` (``X``: ``d``, or a latent rank),
    ``tail`` ``(acc (B, H, g, d), max (B, H, g), sum (B, H, g))`` → the prefix's and the tail's shares of the
    output, ``(B, H, g, X)`` and ``(B, H, g, d)`` float32; their sum (after any map of ``X`` to ``d``) is the output.
    """
    acc, top, total = partial
    tail_acc, tail_top, tail_total = tail
    weights = merge_weights(torch.cat([top.permute(0, 1, 3, 2), tail_top[..., None]], dim=-1),
                            torch.cat([total.permute(0, 1, 3, 2), tail_total[..., None]], dim=-1))  # (B, H, g, S+1)
    return torch.einsum("bhgs,bhsgx->bhgx", weights[..., :-1], acc), weights[..., -1:] * tail_acc


def _finite(x: torch.Tensor) -> torch.Tensor:
    """``x`` with ``-inf`` (a fully masked row) replaced by 0, so ``exp(−inf − x)`` is 0, not NaN."""
    return x.masked_fill(x == float("-inf"), 0.0)


def dense_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tail_k: torch.Tensor,
                           tail_v: torch.Tensor, scale: float, bias: torch.Tensor | None) -> torch.Tensor:
    """The reference: one float32 softmax over prefix and tail scores.

    ``q`` ``(B, H, g, d)``; prefix ``keys``/``values`` ``(B, H, T, d)`` (keys post-RoPE); tail ``(B, H, t, d)``;
    ``bias`` broadcastable to ``(B, H, g, T + t)`` or ``None`` → ``(B, H, g, d)`` in ``q``'s dtype.
    """
    k = torch.cat([keys.float(), tail_k.float()], dim=-2)
    v = torch.cat([values.float(), tail_v.float()], dim=-2)
    scores = (q.float() @ k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.float()
    return (scores.softmax(-1) @ v).to(q.dtype)
