"""RoPE arithmetic, in one place: apply, its exact inverse, rotate-half on either layout, per-forward tables.

Tables come from the model's own rotary embedding module (``model.model.rotary_emb``; frequencies, scaling
and any attention factor folded into cos/sin are never reimplemented here). The rotate-half convention is
transformers' (``cos`` and ``sin`` repeat their ``d/2`` frequencies in both halves of the head dimension).
Keys lie along ``dim=-1`` as ``(…, T, d)``; the transposed layout ``(…, d, T)`` (a factored prefix's
``Kᵀ``) passes ``dim=-2`` with tables transposed alike.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

Positions = range | torch.Tensor  # absolute positions: a range, or a (T,) / (B, T) integer tensor


def halves(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """The two halves of ``x`` along ``dim`` (views)."""
    half = x.shape[dim] // 2
    return x.narrow(dim, 0, half), x.narrow(dim, half, half)


def rotate_half(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``[x1, x2] → [−x2, x1]`` along ``dim`` (the head dimension)."""
    x1, x2 = halves(x, dim)
    return torch.cat((-x2, x1), dim=dim)


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """RoPE ``x·cos + rotate_half(x)·sin`` with tables broadcastable to ``x`` (head dimension along ``dim``).

    Computed half by half (``x1·c1 − x2·s1``, ``x2·c2 + x1·s2``): the same floats as transformers'
    ``apply_rotary_pos_emb``, without materialising ``rotate_half(x)``; traceable by ``torch.compile(fullgraph=True)``.
    """
    (x1, x2), (c1, c2), (s1, s2) = halves(x, dim), halves(cos, dim), halves(sin, dim)
    return torch.cat((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), dim=dim)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The exact inverse of :func:`apply` (any scaling folded into cos/sin included), computed in float32 and
    returned in ``x``'s dtype: ``(x·cos − rotate_half(x)·sin) / (cos² + sin²)``."""
    xf, cos, sin = x.float(), cos.float(), sin.float()
    return ((xf * cos - rotate_half(xf, dim) * sin) / (cos * cos + sin * sin)).to(x.dtype)


def _as_tensor(positions: Positions, device: torch.device) -> torch.Tensor:
    if isinstance(positions, range):
        return torch.arange(positions.start, positions.stop, positions.step, device=device)
    return positions.to(device=device, dtype=torch.long)


class Rotary:
    """RoPE at absolute positions with a model's rotary embedding module (``rotary_emb(x, position_ids)``
    → ``cos, sin`` ``(B, T, d)``). Keys ``(B, H, T, d)``; positions ``(T,)`` or ``(B, T)`` int64."""

    def __init__(self, rotary_emb: nn.Module):
        self.rotary_emb = rotary_emb

    def cos_sin(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables ``(B|1, 1, T, d)`` in ``like``'s dtype, on its device (only those two are read from it)."""
        if positions.dim() == 1:
            positions = positions.unsqueeze(0)
        cos, sin = self.rotary_emb(like.new_empty(0), positions.to(like.device))  # (B|1, T, d) each
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate(self, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """RoPE in ``k``'s dtype, as the model applies it to keys."""
        return apply(k, *self.cos_sin(positions, k))

    def unrotate(self, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """RoPE undone (float32 tables and arithmetic), in ``k``'s dtype."""
        return unrotate(k, *self.cos_sin(positions, k.float()))


class RopeTables:
    """cos/sin tables of one forward, shared by every layer that asks for the same positions on the same device.

    Keyed by positions, device and dtype: a ``range`` by its value; a tensor by its identity (its storage
    address and shape — the entry keeps the tensor referenced, so the address cannot be reused while the
    key exists). The owner calls :meth:`release` after the last layer of every forward (a cache's
    ``update`` for its last layer) and after any rebuild outside a forward, so nothing is held between
    forwards; its ``stored_tensors`` yields :meth:`tensors`, so a table alive mid-forward is counted too.
    """

    def __init__(self, rotary: Rotary):
        self.rotary = rotary
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor, Positions]] = {}

    def __len__(self) -> int:
        return len(self._tables)

    def at(self, positions: Positions, device: torch.device, dtype: torch.dtype = torch.float32,
           transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``(1, 1, T, d)`` at ``positions`` (``range`` or ``(T,)`` integers), on ``device`` in ``dtype``;
        with ``transposed`` contiguous ``(1, 1, d, T)`` for the layout ``(…, d, T)`` (``dim=-2``)."""
        device = torch.device(device)
        ident = ("range", positions) if isinstance(positions, range) else \
            ("tensor", positions.data_ptr(), tuple(positions.shape), positions.device)
        key = (ident, device, dtype, transposed)
        entry = self._tables.get(key)
        if entry is None:
            like = torch.empty(0, dtype=dtype, device=device)
            cos, sin = self.rotary.cos_sin(_as_tensor(positions, device), like)
            if transposed:
                cos, sin = cos.transpose(-1, -2).contiguous(), sin.transpose(-1, -2).contiguous()
            entry = self._tables[key] = (cos, sin, positions)
        return entry[0], entry[1]

    def tensors(self) -> Iterator[torch.Tensor]:
        """The tables held now (none between forwards), for the owner's ``stored_tensors``."""
        for cos, sin, positions in self._tables.values():
            yield cos
            yield sin
            if isinstance(positions, torch.Tensor):
                yield positions

    def release(self) -> None:
        """Forget every table (the forward that used them is over)."""
        self._tables = {}
