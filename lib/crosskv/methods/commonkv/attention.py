"""CommonKV's values in latent form: attention weights × latents, then the up-projection once per head.

A held token's value is V_t = R_v·c_t + b_v with R_v ``(H_kv·d, r)``. For a query head h reading KV head
k(h), Σ_t p_t·V_t = R_v⁽ᵏ⁾·(Σ_t p_t·c_t) + b_v⁽ᵏ⁾·Σ_t p_t: the weights are applied to the latents
``(Hq·T·r`` multiply-adds per query row) and R_v once per head ``(Hq·r·d)``. The rebuild it replaces
computes every V_t first (``T·r·H_kv·d``) and then weights them (``Hq·T·d``): latent values are cheaper
by about H_kv·d / Hq for long prefixes (192/9 ≈ 21× on SmolLM2-135M, 1024/32 = 32× on Llama-3.1-8B),
as long as the new query rows q·Hq stay below H_kv·d — decode steps and short appended chunks; long
chunks rebuild V (:func:`latent_values_cheaper`).

Keys cannot be absorbed the same way: RoPE rotates each token's key by its own position, so q·K_t needs
each K_t = RoPE(R_k·c_t) (absorbing R_k into the query would need one query per rotary frequency, which
costs as much as rebuilding K). The cache rebuilds them once per step (:class:`LatentPrefix` ``keys``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from torch import nn

from crosskv.cache.attention import CompressedPrefix
from crosskv.cache.quant import Stored, dense
from crosskv.cache.static import StepPrefix
from crosskv.core import rotary
from crosskv.core.capture import KVShape


def latent_values_cheaper(queries: int, shape: KVShape) -> bool:
    """True when applying ``queries`` new tokens' weights to the latents beats rebuilding V: q·Hq < H_kv·d."""
    return queries * shape.heads < shape.width


@dataclass(frozen=True)
class LatentPrefix(CompressedPrefix):
    """A CommonKV layer's held tokens as attention reads them.

    Held order, in pieces (the group's merged entries, quantized own, float own): ``keys`` ``(B, H_kv, n_i, d)``
    post-RoPE, rebuilt once this step, and ``latents`` ``(B, n_i, r)`` of the same tokens — never concatenated
    (a decode step concatenates the scores, Hq·T values, instead); ``up`` R_v ``(H_kv·d, r)`` and ``bias`` b_v
    ``(H_kv·d,)`` or None; ``kv_heads`` H_kv.
    """

    keys: tuple[torch.Tensor, ...]
    latents: tuple[torch.Tensor, ...]
    up: torch.Tensor
    bias: torch.Tensor | None
    kv_heads: int

    @property
    def length(self) -> int:
        return sum(k.shape[-2] for k in self.keys)

    def scores(self, q: torch.Tensor) -> torch.Tensor:
        """``q`` ``(B, H_kv, n, d)`` → q·Kᵀ ``(B, H_kv, n, T_c)`` float32 (unscaled)."""
        return torch.cat([(q @ k.transpose(-1, -2)).float() for k in self.keys], dim=-1)

    def apply(self, probs: torch.Tensor) -> torch.Tensor:
        """``probs`` ``(B, H_kv, n, T_c)`` → Σ_t p_t·V_t ``(B, H_kv, n, d)`` without rebuilding V."""
        b, h_kv, n, _ = probs.shape
        flat = probs.reshape(b, h_kv * n, -1)                               # (B, H_kv·n, T_c)
        mixed, start = None, 0
        for lat in self.latents:                                            # (B, n_i, r)
            part = torch.bmm(flat[..., start:start + lat.shape[-2]], lat)   # (B, H_kv·n, r)
            mixed = part if mixed is None else mixed + part
            start += lat.shape[-2]
        rank = self.up.shape[-1]
        up = self.up.view(h_kv, -1, rank)                                   # (H_kv, d, r)
        out = mixed.view(b, h_kv, n, rank) @ up.transpose(-1, -2)           # (B, H_kv, n, d)
        if self.bias is not None:
            out = out + probs.sum(-1, keepdim=True) * self.bias.view(h_kv, 1, -1)
        return out


@dataclass(frozen=True)
class LatentSteps(StepPrefix):
    """A CommonKV layer's held tokens frozen for the static layout (:mod:`crosskv.cache.static`): every step
    :meth:`at` rebuilds the keys from the stored latents as a dynamic cache does (R_k·c, RoPE of each token's own
    position from the model's rotary module) and hands the latents on as values (:class:`LatentPrefix`).

    ``pieces``: held order, ``(latents (B, n_i, r) float or codes, positions (n_i,) int32)``; ``up_k`` the layer's
    R_k module, ``k_norm`` the model's key norm or None; ``up``/``bias`` R_v and b_v; ``dtype`` the keys' dtype.
    """

    pieces: tuple[tuple[Stored, torch.Tensor], ...]
    up_k: nn.Module
    k_norm: nn.Module | None
    rope: rotary.Rotary
    up: torch.Tensor
    bias: torch.Tensor | None
    shape: KVShape
    dtype: torch.dtype

    @property
    def length(self) -> int:
        return sum(pos.numel() for _, pos in self.pieces)

    def at(self, positions: torch.Tensor) -> LatentPrefix:
        keys, latents = [], []
        for stored, pos in self.pieces:
            lat = dense(stored).to(pos.device, self.dtype)                          # (B, n, r)
            k = self.up_k(lat)
            k = k.view(*k.shape[:2], self.shape.kv_heads, self.shape.head_dim)     # (B, n, H_kv, d)
            if self.k_norm is not None:
                k = self.k_norm(k)
            k = k.transpose(1, 2)                                                   # (B, H_kv, n, d)
            keys.append(rotary.apply(k, *self.rope.cos_sin(pos, k)))
            latents.append(lat)
        return LatentPrefix(tuple(keys), tuple(latents), self.up, self.bias, self.shape.kv_heads)
