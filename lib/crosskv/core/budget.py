"""Budget rules: layer groups, rank allocation (uniform, Fisher), sensitivity weights, cosine bottom-k merge budget.

Pure functions on small tensors and lists; the methods measure the inputs (Fisher information,
perplexity sensitivity, latent similarity) and call these to turn them into budgets.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def layer_groups(layers: int, group_size: int) -> list[list[int]]:
    """Consecutive groups of ``group_size`` layers; the last group is smaller when it does not divide ``layers``."""
    if group_size < 1 or group_size > layers:
        raise ValueError(f"group_size={group_size} must be in [1, {layers}] (the layer count)")
    return [list(range(start, min(start + group_size, layers))) for start in range(0, layers, group_size)]


def check_ratio(name: str, value: float, allow_zero: bool = True) -> None:
    """Raise ``ValueError`` naming ``name=value`` unless it lies in [0, 1] (or (0, 1] without ``allow_zero``)."""
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value <= 1) or math.isnan(value):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name}={value} is outside {interval}")


def uniform_ranks(rank: int, caps: Sequence[int]) -> list[int]:
    """The same ``rank`` for every group; ``caps[g]`` (the group's full rank) bounds it."""
    return [min(rank, cap) for cap in caps]


def _waterfill(weights: Sequence[float], sizes: Sequence[int], caps: Sequence[int], budget: float) -> list[float]:
    """Real-valued ranks r_g = c·weights[g], capped at caps[g], with Σ sizes[g]·r_g = budget."""
    fixed: dict[int, float] = {}
    while True:
        free = [g for g in range(len(weights)) if g not in fixed]
        if not free:
            return [fixed[g] for g in range(len(weights))]
        left = budget - sum(sizes[g] * r for g, r in fixed.items())
        mass = sum(sizes[g] * weights[g] for g in free)
        scale = left / mass if mass > 0 else 0.0
        over = [g for g in free if scale * weights[g] > caps[g]]
        if not over:
            ranks = {g: scale * weights[g] for g in free} | fixed
            return [ranks[g] for g in range(len(weights))]
        fixed.update({g: float(caps[g]) for g in over})


def fisher_ranks(fisher: Sequence[float], sizes: Sequence[int], caps: Sequence[int], rank_ratio: float,
                 hidden: int, multiple: int = 32) -> list[int]:
    """Ranks per group ∝ the group's mean per-layer Fisher information, under a total budget.

    The budget is that of a uniform ``rank_ratio·hidden`` rank: Σ_g sizes[g]·r_g ≤ rank_ratio·hidden·Σ sizes
    (``sizes`` = layers per group, so the latent memory matches the uniform allocation). Ranks are
    multiples of ``multiple`` (at least one multiple), capped at ``caps[g]``; the rounding remainder is
    handed out in multiples by largest fractional part while the budget allows.
    """
    check_ratio("rank_ratio", rank_ratio, allow_zero=False)
    if len(fisher) != len(sizes) or len(sizes) != len(caps):
        raise ValueError(f"fisher ({len(fisher)}), sizes ({len(sizes)}) and caps ({len(caps)}) differ in length")
    budget = rank_ratio * hidden * sum(sizes)
    weights = [max(float(f), 0.0) / s for f, s in zip(fisher, sizes)]
    if sum(weights) <= 0:
        weights = [1.0] * len(sizes)
    ideal = _waterfill(weights, sizes, caps, budget)
    ranks = [min(cap, max(multiple, multiple * math.floor(r / multiple))) for r, cap in zip(ideal, caps)]
    order = sorted(range(len(ranks)), key=lambda g: ideal[g] - ranks[g], reverse=True)
    for g in order:
        step = min(multiple, caps[g] - ranks[g])
        used = sum(s * r for s, r in zip(sizes, ranks))
        if step > 0 and ideal[g] > ranks[g] and used + sizes[g] * step <= budget + 1e-9:
            ranks[g] += step
    return ranks


def normalise_within_groups(values: Sequence[float], groups: Sequence[Sequence[int]]) -> list[float]:
    """Per-layer weights: ``values`` clipped at 0 and normalised to sum 1 within each group (uniform if all 0)."""
    weights = [0.0] * len(values)
    for group in groups:
        clipped = [max(float(values[i]), 0.0) for i in group]
        total = sum(clipped)
        for i, v in zip(group, clipped):
            weights[i] = v / total if total > 0 else 1.0 / len(group)
    return weights


def global_bottom_k(scores: Sequence[torch.Tensor], ratio: float) -> list[torch.Tensor]:
    """Adaptive budget: over all groups' candidate scores, the ``ratio`` lowest stay unmerged.

    ``scores[g]`` is ``(n_g,)`` (cosine of group g's first and last layer per token). Returns one bool
    mask per group, True = stays unmerged. ``round(ratio·Σ n_g)`` entries in total are kept unmerged,
    so a group whose tokens are less similar keeps more of them.
    """
    check_ratio("unmerged_ratio", ratio)
    sizes = [int(s.numel()) for s in scores]
    device = scores[0].device if scores else None
    flat = torch.cat([s.flatten().float() for s in scores]) if scores else torch.zeros(0, device=device)
    keep = round(ratio * flat.numel())
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[torch.argsort(flat, stable=True)[:keep]] = True
    return list(mask.split(sizes))


def per_group_bottom_k(scores: Sequence[torch.Tensor], ratio: float) -> list[torch.Tensor]:
    """Fixed budget: within each group separately, the ``ratio`` lowest-scoring entries stay unmerged."""
    return [global_bottom_k([s], ratio)[0] for s in scores]
