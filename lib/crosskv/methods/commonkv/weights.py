"""CommonKV's shared weights: the thin SVD of a group's stacked W_k/W_v and the latent projection modules.

For a group of G consecutive layers the stacked projection weights [W_k¹;…;W_kᴳ;W_v¹;…;W_vᴳ]
``(2·G·H_kv·d, D)`` get a thin SVD U·Σ·Vᵀ; the group shares the down-projection P_g = Σ^½·Vᵀ ``(r_g, D)``
and each layer keeps its up-projections R_k, R_v (its rows of U·Σ^½). A layer's ``k_proj``/``v_proj`` are
replaced by modules computing the latent c = P_g·x once and K = R_k·c (+ bias), V = R_v·c (+ bias);
exact when r_g is the full rank.

The SVD runs in float64 once, at bind time; only the modules the forward needs are kept, in each layer's
dtype and on its device (:func:`build_projections`): one P_g per group and device, R_k, R_v and the
original biases per layer. :func:`overhead_bytes` counts them against the ``k_proj``/``v_proj`` weights
they make unused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from crosskv.core.capture import KVShape


@dataclass(frozen=True)
class LayerProjections:
    """One layer's replacement projections: the group's shared ``down`` P_g ``(r, D)`` (one module per group
    and device) and the layer's ``up_k`` R_k, ``up_v`` R_v ``(H_kv·d, r)`` carrying the original biases."""

    down: nn.Linear
    up_k: nn.Linear
    up_v: nn.Linear

    @property
    def rank(self) -> int:
        return self.down.out_features


def stacked_weights(attns: list, layers: list[int]) -> torch.Tensor:
    """[W_k of each layer; W_v of each layer] → ``(2·G·H_kv·d, D)`` float64 on the first layer's device."""
    device = attns[layers[0]].k_proj.weight.device
    keys = [attns[i].k_proj.weight.detach().to(device, torch.float64) for i in layers]
    values = [attns[i].v_proj.weight.detach().to(device, torch.float64) for i in layers]
    return torch.cat(keys + values)


def factorize_group(attns: list, layers: list[int], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin SVD of the group's stacked K/V weights truncated to ``rank`` (≤ its full rank) →
    ``down`` P_g ``(r, D)`` and the stacked ``up`` U·Σ^½ ``(2·G·H_kv·d, r)``, both float64 (transient)."""
    weights = stacked_weights(attns, layers)
    u, s, vh = torch.linalg.svd(weights, full_matrices=False)
    if rank > s.numel():
        raise ValueError(f"rank={rank} exceeds the group's full rank {s.numel()}")
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]


def full_rank(layers: int, width: int, hidden: int) -> int:
    """Rank of a group's stacked weights at most: min(D, 2·G·H_kv·d)."""
    return min(hidden, 2 * layers * width)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    """A frozen ``nn.Linear`` holding ``weight`` (and ``bias``) in ``like``'s dtype and on its device."""
    out_f, in_f = weight.shape
    layer = nn.Linear(in_f, out_f, bias=bias is not None, device=like.weight.device, dtype=like.weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.requires_grad_(False)
    return layer


def build_projections(attns: list, groups: list[list[int]], ranks: list[int]) -> list[LayerProjections]:
    """Per layer, its :class:`LayerProjections` from the truncated SVD of its group; the float64 factors are
    dropped once the modules hold them. A group whose layers sit on several devices gets one P_g per device."""
    out: list[LayerProjections | None] = [None] * len(attns)
    for layers, rank in zip(groups, ranks):
        down, up = factorize_group(attns, layers, rank)
        width = attns[layers[0]].k_proj.weight.shape[0]
        downs: dict[tuple[torch.device, torch.dtype], nn.Linear] = {}
        for i, layer in enumerate(layers):
            k_proj, v_proj = attns[layer].k_proj, attns[layer].v_proj
            where = (k_proj.weight.device, k_proj.weight.dtype)
            if where not in downs:
                downs[where] = _linear(down, None, k_proj)
            up_k = _linear(up[i * width:(i + 1) * width], k_proj.bias, k_proj)
            up_v = _linear(up[(len(layers) + i) * width:(len(layers) + i + 1) * width], v_proj.bias, v_proj)
            out[layer] = LayerProjections(downs[where], up_k, up_v)
    return out


def overhead_bytes(shape: KVShape, ranks: list[int], group_sizes: list[int], element_size: int,
                   downs_per_group: list[int] | None = None) -> dict[str, int]:
    """From shapes alone: ``added`` — the replacement projections (per group ``downs_per_group`` copies of
    P_g, r·D each, default one; per layer R_k and R_v, 2·H_kv·d·r), and ``droppable`` — the original
    ``k_proj``/``v_proj`` weights (2·L·H_kv·d·D), in bytes of ``element_size``. Biases move unchanged from
    the originals to R_k/R_v and cancel. ``net`` = added − droppable."""
    copies = downs_per_group or [1] * len(ranks)
    added = sum(c * r * shape.hidden + g * 2 * shape.width * r for r, g, c in zip(ranks, group_sizes, copies))
    droppable = 2 * sum(group_sizes) * shape.width * shape.hidden
    return {"added": added * element_size, "droppable": droppable * element_size,
            "net": (added - droppable) * element_size}


class LatentSlot:
    """Hands the latent computed by a layer's key projection to its value projection and cache layer."""

    def __init__(self):
        self.x: torch.Tensor | None = None
        self.latent: torch.Tensor | None = None


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
