"""``minicache``: SLERP merge of adjacent layer pairs' K/V from the middle layer up (MiniCache, re-implemented).

After the context prefill, layers ``(s, s+1), (s+2, s+3), …`` within ``[start_layer, end_layer)``
(default ``[L/2, L)``; an odd last layer stays plain) are merged per token and KV head: each vector
is split into magnitude and direction, the two directions are SLERP-ed with ``t`` (``t=0`` gives
the lower layer's direction, ``t=1`` the upper's), and the cache stores the shared direction
``(B, H_kv, T, d)`` once per pair, each layer's magnitudes ``(B, H_kv, T)``, and the **retained**
rows ``(N, d)`` of both layers unmerged together with their flat indices ``(N,)`` (int32 into
``B·H_kv·T``). Keys are merged post-RoPE (both layers share positions). K and V are merged and
retained independently. Tokens appended later (question, decoded) are stored exactly; ``cache.reset()``
drops every pair's merge (the next prompt is merged again); a batch of different sequences is refused at
the merge (padding would become the sink token and enter the angle range). Decode reads
the pair through the attention channel (:class:`MergedPrefix`): scores ``(q·directionᵀ)⊙magnitude``
with the retained rows' scores put in place, values ``(P⊙magnitude)·direction`` plus the retained rows'
part, so the merged K and V are never materialised.

Retention compares each row's angle Ω between the two layers' vectors with the range
``[Ω_min, Ω_max]`` over the prompt tokens and heads of the merged pair, the attention-sink token
(position 0) excluded from the min/max and always retained:

- ``retention="paper"`` (the paper's prose: keep the pairs that are hard to merge) retains rows with
  ``Ω ≥ Ω_max − γ·(Ω_max − Ω_min)``, the most dissimilar γ of the range;
- ``retention="xkv"`` (xKV's re-implementation) retains rows with ``Ω ≤ Ω_min + γ·(Ω_max − Ω_min)``,
  the most similar ones.

With ``gamma=1`` both readings retain every row, so the cache is exact (and larger than a plain one).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator

import torch

from crosskv.core.capture import KVShape, kv_shape
from crosskv.methods.base import MethodConfig, Runner, register
from crosskv.cache.attention import CompressedPrefix, installed
from crosskv.cache.batch import check_one_sequence
from crosskv.cache.plain import PlainLayer
from crosskv.cache.prefix import PrefixCache, PrefixLayer
from crosskv.cache.quant import QuantSpec, Stored, dense, parts, quantize_rows

log = logging.getLogger(__name__)

RETENTION = ("paper", "xkv")


@register
@dataclass(frozen=True)
class MiniCache(MethodConfig):
    """Merge layer pairs from ``start_layer`` by SLERP (``t``), keep rows selected by ``gamma`` unmerged."""

    name = "minicache"
    description = "MiniCache: SLERP-merged directions of adjacent layer pairs + per-layer magnitudes + retained rows"
    plain_prefill = True  # merges after the prefill

    start_layer: int | None = None  # default L // 2
    end_layer: int | None = None    # exclusive; default L
    t: float = 0.6
    gamma: float = 0.05
    retention: str = "paper"        # "paper" | "xkv" (see the module docstring)

    def __post_init__(self):
        for field in ("t", "gamma"):
            value = getattr(self, field)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{field}={value} must be in [0, 1]")
        if self.retention not in RETENTION:
            raise ValueError(f"retention={self.retention!r} must be one of {', '.join(RETENTION)}")
        if self.start_layer is not None and self.start_layer < 0:
            raise ValueError(f"start_layer={self.start_layer} must be ≥ 0")

    def pairs(self, shape: KVShape) -> list[tuple[int, int]]:
        """The merged layer pairs, checked against the model's layer count."""
        start = shape.layers // 2 if self.start_layer is None else self.start_layer
        end = shape.layers if self.end_layer is None else self.end_layer
        if end > shape.layers:
            raise ValueError(f"end_layer={end} exceeds the model's {shape.layers} layers")
        if start >= shape.layers:
            raise ValueError(f"start_layer={start} is outside the model's {shape.layers} layers")
        if end - start < 2:
            raise ValueError(f"layer range [{start}, {end}) holds no pair of layers")
        return [(i, i + 1) for i in range(start, end - 1, 2)]

    def bind(self, model, tokenizer=None) -> "MiniCacheRunner":
        self.pairs(kv_shape(model))
        return MiniCacheRunner(self, model, tokenizer)


def slerp_directions(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit SLERP of the directions of ``a`` and ``b`` ``(..., d)`` → (direction ``(..., d)``, angle Ω ``(...)``)."""
    ua = a.float() / a.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    ub = b.float() / b.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = (ua * ub).sum(-1).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    near = sin < 1e-6  # parallel (or antiparallel) directions: fall back to linear interpolation
    safe = torch.where(near, torch.ones_like(sin), sin)
    wa = torch.where(near, torch.full_like(sin, 1 - t), torch.sin((1 - t) * omega) / safe)
    wb = torch.where(near, torch.full_like(sin, t), torch.sin(t * omega) / safe)
    direction = wa[..., None] * ua + wb[..., None] * ub
    return direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12), omega


def retained_mask(omega: torch.Tensor, gamma: float, retention: str) -> torch.Tensor:
    """Rows kept unmerged, ``(B, H, T)`` bool from angles ``(B, H, T)``; token 0 (the sink) always kept.

    The range [Ω_min, Ω_max] is the merged pair's: over all its heads and tokens 1…T−1 (per sequence of the
    batch), as in the paper and xKV's re-implementation (which flattens B·H·T rows), not per head.
    """
    keep = torch.zeros_like(omega, dtype=torch.bool)
    keep[..., 0] = True
    if omega.shape[-1] < 2:
        return keep
    rest = omega[..., 1:]
    low = rest.amin(dim=(-2, -1), keepdim=True)
    high = rest.amax(dim=(-2, -1), keepdim=True)
    if retention == "paper":
        keep[..., 1:] = rest >= high - gamma * (high - low)
    else:
        keep[..., 1:] = rest <= low + gamma * (high - low)
    return keep


@dataclass
class MergedTensor:
    """One merged pair of K (or V): shared direction, per-layer magnitudes, retained rows and their indices.

    The float fields are held as floats or, after :meth:`quantize_`, as codes only (dequantized in
    :meth:`rebuild`, inside the step).
    """

    direction: Stored           # (B, H, T, d)
    magnitudes: Stored          # (2, B, H, T)
    indices: torch.Tensor       # (N,) int32 into B·H·T
    rows: Stored                # (2, N, d)

    def tensors(self) -> Iterator[torch.Tensor]:
        for field in (self.direction, self.magnitudes, self.indices, self.rows):
            yield from parts(field)

    def quantize_(self, spec: QuantSpec) -> None:
        """Hold direction, magnitudes and retained rows as codes (groups along each one's last axis)."""
        self.direction = quantize_rows(self.direction, spec)
        self.magnitudes = quantize_rows(self.magnitudes, spec)
        self.rows = quantize_rows(self.rows, spec)

    def rebuild(self, which: int) -> torch.Tensor:
        """Layer ``which`` (0 = lower, 1 = upper) of the pair, ``(B, H, T, d)``."""
        x = dense(self.magnitudes)[which].unsqueeze(-1) * dense(self.direction)
        flat = x.reshape(-1, x.shape[-1])
        flat[self.indices.long()] = dense(self.rows)[which]
        return flat.view_as(x)


def merge_pair(a: torch.Tensor, b: torch.Tensor, t: float, gamma: float, retention: str) -> MergedTensor:
    """Merge two layers' K (or V) ``(B, H, T, d)`` into a :class:`MergedTensor` (stored in ``a.dtype``).

    A retained row's magnitudes are stored as 0 (its stored row replaces it whole), so ``m·direction``
    is zero there and decode adds the retained rows' part separately (:class:`MergedPrefix`).
    """
    direction, omega = slerp_directions(a, b, t)
    keep = retained_mask(omega, gamma, retention)
    indices = keep.flatten().nonzero().squeeze(-1)
    d = a.shape[-1]
    rows = torch.stack([a.reshape(-1, d)[indices], b.reshape(-1, d)[indices]])
    magnitudes = torch.stack([a.float().norm(dim=-1), b.float().norm(dim=-1)]).masked_fill(keep, 0.0)
    return MergedTensor(direction.to(a.dtype), magnitudes.to(a.dtype), indices.to(torch.int32), rows)


@dataclass(frozen=True)
class MergedPrefix(CompressedPrefix):
    """Layer ``which`` of a merged pair as attention reads it, without rebuilding K or V.

    ``key_dir``/``value_dir`` ``(B, H, T, d)``; ``key_mag``/``value_mag`` ``(B, H, T)`` (0 at retained rows);
    ``key_index``/``value_index`` ``(N,)`` flat indices into ``B·H·T``; ``key_rows``/``value_rows`` ``(N, d)``.
    Scores: ``(q·dirᵀ)⊙m`` plus ``q·row`` at the retained rows; values: ``(P⊙m)·dir`` plus ``P_row·row``.
    """

    key_dir: torch.Tensor
    key_mag: torch.Tensor
    key_index: torch.Tensor
    key_rows: torch.Tensor
    value_dir: torch.Tensor
    value_mag: torch.Tensor
    value_index: torch.Tensor
    value_rows: torch.Tensor

    @property
    def length(self) -> int:
        return self.key_dir.shape[-2]

    def scores(self, q: torch.Tensor) -> torch.Tensor:
        b, h, n, d = q.shape
        t = self.length
        scores = (q @ self.key_dir.transpose(-1, -2)).float() * self.key_mag.unsqueeze(-2).float()  # (B, H, n, T)
        index = self.key_index.long()
        bh, pos = index // t, index % t                                                           # (N,) each
        row_scores = (q.reshape(b * h, n, d)[bh] @ self.key_rows.unsqueeze(-1)).squeeze(-1)      # (N, n)
        flat = scores.view(b * h, n, t)
        flat[bh, :, pos] = row_scores.float()
        return scores

    def apply(self, probs: torch.Tensor) -> torch.Tensor:
        b, h, n, t = probs.shape
        weights = (probs.float() * self.value_mag.unsqueeze(-2).float()).to(probs.dtype)          # (B, H, n, T)
        out = weights @ self.value_dir                                                            # (B, H, n, d)
        index = self.value_index.long()
        bh, pos = index // t, index % t
        picked = probs.reshape(b * h, n, t)[bh, :, pos]                                           # (N, n)
        rows = picked.unsqueeze(-1) * self.value_rows.unsqueeze(1)                                # (N, n, d)
        return out.reshape(b * h, n, -1).index_add(0, bh, rows.to(out.dtype)).view_as(out)


class MergedPair:
    """The merged K and V of one layer pair (``None`` until compressed)."""

    def __init__(self, layers: tuple[int, int]):
        self.layers = layers
        self.keys: MergedTensor | None = None
        self.values: MergedTensor | None = None

    def tensors(self) -> Iterator[torch.Tensor]:
        if self.keys is not None:
            yield from self.keys.tensors()
            yield from self.values.tensors()

    def quantize_(self, spec: QuantSpec) -> None:
        if self.keys is not None:
            self.keys.quantize_(spec)
            self.values.quantize_(spec)

    def release(self) -> None:
        """Drop the merged K and V (for :meth:`MiniCacheCache.reset`): the pair can be merged again."""
        self.keys = self.values = None

    def retained_rows(self) -> tuple[int, int]:
        """Retained rows ``(N_k, N_v)`` (0, 0 before compression)."""
        if self.keys is None:
            return 0, 0
        return self.keys.indices.numel(), self.values.indices.numel()


class MergedLayer(PrefixLayer):
    """One layer of a merged pair (``which`` = 0 lower, 1 upper); everything it holds lives in the pair."""

    def __init__(self, pair: MergedPair, which: int):
        super().__init__()
        self.pair = pair
        self.which = which

    def prefix_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pair.keys.rebuild(self.which), self.pair.values.rebuild(self.which)

    def release_prefix(self) -> None:
        """Nothing of its own to drop: the pair's tensors are released by the cache (:meth:`MergedPair.release`)."""

    def compressed_prefix(self) -> MergedPrefix:
        """This layer's half of the pair, read by attention without rebuilding (stored tensors, dequantized
        per step if held as codes)."""
        keys, values, w = self.pair.keys, self.pair.values, self.which
        return MergedPrefix(dense(keys.direction), dense(keys.magnitudes)[w], keys.indices, dense(keys.rows)[w],
                            dense(values.direction), dense(values.magnitudes)[w], values.indices,
                            dense(values.rows)[w])


class MiniCacheCache(PrefixCache):
    """``MergedLayer`` for the merged pairs, :class:`~crosskv.cache.plain.PlainLayer` elsewhere."""

    def __init__(self, config: MiniCache, shape: KVShape):
        self.config = config
        self.pairs = [MergedPair(p) for p in config.pairs(shape)]
        layers: list = [PlainLayer() for _ in range(shape.layers)]
        for pair in self.pairs:
            layers[pair.layers[0]] = MergedLayer(pair, 0)
            layers[pair.layers[1]] = MergedLayer(pair, 1)
        super().__init__(layers)
        self.shared = self.pairs

    def compress(self) -> None:
        """Merge every pair not yet merged (idempotent)."""
        for pair in self.pairs:
            if pair.keys is None:
                self.merge(pair)

    def merge(self, pair: MergedPair) -> None:
        lower, upper = (self.layers[i] for i in pair.layers)
        check_one_sequence(lower.keys, self.config.name, "padding would enter its merge as the sink token and "
                           "in the angle range")
        (ka, va), (kb, vb) = lower.take_tail(), upper.take_tail()
        cfg = self.config
        pair.keys = merge_pair(ka, kb, cfg.t, cfg.gamma, cfg.retention)
        pair.values = merge_pair(va, vb, cfg.t, cfg.gamma, cfg.retention)
        lower.prefix_len = upper.prefix_len = ka.shape[-2]
        log.debug("merged layers %s: T=%d retained K/V rows %s", pair.layers, ka.shape[-2], pair.retained_rows())

    def retained_rows(self) -> tuple[int, int]:
        """Total retained rows over all pairs, ``(N_k, N_v)``."""
        counts = [pair.retained_rows() for pair in self.pairs]
        return sum(k for k, _ in counts), sum(v for _, v in counts)


class MiniCacheRunner(Runner):
    """Binds a :class:`MiniCache` config; merging happens in :meth:`compress` after the prefill."""

    def __init__(self, config: MiniCache, model, tokenizer=None):
        super().__init__(config, model, tokenizer)
        self.shape = kv_shape(model)

    @contextlib.contextmanager
    def applied(self) -> Iterator["MiniCacheRunner"]:
        """Merged layers hand their pair to the ``crosskv`` attention (:mod:`crosskv.cache.attention`)."""
        with installed(self.model):
            yield self

    def new_cache(self) -> MiniCacheCache:
        return MiniCacheCache(self.config, self.shape)

    def compress(self, cache: MiniCacheCache) -> None:
        cache.compress()
