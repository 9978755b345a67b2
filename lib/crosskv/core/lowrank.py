"""Low-rank helpers shared by the xKV/SVD cache and the evidence: grouped matrices, truncated SVD, spectra.

A "group matrix" stacks G layers' K (or V) of one sequence side by side along the feature axis,
``(B, T, G·H_kv·d)``; xKV's premise is that such a matrix has a faster-decaying spectrum than each
layer's ``(B, T, H_kv·d)`` matrix alone, so one shared token basis serves the whole group.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch

# (Gram matrix, its eigenvectors) pairs decomposed inside shared_eigendecompositions(); None outside
_DECOMPOSED: contextvars.ContextVar[list[tuple[torch.Tensor, torch.Tensor]] | None] = contextvars.ContextVar(
    "crosskv_decomposed", default=None)


def group_matrix(kv: torch.Tensor) -> torch.Tensor:
    """Stack layers along features: ``(G, B, H, T, d)`` → ``(B, T, G·H·d)`` (layer-major, then head, then dim)."""
    g, b, h, t, d = kv.shape
    return kv.permute(1, 3, 0, 2, 4).reshape(b, t, g * h * d)


def split_group_matrix(x: torch.Tensor, layers: int, heads: int) -> torch.Tensor:
    """Inverse of :func:`group_matrix`: ``(B, T, G·H·d)`` → ``(G, B, H, T, d)``."""
    b, t, f = x.shape
    return x.reshape(b, t, layers, heads, f // (layers * heads)).permute(2, 0, 3, 1, 4)


def truncated_svd(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factorisation of each batch element, computed in float32.

    ``x``: ``(B, T, F)`` → ``basis`` ``(B, T, r)`` (orthonormal columns) and ``factor`` ``(B, r, F)``
    (singular values folded in) with ``basis @ factor`` ≈ ``x``; ``r = min(rank, T, F)``.
    """
    u, s, vh = torch.linalg.svd(x.float(), full_matrices=False)
    r = min(rank, s.shape[-1])
    return u[..., :r], s[..., :r, None] * vh[..., :r, :]


def gram_factors(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factorisation through the Gram matrix's eigendecomposition, float32, batched.

    ``x``: ``(N, T, F)`` → ``basis`` ``(N, T, r)`` (orthonormal columns) and ``factor`` ``(N, r, F)``
    (singular values folded in), ``r = min(rank, T, F)``: the same projection onto the top-r singular
    subspace as :func:`truncated_svd`, for ``T·min(T,F)²`` multiply-adds (the Gram matrix) and one
    ``min(T,F)``-sized symmetric eigendecomposition instead of an SVD of the tall matrix. The product
    ``basis @ factor`` is formed as ``x·V·Vᵀ`` (or ``U·Uᵀ·x``), so full rank reproduces ``x`` up to float32
    rounding even where singular values vanish.
    """
    x = x.float()
    _, t, f = x.shape
    r = min(rank, t, f)
    if f <= t:
        vectors = _eigenvectors(x.transpose(1, 2) @ x)                     # (N, F, F), ascending
        v = vectors[..., -r:].flip(-1)                                     # (N, F, r), top first
        projected = x @ v                                                  # (N, T, r) = U·S
        sigma = projected.norm(dim=1, keepdim=True)                        # (N, 1, r)
        basis = projected / sigma.clamp_min(torch.finfo(x.dtype).tiny)
        return basis, sigma.transpose(1, 2) * v.transpose(1, 2)
    vectors = _eigenvectors(x @ x.transpose(1, 2))                         # (N, T, T), ascending
    basis = vectors[..., -r:].flip(-1)                                     # (N, T, r)
    return basis, basis.transpose(1, 2) @ x


@contextlib.contextmanager
def shared_eigendecompositions() -> Iterator[None]:
    """Within, :func:`gram_factors` decomposes each distinct Gram matrix once: configurations that compress
    copies of one prefill (a grid sample's shared prefill: xKV or Single SVD at several ranks, selective
    reconstruction on them, their compositions) reuse the eigenvectors of a Gram matrix bitwise equal to one
    already decomposed — the same factors, without repeating the eigendecomposition. Nothing outlives it."""
    token = _DECOMPOSED.set([])
    try:
        yield
    finally:
        _DECOMPOSED.reset(token)


def _eigenvectors(gram: torch.Tensor) -> torch.Tensor:
    """Eigenvectors ``(N, F, F)`` (ascending eigenvalues) of symmetric ``gram`` ``(N, F, F)``, reused inside
    :func:`shared_eigendecompositions` when an equal matrix was decomposed there."""
    decomposed = _DECOMPOSED.get()
    if decomposed is None:
        return torch.linalg.eigh(gram)[1]
    for seen, vectors in decomposed:
        if seen.shape == gram.shape and seen.device == gram.device and torch.equal(seen, gram):
            return vectors
    vectors = torch.linalg.eigh(gram)[1]
    decomposed.append((gram, vectors))
    return vectors


def spectrum(x: torch.Tensor) -> torch.Tensor:
    """Singular values of each batch element of ``x`` ``(B, T, F)`` → ``(B, min(T, F))``, descending."""
    return torch.linalg.svdvals(x.float())


def energy_captured(singular_values: torch.Tensor) -> torch.Tensor:
    """Fraction of squared Frobenius norm captured by the top-r components, for r = 1…n: ``(..., n)``."""
    energy = singular_values.float().pow(2)
    return energy.cumsum(-1) / energy.sum(-1, keepdim=True)


def rank_error(x: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error of the best rank-``rank`` approximation of ``x`` ``(B, T, F)``.

    Uses the Eckart–Young identity (error² = energy of the discarded singular values).
    """
    return tail_error(spectrum(x).pow(2), rank)


def tail_error(energy: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error of a rank-``rank`` truncation from squared singular values ``(..., n)`` (summed
    over any leading batch axes)."""
    return float((energy[..., rank:].sum() / energy.sum()).sqrt())


def factored_elements(tokens: int, rank: int, layers: int, width: int) -> int:
    """Elements of one group stored as a ``tokens × rank`` basis plus ``layers`` factors of ``rank × width``."""
    rank = min(rank, tokens, layers * width)
    return tokens * rank + layers * rank * width


def rank_for_elements(budget: int, tokens: int, layers: int, width: int) -> int:
    """Largest rank whose :func:`factored_elements` stays within ``budget`` (at least 1)."""
    return max(1, min(budget // (tokens + layers * width), tokens, layers * width))


def equal_storage_errors(layer_energy: list[torch.Tensor], group_energy: torch.Tensor, tokens: int,
                         width: int, single_rank: int) -> dict[str, float]:
    """Per-layer vs grouped truncation error of G layers at equal stored elements, from their spectra.

    ``layer_energy``: G squared-singular-value tensors ``(..., n)`` of each layer's ``(T, width)`` matrix;
    ``group_energy``: those of the group's ``(T, G·width)`` matrix. Per-layer SVD keeps ``single_rank`` per
    layer; the grouped SVD gets the largest rank whose stored elements (shared basis + G factors) do not
    exceed the G per-layer factorisations. Returns ``{"single": err, "grouped": err, "single_rank": r1,
    "grouped_rank": rG, "elements": n}``, each error the relative Frobenius error over the whole group.
    """
    g = len(layer_energy)
    budget = g * factored_elements(tokens, single_rank, 1, width)
    grouped_rank = rank_for_elements(budget, tokens, g, width)
    norms = [float(energy.sum()) for energy in layer_energy]
    single_sq = sum(tail_error(energy, single_rank) ** 2 * norm for energy, norm in zip(layer_energy, norms))
    return {"single": (single_sq / sum(norms)) ** 0.5, "grouped": tail_error(group_energy, grouped_rank),
            "single_rank": single_rank, "grouped_rank": grouped_rank, "elements": budget}


def grouped_vs_single_error(kv: torch.Tensor, group_size: int, single_rank: int) -> dict[str, float]:
    """:func:`equal_storage_errors` of ``kv`` ``(G, B, H, T, d)``: G = ``group_size`` consecutive layers (pre-RoPE
    keys or values), errors over the batch."""
    g, _, h, t, d = kv.shape
    if g != group_size:
        raise ValueError(f"kv holds {g} layers but group_size={group_size}")
    layer_energy = [spectrum(group_matrix(kv[i:i + 1])).pow(2) for i in range(g)]
    return equal_storage_errors(layer_energy, spectrum(group_matrix(kv)).pow(2), t, h * d, single_rank)


def group_energy(kv: torch.Tensor, group_size: int) -> torch.Tensor:
    """Energy captured vs rank for every full group of ``group_size`` consecutive layers.

    ``kv``: ``(L, N, H, T, d)`` (one field of a :class:`crosskv.core.capture.Capture`). Returns
    ``(groups, N, min(T, G·H·d))``: for each group and sequence, the cumulative energy fraction of its
    grouped matrix's top-r singular values, r = 1…; the last ``L mod G`` layers are left out.
    """
    groups = kv.shape[0] // group_size
    return torch.stack([energy_captured(spectrum(group_matrix(kv[g * group_size:(g + 1) * group_size])))
                        for g in range(groups)])
