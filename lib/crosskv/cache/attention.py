"""The one channel from a cache layer to attention: a compressed prefix travels as a typed object.

A cache layer that holds ``T_c`` prompt tokens in compressed form (low-rank factors, merged
directions, quantized codes) returns, from its ``update``, one :class:`CompressedKV` in place of
*both* keys and values: its :class:`CompressedPrefix` and its exact tail ``keys``/``values``
``(B, H_kv, t, d)`` (tokens appended after compression). Transformers' attention modules hand what
``Cache.update`` returns straight to the attention function, so the prefix reaches attention as an
argument, never as an attribute hung on a tensor, and nothing can drop it on the way.

Only :func:`crosskv_attention`, registered once in transformers' ``AttentionInterface`` under
:data:`ATTENTION` (``"crosskv"``), reads a :class:`CompressedKV`. Any other attention function (sdpa,
eager, flash) touches it as it would a tensor (``.shape``, a torch function) and gets a
:class:`PrefixChannelError` naming the layer: a compressed layer under another attention never
silently attends to its exact tail alone. On plain tensors :func:`crosskv_attention` is the model's
SDPA attention, so a cache mixing plain and compressed layers runs under the one implementation.

The API a method implements (small, and all a method needs):

- a :class:`CompressedPrefix` subclass (a frozen dataclass of tensors) with ``length`` (``T_c``),
  ``scores(q)`` → ``q·Kᵀ`` ``(B, H_kv, n, T_c)`` float32 (unscaled; keys post-RoPE) and
  ``apply(probs)`` → ``probs·V`` ``(B, H_kv, n, d)`` from ``probs`` ``(B, H_kv, n, T_c)``, each computed
  from the compressed tensors without materialising the prefix's K or V when it can;
- its layer's ``update`` returning :func:`compressed_kv` ``(prefix, keys, values, layer_idx)`` (a pair);
- its runner's ``applied()`` entering :func:`installed` ``(model)``.

Everything is plain tensors and frozen dataclasses built inside the forward, so
``torch.compile(fullgraph=True)`` traces the decode step through it (no tensor attributes, no
data-dependent Python control flow on tensor values).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "crosskv"


class PrefixChannelError(RuntimeError):
    """A compressed prefix reached an attention function that cannot read it."""


class CompressedPrefix:
    """A layer's ``T_c`` compressed prompt tokens as attention reads them (subclasses: frozen dataclasses)."""

    @property
    def length(self) -> int:
        """``T_c``: tokens held in compressed form."""
        raise NotImplementedError

    def scores(self, q: torch.Tensor) -> torch.Tensor:
        """``q`` ``(B, H_kv, n, d)`` → ``q·Kᵀ`` ``(B, H_kv, n, T_c)`` float32, unscaled, K post-RoPE."""
        raise NotImplementedError

    def apply(self, probs: torch.Tensor) -> torch.Tensor:
        """``probs`` ``(B, H_kv, n, T_c)`` (query dtype) → ``probs·V`` ``(B, H_kv, n, d)``."""
        raise NotImplementedError

    def fuses(self, q: torch.Tensor) -> bool:
        """Whether :meth:`decode` runs one-query steps for ``q`` (a Triton kernel, or a cheaper eager path than the
        channel's two calls); by default no: the channel's :meth:`scores` and :meth:`apply` run."""
        return False

    def decode(self, q: torch.Tensor, tail_k: torch.Tensor, tail_v: torch.Tensor, scale: float,
               bias: torch.Tensor | None) -> torch.Tensor:
        """One decode step over the prefix and the exact tail ``(B, H_kv, t, d)``, fused (a Triton kernel of
        :mod:`crosskv.cache.kernels`, or the prefix's own eager path) where :meth:`fuses`: ``q`` ``(B, H_kv, g, d)``,
        ``bias`` ``(B, T_c + t)`` additive or ``None`` → ``(B, H_kv, g, d)``."""
        raise NotImplementedError(f"{type(self).__name__} has no fused decode step")


@dataclass(frozen=True)
class CompressedKV:
    """What a compressed layer's ``update`` returns as keys and as values: its prefix and exact tail.

    ``prefix`` precedes the tail; ``keys``/``values`` ``(B, H_kv, t, d)`` (``t`` may be 0); ``layer_idx``
    names the layer in errors; ``visible`` ``(q, t)`` bool, when given (the static layout's preallocated tail,
    :mod:`crosskv.cache.static`), says which tail rows each query reads — attention then ignores the model's mask
    (every prefix row precedes every query). ``shape`` is the held K shape ``(B, H_kv, T_c + t, d)``, so a wrapper that
    only looks at shapes (a library's patch of every registered attention function, until :func:`reclaim`
    drops it) passes it through; any other tensor use (an attribute, indexing, a torch function) raises
    :class:`PrefixChannelError`.
    """

    prefix: CompressedPrefix
    keys: torch.Tensor
    values: torch.Tensor
    layer_idx: int | None = None
    visible: torch.Tensor | None = None

    def misread(self, what: str) -> PrefixChannelError:
        return PrefixChannelError(
            f"cache layer {self.layer_idx} holds a compressed prefix of {self.prefix.length} tokens, but the "
            f"model's attention function read it as a tensor ({what}): only the {ATTENTION!r} attention reads "
            f"it; run under crosskv.cache.attention.installed(model) (the method runner's applied() does)")

    @property
    def shape(self) -> torch.Size:
        b, h, t, d = self.keys.shape
        return torch.Size((b, h, self.prefix.length + t, d))

    def __getitem__(self, index):
        raise self.misread("indexing")

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise self.misread(f".{name}")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kv = next(a for a in (*args, *(kwargs or {}).values()) if isinstance(a, CompressedKV))
        raise kv.misread(getattr(func, "__name__", str(func)))


def compressed_kv(prefix: CompressedPrefix, keys: torch.Tensor, values: torch.Tensor,
                  layer_idx: int | None = None, visible: torch.Tensor | None = None
                  ) -> tuple[CompressedKV, CompressedKV]:
    """The ``(keys, values)`` pair a compressed layer's ``update`` returns: the same :class:`CompressedKV` twice."""
    kv = CompressedKV(prefix, keys, values, layer_idx, visible)
    return kv, kv


@dataclass(frozen=True)
class ExactPrefix(CompressedPrefix):
    """Float rows ``keys``/``values`` ``(B, H_kv, T, d)`` read as a prefix segment (of :class:`ConcatPrefix`)."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def length(self) -> int:
        return self.keys.shape[-2]

    def scores(self, q: torch.Tensor) -> torch.Tensor:
        return (q @ self.keys.transpose(-1, -2)).float()                  # (B, H_kv, n, T)

    def apply(self, probs: torch.Tensor) -> torch.Tensor:
        return probs @ self.values.to(probs.dtype)                         # (B, H_kv, n, d)


@dataclass(frozen=True)
class ConcatPrefix(CompressedPrefix):
    """Prefix ``segments`` in token order, read as one prefix: scores concatenated, outputs summed (in float32)."""

    segments: tuple[CompressedPrefix, ...]

    @property
    def length(self) -> int:
        return sum(segment.length for segment in self.segments)

    def scores(self, q: torch.Tensor) -> torch.Tensor:
        return torch.cat([segment.scores(q) for segment in self.segments], dim=-1)  # (B, H_kv, n, T_c)

    def flat(self) -> list[CompressedPrefix]:
        """The segments with nested concatenations expanded, in token order."""
        out = []
        for segment in self.segments:
            out += segment.flat() if isinstance(segment, ConcatPrefix) else [segment]
        return out

    def fuses(self, q: torch.Tensor) -> bool:
        """The first segment's fused step, when every later segment is exact rows (a KIVI context: codes, then its
        float window)."""
        first, *rest = self.flat()
        return bool(rest) and all(isinstance(s, ExactPrefix) for s in rest) and first.fuses(q)

    def decode(self, q, tail_k, tail_v, scale, bias):
        """The first segment's fused step, the later (exact) segments' rows joining the tail."""
        first, *rest = self.flat()
        keys = torch.cat([s.keys for s in rest] + [tail_k], dim=-2)
        values = torch.cat([s.values for s in rest] + [tail_v], dim=-2)
        return first.decode(q, keys.to(q.dtype), values.to(q.dtype), scale, bias)

    def apply(self, probs: torch.Tensor) -> torch.Tensor:
        out, start = None, 0
        for segment in self.segments:
            part = segment.apply(probs[..., start:start + segment.length]).float()  # (B, H_kv, n, d)
            out = part if out is None else out + part
            start += segment.length
        return out.to(probs.dtype)


def _causal_bias(attention_mask, q_len: int, kv_len: int, like: torch.Tensor) -> torch.Tensor | None:
    """An additive ``(B|1, 1, q, kv)`` float bias from a bool/float mask, or causal when no mask is given."""
    if attention_mask is None:
        if q_len == 1:
            return None
        attention_mask = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=like.device).tril(kv_len - q_len)
    if attention_mask.dtype == torch.bool:
        return torch.zeros(attention_mask.shape, dtype=like.dtype, device=like.device).masked_fill(
            ~attention_mask, float("-inf"))
    return attention_mask.to(like.dtype)


def _decode_bias(key: CompressedKV, attention_mask, kv_len: int, batch: int, like: torch.Tensor) -> torch.Tensor | None:
    """A one-query step's additive bias ``(B, T_c + t)`` float32 for a kernel: from the static layout's ``visible``
    (the prefix all visible), from the model's mask, or ``None`` when every row is visible."""
    if key.visible is not None:
        tail = torch.zeros(key.visible.shape[-1], dtype=torch.float32, device=like.device).masked_fill(
            ~key.visible[-1], float("-inf"))
        prefix = tail.new_zeros(kv_len - tail.shape[0])
        return torch.cat([prefix, tail]).expand(batch, -1)
    bias = _causal_bias(attention_mask, 1, kv_len, like.float())
    return None if bias is None else bias.reshape(bias.shape[0], kv_len).expand(batch, -1)


def crosskv_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Attention over a compressed prefix and an exact tail, without concatenating their K or V.

    ``query`` ``(B, Hq, q, d)``. With ``key`` a :class:`CompressedKV` (``value`` the same object): scores of
    prefix (``prefix.scores``) and tail are concatenated ``(B, H_kv, g·q, T_c + t)``, softmaxed in float32,
    and ``out = prefix.apply(P_prefix) + P_tail·V_tail`` — a one-query step whose prefix :meth:`~CompressedPrefix.fuses`
    (a Triton kernel, :func:`~crosskv.cache.kernels.launch.use_kernel`, or a cheaper eager path) goes through
    ``prefix.decode`` instead; the key's ``visible`` (static layout), when given, masks the
    tail in place of ``attention_mask``. With tensors: the model's SDPA attention.
    Returns ``((B, q, Hq, d), None)``.
    """
    if not isinstance(key, CompressedKV):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    prefix, tail_k, tail_v = key.prefix, key.keys, key.values
    b, hq, q_len, d = query.shape
    h_kv = tail_k.shape[1]
    prefix_len = prefix.length
    kv_len = prefix_len + tail_k.shape[2]
    groups = hq // h_kv
    scale = scaling if scaling is not None else d ** -0.5
    q = query.reshape(b, h_kv, groups * q_len, d)
    if q_len == 1 and prefix.fuses(q):
        out = prefix.decode(q, tail_k, tail_v, scale, _decode_bias(key, attention_mask, kv_len, b, q))  # (B, H_kv, g, d)
        return out.view(b, hq, 1, d).transpose(1, 2).contiguous(), None
    scores = prefix.scores(q)                                              # (B, H_kv, g·q, T_c)
    if tail_k.shape[2]:
        tail = (q @ tail_k.transpose(-1, -2)).float()                      # (B, H_kv, g·q, t)
        if key.visible is not None:
            tail = tail.view(b, h_kv, groups, q_len, -1).masked_fill(~key.visible, float("-inf")).view_as(tail)
        scores = torch.cat([scores, tail], dim=-1)
    scores = scores * scale                                                # (B, H_kv, g·q, T)
    bias = None if key.visible is not None else _causal_bias(attention_mask, q_len, kv_len, scores)
    if bias is not None:
        scores = (scores.view(b, h_kv, groups, q_len, kv_len)
                  + bias.view(bias.shape[0], 1, 1, q_len, kv_len)).view(b, h_kv, groups * q_len, kv_len)
    probs = scores.softmax(-1).to(query.dtype)
    out = prefix.apply(probs[..., :prefix_len])                            # (B, H_kv, g·q, d)
    if kv_len > prefix_len:
        out = out + probs[..., prefix_len:] @ tail_v
    return out.view(b, hq, q_len, d).transpose(1, 2).contiguous(), None


def reclaim() -> None:
    """Map :data:`ATTENTION` to :func:`crosskv_attention` itself in the table models read, dropping any wrapper a
    library put since over every registered attention function (kvpress does on import, in the table's local
    mapping, which the class-wide registration below cannot override). :func:`installed` calls it on entry."""
    ALL_ATTENTION_FUNCTIONS[ATTENTION] = crosskv_attention


@contextlib.contextmanager
def installed(model) -> Iterator[None]:
    """Run ``model`` with :data:`ATTENTION` as its attention implementation; the previous one is restored."""
    previous = model.config._attn_implementation
    reclaim()
    model.set_attn_implementation(ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


AttentionInterface.register(ATTENTION, crosskv_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)
