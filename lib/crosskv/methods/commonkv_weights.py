"""CommonKV's shared weights: the thin SVD of a group's stacked W_k/W_v and the latent projection modules.

For a group of G consecutive layers the stacked projection weights [W_k¹;…;W_kᴳ;W_v¹;…;W_vᴳ]
``(2·G·H_kv·d, D)`` get a thin SVD U·Σ·Vᵀ; the group shares the down-projection P_g = Σ^½·Vᵀ ``(r_g, D)``
and each layer keeps its up-projections R_k, R_v (its rows of U·Σ^½). A layer's ``k_proj``/``v_proj`` are
replaced by modules computing the latent c = P_g·x once and K = R_k·c (+ bias), V = R_v·c (+ bias);
exact when r_g is the full rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

@dataclass
class GroupFactors:
    """One group's shared down-projection ``down`` (r, D) and per-layer ``up_k``/``up_v`` (H_kv·d, r)."""

    layers: list[int]
    down: torch.Tensor
    up_k: list[torch.Tensor]
    up_v: list[torch.Tensor]

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def stacked_weights(attns: list, layers: list[int]) -> torch.Tensor:
    """[W_k of each layer; W_v of each layer] → ``(2·G·H_kv·d, D)`` float64."""
    keys = [attns[i].k_proj.weight.detach().double() for i in layers]
    values = [attns[i].v_proj.weight.detach().double() for i in layers]
    return torch.cat(keys + values)


def factorize_group(attns: list, layers: list[int], rank: int) -> GroupFactors:
    """Thin SVD of the group's stacked K/V weights, truncated to ``rank`` (≤ its full rank)."""
    weights = stacked_weights(attns, layers)
    u, s, vh = torch.linalg.svd(weights, full_matrices=False)
    if rank > s.numel():
        raise ValueError(f"rank={rank} exceeds the group's full rank {s.numel()}")
    root = s[:rank].sqrt()
    down = root[:, None] * vh[:rank]                  # (r, D)
    up = u[:, :rank] * root[None, :]                  # (2·G·w, r)
    width = attns[layers[0]].k_proj.weight.shape[0]
    g = len(layers)
    up_k = [up[i * width:(i + 1) * width] for i in range(g)]
    up_v = [up[(g + i) * width:(g + i + 1) * width] for i in range(g)]
    return GroupFactors(layers, down.float(), [t.float() for t in up_k], [t.float() for t in up_v])


def full_rank(layers: int, width: int, hidden: int) -> int:
    """Rank of a group's stacked weights at most: min(D, 2·G·H_kv·d)."""
    return min(hidden, 2 * layers * width)


class LatentSlot:
    """Hands the latent computed by a layer's key projection to its value projection and cache layer."""

    def __init__(self):
        self.x: torch.Tensor | None = None
        self.latent: torch.Tensor | None = None


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    out_f, in_f = weight.shape
    layer = nn.Linear(in_f, out_f, bias=bias is not None, device=like.weight.device, dtype=like.weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.requires_grad_(False)
    return layer


class LatentKeyProj(nn.Module):
    """Replaces ``k_proj``: x ``(B, T, D)`` → latent c = P_g·x ``(B, T, r)`` (kept in the slot) → R_k·c + b_k."""

    def __init__(self, down: nn.Linear, up: nn.Linear, slot: LatentSlot):
        super().__init__()
        self.down, self.up, self.slot = down, up, slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latent = self.down(x)
        self.slot.x, self.slot.latent = x, latent
        return self.up(latent)


class LatentValueProj(nn.Module):
    """Replaces ``v_proj``: reuses the latent of the same input (computes it if the input differs) → R_v·c + b_v."""

    def __init__(self, down: nn.Linear, up: nn.Linear, slot: LatentSlot):
        super().__init__()
        self.down, self.up, self.slot = down, up, slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latent = self.slot.latent if self.slot.x is x else self.down(x)
        return self.up(latent)

