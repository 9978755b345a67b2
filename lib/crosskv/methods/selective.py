"""``selective``: top-k reconstruction on a low-rank cache (xKV, Single SVD) at each decode step.

The base method compresses the prompt as it always does (a group's token basis ``(B, T_c, r)`` and
per-layer factors ``(B, r, H_kv·d)`` for K and V); nothing else is held between decode steps, so
the held bytes are the base's. At each **decode step** (one query token) a layer attends over

1. the prompt tokens chosen by a **latent scorer**: the query with RoPE undone at its own absolute
   position, ``q̃``, against the *pre-RoPE* low-rank keys, ``s̃_t = q̃·(basis_t·factor)``,
   computed as ``basis_t · (factor·q̃)`` — ``T_c·r'`` multiply-adds per query head instead of the
   exact path's rebuild of every key (``T_c·r·H_kv·d``) — using the leading ``score_rank`` basis
   columns (the SVD orders them by singular value). It drops the relative rotation
   ``R(t − p)`` between token and query, so it ranks tokens by content, not position: an
   approximation used only to *choose* tokens, never as an attention score. Per KV head the group's
   query heads are softmaxed separately and their probabilities summed; the ``top_k`` highest
   prompt tokens are kept;
2. the first ``sinks`` and the last ``window`` prompt tokens, always;
3. the exact tail (question, decoded tokens), always.

The chosen prompt tokens are rebuilt exactly — ``RoPE(basis_t·factor)`` at their true absolute
positions, values ``basis_t·factor_v`` — and attention is exact over them and the tail (one softmax
over their concatenated scores). With ``top_k + sinks + window ≥ T_c`` every token is chosen and
the output equals the base's factored attention. Query blocks of more than one token (the question
append, strict prefill) attend exactly over the whole factored prefix, as the base does: selection
is a decode-step device.

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
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from crosskv.core.capture import Rotary
from crosskv.methods.base import MethodConfig, make_method, register
from crosskv.methods.compose import parse_params
from crosskv.methods.svd import (XKV, FactoredPrefix, LowRankCache, LowRankLayer, LowRankRunner, _causal_bias,
                                 lowrank_attention)

ATTENTION = "crosskv_selective"
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
        base = self.base_config()
        if base.attention != "factored":
            raise ValueError(f"base_params attention={base.attention!r}: selective reconstruction reads the "
                             "factored prefix; use the base's default attention='factored'")

    @property
    def strict(self) -> bool:
        """The base's strict mode (compositions refuse eviction with it)."""
        return self.base_config().strict

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


def select_tokens(mass: torch.Tensor, top_k: int, sinks: int, window: int) -> torch.Tensor:
    """Prefix indices to rebuild per KV head: ``mass`` ``(B, H_kv, T_c)`` → ``(B, H_kv, K)`` int64, sorted.

    The first ``sinks`` and last ``window`` positions always; of the rest the ``top_k`` largest. When
    they cover the prefix, every index ``0…T_c−1`` (``K = T_c``).
    """
    b, h_kv, t = mass.shape
    fixed = min(sinks, t) + min(window, max(t - sinks, 0))
    if top_k + fixed >= t:
        return torch.arange(t, device=mass.device).expand(b, h_kv, t)
    middle = mass[..., sinks:t - window]                                     # (B, H_kv, T_c − fixed)
    chosen = middle.topk(top_k, dim=-1, sorted=False).indices + sinks
    ends = torch.cat([torch.arange(sinks, device=mass.device), torch.arange(t - window, t, device=mass.device)])
    return torch.cat([ends.expand(b, h_kv, -1), chosen], dim=-1).sort(-1).values


def rebuild_selected(prefix: FactoredPrefix, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact post-RoPE keys and values of the chosen prefix tokens.

    ``index`` ``(B, H_kv, K)`` → keys, values ``(B, H_kv, K, d)`` each: ``RoPE(basis_k[t]·factor_k)`` with
    the prefix's cos/sin at each token's absolute position, and ``basis_v[t]·factor_v``.
    """
    b, h_kv, k = index.shape
    batch = torch.arange(b, device=index.device)[:, None, None]

    def rows(basis: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        picked = basis[batch, index]                                          # (B, H_kv, K, r)
        per_head = factor.view(b, factor.shape[1], h_kv, -1).transpose(1, 2)  # (B, H_kv, r, d)
        return picked @ per_head

    keys = rows(prefix.basis_k, prefix.factor_k)
    half = keys.shape[-1] // 2
    cos, sin = prefix.rope.cos[0, 0].T[index], prefix.rope.sin[0, 0].T[index]  # (B, H_kv, K, d)
    rotated = torch.cat([-keys[..., half:], keys[..., :half]], dim=-1)
    keys = keys * cos.to(keys.dtype) + rotated * sin.to(keys.dtype)
    return keys, rows(prefix.basis_v, prefix.factor_v)


def selective_decode(query: torch.Tensor, query_pre: torch.Tensor, prefix: FactoredPrefix,
                     tail_k: torch.Tensor, tail_v: torch.Tensor, spec: "Selection", scale: float,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step's attention over the chosen prefix tokens and the exact tail.

    ``query`` ``(B, H_kv, g, d)`` post-RoPE and ``query_pre`` the same with RoPE undone; ``tail_k``,
    ``tail_v`` ``(B, H_kv, t, d)``; ``bias`` ``(B|1, T_c + t)`` additive float mask (``-inf`` on padding)
    or ``None`` → ``(B, H_kv, g, d)``. Masked prompt tokens are never chosen by the scorer.
    """
    b, h_kv, _, _ = query.shape
    t = prefix.length
    fixed = min(spec.sinks, t) + min(spec.window, max(t - spec.sinks, 0))
    if spec.top_k + fixed >= t:
        mass = query.new_zeros(b, h_kv, t)  # every token is kept; no scoring needed
    else:
        mass = head_mass(latent_scores(query_pre, prefix.basis_k, prefix.factor_k, spec.score_rank), scale)
        if bias is not None:
            mass = mass + bias[:, None, :t].float()
    index = select_tokens(mass, spec.top_k, spec.sinks, spec.window)
    keys, values = rebuild_selected(prefix, index)
    q = query.to(keys.dtype)
    scores = torch.cat([(q @ keys.transpose(-1, -2)).float(), (q @ tail_k.transpose(-1, -2).to(q.dtype)).float()],
                       dim=-1) * scale                                       # (B, H_kv, g, K + t)
    if bias is not None:
        chosen = bias[:, None, :t].float().expand(b, h_kv, t).gather(-1, index)  # (B, H_kv, K)
        tail = bias[:, None, t:].float().expand(b, h_kv, -1)                     # (B, H_kv, t)
        scores = scores + torch.cat([chosen, tail], dim=-1).unsqueeze(-2)
    probs = scores.softmax(-1).to(query.dtype)
    k = index.shape[-1]
    return probs[..., :k] @ values.to(query.dtype) + probs[..., k:] @ tail_v.to(query.dtype)


def scorer_recall(query: torch.Tensor, query_pre: torch.Tensor, prefix: FactoredPrefix, spec: "Selection",
                  scale: float) -> tuple[float, float]:
    """How well the latent scorer picks, against an oracle that scores with the exact keys.

    Both rank tokens by the group-summed softmax mass (:func:`head_mass`) over the prefix, the oracle on
    ``q·RoPE(K)`` (every key rebuilt). ``query``/``query_pre`` ``(B, H_kv, g, d)`` → ``(recall, mass)``:
    the fraction of the oracle's ``top_k`` (outside sinks and window) the scorer also chose, and the exact
    prefix attention mass on the scorer's tokens over that on the oracle's (1.0 = as good as exact).
    """
    exact = head_mass(prefix.key_scores(query), scale)                                       # (B, H_kv, T_c)
    approx = head_mass(latent_scores(query_pre, prefix.basis_k, prefix.factor_k, spec.score_rank), scale)
    chosen = select_tokens(approx, spec.top_k, spec.sinks, spec.window)
    oracle = select_tokens(exact, spec.top_k, spec.sinks, spec.window)
    fixed = oracle.shape[-1] - spec.top_k
    hits = (chosen[..., :, None] == oracle[..., None, :]).any(-2).sum(-1) - fixed            # (B, H_kv)
    mass = exact.gather(-1, chosen).sum(-1) / exact.gather(-1, oracle).sum(-1)
    return float(hits.float().mean() / spec.top_k), float(mass.mean())


# ----------------------------------------------------------------------------- cache and attention

@dataclass(frozen=True)
class Selection:
    """What the attention function needs besides the factored prefix: the selection parameters and
    RoPE at the query's position (``cos``, ``sin`` ``(1, 1, 1, d)``, to undo it), per decode step."""

    top_k: int
    sinks: int
    window: int
    score_rank: int | None
    cos: torch.Tensor
    sin: torch.Tensor

    def unrotate(self, query: torch.Tensor) -> torch.Tensor:
        """``query`` ``(B, H, n, d)`` post-RoPE → pre-RoPE (the exact inverse of the rotation)."""
        half = query.shape[-1] // 2
        q = query.float()
        rotated = torch.cat([-q[..., half:], q[..., :half]], dim=-1)
        return ((q * self.cos - rotated * self.sin) / (self.cos ** 2 + self.sin ** 2)).to(query.dtype)


class SelectiveLayer(LowRankLayer):
    """A low-rank layer whose factored prefix also carries the decode step's :class:`Selection`."""

    def attend_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().attend_kv()
        if self.prefix_len and getattr(values, "crosskv_prefix", None) is not None:
            values.crosskv_selection = self.cache.selection(self.get_seq_length() - 1, values.device)
            if self is self.cache.last_lowrank:
                self.cache.release_selection()
        return keys, values


class SelectiveCache(LowRankCache):
    """The base's :class:`LowRankCache` with :class:`SelectiveLayer` in its groups (same held tensors)."""

    def __init__(self, config: Selective, base: XKV, shape, rotary: Rotary):
        super().__init__(base, shape, rotary)
        self.selective = config
        self._selection: tuple[int, Selection] | None = None
        for group in self.groups:
            for index in group.layers:
                self.layers[index] = SelectiveLayer(self, group)

    def selection(self, position: int, device) -> Selection:
        """The decode step's :class:`Selection` for a query at absolute ``position`` (made once per step,
        shared by every layer and released after the last one, so nothing is held between steps)."""
        if self._selection is None or self._selection[0] != position:
            cos, sin = self.rotary.cos_sin(torch.tensor([position], device=device), torch.empty(0, device=device))
            c = self.selective
            self._selection = position, Selection(c.top_k, c.sinks, c.window, c.score_rank, cos, sin)
        return self._selection[1]

    def release_selection(self) -> None:
        """Drop the step's :class:`Selection` (the last low-rank layer holds its own reference)."""
        self._selection = None


class SelectiveRunner(LowRankRunner):
    """Binds a :class:`Selective` config: the base's runner with the selective attention function."""

    def __init__(self, config: Selective, model, tokenizer=None):
        self.base = config.base_config()
        super().__init__(self.base, model, tokenizer)
        self.base.check(self.shape)
        self.config = config

    @contextlib.contextmanager
    def applied(self) -> Iterator["SelectiveRunner"]:
        previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(ATTENTION)
        try:
            yield self
        finally:
            self.model.set_attn_implementation(previous)

    def new_cache(self) -> SelectiveCache:
        return SelectiveCache(self.config, self.base, self.shape, self.rotary)


def selective_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Selective decode attention; otherwise the base's factored attention (or SDPA without a prefix).

    ``query`` ``(B, Hq, 1, d)`` with ``value`` carrying ``crosskv_prefix`` and ``crosskv_selection``: see
    :func:`selective_decode`. Returns ``((B, q, Hq, d), None)``.
    """
    prefix = getattr(value, "crosskv_prefix", None)
    selection = getattr(value, "crosskv_selection", None)
    if prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    b, hq, q_len, d = query.shape
    if q_len != 1 or selection is None:
        return lowrank_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                 **kwargs)
    h_kv = key.shape[1]
    scale = scaling if scaling is not None else d ** -0.5
    q = query.reshape(b, h_kv, hq // h_kv, d)
    bias = _causal_bias(attention_mask, 1, prefix.length + key.shape[2], query)         # (B|1, 1, 1, T) or None
    bias = None if bias is None else bias.view(bias.shape[0], -1)
    out = selective_decode(q, selection.unrotate(q), prefix, key, value, selection, scale, bias)  # (B, H_kv, g, d)
    return out.reshape(b, hq, 1, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, selective_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)
