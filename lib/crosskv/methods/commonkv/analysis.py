"""CommonKV analysis: prompt latents and the per-token cosines between a group's first and last layer."""
from __future__ import annotations

import torch

from crosskv.core.capture import decoder_layers
from crosskv.methods.commonkv import CommonKVRunner
from crosskv.methods.commonkv.cache import CommonKVCache, group_similarity

@torch.no_grad()
def prompt_latents(runner: CommonKVRunner, ids: torch.Tensor) -> CommonKVCache:
    """Prefill ``ids`` ``(1, T)`` through the latent projections; the returned cache holds every layer's latents."""
    with runner.applied():
        cache = runner.new_cache()
        runner.model(input_ids=ids.to(runner.model.device), past_key_values=cache, use_cache=True)
    return cache


def token_cosines(cache: CommonKVCache) -> list[torch.Tensor | None]:
    """Per group: cosine between its first and last layer's latents at every held position ``(T,)``
    (averaged over the batch; ``None`` for 1-layer groups)."""
    out = []
    for group in cache.groups:
        layers = [cache.layers[i] for i in group]
        out.append(group_similarity(layers, layers[0].pos) if len(layers) > 1 else None)
    return out


def group_cosines(cache: CommonKVCache) -> list[float]:
    """Per group: mean over tokens of the cosine between its first and last layer's latents (NaN for 1-layer groups)."""
    return [float("nan") if c is None else float(c.mean()) for c in token_cosines(cache)]


@torch.no_grad()
def input_cosines(model, hidden: torch.Tensor, groups: list[list[int]]) -> list[torch.Tensor | None]:
    """Per group: cosine between the normalised inputs of its first and last layer's K/V projections per token.

    ``hidden``: ``(L+1, B, T, D)`` residual stream (row ℓ enters layer ℓ, as :func:`crosskv.core.capture.capture`
    returns it); each layer's own ``input_layernorm`` is applied, so this is what ``k_proj``/``v_proj`` see.
    Returns ``(B·T,)`` per group (``None`` for 1-layer groups) — the baseline the latents' cosine is compared to.
    """
    layers = decoder_layers(model)
    if not all(hasattr(layer, "input_layernorm") for layer in layers):
        raise ValueError(f"{type(layers[0]).__name__} has no input_layernorm: input_cosines needs the pre-attention norm")
    out = []
    for group in groups:
        if len(group) < 2:
            out.append(None)
            continue
        first, last = (layers[i].input_layernorm(hidden[i].to(model.dtype)).float().flatten(0, 1) for i in (group[0], group[-1]))
        out.append(torch.nn.functional.cosine_similarity(first, last, dim=-1))
    return out
