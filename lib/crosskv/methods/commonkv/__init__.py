"""``commonkv``: cross-layer parameter sharing with a latent cache and an adaptive merge budget (CommonKV).

Map of the package against the CommonKV paper and release: the offline weight step (thin SVD of a group's
stacked W_k/W_v, the shared down-projection P_g and per-layer up-projections) is
:mod:`crosskv.methods.commonkv.weights`; the calibration measurements (v_proj Fisher importance behind the
rank allocation, per-layer perplexity sensitivity behind the merge weights) are
:mod:`crosskv.methods.commonkv.calibration`; the latent cache and
the adaptive cosine merge budget (sink/recent tokens never merged, one weighted group latent per merged
entry) are :mod:`crosskv.methods.commonkv.cache`; attending to latent values without rebuilding V is
:mod:`crosskv.methods.commonkv.attention`; the cross-layer similarity analysis behind the merge (latents
vs inputs) is :mod:`crosskv.methods.commonkv.analysis`. This module holds the method's config
(:class:`CommonKV`) and its runner (:class:`CommonKVRunner`), which installs the projections and builds
the caches.

Attention (``attend``): ``"rebuild"`` (default) holds only latents — the memory-saving mode. Each step
rebuilds the held tokens' keys once (R_k·c, RoPE at their positions from cached tables, in the model's
dtype) and applies the attention weights to the latents, then R_v once per head, instead of rebuilding V
(:mod:`crosskv.methods.commonkv.attention`; about H_kv·d / Hq times fewer multiply-adds for the values
than the rebuild, which is what the CommonKV release does for K and V every step). The latent values
reach attention through :mod:`crosskv.cache.attention`'s explicit channel, installed by
:meth:`CommonKVRunner.applied`. ``"buffer"`` additionally keeps the rebuilt post-RoPE K and V (built
once after compression, then the exact new K/V are appended), so decoding runs at plain-cache speed; the
buffer is held across steps, so it is counted in ``stored_tensors()`` (``kept`` > 1 then): a speed
reference, not a compression mode.

Method overhead (:meth:`CommonKVRunner.method_bytes`, :func:`nominal_method_bytes`): the replacement
projections in the model's dtype minus the ``k_proj``/``v_proj`` weights they make unused.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Iterator

import torch

from crosskv.cache.attention import installed
from crosskv.cache.batch import check_one_sequence
from crosskv.core import budget
from crosskv.core.capture import Rotary, attention_modules, kv_shape
from crosskv.core.rotary import RopeTables
from crosskv.methods.base import MethodConfig, Runner, module_bytes, register
from crosskv.methods.commonkv.cache import CommonKVCache, CommonKVLayer, GroupStore, merge_groups
from crosskv.methods.commonkv.calibration import cached_measurement, group_fisher, key_noise_sensitivity
from crosskv.methods.commonkv.weights import (LatentKeyProj, LatentSlot, LatentValueProj, build_projections,
                                              full_rank, overhead_bytes)

log = logging.getLogger(__name__)

RANKINGS = ("uniform", "fisher")
WEIGHTINGS = ("sensitivity", "uniform")
MERGE_BUDGETS = ("global", "group")
ATTEND = ("buffer", "rebuild")


@register
@dataclass(frozen=True)
class CommonKV(MethodConfig):
    """CommonKV. Ranks: ``rank`` per group, else ``rank_ratio``·D uniformly, or ``ranks="fisher"`` under the
    ``rank_ratio`` budget. Merge: ``unmerged_ratio`` (1 = no merging) with ``merge_budget`` global
    (adaptive cosine bottom-k) or per group, ``weights`` sensitivity or uniform.

    Default budget ``kept=0.5`` (used when neither ``rank`` nor ``rank_ratio`` is given; it is then cleared):
    the rank r is chosen so that the nominal latent bytes — r per layer per token, times the stored
    fraction ``u + (1 − u)/G`` of merging — are ``kept`` × a plain cache's 2·H_kv·d, rounded down to a
    multiple of 32 (see :func:`kept_rank`). The measured ``kept`` of a run differs: sink and recent tokens
    are never merged, and decoded tokens are stored unmerged. On GQA models a latent is easily wider
    than the K+V it replaces (rank_ratio=1: 576 > 384 on SmolLM2, 4096 > 2048 on Llama-3.1-8B); such runs
    record ``latent_wider_than_kv: true``."""

    name = "commonkv"
    description = "cross-layer shared K/V down-projection (weight SVD), latent cache, adaptive cosine merge"
    note = ("kept=0.5 (default) picks the latent rank r to save memory; with rank/rank_ratio the latent can be "
            "wider than a layer's K+V (r > 2·H_kv·d: rank_ratio=1 gives 576 > 384 on SmolLM2-135M, 4096 > 2048 on "
            "Llama-3.1-8B) and holds more than a plain cache before merging; such runs record "
            "latent_wider_than_kv: true")

    group_size: int = 4
    rank: int | None = None
    rank_ratio: float | None = None
    kept: float | None = 0.5
    ranks: str = "uniform"
    unmerged_ratio: float = 0.4
    merge_budget: str = "global"
    weights: str = "sensitivity"
    sink_tokens: int = 4
    recent_tokens: int = 128
    attend: str = "rebuild"
    calibration: int = 30
    calibration_length: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.group_size < 1:
            raise ValueError(f"group_size={self.group_size} must be >= 1")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank={self.rank} must be >= 1")
        if self.rank is not None or self.rank_ratio is not None:
            object.__setattr__(self, "kept", None)  # an explicit rank budget replaces the kept target
        if self.rank_ratio is not None:
            budget.check_ratio("rank_ratio", self.rank_ratio, allow_zero=False)
        if self.kept is not None:
            budget.check_ratio("kept", self.kept, allow_zero=False)
        budget.check_ratio("unmerged_ratio", self.unmerged_ratio)
        for field, value, allowed in (("ranks", self.ranks, RANKINGS), ("weights", self.weights, WEIGHTINGS),
                                      ("merge_budget", self.merge_budget, MERGE_BUDGETS),
                                      ("attend", self.attend, ATTEND)):
            if value not in allowed:
                raise ValueError(f"{field}={value!r} is not one of {allowed}")
        if self.ranks == "fisher" and self.rank is not None:
            raise ValueError(f"rank={self.rank} conflicts with ranks='fisher' (give rank_ratio or kept as the budget)")
        if self.sink_tokens < 0 or self.recent_tokens < 0:
            raise ValueError(f"sink_tokens={self.sink_tokens} and recent_tokens={self.recent_tokens} must be >= 0")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0")
        if self.calibration < 1 or self.calibration_length < 2:
            raise ValueError(f"calibration={self.calibration} rows of calibration_length={self.calibration_length} "
                             "tokens: need >= 1 row of >= 2 tokens")

    @property
    def merges(self) -> bool:
        return self.unmerged_ratio < 1

    def calibration_ids(self, tokenizer) -> torch.Tensor:
        from crosskv.core.data import calibration_set

        return calibration_set(tokenizer, n=self.calibration, length=self.calibration_length, seed=self.seed)

    def calibration_key(self) -> dict:
        return {"calibration": self.calibration, "length": self.calibration_length, "seed": self.seed}

    def stored_fraction(self) -> float:
        """Nominal latent rows stored per layer and token after merging: u + (1 − u)/G (1 without merging)."""
        return self.unmerged_ratio + (1 - self.unmerged_ratio) / self.group_size if self.merges else 1.0

    def rank_budget(self, model) -> float:
        """The uniform rank ratio r/D: ``rank_ratio``, or the one :func:`kept_rank` picks for ``kept``."""
        if self.rank_ratio is not None:
            return self.rank_ratio
        shape = kv_shape(model)
        return kept_rank(self.kept, 2 * shape.width, self.stored_fraction(), shape.hidden) / shape.hidden

    def uniform_ranks(self, model_or_config, groups: list[list[int]]) -> list[int]:
        """``rank`` or the :meth:`rank_budget` rank for every group, capped at each group's full rank."""
        shape = kv_shape(model_or_config)
        caps = [full_rank(len(g), shape.width, shape.hidden) for g in groups]
        if self.rank is not None and self.rank > shape.hidden:
            raise ValueError(f"rank={self.rank} exceeds the model width D={shape.hidden}")
        rank = self.rank if self.rank is not None else max(1, round(self.rank_budget(model_or_config) * shape.hidden))
        return budget.uniform_ranks(rank, caps)

    def group_ranks(self, model, tokenizer, groups: list[list[int]]) -> list[int]:
        if self.ranks == "uniform":
            return self.uniform_ranks(model, groups)
        shape = kv_shape(model)
        caps = [full_rank(len(g), shape.width, shape.hidden) for g in groups]
        fisher = group_fisher(model, tokenizer, self, groups)
        return budget.fisher_ranks(fisher, [len(g) for g in groups], caps, self.rank_budget(model), shape.hidden)

    def layer_weights(self, model, tokenizer, groups: list[list[int]]) -> list[float]:
        layers = kv_shape(model).layers
        if not self.merges or self.weights == "uniform":
            return budget.normalise_within_groups([1.0] * layers, groups)
        deltas = cached_measurement("sensitivity", model, self.calibration_key(),
                                    lambda: key_noise_sensitivity(model, self.calibration_ids(tokenizer), self.seed))
        return budget.normalise_within_groups(deltas, groups)

    def bind(self, model, tokenizer=None) -> "CommonKVRunner":
        groups = budget.layer_groups(kv_shape(model).layers, self.group_size)
        ranks = self.group_ranks(model, tokenizer, groups)
        weights = self.layer_weights(model, tokenizer, groups)
        return CommonKVRunner(self, model, tokenizer, groups, ranks, weights)


def kept_rank(kept: float, kv_width: int, stored_fraction: float, hidden: int, multiple: int = 32) -> int:
    """The latent rank r whose nominal bytes r·``stored_fraction`` are ``kept``·``kv_width`` (a plain cache's
    2·H_kv·d per layer and token), rounded down to a multiple of ``multiple`` (at least one), at most D."""
    ideal = kept * kv_width / stored_fraction
    return min(hidden, max(multiple, multiple * math.floor(ideal / multiple)))


class CommonKVRunner(Runner):
    """Holds the replacement projections (built once, in the model's dtype); installs them with the ``crosskv``
    attention and builds latent caches.

    :meth:`method_bytes` = the replacement projections (P_g per group and device, R_k/R_v and biases per layer)
    − the original ``k_proj``/``v_proj`` they make unused while installed. The originals stay loaded here so
    that leaving :meth:`applied` restores the plain model; a deployment that only runs CommonKV could drop
    them (and the runner could then not restore them). Nothing else is kept for the model's lifetime: the
    SVD's float64 factors live only while :func:`~crosskv.methods.commonkv.weights.build_projections` runs.
    """

    def __init__(self, config: CommonKV, model, tokenizer, groups: list[list[int]], ranks: list[int],
                 weights: list[float]):
        super().__init__(config, model, tokenizer)
        self.groups, self.ranks, self.weights = groups, ranks, weights
        attns = attention_modules(model)
        self.projections = build_projections(attns, groups, ranks)
        self.devices = layer_devices(attns)
        self.rotary = Rotary(model)
        rope_type = getattr(self.rotary.rotary_emb, "rope_type", "default")
        if "dynamic" in rope_type or rope_type == "longrope":
            raise ValueError(f"commonkv: rope_type={rope_type!r} rescales RoPE with the sequence length; the latent "
                             "cache rotates keys from tables of fixed positions (static RoPE types only)")
        self.slots: list[LatentSlot] | None = None  # set while installed, with the originals put aside
        self.originals: list[tuple] = []
        self.merged_counts: list[int] = []
        self.kv_width = 2 * kv_shape(model).width
        log.info("commonkv: groups %s, ranks %s", [len(g) for g in groups], ranks)
        if self.latent_wider_than_kv:
            log.warning("commonkv: latent ranks %s are wider than a layer's K+V (%d): unmerged entries hold more "
                        "than a plain cache", ranks, self.kv_width)

    @property
    def latent_wider_than_kv(self) -> bool:
        """True when some group's latent (r per layer and token) is wider than the K+V it replaces (2·H_kv·d)."""
        return max(self.ranks) > self.kv_width

    def record_fields(self) -> dict:
        return {"latent_ranks": list(self.ranks), "kv_width": self.kv_width,
                "latent_wider_than_kv": self.latent_wider_than_kv}

    def method_bytes(self) -> int:
        """Bytes of the replacement projections minus the original ``k_proj``/``v_proj`` (see the class docstring);
        negative when the factors are smaller than the weights they replace."""
        added = module_bytes(m for p in self.projections for m in (p.down, p.up_k, p.up_v))
        originals = [m for a in attention_modules(self.model) for m in (a.k_proj, a.v_proj)]
        if self.slots is not None:  # installed: the originals are the ones applied() put aside
            originals = [m for pair in self.originals for m in pair]
        return added - module_bytes(originals)

    @contextlib.contextmanager
    def applied(self) -> Iterator["CommonKVRunner"]:
        attns = attention_modules(self.model)
        self.originals = [(a.k_proj, a.v_proj) for a in attns]
        self.slots = [LatentSlot() for _ in attns]
        attention = installed(self.model) if self.config.attend == "rebuild" else contextlib.nullcontext()
        try:
            for attn, proj, slot in zip(attns, self.projections, self.slots):
                attn.k_proj = LatentKeyProj(proj.down, proj.up_k, slot)
                attn.v_proj = LatentValueProj(proj.down, proj.up_v, slot)
            with attention:
                yield self
        finally:
            for attn, (k, v) in zip(attns, self.originals):
                attn.k_proj, attn.v_proj = k, v
            self.slots, self.originals = None, []

    def new_cache(self) -> CommonKVCache:
        if self.slots is None:
            raise RuntimeError("CommonKVRunner.new_cache() must be called inside runner.applied()")
        shape = kv_shape(self.model)
        attns = attention_modules(self.model)
        stores = [GroupStore(device) for device in store_devices(self.groups, self.devices)]
        group_of = {layer: g for g, layers in enumerate(self.groups) for layer in layers}
        rope = RopeTables(self.rotary)
        layers = [CommonKVLayer(self.slots[i], self.projections[i], stores[group_of[i]], rope, shape,
                                self.config.attend, getattr(attns[i], "k_norm", None), self.devices[i], i)
                  for i in range(shape.layers)]
        return CommonKVCache(layers, self.groups, stores, rope)

    def compress(self, cache: CommonKVCache) -> None:
        """Merge the groups' most similar entries; a batch of different sequences is refused first (the cache
        rotates every row's keys at positions 0…T−1 and merges one token set for the whole batch)."""
        if cache.layers[0].seen:
            check_one_sequence(cache.layers[0].own_latents(), self.config.name, "its keys are rotated at positions "
                               "0…T−1 of the cache, not each row's, and merged with one token set for the batch")
        if not self.config.merges:
            return
        self.merged_counts = merge_groups(cache, self.weights, self.config.unmerged_ratio, self.config.sink_tokens,
                                          self.config.recent_tokens, self.config.merge_budget)
        log.info("commonkv: merged tokens per group %s", self.merged_counts)


def layer_devices(attns: list) -> list[torch.device]:
    """Each layer's device: that of its ``k_proj`` weight (with ``device_map="auto"`` layers differ)."""
    return [attn.k_proj.weight.device for attn in attns]


def store_devices(groups: list[list[int]], devices: list[torch.device]) -> list[torch.device]:
    """Where each group's store of merged latents lives: on its first layer's device (a layer on another
    device reads the merged latents through a transient copy)."""
    return [devices[group[0]] for group in groups]


def nominal_method_bytes(config: CommonKV, model_config, element_size: int = 2) -> dict[str, int]:
    """:meth:`CommonKVRunner.method_bytes` from shapes alone (no weights: e.g. the Llama-3.1-8B shape), for
    uniform ranks (``ranks="fisher"`` needs the model), one device: ``{added, droppable, net}`` bytes."""
    if config.ranks != "uniform":
        raise ValueError(f"ranks={config.ranks!r}: nominal method bytes need uniform ranks (bind the model instead)")
    shape = kv_shape(model_config)
    groups = budget.layer_groups(shape.layers, config.group_size)
    ranks = config.uniform_ranks(model_config, groups)
    return overhead_bytes(shape, ranks, [len(g) for g in groups], element_size)
