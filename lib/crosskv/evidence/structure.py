"""Structural reasons from model shapes alone (configs, no weights): where a method can and cannot save memory.

CommonKV stores one latent of width r per layer and token (r = rank ratio · D, the hidden size) where a
plain cache stores K and V, 2·H_kv·d wide. An unmerged entry therefore saves memory only when
r < 2·H_kv·d, i.e. below the break-even rank ratio 2·H_kv·d / D; merging stores one latent for a group
of G layers, so a fraction u of unmerged entries gives the nominal kept (u + (1 − u)/G) · r / (2·H_kv·d).
Grouped-query attention (few KV heads) lowers the break-even ratio: the fewer KV heads per hidden
dimension, the less a latent in the hidden space can save.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Sequence

import pandas as pd

from crosskv.core.capture import kv_shape
from crosskv.core.models import RANDOM_SHAPES


def shape_of(name: str, model=None):
    """The :class:`~crosskv.core.capture.KVShape` of ``model`` when given, else of the published config
    ``name`` in :data:`crosskv.core.models.RANDOM_SHAPES`."""
    if model is not None:
        return kv_shape(model)
    if name not in RANDOM_SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(sorted(RANDOM_SHAPES))}")
    return kv_shape(SimpleNamespace(**RANDOM_SHAPES[name]))


def commonkv_widths(shapes: dict, points: Sequence[tuple[float, float]], group_size: int = 4) -> pd.DataFrame:
    """One row per (model, rank ratio, unmerged ratio): D, H_kv, d, the K+V width 2·H_kv·d, the latent width
    r·D, the break-even rank ratio, whether an unmerged entry saves memory, and the nominal kept of the
    point (latent bytes over a plain cache's, before any rounding of ranks). ``shapes``: name → KVShape."""
    rows = []
    for name, shape in shapes.items():
        kv = 2 * shape.width
        for rank_ratio, unmerged in points:
            if not (0 < rank_ratio <= 1 and 0 <= unmerged <= 1):
                raise ValueError(f"rank_ratio {rank_ratio} must be in (0, 1] and unmerged_ratio {unmerged} in [0, 1]")
            latent = rank_ratio * shape.hidden
            rows.append({"model": name, "layers": shape.layers, "D": shape.hidden, "kv_heads": shape.kv_heads,
                         "head_dim": shape.head_dim, "kv_width": kv, "rank_ratio": rank_ratio,
                         "unmerged_ratio": unmerged, "latent_width": latent, "latent_over_kv": latent / kv,
                         "break_even_rank_ratio": kv / shape.hidden, "unmerged_entry_saves": latent < kv,
                         "nominal_kept": (unmerged + (1 - unmerged) / group_size) * latent / kv})
    return pd.DataFrame(rows)
