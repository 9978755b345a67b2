"""``xkv`` (cross-layer SVD of the KV cache, groups of G layers) and ``svd`` (the same with G=1, Single SVD).

After the context prefill, each group of G consecutive layers in ``[start_layer, end_layer)``
stacks its layers' **pre-RoPE** keys side by side, ``(B, T, G·H_kv·d)``, takes a float32 thin SVD
per batch element and keeps rank ``rank_k``; values likewise with ``rank_v``. The factorisation is
:func:`crosskv.core.lowrank.gram_factors` (Gram-matrix eigendecomposition, K and V of a group batched). The cache then holds
only the group's token basis ``(B, T, r)`` once and one factor ``(B, r, H_kv·d)`` per layer
(singular values folded into the factors), plus tokens appended later (question, decoded) stored
exactly. Keys are rebuilt as ``RoPE(basis @ factor)`` at their original absolute positions.
After token eviction (``compose``) a group keeps one token set; its kept absolute positions
``(T',)`` int32 are stored with the group and used to undo RoPE before the SVD and redo it after.
``cache.reset()`` drops every group's bases and positions and every layer's factors and tail (the next prompt
is compressed anew); a batch of different sequences is refused at compression by the method's name (the SVD
would read every row at positions 0…T−1, padding included), identical rows pass.

Ranks are per group. When G does not divide the range, the last group has G' < G layers and ranks
``round(r·G'/G)`` (so a lossless rank G·H_kv·d stays lossless). With ``kept`` instead of ranks, the
ranks are derived at compression time from the actual context length T (see :func:`ranks_for_kept`).
With no ranks and no ``kept``, ``rank_k = ⌈G·H_kv·d/8⌉`` (the xKV README's 512 of 4096 for
Llama-3.1-8B G=4, and Single SVD's 128 of 1024) and ``rank_v = round(1.5·rank_k)``.

Attention paths (``attention``): ``reconstruct`` rebuilds K and V of the prefix and hands them to
the model's own attention; ``factored`` (the default, the decode fast path) hands a :class:`FactoredPrefix` to the
``crosskv`` attention function through the explicit channel of :mod:`crosskv.cache.attention`,
which never concatenates prefix and tail: it scores the
prefix and the exact tail separately and softmaxes their concatenated *scores*; the prefix rebuilds the
prefix keys transposed, ``Kᵀ = factorᵀ·basisᵀ`` ``(B, H_kv, d, T_c)`` (one GEMM of T_c·r_k·H_kv·d
multiply-adds, the floor for an exact low-rank key cache: RoPE differs per position, so the key
up-projection cannot be absorbed into the query), rotates them with cos/sin tables at the prefix's absolute
positions (the cache's :class:`~crosskv.core.rotary.RopeTables`: made once per forward and device, shared by
every layer, released after the model's last layer, so nothing extra is held between decode steps), and
applies values in factored form, ``(softmax(qKᵀ)·basis)·factor``, never materialising V of the prefix.

Strict mode (``strict=True``, labelled "strict" in figures): a group is compressed inside the
prefill forward as soon as its **last** layer's K/V arrive; that layer (and every later forward)
attends on the reconstruction, and later layers' K/V are computed from the perturbed stream. The
group's first G−1 layers already attended on their exact K/V in that forward (their inputs to the
SVD are exact). For G=1 this means every layer in range attends on its own rank-r reconstruction.
Strict mode needs the whole context in one prefill forward.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Iterator

import torch

from crosskv.core import rotary as rope
from crosskv.core.capture import KVShape, Rotary, kv_shape
from crosskv.core.lowrank import gram_factors, group_matrix
from crosskv.methods.base import MethodConfig, Runner, register
from crosskv.cache.attention import CompressedPrefix, installed
from crosskv.cache.batch import check_one_sequence
from crosskv.cache.layer import ReleasesRopePerForward
from crosskv.cache.kernels.factored import factored_decode_attention, factored_decode_scores
from crosskv.cache.kernels.launch import use_kernel
from crosskv.cache.plain import PlainLayer
from crosskv.cache.prefix import PrefixCache, PrefixLayer
from crosskv.cache.quant import QTensor, QuantSpec, Stored, dense, parts, quantize_rows

log = logging.getLogger(__name__)

V_OVER_K = 1.5  # rank_v / rank_k in the xKV papers


@dataclass(frozen=True)
class GroupPlan:
    """One group: its layer indices and per-group ranks (before capping at the context length)."""

    layers: tuple[int, ...]
    rank_k: int
    rank_v: int

    def effective(self, tokens: int) -> tuple[int, int]:
        """Ranks actually kept for ``tokens`` prompt tokens: at most min(T, G·H_kv·d) components exist."""
        return min(self.rank_k, tokens), min(self.rank_v, tokens)


@register
@dataclass(frozen=True)
class XKV(MethodConfig):
    """Cross-layer SVD: one shared token basis per group of ``group_size`` layers, per-layer factors."""

    name = "xkv"
    description = "xKV: shared low-rank token basis per group of G layers (pre-RoPE K, V), per-layer factors"

    group_size: int = 4
    rank_k: int | None = None    # per-group rank of K; G·H_kv·d is lossless
    rank_v: int | None = None    # per-group rank of V; default round(1.5·rank_k)
    kept: float | None = None    # target kept fraction of the range's bytes (instead of ranks)
    start_layer: int = 0
    end_layer: int | None = None  # exclusive; default: all layers
    strict: bool = False         # compress inside the prefill forward (see module docstring)
    attention: str = "factored"  # "factored" | "reconstruct"

    def __post_init__(self):
        if self.group_size <= 0:
            raise ValueError(f"group_size={self.group_size} must be positive")
        for field in ("rank_k", "rank_v"):
            value = getattr(self, field)
            if value is not None and value <= 0:
                raise ValueError(f"{field}={value} must be positive")
        if self.kept is not None:
            if not 0.0 < self.kept <= 1.0:
                raise ValueError(f"kept={self.kept} must be in (0, 1]")
            if self.rank_k is not None or self.rank_v is not None:
                raise ValueError(f"kept={self.kept} derives the ranks; do not also set rank_k/rank_v")
        if self.start_layer < 0:
            raise ValueError(f"start_layer={self.start_layer} must be ≥ 0")
        if self.end_layer is not None and self.end_layer <= self.start_layer:
            raise ValueError(f"end_layer={self.end_layer} must exceed start_layer={self.start_layer}")
        if self.attention not in ("factored", "reconstruct"):
            raise ValueError(f"attention={self.attention!r} must be 'factored' or 'reconstruct'")

    @property
    def plain_prefill(self) -> bool:
        """Non-strict runs compress after a plain prefill; strict ones inside it."""
        return not self.strict

    def layer_range(self, shape: KVShape) -> tuple[int, int]:
        """``(start, end)`` checked against the model's layer count."""
        end = shape.layers if self.end_layer is None else self.end_layer
        if end > shape.layers:
            raise ValueError(f"end_layer={end} exceeds the model's {shape.layers} layers")
        if self.start_layer >= shape.layers:
            raise ValueError(f"start_layer={self.start_layer} is outside the model's {shape.layers} layers")
        if self.group_size > end - self.start_layer:
            raise ValueError(f"group_size={self.group_size} exceeds the layer range [{self.start_layer}, {end}) "
                             f"of {end - self.start_layer} layers")
        return self.start_layer, end

    def check(self, shape: KVShape) -> None:
        """Validate against the model geometry (layer range, ranks ≤ group width)."""
        self.layer_range(shape)
        width = self.group_size * shape.width
        for field in ("rank_k", "rank_v"):
            value = getattr(self, field)
            if value is not None and value > width:
                raise ValueError(f"{field}={value} exceeds the group width {width} "
                                 f"(group_size {self.group_size} × {shape.kv_heads} heads × {shape.head_dim})")

    def groups(self, shape: KVShape) -> list[tuple[int, ...]]:
        """Layer indices of each group: consecutive runs of ``group_size`` over the range, the last maybe shorter."""
        start, end = self.layer_range(shape)
        return [tuple(range(first, min(first + self.group_size, end))) for first in range(start, end, self.group_size)]

    def plan(self, shape: KVShape, tokens: int | None = None) -> list[GroupPlan]:
        """The groups and their ranks; ``kept`` needs the prompt length ``tokens``."""
        self.check(shape)
        rank_k, rank_v = self.full_group_ranks(shape, tokens)
        return [GroupPlan(layers, scale_rank(rank_k, len(layers), self.group_size),
                          scale_rank(rank_v, len(layers), self.group_size)) for layers in self.groups(shape)]

    def full_group_ranks(self, shape: KVShape, tokens: int | None) -> tuple[int, int]:
        """``(rank_k, rank_v)`` of a group of ``group_size`` layers."""
        width = self.group_size * shape.width
        if self.kept is not None:
            if tokens is None:
                raise ValueError(f"kept={self.kept} needs the prompt length to derive ranks")
            return ranks_for_kept(self.kept, tokens, self.group_size, shape.width)
        rank_k = self.rank_k if self.rank_k is not None else math.ceil(width / 8)
        rank_v = self.rank_v if self.rank_v is not None else min(width, round(V_OVER_K * rank_k))
        return rank_k, rank_v

    def bind(self, model, tokenizer=None) -> "LowRankRunner":
        self.check(kv_shape(model))
        return LowRankRunner(self, model, tokenizer)


@register
@dataclass(frozen=True)
class SingleSVD(XKV):
    """Single SVD (Palu-like): xKV with one layer per group."""

    name = "svd"
    description = "Single SVD: per-layer low-rank token basis of pre-RoPE K and V (xKV with G=1)"

    group_size: int = 1

    def __post_init__(self):
        if self.group_size != 1:
            raise ValueError(f"group_size={self.group_size}: svd is xkv with group_size=1; use xkv for groups")
        super().__post_init__()


def scale_rank(rank: int, layers: int, group_size: int) -> int:
    """Rank of a group of ``layers`` < ``group_size`` layers: round(rank·layers/group_size), at least 1."""
    return max(1, (rank * layers + group_size // 2) // group_size)


def ranks_for_kept(kept: float, tokens: int, group_size: int, width: int) -> tuple[int, int]:
    """Per-group ``(rank_k, rank_v)`` so a full group holds ≈ ``kept`` of its uncompressed bytes.

    A group of G layers stores ``T·(r_k + r_v)`` (bases) + ``G·(r_k + r_v)·W`` (factors) elements
    against ``2·G·T·W`` uncompressed (W = H_kv·d), so ``r_k + r_v = kept·2·G·T·W / (T + G·W)``;
    split as ``r_v = 1.5·r_k`` (floor), each capped at the lossless ``min(T, G·W)``. Tokens appended
    later are not part of the target.
    """
    total = kept * 2 * group_size * tokens * width / (tokens + group_size * width)
    cap = min(tokens, group_size * width)
    rank_k = max(1, min(cap, math.floor(total / (1 + V_OVER_K))))
    rank_v = max(1, min(cap, math.floor(V_OVER_K * rank_k)))
    return rank_k, rank_v


class LowRankGroup:
    """A group's shared token bases ``(B, T_c, r_k)`` and ``(B, T_c, r_v)`` (``None`` until compressed).

    The bases are held as floats or, after :meth:`quantize_`, as codes only; reading ``basis_k`` /
    ``basis_v`` returns floats, codes dequantized once per forward for every layer of the group (kept in
    ``step`` until the cache's ``forward_done``, and counted by :meth:`tensors` while kept). ``positions`` ``(T_c,)``:
    absolute positions of the compressed tokens when an evicting composition kept a subset; ``None``
    means ``0…T_c−1`` and holds nothing.
    """

    def __init__(self, layers: tuple[int, ...]):
        self.layers = layers
        self.held_k: Stored | None = None
        self.held_v: Stored | None = None
        self.positions: torch.Tensor | None = None  # (T_c,) int32 kept absolute positions; None: 0…T_c−1
        self.step: dict[str, torch.Tensor] = {}  # bases dequantized in the forward in progress

    def dense_once(self, name: str) -> torch.Tensor | None:
        """The float basis ``held_k``/``held_v`` (``name`` ``"k"``/``"v"``): codes dequantized once per forward."""
        held = getattr(self, f"held_{name}")
        if not isinstance(held, QTensor):
            return held
        if name not in self.step:
            self.step[name] = held.dequantize()
        return self.step[name]

    basis_k = property(lambda self: self.dense_once("k"), lambda self, x: setattr(self, "held_k", x))
    basis_v = property(lambda self: self.dense_once("v"), lambda self, x: setattr(self, "held_v", x))

    def prefix_positions(self, tokens: int, device) -> torch.Tensor:
        """Absolute positions ``(T_c,)`` int64 of the group's compressed tokens."""
        if self.positions is None:
            return torch.arange(tokens, device=device)
        return self.positions.to(device=device, dtype=torch.long)

    @property
    def compressed(self) -> bool:
        return self.held_k is not None

    def tensors(self) -> Iterator[torch.Tensor]:
        yield from parts(self.held_k)
        yield from parts(self.held_v)
        if self.positions is not None:
            yield self.positions
        yield from self.step.values()

    def quantize_(self, spec: QuantSpec) -> None:
        """Hold the bases as codes, quantized per token (groups along the rank axis)."""
        self.held_k, self.held_v = quantize_rows(self.held_k, spec), quantize_rows(self.held_v, spec)
        self.step = {}

    def release(self) -> None:
        """Drop the bases and kept positions (for :meth:`LowRankCache.reset`): the group can be compressed again."""
        self.held_k = self.held_v = self.positions = None
        self.step = {}


class LowRankLayer(PrefixLayer):
    """A layer of a group: its factors ``(B, r, H_kv·d)`` for K and V, the group's bases, exact tail."""

    def __init__(self, cache: "LowRankCache", group: LowRankGroup):
        super().__init__()
        self.cache = cache
        self.group = group
        self.held_factor_k: Stored | None = None
        self.held_factor_v: Stored | None = None

    factor_k = property(lambda self: dense(self.held_factor_k), lambda self, x: setattr(self, "held_factor_k", x))
    factor_v = property(lambda self: dense(self.held_factor_v), lambda self, x: setattr(self, "held_factor_v", x))

    def prefix_tensors(self) -> Iterator[torch.Tensor]:
        yield from parts(self.held_factor_k)
        yield from parts(self.held_factor_v)

    def quantize_(self, spec: QuantSpec) -> None:
        """Hold the factors as codes, quantized per rank row (groups along the H_kv·d axis)."""
        self.held_factor_k = quantize_rows(self.held_factor_k, spec)
        self.held_factor_v = quantize_rows(self.held_factor_v, spec)

    def release_prefix(self) -> None:
        """Drop this layer's factors (for :meth:`reset`; the group's bases are released by the cache)."""
        self.held_factor_k = self.held_factor_v = None

    def _rebuild(self, basis: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """``(B, T_c, r) @ (B, r, H·d)`` → ``(B, H, T_c, d)``."""
        b, t, _ = basis.shape
        return (basis @ factor).view(b, t, self.cache.shape.kv_heads, -1).transpose(1, 2)

    def prefix_keys(self) -> torch.Tensor:
        keys = self._rebuild(self.group.basis_k, self.factor_k)  # (B, H, T_c, d), pre-RoPE
        return rope.apply(keys, *self.cache.prefix_tables(self.group, self.prefix_len, keys.device, keys.dtype))

    def prefix_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prefix_keys(), self._rebuild(self.group.basis_v, self.factor_v)

    def compressed_prefix(self) -> "FactoredPrefix | None":
        """The factored prefix (``attention="factored"``), RoPE tables shared per forward; else ``None``."""
        if not self.cache.factored:
            return None
        cos, sin = self.cache.prefix_tables(self.group, self.prefix_len, self.keys.device, self.keys.dtype,
                                            transposed=True)
        return FactoredPrefix(self.group.basis_k, self.factor_k, self.group.basis_v, self.factor_v, cos, sin)

    def on_append(self) -> None:
        if self.cache.strict_now() and not self.group.compressed and self is self.cache.last_of(self.group):
            self.cache.compress_group(self.group)


class LowRankCache(ReleasesRopePerForward, PrefixCache):
    """xKV/SVD cache: ``LowRankLayer`` for layers in groups, :class:`~crosskv.cache.plain.PlainLayer` elsewhere.

    ``rope`` holds the RoPE tables of the forward in progress (see :meth:`update`): none between forwards.
    ``method`` names the method in refusals (default ``config.name``; a method built on xKV passes its own).
    """

    def __init__(self, config: XKV, shape: KVShape, rotary: Rotary, method: str | None = None):
        self.config = config
        self.method = config.name if method is None else method
        self.shape = shape
        self.rotary = rotary
        self.factored = config.attention == "factored"
        self.groups: list[LowRankGroup] = []
        layers: list = [PlainLayer() for _ in range(shape.layers)]
        for group_layers in config.groups(shape):
            group = LowRankGroup(group_layers)
            self.groups.append(group)
            for index in group_layers:
                layers[index] = LowRankLayer(self, group)
        super().__init__(layers)
        self.shared = self.groups
        self.rope = rope.RopeTables(rotary)

    def stored_tensors(self) -> Iterator[torch.Tensor]:
        yield from super().stored_tensors()
        yield from self.rope.tensors()

    def reset(self) -> None:
        """Forget every token as a new cache: bases, factors, exact tails (:meth:`PrefixCache.reset`), RoPE tables."""
        super().reset()
        self.rope.release()

    def forward_done(self) -> None:
        """Release the forward's RoPE tables and the bases its layers dequantized."""
        super().forward_done()
        for group in self.groups:
            group.step = {}

    def prefix_tables(self, group: LowRankGroup, tokens: int, device, dtype: torch.dtype, transposed: bool = False):
        """cos, sin ``(1, 1, T_c, d)`` (``transposed``: ``(1, 1, d, T_c)``) at ``group``'s ``tokens`` prefix
        positions on ``device``, made once per forward."""
        positions = range(tokens) if group.positions is None else group.positions
        return self.rope.at(positions, device, dtype, transposed)

    def strict_now(self) -> bool:
        return self.config.strict and self.in_prefill

    def last_of(self, group: LowRankGroup) -> LowRankLayer:
        return self.layers[group.layers[-1]]

    def evict_tokens(self, positions: dict[int, torch.Tensor]) -> None:
        """Evict prompt rows before compression; each group keeps one token set, stored as its positions."""
        super().evict_tokens(positions)
        for group in self.groups:
            group.positions = positions[group.layers[0]].to(device=self.layers[group.layers[0]].keys.device,
                                                       dtype=torch.int32)

    def compress(self) -> None:
        """Compress every group not yet compressed (idempotent)."""
        for group in self.groups:
            if not group.compressed:
                self.compress_group(group)

    def compress_group(self, group: LowRankGroup) -> None:
        """Replace the group's exact prompt tokens by a shared basis and per-layer factors."""
        members = [self.layers[i] for i in group.layers]
        check_one_sequence(members[0].keys, self.method, "its SVD reads every row's prompt at positions 0…T−1, "
                           "padding included")
        tails = [layer.take_tail() for layer in members]
        tokens = tails[0][0].shape[-2]
        if any(k.shape[-2] != tokens for k, _ in tails) or any(layer.prefix_len for layer in members):
            raise RuntimeError(f"group {group.layers} has unequal or already-compressed prompts")
        positions = group.prefix_positions(tokens, tails[0][0].device)
        if positions.numel() != tokens:
            raise RuntimeError(f"group {group.layers} holds {tokens} prompt tokens but {positions.numel()} positions")
        keys = torch.stack([self.rotary.unrotate(k.float(), positions) for k, _ in tails])  # (G, B, H, T, d)
        values = torch.stack([v.float() for _, v in tails])                                 # (G, B, H, T, d)
        plan = {p.layers: p for p in self.config.plan(self.shape, tokens)}[group.layers]
        rank_k, rank_v = plan.effective(tokens)
        dtype = tails[0][0].dtype
        b = keys.shape[1]
        bases, factors = gram_factors(torch.cat([group_matrix(keys), group_matrix(values)]), max(rank_k, rank_v))
        group.basis_k, factor_k = bases[:b, :, :rank_k], factors[:b, :rank_k]  # (B, T, r_k), (B, r_k, G·W)
        group.basis_v, factor_v = bases[b:, :, :rank_v], factors[b:, :rank_v]  # (B, T, r_v), (B, r_v, G·W)
        group.basis_k, group.basis_v = _owned(group.basis_k, dtype), _owned(group.basis_v, dtype)
        for i, layer in enumerate(members):
            layer.factor_k = _owned(factor_k[..., i * self.shape.width:(i + 1) * self.shape.width], dtype)
            layer.factor_v = _owned(factor_v[..., i * self.shape.width:(i + 1) * self.shape.width], dtype)
            layer.prefix_len = tokens
        log.debug("compressed layers %s: T=%d rank_k=%d rank_v=%d", group.layers, tokens, rank_k, rank_v)


def _owned(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``, contiguous, in its own storage (a view would pin the whole factorisation)."""
    y = x.to(dtype).contiguous()
    return y.clone() if y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() else y


class LowRankRunner(Runner):
    """Binds an :class:`XKV` config: installs the factored attention function when asked."""

    def __init__(self, config: XKV, model, tokenizer=None):
        super().__init__(config, model, tokenizer)
        self.shape = kv_shape(model)
        self.rotary = Rotary(model)

    @contextlib.contextmanager
    def applied(self) -> Iterator["LowRankRunner"]:
        if self.config.attention != "factored":
            yield self
            return
        with installed(self.model):
            yield self

    def new_cache(self) -> LowRankCache:
        return LowRankCache(self.config, self.shape, self.rotary)

    @contextlib.contextmanager
    def prefill(self, cache: LowRankCache) -> Iterator[None]:
        cache.in_prefill = True
        try:
            yield
        finally:
            cache.in_prefill = False

    def compress(self, cache: LowRankCache) -> None:
        cache.compress()


@dataclass(frozen=True)
class FactoredPrefix(CompressedPrefix):
    """A layer's low-rank prefix as :func:`crosskv.cache.attention.crosskv_attention` reads it.

    ``basis_k`` ``(B, T_c, r_k)``, ``factor_k`` ``(B, r_k, H_kv·d)`` (pre-RoPE keys = basis·factor),
    ``basis_v`` ``(B, T_c, r_v)``, ``factor_v`` ``(B, r_v, H_kv·d)``; ``cos``, ``sin`` RoPE at the prefix's
    absolute positions, transposed for ``Kᵀ``: ``(1, 1, d, T_c)`` each.
    """

    basis_k: torch.Tensor
    factor_k: torch.Tensor
    basis_v: torch.Tensor
    factor_v: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor

    @property
    def length(self) -> int:
        return self.basis_k.shape[1]

    def scores(self, q: torch.Tensor) -> torch.Tensor:
        """``q`` ``(B, H_kv, n, d)`` → ``q·RoPE(K)ᵀ`` ``(B, H_kv, n, T_c)`` float32, K rebuilt transposed.

        Rebuild: one GEMM ``factorᵀ·basisᵀ`` → ``(B, H_kv, d, T_c)``; RoPE in that transposed layout with the
        forward's tables; then one score GEMM. On CUDA the Triton kernel computes the same scores tile by tile
        without building K (:func:`crosskv.cache.kernels.factored.factored_decode_scores`).
        """
        if use_kernel(q):
            return factored_decode_scores(q, self.basis_k, self.factor_k, self.cos[0, 0].T, self.sin[0, 0].T)
        b, h_kv, _, d = q.shape
        keys_t = (self.factor_k.transpose(1, 2) @ self.basis_k.transpose(1, 2)).view(b, h_kv, d, -1)
        return (q @ rope.apply(keys_t.to(q.dtype), self.cos.to(q.dtype), self.sin.to(q.dtype), dim=-2)).float()

    def fuses(self, q: torch.Tensor) -> bool:
        """Where the factored kernel runs (:func:`~crosskv.cache.kernels.launch.use_kernel`)."""
        return use_kernel(q)

    def decode(self, q, tail_k, tail_v, scale, bias):
        """The factored kernel: key tiles rebuilt in registers with RoPE, values absorbed (no K or V built)."""
        return factored_decode_attention(q, self.basis_k, self.factor_k, self.basis_v, self.factor_v,
                                         self.cos[0, 0].T, self.sin[0, 0].T, tail_k, tail_v, scale, bias)

    def apply(self, probs: torch.Tensor) -> torch.Tensor:
        """``probs`` ``(B, H_kv, n, T_c)`` → ``(probs·basis_v)·factor_v`` ``(B, H_kv, n, d)``."""
        b, h_kv, n, t = probs.shape
        mixed = probs.reshape(b, h_kv * n, t) @ self.basis_v                   # (B, H_kv·n, r_v)
        mixed = mixed.view(b, h_kv, n, -1)
        factor = self.factor_v.view(b, self.factor_v.shape[1], h_kv, -1).transpose(1, 2)  # (B, H_kv, r_v, d)
        return mixed @ factor
