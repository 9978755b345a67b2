"""``selective``: top-k reconstruction on a low-rank cache (xKV, Single SVD) at each decode step.

The base method compresses the prompt as it always does (a group's token basis ``(B, T_c, r)`` and
per-layer factors ``(B, r, H_kv·d)`` for K and V); nothing else is held between decode steps, so
the held bytes are the base's. At each **decode step** (one query token) a layer attends over

1. the prompt tokens chosen by a **latent scorer**: the query with RoPE undone at its own absolute
   position, ``q̃``, against the *pre-RoPE* low-rank keys, ``s̃_t = q̃·(basis_t·factor)``,
   computed as ``basis_t · (factor·q̃)`` — ``T_c·r'`` multiply-adds per query head instead of the
   exact path's rebuild of every key (``T_c·r·H_kv·d``) — using the leading ``score_rank`` basis
   columns (the SVD orders them by singular value) and only the ``score_frequencies`` fraction of
   RoPE frequency pairs with the lowest frequencies. It drops the relative rotation ``R(t − p)``
   between token and query, so it ranks tokens by content, not position; the high-frequency pairs,
   whose rotation over a long context is effectively random, are left out because their unrotated
   products mostly add noise (:mod:`crosskv.run.recall` measures the recall of each setting against
   exact keys on real caches). An approximation used only to *choose* tokens, never as an attention
   score. Per KV head the group's
   query heads are softmaxed separately and their probabilities summed; the ``top_k`` highest
   prompt tokens are kept;
2. the first ``sinks`` and the last ``window`` prompt tokens, always;
3. the exact tail (question, decoded tokens), always.

The chosen prompt tokens are rebuilt exactly — ``RoPE(basis_t·factor)`` at their true absolute
positions, values ``basis_t·factor_v`` — and attention is exact over them and the tail (one softmax
over their concatenated scores), through the explicit channel of :mod:`crosskv.cache.attention`
(a :class:`SelectivePrefix`: ``-inf`` scores off the chosen tokens). With ``top_k + sinks + window ≥
T_c`` every token is chosen and the output equals the base's factored attention. Every block appended
after compression (the question, a teacher-forced answer or continuation, whoever calls the model: the
harness, lm-eval, kvpress's pipeline, a user's loop) is read as that many decode steps in one forward:
each query chooses its own tokens and attends over them and the causal tail, as it would one token at a
time, with every prefix key rebuilt once for the block. So a block of n tokens scores as n one-token
forwards (the cache contract). Only a strict prefill's own block, which is the compressed prefix, attends
over the whole factored prefix as the base does. A batch of different sequences is refused at compression,
as the base refuses it; ``cache.reset()`` forgets the compressed prompt as the base's cache does.

The base and its parameters are strings so that ``make_method("selective", base="xkv",
base_params="group_size=4;kept=0.25", top_k="256")`` works from the command line. Supported bases:
:data:`BASES`; any other raises ``ValueError`` naming it (CommonKV holds one latent per layer rather
than a token basis with factors, a different reconstruction not implemented here).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from crosskv.cache.attention import CompressedKV, CompressedPrefix, ConcatPrefix, ExactPrefix, compressed_kv, installed
from crosskv.cache.kernels.launch import use_kernel
from crosskv.cache.kernels.selective import selective_decode_attention
from crosskv.cache.static import StepPrefix
from crosskv.core import rotary as rope
from crosskv.core.capture import Rotary
from crosskv.methods.base import MethodConfig, make_method, register
from crosskv.methods.compose import parse_params
from crosskv.methods.svd import XKV, FactoredPrefix, LowRankCache, LowRankLayer, LowRankRunner

BASES = ("xkv", "svd")


@register
@dataclass(frozen=True)
class Selective(MethodConfig):
    """Latent scoring, then exact reconstruction of the top-k prompt tokens plus sinks and a recent window."""

    name = "selective"
    description = ("selective reconstruction: latent-space token scores, exact RoPE rebuild of the top-k prompt "
                   "tokens + sinks + recent window of a low-rank (xKV / Single SVD) cache at each decode step")

    base: str = "xkv"
    base_params: str = ""          # the base's parameters, "a=1;b=2"
    top_k: int = 256               # prompt tokens chosen by the latent scorer per KV head and decode step
    sinks: int = 4                 # first prompt tokens always attended
    window: int = 64               # last prompt tokens always attended
    score_rank: int | None = None  # leading basis columns the scorer reads; None: all of rank_k
    score_frequencies: float = 0.5  # fraction of RoPE frequency pairs (lowest first) the scorer reads

    def __post_init__(self):
        if self.base not in BASES:
            raise ValueError(f"base={self.base!r} is not supported by selective reconstruction; supported: "
                             f"{', '.join(BASES)} (a token basis with per-layer factors)")
        if self.top_k <= 0:
            raise ValueError(f"top_k={self.top_k} must be positive")
        if self.sinks < 0:
            raise ValueError(f"sinks={self.sinks} must be ≥ 0")
        if self.window < 0:
            raise ValueError(f"window={self.window} must be ≥ 0")
        if self.score_rank is not None and self.score_rank <= 0:
            raise ValueError(f"score_rank={self.score_rank} must be positive")
        if not 0.0 < self.score_frequencies <= 1.0:
            raise ValueError(f"score_frequencies={self.score_frequencies} must be in (0, 1]")
        base = self.base_config()
        if base.attention != "factored":
            raise ValueError(f"base_params attention={base.attention!r}: selective reconstruction reads the "
                             "factored prefix; use the base's default attention='factored'")

    @property
    def strict(self) -> bool:
        """The base's strict mode (compositions refuse eviction with it)."""
        return self.base_config().strict

    @property
    def plain_prefill(self) -> bool:
        """The base's: selection changes decode steps only, so a non-strict base compresses a plain prefill."""
        return self.base_config().plain_prefill

    def base_config(self) -> XKV:
        """The base method's config (validates ``base_params``)."""
        return make_method(self.base, **parse_params(self.base_params))

    def bind(self, model, tokenizer=None) -> "SelectiveRunner":
        return SelectiveRunner(self, model, tokenizer)


# ----------------------------------------------------------------------------- pure selection math

def latent_scores(query_pre: torch.Tensor, basis_k: torch.Tensor, factor_k: torch.Tensor,
                  score_rank: int | None = None) -> torch.Tensor:
    """Content scores of every prefix token, RoPE left out: ``q̃·(basis·factor)`` in latent form.

    ``query_pre`` ``(B, H_kv, g, d)`` (RoPE undone at the query's position), ``basis_k`` ``(B, T_c, r)``,
    ``factor_k`` ``(B, r, H_kv·d)`` → ``(B, H_kv, g, T_c)`` float32. Reads the leading ``score_rank``
    columns of the basis (all when ``None``): ``T_c·r'·H_kv·g`` multiply-adds.
    """
    b, h_kv, g, d = query_pre.shape
    r = basis_k.shape[-1] if score_rank is None else min(score_rank, basis_k.shape[-1])
    factor = factor_k[:, :r].view(b, r, h_kv, d).permute(0, 2, 1, 3)        # (B, H_kv, r, d)
    mixed = factor @ query_pre.to(factor.dtype).transpose(-1, -2)           # (B, H_kv, r, g)
    mixed = mixed.permute(0, 2, 1, 3).reshape(b, r, h_kv * g)               # (B, r, H_kv·g)
    scores = basis_k[..., :r] @ mixed                                       # (B, T_c, H_kv·g)
    return scores.float().view(b, -1, h_kv, g).permute(0, 2, 3, 1)


def head_mass(scores: torch.Tensor, scale: float) -> torch.Tensor:
    """``(B, H_kv, g, T)`` scores → ``(B, H_kv, T)``: each query head softmaxed, summed over the group."""
    return (scores * scale).softmax(-1).sum(-2)


def select_count(tokens: int, top_k: int, sinks: int, window: int) -> int:
    """``K``: how many of ``tokens`` prefix tokens :func:`select_tokens` returns."""
    return min(tokens, top_k + sinks + window)


def select_tokens(mass: torch.Tensor, top_k: int, sinks: int, window: int) -> torch.Tensor:
    """Prefix indices to rebuild per KV head: ``mass`` ``(B, H_kv, T_c)`` → ``(B, H_kv, K)`` int64: sinks and
    window in order, then the top-k unordered (attention does not depend on the order).

    The first ``sinks`` and last ``window`` positions always; of the rest the ``top_k`` largest. When
    they cover the prefix, every index ``0…T_c−1`` (``K = T_c``).
    """
    b, h_kv, t = mass.shape
    if select_count(t, top_k, sinks, window) == t:
        return torch.arange(t, device=mass.device).expand(b, h_kv, t)
    middle = mass[..., sinks:t - window]                                     # (B, H_kv, T_c − fixed)
    chosen = middle.topk(top_k, dim=-1, sorted=False).indices + sinks
    ends = torch.cat([torch.arange(sinks, device=mass.device), torch.arange(t - window, t, device=mass.device)])
    return torch.cat([ends.expand(b, h_kv, -1), chosen], dim=-1)


def rebuild_selected(prefix: FactoredPrefix, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact post-RoPE keys and values of the chosen prefix tokens.

    ``index`` ``(B, H_kv, K)`` → keys, values ``(B, H_kv, K, d)`` each: ``RoPE(basis_k[t]·factor_k)`` with
    the prefix's cos/sin at each token's absolute position, and ``basis_v[t]·factor_v``.
    """
    b, h_kv, k = index.shape
    tokens = prefix.length
    flat = (index + tokens * torch.arange(b, device=index.device)[:, None, None]).reshape(-1)  # (B·H_kv·K,)

    def rows(basis: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        picked = basis.reshape(b * tokens, -1).index_select(0, flat).view(b, h_kv, k, -1)  # (B, H_kv, K, r)
        per_head = factor.view(b, factor.shape[1], h_kv, -1).transpose(1, 2)              # (B, H_kv, r, d)
        return picked @ per_head

    def table(t: torch.Tensor) -> torch.Tensor:                             # (1, 1, d, T_c) → (B, H_kv, K, d)
        return t[0, 0].index_select(1, index.reshape(-1)).T.reshape(b, h_kv, k, -1)

    pre = rows(prefix.basis_k, prefix.factor_k)
    cos, sin = table(prefix.cos).to(pre.dtype), table(prefix.sin).to(pre.dtype)
    return rope.apply(pre, cos, sin), rows(prefix.basis_v, prefix.factor_v)


def chosen_bias(bias: torch.Tensor | None, index: torch.Tensor, tokens: int) -> torch.Tensor | None:
    """A step's additive ``bias`` ``(B, T_c + t)`` read at the chosen prefix tokens ``index`` ``(B, H_kv, K)`` and
    the tail → ``(B, H_kv, 1, K + t)``, or ``None``."""
    if bias is None:
        return None
    b, h_kv, _ = index.shape
    picked = bias[:, :tokens].gather(-1, index.reshape(b, -1)).view(b, h_kv, -1)           # (B, H_kv, K)
    tail = bias[:, None, tokens:].expand(b, h_kv, -1)                                      # (B, H_kv, t)
    return torch.cat([picked, tail], dim=-1)[:, :, None]


def attend_chosen(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tail_k: torch.Tensor,
                  tail_v: torch.Tensor, scale: float, bias: torch.Tensor | None) -> torch.Tensor:
    """One decode step over the chosen rows and the tail, as the channel computes it (float32 softmax, products in
    ``q``'s dtype): ``q`` ``(B, H_kv, g, d)``, ``keys``/``values`` ``(B, H_kv, K, d)`` post-RoPE, tail
    ``(B, H_kv, t, d)``, ``bias`` ``(B, H_kv, 1, K + t)`` or ``None`` → ``(B, H_kv, g, d)``."""
    scores = torch.cat([(q @ keys.transpose(-1, -2)).float(), (q @ tail_k.transpose(-1, -2)).float()], dim=-1)
    scores = scores * scale                                                               # (B, H_kv, g, K + t)
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(-1).to(q.dtype)
    chosen = keys.shape[-2]
    return probs[..., :chosen] @ values + probs[..., chosen:] @ tail_v


def scorer_recall(prefix: "SelectivePrefix", query: torch.Tensor) -> tuple[float, float]:
    """How well the latent scorer picks, against an oracle that scores with the exact keys.

    Both rank tokens by the group-summed softmax mass (:func:`head_mass`) over the prefix, the oracle on
    ``q·RoPE(K)`` (every key rebuilt). ``query`` ``(B, H_kv, g, d)`` post-RoPE → ``(recall, mass)``: the
    fraction of the oracle's ``top_k`` (outside sinks and window) the scorer also chose, and the exact
    prefix attention mass on the scorer's tokens over that on the oracle's (1.0 = as good as exact).
    """
    scale = query.shape[-1] ** -0.5
    exact = head_mass(prefix.base.scores(query), scale)                                    # (B, H_kv, T_c)
    chosen = prefix.choose(query, scale)[:, :, 0]                                          # one decode step
    oracle = select_tokens(exact, prefix.top_k, prefix.sinks, prefix.window)
    found = (chosen[..., :, None] == oracle[..., None, :]).any(-2).sum(-1)                 # (B, H_kv)
    middle = min(prefix.top_k, oracle.shape[-1])
    hits = found - (oracle.shape[-1] - middle)
    mass = exact.gather(-1, chosen).sum(-1) / exact.gather(-1, oracle).sum(-1)
    return float(hits.float().mean() / middle), float(mass.mean())


# ----------------------------------------------------------------------------- the prefix and the cache

@dataclass(frozen=True)
class SelectivePrefix(CompressedPrefix):
    """A low-rank prefix as decode steps read it: scored in latent form, the chosen tokens rebuilt exactly.

    ``base`` the layer's :class:`FactoredPrefix`; ``cos``, ``sin`` ``(1, 1, n, d)`` RoPE at the absolute
    positions of the ``n`` queries (one per decode step; to undo it); ``frequencies`` ``(d,)`` 1 on the
    dimensions the scorer reads, else 0. One query (a decode step) goes through :meth:`decode`: one top-k,
    only the chosen keys and values rebuilt, one softmax over them and the tail. A block of ``n`` steps goes
    through the channel's two calls: :meth:`scores` rebuilds every key once and returns exact ``q·RoPE(K)ᵀ`` on
    each query's chosen tokens and ``-inf`` elsewhere, so the softmax gives the others exactly zero weight, and
    :meth:`apply` is the base's factored values.
    """

    base: FactoredPrefix
    top_k: int
    sinks: int
    window: int
    score_rank: int | None
    cos: torch.Tensor
    sin: torch.Tensor
    frequencies: torch.Tensor

    @property
    def length(self) -> int:
        return self.base.length

    @property
    def steps(self) -> int:
        """``n``: decode steps (queries) read in one forward."""
        return self.cos.shape[-2]

    def chosen(self) -> int:
        """``K``: prompt tokens attended per KV head (``T_c`` when sinks, window and top-k cover them)."""
        return select_count(self.length, self.top_k, self.sinks, self.window)

    def unrotate(self, query: torch.Tensor) -> torch.Tensor:
        """``query`` ``(B, H, g·n, d)`` post-RoPE, rows ``(g, n)`` → pre-RoPE at each step's position (exact)."""
        b, h, rows, d = query.shape
        q = query.view(b, h, rows // self.steps, self.steps, d)
        return rope.unrotate(q, self.cos.unsqueeze(2), self.sin.unsqueeze(2)).view(b, h, rows, d)  # (1, 1, 1, n, d)

    def choose(self, q: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Indices ``(B, H_kv, n, K)`` to rebuild for ``q`` ``(B, H_kv, g·n, d)`` (see :func:`select_tokens`)."""
        b, h_kv = q.shape[:2]
        n = self.steps
        if self.chosen() == self.length:
            mass = q.new_zeros(b, h_kv * n, self.length)  # every token is kept; no scoring needed
        else:
            query_pre = self.unrotate(q) * self.frequencies.to(q.dtype)
            g = q.shape[2] // n
            scores = latent_scores(query_pre, self.base.basis_k, self.base.factor_k, self.score_rank)
            scores = scores.view(b, h_kv, g, n, -1).transpose(2, 3)                        # (B, H_kv, n, g, T_c)
            mass = head_mass(scores, scale).reshape(b, h_kv * n, -1)                      # (B, H_kv·n, T_c)
        return select_tokens(mass, self.top_k, self.sinks, self.window).view(b, h_kv, n, -1)

    def scores(self, q: torch.Tensor) -> torch.Tensor:
        """``q`` ``(B, H_kv, g·n, d)`` → ``(B, H_kv, g·n, T_c)`` float32, ``-inf`` off each query's chosen tokens
        (a block of ``n`` steps: every prefix key rebuilt once; one step goes through :meth:`decode`)."""
        index = self.choose(q, q.shape[-1] ** -0.5)                                   # (B, H_kv, n, K)
        b, h_kv, rows, _ = q.shape
        exact = self.base.scores(q).view(b, h_kv, rows // self.steps, self.steps, -1)
        allowed = torch.zeros(b, h_kv, self.steps, self.length, dtype=torch.bool, device=q.device)
        allowed.scatter_(-1, index, True)
        return exact.masked_fill(~allowed[:, :, None], float("-inf")).view(b, h_kv, rows, -1)

    def fuses(self, q: torch.Tensor) -> bool:
        """One query (a decode step): chosen once, attended over the chosen tokens and the tail only."""
        return self.steps == 1

    def decode(self, q, tail_k, tail_v, scale, bias):
        """One step with one top-k: the chosen tokens rebuilt and attended with the tail — by the kernel in one
        launch where it runs, else eagerly over the ``K + t`` rows (no ``T_c``-long scores)."""
        base = self.base
        index = self.choose(q, q.shape[-1] ** -0.5)[:, :, 0]                            # (B, H_kv, K)
        if use_kernel(q):
            return selective_decode_attention(q, base.basis_k, base.factor_k, base.basis_v, base.factor_v,
                                              base.cos[0, 0].T, base.sin[0, 0].T, index, tail_k, tail_v, scale, bias)
        keys, values = rebuild_selected(base, index)                                   # (B, H_kv, K, d) each
        return attend_chosen(q, keys.to(q.dtype), values.to(q.dtype), tail_k, tail_v, scale,
                             chosen_bias(bias, index, self.length))

    def apply(self, probs: torch.Tensor) -> torch.Tensor:
        """``probs`` ``(B, H_kv, g·n, T_c)``, zero off each query's chosen tokens → ``(B, H_kv, g·n, d)``."""
        return self.base.apply(probs)


@dataclass(frozen=True)
class SelectiveSteps(StepPrefix):
    """A frozen selective prefix for the static layout: :meth:`at` the step's positions it is the
    :class:`SelectivePrefix` a dynamic cache builds (RoPE of the query positions from the model's rotary module,
    float32), computed inside the step from ``cache_position``."""

    base: FactoredPrefix
    config: "Selective"
    rotary: Rotary
    frequencies: torch.Tensor

    @property
    def length(self) -> int:
        return self.base.length

    def at(self, positions: torch.Tensor) -> SelectivePrefix:
        like = torch.empty(0, device=self.base.basis_k.device)                         # float32 tables
        cos, sin = self.rotary.cos_sin(positions, like)                                # (1, 1, n, d)
        c = self.config
        return SelectivePrefix(self.base, c.top_k, c.sinks, c.window, c.score_rank, cos, sin, self.frequencies)


class SelectiveLayer(LowRankLayer):
    """A low-rank layer that hands attention a :class:`SelectivePrefix` for every block appended after
    compression (the block lies in the exact tail): ``n`` tokens are read as ``n`` decode steps."""

    def update(self, key_states, value_states, cache_kwargs=None):
        self.appended = key_states.shape[-2]
        return super().update(key_states, value_states, cache_kwargs)

    def attend_kv(self):
        keys, values = super().attend_kv()
        if isinstance(keys, CompressedKV) and 0 < self.appended <= keys.keys.shape[-2]:
            first = self.get_seq_length() - self.appended
            prefix = self.cache.selective_prefix(keys.prefix, first, self.appended)
            keys, values = compressed_kv(prefix, keys.keys, keys.values, self.layer_idx)
        return keys, values

    def frozen_prefix(self, capacity: int):
        """The factored prefix as :class:`SelectiveSteps` (each decode step selects anew), then the exact tail."""
        keys, values = LowRankLayer.attend_kv(self)
        if not isinstance(keys, CompressedKV):
            return ExactPrefix(keys, values)
        steps = self.cache.selective_steps(keys.prefix)
        return ConcatPrefix((steps, ExactPrefix(keys.keys, keys.values))) if keys.keys.shape[-2] else steps


class SelectiveCache(LowRankCache):
    """The base's :class:`LowRankCache` with :class:`SelectiveLayer` in its groups (same held tensors)."""

    def __init__(self, config: Selective, base: XKV, shape, rotary: Rotary, frequencies: torch.Tensor):
        super().__init__(base, shape, rotary, method=config.name)
        self.selective = config
        self.frequencies = frequencies  # the runner's (d,) mask, made at bind: not the cache's bytes
        for group in self.groups:
            for index in group.layers:
                self.layers[index] = SelectiveLayer(self, group)
                self.layers[index].layer_idx = index  # named in the channel's errors

    def selective_prefix(self, base: FactoredPrefix, first: int, steps: int = 1) -> SelectivePrefix:
        """``base`` wrapped for queries at absolute positions ``first…first+steps−1``; their float32 RoPE tables
        come from the cache's per-forward :attr:`rope` (shared by every layer, released after the forward)."""
        device = base.basis_k.device
        cos, sin = self.rope.at(range(first, first + steps), device)
        c = self.selective
        return SelectivePrefix(base, c.top_k, c.sinks, c.window, c.score_rank, cos, sin, self.frequencies.to(device))


    def selective_steps(self, base: FactoredPrefix) -> SelectiveSteps:
        """``base`` for the static layout: selected anew at each step's positions (:class:`SelectiveSteps`)."""
        return SelectiveSteps(base, self.selective, self.rotary, self.frequencies.to(base.basis_k.device))


class SelectiveRunner(LowRankRunner):
    """Binds a :class:`Selective` config: the base's runner (and its ``applied``) with a selective cache."""

    def __init__(self, config: Selective, model, tokenizer=None):
        self.base = config.base_config()
        super().__init__(self.base, model, tokenizer)
        self.config = config
        self.frequencies = low_frequencies(self.rotary, config.score_frequencies)

    @contextlib.contextmanager
    def applied(self) -> Iterator["SelectiveRunner"]:
        with installed(self.model):
            yield self

    def new_cache(self) -> SelectiveCache:
        return SelectiveCache(self.config, self.base, self.shape, self.rotary, self.frequencies)


def low_frequencies(rotary: Rotary, fraction: float) -> torch.Tensor:
    """``(d,)`` mask: 1 on both halves of the ``round(fraction·d/2)`` lowest-frequency RoPE pairs (at least one)."""
    inv_freq = rotary.rotary_emb.inv_freq                                         # (d/2,)
    low = torch.zeros(inv_freq.numel(), device=inv_freq.device)
    low[inv_freq.argsort()[:max(1, round(fraction * inv_freq.numel()))]] = 1.0
    return torch.cat([low, low])                                                  # rotate-half layout
