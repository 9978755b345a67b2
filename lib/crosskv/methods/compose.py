"""``compose``: token eviction → any cross-layer method → quantization, wrapped around the base method's Runner.

The order is fixed and documented here (it is also the order of :attr:`ComposeRunner.stages`):

1. **evict** — while the context is prefilled, a kvpress press (``snapkv`` or ``pyramidkv``) scores every
   layer's context tokens (its ``score`` method; its per-layer budget: ``compute_n_kept`` or PyramidKV's
   ``get_layer_budget``). The scores are averaged over the KV heads, so a layer keeps one token set for
   all heads — cross-layer representations (one latent per token, a token basis per group) are per
   token, not per head. After the prefill the unkept tokens are dropped from the cache: through
   ``cache.evict_tokens`` when the cache defines it (CommonKV keeps latents and absolute positions),
   else from each ``DynamicLayer``'s K/V (plain layers become :class:`EvictedLayer`, which still counts
   absolute positions). Other layer types (KVSharer's consumers) cannot be evicted: ``ValueError``.
2. **compress** — the base method's own ``compress`` runs on the kept tokens (xKV's SVD, CommonKV's merge…).
3. **quantize** — :func:`crosskv.methods.quant.quantize_cache` quantizes whatever the cache now stores.

``kept`` as measured by the harness (bytes held / plain-cache bytes) is the combined fraction of all three.
The base method and its parameters are given as strings so that ``make_method("compose", base="commonkv",
base_params="rank_ratio=0.8;unmerged_ratio=0.4", evict="snapkv", evict_ratio="0.5", bits="2")`` works from
the command line; ``bits=0`` disables quantization, ``evict="none"`` eviction.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers.cache_utils import DynamicLayer

from crosskv import budget
from crosskv.capture import attention_modules
from crosskv.methods.base import REGISTRY, MethodConfig, Runner, make_method, register
from crosskv.methods.quant import BITS, QuantSpec, quantize_cache

log = logging.getLogger(__name__)

EVICTIONS = ("none", "snapkv", "pyramidkv")
STAGES = ("evict", "compress", "quantize")


def parse_params(text: str) -> dict[str, str]:
    """``"a=1;b=x"`` (``;`` or ``,`` separated) → ``{"a": "1", "b": "x"}``."""
    params = {}
    for item in text.replace(",", ";").split(";"):
        if not item.strip():
            continue
        if "=" not in item:
            raise ValueError(f"base_params item {item!r} is not key=value")
        key, value = item.split("=", 1)
        params[key.strip()] = value.strip()
    return params


class EvictedLayer(DynamicLayer):
    """A plain K/V layer after eviction: holds ``(B, H_kv, kept, d)`` but counts every token seen,
    so positions and masks stay absolute (``get_seq_length`` = tokens seen)."""

    plain_kv = True

    def __init__(self, layer: DynamicLayer, index: torch.Tensor):
        super().__init__()
        self.dtype, self.device, self.is_initialized = layer.keys.dtype, layer.keys.device, True
        self.seen = layer.get_seq_length()
        self.evicted_at = self.seen  # tokens appended after eviction can be cropped again
        index = index.to(layer.keys.device)
        self.keys = layer.keys.index_select(-2, index)
        self.values = layer.values.index_select(-2, index)

    def update(self, key_states, value_states, cache_kwargs=None):
        self.seen += key_states.shape[-2]
        return super().update(key_states, value_states, cache_kwargs)

    def held(self) -> int:
        return self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self.held() + cache_position.shape[0], self.seen - self.held()

    def crop(self, max_length: int) -> None:
        """Drop the newest tokens down to ``max_length`` seen (only tokens appended after the eviction)."""
        max_length = self.seen + max_length if max_length < 0 else max_length
        if max_length >= self.seen:
            return
        if max_length < self.evicted_at:
            raise ValueError(f"cannot crop to {max_length} tokens: the first {self.evicted_at} went through eviction")
        keep = self.held() - (self.seen - max_length)
        self.keys, self.values, self.seen = self.keys[..., :keep, :], self.values[..., :keep, :], max_length


def layer_kv(layer) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The K/V ``(B, H_kv, T, d)`` a cache layer currently attends with (``current_kv()`` if it defines one)."""
    if hasattr(layer, "current_kv"):
        return layer.current_kv()
    return getattr(layer, "keys", None), getattr(layer, "values", None)


class EvictionScorer:
    """Collects, per layer, the context positions a kvpress press keeps (one set shared by the layer's heads)."""

    def __init__(self, model, press: str, ratio: float, window_size: int = 64):
        import kvpress  # lazy: importing kvpress patches transformers' attention functions

        cls = {"snapkv": kvpress.SnapKVPress, "pyramidkv": kvpress.PyramidKVPress}[press]
        self.press = cls(compression_ratio=ratio, window_size=window_size)
        self.model, self.ratio = model, ratio
        self.kept: dict[int, torch.Tensor] = {}

    def budget(self, module, tokens: int) -> int:
        from kvpress.utils import compute_n_kept

        if hasattr(self.press, "get_layer_budget"):
            return min(tokens, self.press.get_layer_budget(module, tokens))
        return compute_n_kept(tokens, self.ratio)

    def hook(self, module, args, kwargs, output):
        cache = kwargs["past_key_values"]
        keys, values = layer_kv(cache.layers[module.layer_idx])
        if keys is None:
            return output
        scores = self.press.score(module, kwargs["hidden_states"], keys, values, None, kwargs)  # (B, H_kv, T)
        token_scores = scores.float().mean(dim=(0, 1))  # (T,)
        keep = self.budget(module, token_scores.numel())
        self.kept[module.layer_idx] = token_scores.topk(keep).indices.sort().values
        return output

    @contextlib.contextmanager
    def hooks(self) -> Iterator["EvictionScorer"]:
        handles = [attn.register_forward_hook(self.hook, with_kwargs=True) for attn in attention_modules(self.model)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


def evict_cache(cache, kept: dict[int, torch.Tensor]) -> None:
    """Drop every context token not in ``kept[layer]`` (indices = absolute positions of a fresh cache)."""
    if hasattr(cache, "evict_tokens"):
        cache.evict_tokens(kept)
        return
    for idx, index in kept.items():
        layer = cache.layers[idx]
        if type(layer) is DynamicLayer:
            cache.layers[idx] = EvictedLayer(layer, index)
        elif isinstance(layer, DynamicLayer) and not getattr(layer, "prefix_len", 0):
            layer.keys = layer.keys.index_select(-2, index.to(layer.keys.device))
            layer.values = layer.values.index_select(-2, index.to(layer.values.device))
        else:
            raise ValueError(f"cannot evict tokens from layer {idx} of type {type(layer).__name__}: the cache needs "
                             "evict_tokens() or plain DynamicLayer layers")


def kept_fraction(kept: dict[int, torch.Tensor], tokens: int) -> float:
    """Mean fraction of context tokens kept per layer."""
    return sum(k.numel() for k in kept.values()) / (len(kept) * tokens) if kept else 1.0


@register
@dataclass(frozen=True)
class Compose(MethodConfig):
    """Eviction (kvpress SnapKV/PyramidKV at ``evict_ratio``) → ``base`` method → ``bits``-bit quantization."""

    name = "compose"
    description = "evict (kvpress snapkv|pyramidkv) → base cross-layer method → KIVI-style quantization"

    base: str = "commonkv"
    base_params: str = ""
    evict: str = "none"
    evict_ratio: float = 0.0
    window_size: int = 64
    bits: int = 0
    group_size: int = 32
    residual: int = 128

    def __post_init__(self):
        if self.base == self.name or self.base not in REGISTRY:
            raise ValueError(f"base={self.base!r} is not a registered method other than compose; "
                             f"known: {', '.join(sorted(n for n in REGISTRY if n != self.name))}")
        if self.base.startswith("kvpress:"):
            raise ValueError(f"base={self.base!r}: kvpress presses are eviction peers; use evict=snapkv|pyramidkv")
        self.base_config()  # validates base_params
        if self.evict not in EVICTIONS:
            raise ValueError(f"evict={self.evict!r} is not one of {EVICTIONS}")
        budget.check_ratio("evict_ratio", self.evict_ratio)
        if self.evict_ratio >= 1:
            raise ValueError(f"evict_ratio={self.evict_ratio} would evict every token")
        if self.bits and self.bits not in BITS:
            raise ValueError(f"bits={self.bits} is not 0 (off) or one of {BITS}")
        if self.bits:
            QuantSpec(self.bits, self.group_size, self.residual)

    def base_config(self) -> MethodConfig:
        return make_method(self.base, **parse_params(self.base_params))

    def quant_spec(self) -> QuantSpec | None:
        return QuantSpec(self.bits, self.group_size, self.residual) if self.bits else None

    def bind(self, model, tokenizer=None) -> "ComposeRunner":
        return ComposeRunner(self, model, tokenizer, self.base_config().bind(model, tokenizer))


class ComposeRunner(Runner):
    """Wraps the base runner; :attr:`stages` records the stages run on the last cache, in order."""

    def __init__(self, config: Compose, model, tokenizer, base: Runner):
        super().__init__(config, model, tokenizer)
        self.base = base
        self.scorer: EvictionScorer | None = None
        self.stages: list[str] = []
        self.evicted_kept = 1.0
        self.quant_storage: str | None = None

    @contextlib.contextmanager
    def applied(self) -> Iterator["ComposeRunner"]:
        with self.base.applied():
            yield self

    def new_cache(self):
        self.stages = []
        return self.base.new_cache()

    @contextlib.contextmanager
    def prefill(self, cache) -> Iterator[None]:
        if self.config.evict == "none" or self.config.evict_ratio == 0:
            with self.base.prefill(cache):
                yield
            return
        self.scorer = EvictionScorer(self.model, self.config.evict, self.config.evict_ratio, self.config.window_size)
        with self.base.prefill(cache), self.scorer.hooks():
            yield

    def compress(self, cache) -> None:
        if self.scorer is not None:
            tokens = cache.get_seq_length()
            evict_cache(cache, self.scorer.kept)
            self.evicted_kept = kept_fraction(self.scorer.kept, tokens)
            self.stages.append("evict")
            self.scorer = None
        self.base.compress(cache)
        self.stages.append("compress")
        spec = self.config.quant_spec()
        if spec is not None:
            self.quant_storage = quantize_cache(cache, spec)
            self.stages.append("quantize")
        log.info("compose: stages %s, tokens kept by eviction %.3f, quantization %s", self.stages,
                 self.evicted_kept, self.quant_storage)
