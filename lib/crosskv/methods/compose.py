"""``compose``: token eviction → any cross-layer method → quantization, wrapped around the base method's Runner.

The order is fixed and documented here (it is also the order of :attr:`ComposeRunner.stages`):

1. **evict** — while the context is prefilled, a kvpress scorer press (``evict``: one of
   :data:`~crosskv.methods.peers.PRESSES` — snapkv, pyramidkv, knorm, streaming_llm,
   expected_attention) scores every layer's context tokens, averaged over the KV heads, and gives
   each layer a budget (``compute_n_kept``, or PyramidKV's ``get_layer_budget``). After the prefill
   the layers are partitioned into *units* that must keep the same tokens, because they share
   something across layers (:func:`token_units`):

   - ``full``: every layer is its own unit (plain per-layer eviction, as kvpress does);
   - ``xkv`` / ``svd``: one unit per group of G layers (the group's shared token basis); RoPE is
     undone before the SVD and redone at the **kept absolute positions**, stored with the group;
     layers outside ``[start_layer, end_layer)`` are units of one;
   - ``minicache``: one unit per merged pair (row t of both layers is one token); other layers alone;
   - ``commonkv``: one unit per group (its merge compares a group's latents token by token);
   - ``kvsharer``: each producer is a unit of one; consumers are not evicted on their own, they read
     their producer's evicted layer (no stale pre-eviction copy stays alive).

   **Budget rule**: a unit keeps the top ``⌊mean of its layers' budgets + ½⌋`` tokens of the mean of its
   layers' scores. With a uniform budget (SnapKV …) that is every layer's budget; with per-layer budgets
   (PyramidKV) a group gets the mean of its layers' pyramid budgets, so the total stays ≈ the pyramid's.
   Eviction runs as the prefill ends (the scores and kept positions live no longer); with per-layer budgets
   each layer then gets its own attention mask (:func:`crosskv.cache.masks.fitted_masks`), so a block after
   the context scores as its one-token forwards. A batch of different rows is refused by name.
2. **compress** — the base method's own ``compress`` runs on the kept tokens (xKV's SVD, CommonKV's merge…).
3. **quantize** — :func:`crosskv.cache.quant.quantize_cache` quantizes whatever the cache now stores (a batch
   of different rows is refused by name: a padded row's quantization groups would start at its padding).

Refused at config time (``ValueError`` naming the composition, see :func:`composition_matrix`):
kvpress presses as ``base`` (they are eviction, use ``evict``); ``evict_ratio`` > 0 without an
eviction press; eviction with ``xkv``/``svd`` ``strict=true`` (strict compresses each group inside the
prefill, before the tokens to evict are known).

``kept`` as measured by the harness (bytes held / plain-cache bytes) is the combined fraction of all three.
The base method and its parameters are given as strings so that ``make_method("compose", base="commonkv",
base_params="rank_ratio=0.8;unmerged_ratio=0.4", evict="snapkv", evict_ratio="0.5", bits="2")`` works from
the command line; ``bits=0`` disables quantization, ``evict="none"`` eviction.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from crosskv.core import budget
from crosskv.methods.base import REGISTRY, MethodConfig, Runner, make_method, register
from crosskv.methods.peers import PRESSES, EvictionScorer
from crosskv.cache.attention import installed
from crosskv.cache.batch import check_one_sequence
from crosskv.cache.eviction import evict_plain, kept_fraction, token_sets
from crosskv.cache.masks import fitted_masks
from crosskv.cache.quant import BITS, QuantSpec, quantize_cache

log = logging.getLogger(__name__)

EVICTIONS = ("none", *PRESSES)
STAGES = ("evict", "compress", "quantize")
UNIT_RULES = {
    "full": "each layer keeps its own token set",
    "xkv": "one token set per group of G layers; RoPE redone at the kept absolute positions",
    "svd": "each layer keeps its own token set; RoPE redone at the kept absolute positions",
    "selective": "as its base (xkv: one token set per group; svd: per layer); RoPE redone at the kept positions",
    "minicache": "one token set per merged layer pair",
    "commonkv": "one token set per layer group; the merge runs on the group's kept tokens",
    "kvsharer": "producers evicted, each its own set; consumers read their producer's evicted layer",
}
UNEVICTABLE = {  # bases whose token-set rule under eviction is not implemented (and so not reference-tested)
    "kvsharer_xkv": ("its consumers view a compressed producer group, which no token-set rule covers yet; "
                     "evict with base=kvsharer or base=xkv"),
}
BUDGET_RULE = ("a unit of layers that share (group, pair) keeps the mean of its layers' budgets (rounded half up) "
               "in tokens, ranked by the mean of its layers' scores")


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


def token_units(cache) -> list[tuple[int, ...]]:
    """The units of layers that must keep one token set (see the module docstring), from the base cache.

    Layers sharing an object (``cache.shared``: an xKV group, a MiniCache pair; ``cache.groups``: CommonKV)
    form a unit; a KVSharer consumer belongs to no unit (it is never evicted itself); every other layer is
    a unit of one.
    """
    layers = len(cache.layers)
    if hasattr(cache, "shared"):
        shared = [tuple(s.layers) for s in cache.shared]
    else:
        shared = [tuple(g) for g in getattr(cache, "groups", [])]
    consumers = set(getattr(cache, "mapping", {}))
    grouped = {i for unit in shared for i in unit}
    singles = [(i,) for i in range(layers) if i not in grouped and i not in consumers]
    return sorted(shared + singles)


def evict_cache(cache, positions: dict[int, torch.Tensor]) -> None:
    """Drop every context token not in ``positions[layer]`` (the absolute prompt positions to keep)."""
    if hasattr(cache, "evict_tokens"):
        cache.evict_tokens(positions)
        return
    for idx, index in positions.items():
        cache.layers[idx] = evict_plain(cache.layers[idx], index)


def bases(include_refused: bool = False) -> list[str]:
    """Registered methods usable as ``base`` (all but compose; kvpress presses only with ``include_refused``); the
    ``crosskv.methods`` package, imported before this module, has registered every method."""
    return sorted(n for n in REGISTRY if n != Compose.name and (include_refused or not n.startswith("kvpress:")))


def refusal(base: str, evict: str, bits: int, base_config: MethodConfig | None = None) -> str | None:
    """Why ``evict × base × bits`` (with ``base_config``'s parameters, if given) cannot be done correctly, or None."""
    if base.startswith("kvpress:") and base in REGISTRY:
        return (f"base={base!r}: a kvpress press evicts tokens, it is not a cross-layer method; use "
                f"evict={base[8:]!r} with a cross-layer base")
    if base == Compose.name or base not in REGISTRY:
        return f"base={base!r} is not a registered method other than compose; known: {', '.join(bases())}"
    if evict not in EVICTIONS:
        return f"evict={evict!r} is not one of {EVICTIONS}"
    if bits and bits not in BITS:
        return f"bits={bits} is not 0 (off) or one of {BITS}"
    if evict != "none" and base in UNEVICTABLE:
        return f"evict={evict} × base={base} × bits={bits}: {UNEVICTABLE[base]}"
    if evict != "none" and getattr(base_config, "strict", False):
        return (f"evict={evict} × base={base} strict=true × bits={bits}: strict mode compresses each group inside "
                "the prefill, before the tokens to evict are known; use strict=false")
    return None


PARAMETER_REFUSALS = (
    "evict≠none × xkv|svd strict=true: strict compresses inside the prefill, before eviction",
    "evict_ratio>0 × evict=none: no press to evict with",
)


def composition_matrix() -> list[dict[str, Any]]:
    """Every ``base × evict × bits`` composition: rows ``{base, evict, bits, supported, rule}``.

    ``rule`` says how eviction is done for that base (its token-set rule) or, when refused, why.
    ``bits`` > 0 quantizes whatever the cache stores, last. Refusals that depend on a base's parameters
    (:data:`PARAMETER_REFUSALS`) are checked by :class:`Compose`. Accepted compositions:
    ``[r for r in composition_matrix() if r["supported"]]``.
    """
    rows = []
    for base in bases(include_refused=True):
        for evict in EVICTIONS:
            for bits in (0, *BITS):
                reason = refusal(base, evict, bits)
                rule = "no eviction" if evict == "none" else UNIT_RULES.get(base, UNIT_RULES["full"])
                rows.append({"base": base, "evict": evict, "bits": bits, "supported": reason is None,
                             "rule": reason or rule})
    return rows


@register
@dataclass(frozen=True)
class Compose(MethodConfig):
    """Eviction (a kvpress scorer at ``evict_ratio``) → ``base`` method → ``bits``-bit quantization."""

    name = "compose"
    description = ("evict (kvpress scores; one token set per group/pair of layers sharing, group budget = mean) "
                   "→ base cross-layer method → KIVI-style quantization")

    base: str = "commonkv"
    base_params: str = ""
    evict: str = "none"
    evict_ratio: float = 0.0
    window_size: int = 64
    bits: int = 0
    group_size: int = 32
    residual: int = 128

    def __post_init__(self):
        reason = refusal(self.base, self.evict, self.bits)
        if reason:
            raise ValueError(reason)
        base = self.base_config()  # validates base_params
        budget.check_ratio("evict_ratio", self.evict_ratio)
        if self.evict_ratio >= 1:
            raise ValueError(f"evict_ratio={self.evict_ratio} would evict every token")
        if self.evict == "none" and self.evict_ratio:
            raise ValueError(f"evict_ratio={self.evict_ratio} with evict='none': name an eviction press "
                             f"({', '.join(PRESSES)})")
        if self.window_size < 1:
            raise ValueError(f"window_size={self.window_size} must be >= 1")
        reason = refusal(self.base, self.evict, self.bits, base)
        if reason:
            raise ValueError(reason)
        if self.bits:
            QuantSpec(self.bits, self.group_size, self.residual)

    @property
    def plain_prefill(self) -> bool:
        """Eviction scores the prefill with hooks; without it the base method decides."""
        return self.evict == "none" and self.base_config().plain_prefill

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
        self.stages: list[str] = []
        self.evicted_kept = 1.0
        self.quant_storage: str | None = None

    def record_fields(self) -> dict:
        return self.base.record_fields()

    def method_bytes(self) -> int:
        """The sum over the stages: eviction adds nothing (its scores and kept positions live only during the
        prefill), quantization nothing (scales and zero points are held by the cache), plus the base's."""
        return self.base.method_bytes()

    @contextlib.contextmanager
    def applied(self) -> Iterator["ComposeRunner"]:
        """The base's transforms; with ``bits``, also the ``crosskv`` attention that reads quantized layers' codes;
        with a press of per-layer budgets, each layer's own attention mask (:func:`crosskv.cache.masks.fitted_masks`)."""
        uneven = self.config.evict != "none" and PRESSES[self.config.evict].uneven
        with self.base.applied(), (installed(self.model) if self.config.bits else contextlib.nullcontext()), \
                (fitted_masks(self.model) if uneven else contextlib.nullcontext()):
            yield self

    def new_cache(self):
        self.stages = []
        return self.base.new_cache()

    @contextlib.contextmanager
    def prefill(self, cache) -> Iterator[None]:
        """The base's prefill; with eviction, the scorer's hooks too, and the eviction itself once the context
        has run (so neither the scores nor the kept positions outlive the prefill: held bytes are the cache's)."""
        if self.config.evict == "none" or self.config.evict_ratio == 0:
            with self.base.prefill(cache):
                yield
            return
        scorer = EvictionScorer(self.model, self.config.evict, self.config.evict_ratio, self.config.window_size)
        with self.base.prefill(cache), scorer.hooks():
            yield
        self.evict(cache, scorer)

    def evict(self, cache, scorer: EvictionScorer) -> None:
        """Keep each unit's token set, chosen from the prefill's ``scorer`` (:func:`token_sets`), in ``cache``."""
        tokens = cache.get_seq_length()
        units = token_units(cache)
        kept = token_sets(scorer.scores, scorer.budgets, units)
        evict_cache(cache, kept)
        self.evicted_kept = kept_fraction(kept, tokens)
        self.stages.append("evict")
        log.info("compose: evicted with %d units of layers %s", len(units), units)

    def compress(self, cache) -> None:
        self.base.compress(cache)
        self.stages.append("compress")
        spec = self.config.quant_spec()
        if spec is not None:
            self.check_one_sequence(cache)
            self.quant_storage = quantize_cache(cache, spec)
            self.stages.append("quantize")
        log.info("compose: stages %s, tokens kept by eviction %.3f, quantization %s", self.stages,
                 self.evicted_kept, self.quant_storage)

    def check_one_sequence(self, cache) -> None:
        """Refuse quantizing a batch of different rows, naming the composition: a padded row's quantization
        groups would start at its padding, not at its first token (every layer's exact rows are checked)."""
        for layer in cache.layers:
            keys = getattr(layer, "keys", None)  # (B, H_kv, t, d)
            if keys is not None and keys.numel():
                check_one_sequence(keys, f"compose (base={self.config.base}, bits={self.config.bits})",
                                   "quantization groups count each row's tokens from the batch's first column, "
                                   "padding included")
