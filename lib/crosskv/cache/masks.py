"""Each layer's own attention mask, for caches whose layers hold different token counts (per-layer eviction).

transformers builds one attention mask per forward from layer 0's sizes (``get_mask_sizes``) and hands it to
every layer. After eviction with per-layer budgets (PyramidKV, alone or under compose) each layer holds its own
count of context rows, so a block of ``q > 1`` tokens would meet a mask as wide as layer 0's rows and fail (a
single token needs no mask). While :func:`fitted_masks` is active, a forward pre-hook on every attention module
gives its layer a mask of its own width (:func:`fit_mask`): the rows the layer holds before the block are all
visible (they precede it), and the block's causal part is the last ``q`` columns of layer 0's mask, the same for
every layer. A block then gives the logits of its one-token forwards.

The held rows are taken as visible to every query: these caches hold one sequence (eviction refuses a batch of
different rows, :func:`crosskv.cache.batch.check_one_sequence`), with no padding among the rows they keep.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from crosskv.core import capture


def fit_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Layer 0's mask ``(B|1, 1, q, W)`` (bool: True attends; or additive float: 0 attends) → ``(B|1, 1, q, width)``
    for a layer holding ``width − q`` rows before the block: those visible, then the block's last ``q`` columns."""
    q = mask.shape[-2]
    if width < q:
        raise ValueError(f"a layer mask of width {width} cannot hold a block of {q} queries")
    visible = True if mask.dtype == torch.bool else 0.0
    held = mask.new_full((*mask.shape[:-1], width - q), visible)
    return torch.cat([held, mask[..., -q:]], dim=-1)


def _fit_layer_mask(module, args, kwargs):
    """Forward pre-hook of an attention module: its ``attention_mask`` resized to its own layer's width."""
    mask, cache = kwargs.get("attention_mask"), kwargs.get("past_key_values")
    if not isinstance(mask, torch.Tensor) or cache is None or module.layer_idx >= len(cache.layers):
        return None
    layer = cache.layers[module.layer_idx]
    if getattr(layer, "is_sliding", False):  # a sliding window's mask is not a held prefix + a causal block
        return None
    queries = kwargs.get("cache_position")
    if queries is None:
        queries = torch.zeros(mask.shape[-2], dtype=torch.long, device=mask.device)  # its length is what counts
    width = layer.get_mask_sizes(queries)[0]
    if mask.shape[-1] == width:
        return None
    return args, {**kwargs, "attention_mask": fit_mask(mask, width)}


@contextlib.contextmanager
def fitted_masks(model) -> Iterator[None]:
    """Give every attention layer of ``model`` a mask of its own held width while active (see the module
    docstring); the hooks are removed on exit."""
    handles = [module.register_forward_pre_hook(_fit_layer_mask, with_kwargs=True)
               for module in capture.attention_modules(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
