"""Cross-layer similarity of activations (hidden states, keys, values) and of the K/V projection weights.

Metrics, each an ``(L, L)`` matrix over layers:

- ``cosine`` / ``euclidean``: of the per-layer tensors averaged over samples and flattened — the
  quantity KVSharer's search ranks layer pairs by;
- ``cka``: linear centered kernel alignment (Kornblith et al., 2019) with tokens as examples,
  accumulated per sample as HSIC sums (minibatch CKA, Nguyen et al., 2021), so it streams;
- ``subspace``: overlap of the dominant *left* singular vectors (token basis, ``T × r``) of two
  layers' ``T × F`` matrices, ``‖U_iᵀU_j‖²_F / r`` = mean squared cosine of the principal angles
  (1 = same subspace, ``r/T`` = chance) — the observation xKV builds on.

Activations come from :func:`crosskv.core.capture.capture`, one batch at a time. Matrices are returned
as tensors; :func:`to_frame` and :func:`by_distance` turn them into tidy DataFrames for plotting.
"""
from __future__ import annotations

import logging
from typing import Iterable

import pandas as pd
import torch

from crosskv.core.capture import attention_modules, capture
from crosskv.core.progress import bar as progress_bar

log = logging.getLogger(__name__)

ACTIVATIONS = ("hidden", "keys", "keys_pre_rope", "values")
METRICS = ("cosine", "euclidean", "cka", "subspace")
AVERAGED_METRICS = ("cosine", "euclidean")


def flatten_layers(x: torch.Tensor) -> torch.Tensor:
    """``(L, ...)`` → ``(L, F)`` in float64."""
    return x.reshape(x.shape[0], -1).double()


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pair of flattened layers: ``x`` ``(L, ...)`` → ``(L, L)``."""
    flat = torch.nn.functional.normalize(flatten_layers(x), dim=1)
    return (flat @ flat.T).clamp(-1.0, 1.0)


def euclidean_matrix(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of every pair of flattened layers: ``x`` ``(L, ...)`` → ``(L, L)``."""
    flat = flatten_layers(x)
    return torch.cdist(flat, flat).fill_diagonal_(0.0)


def grams(features: torch.Tensor) -> torch.Tensor:
    """Linear kernels over examples: ``features`` ``(L, n, F)`` → ``(L, n, n)`` in float64."""
    f = features.double()
    return f @ f.transpose(1, 2)


def hsic_matrix(gram: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """HSIC of every pair of kernels ``gram`` ``(L, n, n)`` → ``(L, L)``.

    ``unbiased=True`` is Song et al.'s estimator (needs n ≥ 4); otherwise ``tr(K H L H) / (n-1)²``.
    """
    n = gram.shape[-1]
    if not unbiased:
        centered = gram - gram.mean(1, keepdim=True) - gram.mean(2, keepdim=True) + gram.mean((1, 2), keepdim=True)
        return torch.einsum("inm,jnm->ij", centered, centered) / (n - 1) ** 2
    if n < 4:
        raise ValueError(f"unbiased HSIC needs at least 4 examples, got n={n}")
    k = gram.clone()
    k.diagonal(dim1=1, dim2=2).zero_()
    trace = torch.einsum("inm,jnm->ij", k, k)
    total = k.sum((1, 2))
    rows = k.sum(2)  # (L, n)
    return (trace + torch.outer(total, total) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * rows @ rows.T) / (n * (n - 3))


def cka_from_hsic(hsic: torch.Tensor) -> torch.Tensor:
    """Normalise an HSIC matrix ``(L, L)`` into CKA: ``HSIC_ij / sqrt(HSIC_ii · HSIC_jj)``."""
    diag = hsic.diagonal().clamp_min(torch.finfo(hsic.dtype).tiny)
    return hsic / torch.sqrt(torch.outer(diag, diag))


def cka_matrix(features: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Linear CKA of every pair of layers, examples on axis 1: ``features`` ``(L, n, F)`` → ``(L, L)``."""
    return cka_from_hsic(hsic_matrix(grams(features), unbiased))


def linear_cka(x: torch.Tensor, y: torch.Tensor, unbiased: bool = False) -> float:
    """Linear CKA of two representations of the same ``n`` examples, ``x`` ``(n, p)`` and ``y`` ``(n, q)``."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same examples on both sides, got {x.shape[0]} and {y.shape[0]} rows")
    gram = torch.stack([grams(x[None])[0], grams(y[None])[0]])
    return float(cka_from_hsic(hsic_matrix(gram, unbiased))[0, 1])


def dominant_subspace(x: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` left singular vectors of ``x`` ``(..., T, F)`` → ``(..., T, rank)`` (float32 SVD)."""
    if not 1 <= rank <= min(x.shape[-2:]):
        raise ValueError(f"rank={rank} must lie in [1, min(T, F)] = [1, {min(x.shape[-2:])}]")
    u, _, _ = torch.linalg.svd(x.float(), full_matrices=False)
    return u[..., :rank]


def subspace_overlap(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Overlap ``‖uᵀv‖²_F / r`` of orthonormal bases ``u`` ``(..., T, r)`` and ``v`` ``(..., T, r)`` → ``(...)``."""
    return (u.transpose(-1, -2) @ v).pow(2).sum((-1, -2)) / u.shape[-1]


def principal_angles(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the spans of orthonormal ``u``, ``v`` ``(T, r)`` → ``(r,)``."""
    cosines = torch.linalg.svdvals(u.transpose(-1, -2) @ v).clamp(-1.0, 1.0)
    return torch.arccos(cosines)


def subspace_overlap_matrix(bases: torch.Tensor) -> torch.Tensor:
    """Pairwise overlap of per-layer bases ``(L, T, r)`` → ``(L, L)``."""
    cross = torch.einsum("itr,jts->ijrs", bases.double(), bases.double())
    return cross.pow(2).sum((-1, -2)) / bases.shape[-1]


def chance_overlap(rank: int, tokens: int) -> float:
    """Expected overlap of two random ``rank``-dimensional subspaces of R^tokens: ``rank / tokens``."""
    return rank / tokens


def token_features(x: torch.Tensor, field: str) -> torch.Tensor:
    """Per-token feature matrices: keys/values ``(L, B, H, T, d)`` → ``(L, B, T, H·d)``; hidden ``(L+1, B, T, D)`` as is."""
    if field == "hidden":
        return x
    layers, batch, heads, tokens, dim = x.shape
    return x.permute(0, 1, 3, 2, 4).reshape(layers, batch, tokens, heads * dim)


class _Accumulator:
    """Streaming sums for one activation field: mean tensor, HSIC and subspace-overlap sums."""

    def __init__(self, metrics: tuple[str, ...], rank: int, unbiased: bool):
        self.metrics, self.rank, self.unbiased = metrics, rank, unbiased
        self.total: torch.Tensor | None = None
        self.hsic: torch.Tensor | None = None
        self.overlaps: list[torch.Tensor] = []  # one (L, L) subspace-overlap matrix per sample
        self.samples = 0

    @staticmethod
    def _add(acc: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
        return value if acc is None else acc + value

    def update(self, x: torch.Tensor, field: str) -> None:
        """Add one captured batch ``x`` (layer axis 0, batch axis 1)."""
        if any(m in AVERAGED_METRICS for m in self.metrics):
            self.total = self._add(self.total, x.double().sum(1))
        feats = token_features(x, field)  # (L, B, T, F)
        for b in range(feats.shape[1]):
            if "cka" in self.metrics:
                self.hsic = self._add(self.hsic, hsic_matrix(grams(feats[:, b]), self.unbiased))
            if "subspace" in self.metrics:
                self.overlaps.append(subspace_overlap_matrix(dominant_subspace(feats[:, b], self.rank)))
        self.samples += x.shape[1]

    def result(self) -> dict[str, torch.Tensor]:
        out = {}
        mean = self.total / self.samples if self.total is not None else None
        for metric in self.metrics:
            if metric == "cosine":
                out[metric] = cosine_matrix(mean)
            elif metric == "euclidean":
                out[metric] = euclidean_matrix(mean)
            elif metric == "cka":
                out[metric] = cka_from_hsic(self.hsic)
            else:
                out[metric] = torch.stack(self.overlaps).mean(0)
        return out


def _check(values: Iterable[str], allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    values = tuple(values)
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ValueError(f"unknown {what} {bad or values!r}; choose from {', '.join(allowed)}")
    return values


def activation_similarity(model, batches: Iterable[torch.Tensor], fields: Iterable[str] = ACTIVATIONS,
                          metrics: Iterable[str] = METRICS, rank: int = 8, unbiased: bool = True,
                          progress: bool = False, per_sample: bool = False) -> dict[tuple[str, str], torch.Tensor]:
    """Cross-layer similarity of captured activations, streaming over token batches ``(B, T)``.

    Returns ``{(field, metric): (L, L)}`` (``L+1`` rows for ``hidden``, embeddings first). ``cosine`` and
    ``euclidean`` compare the sample-averaged tensors; ``cka`` uses tokens of each sample as examples
    (HSIC summed over samples); ``subspace`` averages the rank-``rank`` left-singular-subspace overlap
    over samples. All batches must share one length ``T``. ``per_sample=True`` (with ``subspace``) adds
    ``(field, "subspace_per_sample")``: the ``(N, L, L)`` overlap matrix of each of the N samples.
    """
    fields = _check(fields, ACTIVATIONS, "activation field(s)")
    metrics = _check(metrics, METRICS, "metric(s)")
    accs = {f: _Accumulator(metrics, rank, unbiased) for f in fields}
    for ids in progress_bar(list(batches), enabled=progress, desc="similarity"):
        cap = capture(model, [ids], fields=fields)
        for field in fields:
            accs[field].update(getattr(cap, field), field)
    out = {(field, metric): matrix for field, acc in accs.items() for metric, matrix in acc.result().items()}
    if per_sample:
        if "subspace" not in metrics:
            raise ValueError("per_sample=True needs the 'subspace' metric")
        out.update({(field, "subspace_per_sample"): torch.stack(acc.overlaps) for field, acc in accs.items()})
    return out


def projection_weights(model, which: str) -> torch.Tensor:
    """Stacked ``k_proj`` (``which="k"``) or ``v_proj`` (``"v"``) weights → ``(L, H_kv·d, D)`` float32."""
    if which not in ("k", "v"):
        raise ValueError(f"which={which!r} must be 'k' or 'v'")
    return torch.stack([getattr(attn, f"{which}_proj").weight.detach().float().cpu() for attn in attention_modules(model)])


def weight_similarity(model, metrics: Iterable[str] = ("cosine", "euclidean", "cka")) -> dict[tuple[str, str], torch.Tensor]:
    """Cross-layer similarity of W_k and W_v → ``{("w_k"|"w_v", metric): (L, L)}``.

    ``cka`` treats the D input dimensions as examples and the H_kv·d outputs as features, so it is
    invariant to a rotation or permutation of a layer's output features (e.g. of its heads); cosine
    and Euclidean compare the raw weights.
    """
    metrics = _check(metrics, ("cosine", "euclidean", "cka"), "weight metric(s)")
    out = {}
    for which in ("k", "v"):
        w = projection_weights(model, which)  # (L, out, D)
        for metric in metrics:
            if metric == "cosine":
                out[(f"w_{which}", metric)] = cosine_matrix(w)
            elif metric == "euclidean":
                out[(f"w_{which}", metric)] = euclidean_matrix(w)
            else:
                out[(f"w_{which}", metric)] = cka_matrix(w.transpose(1, 2), unbiased=False)
    return out


def to_frame(matrices: dict[tuple[str, str], torch.Tensor]) -> pd.DataFrame:
    """Tidy rows ``field, metric, layer_i, layer_j, value`` from ``{(field, metric): (L, L)}``."""
    rows = []
    for (field, metric), matrix in matrices.items():
        n = matrix.shape[0]
        idx = torch.arange(n, device="cpu")  # row labels for pandas
        ii, jj = torch.meshgrid(idx, idx, indexing="ij")
        rows.append(pd.DataFrame({"field": field, "metric": metric, "layer_i": ii.flatten().numpy(),
                                  "layer_j": jj.flatten().numpy(), "value": matrix.flatten().double().numpy()}))
    return pd.concat(rows, ignore_index=True)


def by_distance(matrix: torch.Tensor) -> pd.DataFrame:
    """Summarise an ``(L, L)`` matrix by layer distance ``|i - j| ≥ 1`` → columns ``distance, mean, std, min, max, pairs``."""
    n = matrix.shape[0]
    rows = []
    for k in range(1, n):
        diag = matrix.diagonal(k).double()
        rows.append({"distance": k, "mean": float(diag.mean()), "std": float(diag.std()) if len(diag) > 1 else 0.0,
                     "min": float(diag.min()), "max": float(diag.max()), "pairs": len(diag)})
    return pd.DataFrame(rows)


def distance_profile(matrices: torch.Tensor) -> torch.Tensor:
    """Mean over layer pairs at each distance ``k = 1 … L-1`` of each matrix: ``(N, L, L)`` → ``(N, L-1)``."""
    n = matrices.shape[-1]
    return torch.stack([matrices.diagonal(k, dim1=-2, dim2=-1).double().mean(-1) for k in range(1, n)], dim=-1)


def adjacent(matrix: torch.Tensor) -> pd.DataFrame:
    """Adjacent-layer profile of an ``(L, L)`` matrix → columns ``layer`` (ℓ ≥ 1), ``value`` = M[ℓ-1, ℓ]."""
    return pd.DataFrame({"layer": range(1, matrix.shape[0]), "value": matrix.diagonal(1).double().numpy()})
