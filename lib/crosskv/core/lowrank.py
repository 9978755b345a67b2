"""Low-rank helpers shared by the xKV/SVD cache and the notebooks: grouped matrices, truncated SVD, spectra.

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
    energy = spectrum(x).pow(2)
    return float((energy[..., rank:].sum() / energy.sum()).sqrt())


def factored_elements(tokens: int, rank: int, layers: int, width: int) -> int:
    """Elements of one group stored as a ``tokens × rank`` basis plus ``layers`` factors of ``rank × width``."""
    rank = min(rank, tokens, layers * width)
    return tokens * rank + layers * rank * width


def rank_for_elements(budget: int, tokens: int, layers: int, width: int) -> int:
    """Largest rank whose :func:`factored_elements` stays within ``budget`` (at least 1)."""
    return max(1, min(budget // (tokens + layers * width), tokens, layers * width))


def grouped_vs_single_error(kv: torch.Tensor, group_size: int, single_rank: int) -> dict[str, float]:
    """Reconstruction error of per-layer SVD vs one grouped SVD holding the same number of elements.

    ``kv``: ``(G, B, H, T, d)`` for G = ``group_size`` consecutive layers (pre-RoPE keys or values).
    Per-layer SVD keeps ``single_rank`` per layer; the grouped SVD gets the largest rank whose stored
    elements (shared basis + G factors) do not exceed the G per-layer factorisations. Returns
    ``{"single": err, "grouped": err, "single_rank": r1, "grouped_rank": rG, "elements": n}`` where
    each error is the relative Frobenius error over the whole group.
    """
    g, b, h, t, d = kv.shape
    if g != group_size:
        raise ValueError(f"kv holds {g} layers but group_size={group_size}")
    width = h * d
    budget = g * factored_elements(t, single_rank, 1, width)
    grouped_rank = rank_for_elements(budget, t, g, width)
    single_sq = sum(rank_error(group_matrix(kv[i:i + 1]), single_rank) ** 2 * float(kv[i].float().pow(2).sum())
                    for i in range(g))
    single = (single_sq / float(kv.float().pow(2).sum())) ** 0.5
    grouped = rank_error(group_matrix(kv), grouped_rank)
    return {"single": single, "grouped": grouped, "single_rank": single_rank,
            "grouped_rank": grouped_rank, "elements": budget}


def group_energy(kv: torch.Tensor, group_size: int) -> torch.Tensor:
    """Energy captured vs rank for every full group of ``group_size`` consecutive layers.

    ``kv``: ``(L, N, H, T, d)`` (one field of a :class:`crosskv.core.capture.Capture`). Returns
    ``(groups, N, min(T, G·H·d))``: for each group and sequence, the cumulative energy fraction of its
    grouped matrix's top-r singular values, r = 1…; the last ``L mod G`` layers are left out.
    """
    groups = kv.shape[0] // group_size
    return torch.stack([energy_captured(spectrum(group_matrix(kv[g * group_size:(g + 1) * group_size])))
                        for g in range(groups)])


def energy_table(fields: dict[str, torch.Tensor], group_sizes: list[int]) -> "pandas.DataFrame":
    """Tidy energy-vs-rank curves: one row per (field, G, rank) with the mean energy over groups and sequences.

    ``fields`` maps a label (e.g. "keys (pre-RoPE)") to ``(L, N, H, T, d)``. Columns: field,
    group_size, rank, rank_fraction (rank / (G·H·d): equal values mean equal basis storage per layer,
    factors excluded), energy.
    """
    import pandas as pd

    rows = []
    for label, kv in fields.items():
        for g in group_sizes:
            curve = group_energy(kv, g).mean(dim=(0, 1))  # (n,)
            width = g * kv.shape[2] * kv.shape[4]
            rows += [{"field": label, "group_size": g, "rank": r + 1, "rank_fraction": (r + 1) / width,
                      "energy": float(curve[r])} for r in range(curve.shape[0])]
    return pd.DataFrame(rows)


def grouped_error_table(fields: dict[str, torch.Tensor], group_sizes: list[int], single_ranks: list[int],
                        sequence: int = 0) -> "pandas.DataFrame":
    """Per-layer vs grouped SVD error at equal stored elements, for every full group of each size.

    ``fields`` maps a label to ``(L, N, H, T, d)``; sequence ``sequence`` is used. One row per
    (field, G, single rank, group) with columns field, group_size, first_layer, single_rank,
    grouped_rank, single, grouped (relative Frobenius errors), kept (stored / uncompressed elements).
    """
    import pandas as pd

    rows = []
    for label, kv in fields.items():
        kv = kv[:, sequence:sequence + 1]
        _, _, h, t, d = kv.shape
        for g in group_sizes:
            for r in single_ranks:
                for first in range(0, kv.shape[0] - g + 1, g):
                    result = grouped_vs_single_error(kv[first:first + g], g, r)
                    rows.append({"field": label, "group_size": g, "first_layer": first, "single_rank": r,
                                 "grouped_rank": result["grouped_rank"], "single": result["single"],
                                 "grouped": result["grouped"], "kept": result["elements"] / (g * t * h * d)})
    return pd.DataFrame(rows)


def _tail_error(energy: torch.Tensor, rank: int) -> float:
    """Relative error of a rank-``rank`` truncation from squared singular values ``(n,)``."""
    return float((energy[rank:].sum() / energy.sum()).sqrt())


def grouped_error_units(fields: dict[str, torch.Tensor], group_sizes: list[int], single_ranks: list[int],
                        lengths: list[int]) -> "pandas.DataFrame":
    """:func:`grouped_vs_single_error` for every (field, T, sequence, G, single rank, group): the paired units
    of a per-layer vs grouped comparison at equal stored elements.

    ``fields`` maps a label to ``(L, N, H, T_max, d)``; each T of ``lengths`` (≤ T_max) uses every sequence's
    first T tokens. One SVD per layer and per group (errors for every rank come from its spectrum). One row
    per unit with columns field, tokens, sequence, group_size, first_layer, single_rank, grouped_rank,
    single, grouped (relative Frobenius errors over the group), kept (stored / uncompressed elements).
    """
    import pandas as pd

    rows = []
    for label, kv in fields.items():
        layers, sequences, h, t_max, d = kv.shape
        for t in lengths:
            if not 0 < t <= t_max:
                raise ValueError(f"length {t} outside 1..{t_max} (the captured tokens)")
            for n in range(sequences):
                part = kv[:, n:n + 1, :, :t]  # (L, 1, H, T, d)
                layer_energy = [spectrum(group_matrix(part[i:i + 1]))[0].pow(2) for i in range(layers)]
                for g in group_sizes:
                    for first in range(0, layers - g + 1, g):
                        group_energy_ = spectrum(group_matrix(part[first:first + g]))[0].pow(2)
                        norms = [float(layer_energy[i].sum()) for i in range(first, first + g)]
                        for r in single_ranks:
                            budget = g * factored_elements(t, r, 1, h * d)
                            grouped_rank = rank_for_elements(budget, t, g, h * d)
                            single_sq = sum(_tail_error(layer_energy[first + i], r) ** 2 * norms[i] for i in range(g))
                            rows.append({"field": label, "tokens": t, "sequence": n, "group_size": g,
                                         "first_layer": first, "single_rank": r, "grouped_rank": grouped_rank,
                                         "single": (single_sq / sum(norms)) ** 0.5,
                                         "grouped": _tail_error(group_energy_, grouped_rank),
                                         "kept": budget / (g * t * h * d)})
    return pd.DataFrame(rows)
