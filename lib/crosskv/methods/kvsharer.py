"""``kvsharer``: layer-wise dissimilar KV-cache sharing (KVSharer, Yang et al., 2024).

Offline, a greedy search (the paper's Algorithm 1) picks C *consumer* layers, each of which reuses
the K/V cache of an earlier *producer* layer: layer pairs are ranked by the distance of their
sample-averaged K and V on a small calibration set (most dissimilar first), and a pair is accepted
while the final hidden states of the sharing model stay close to the original's (cosine > T).
At inference a :class:`SharingCache` holds nothing for consumers: their attention reads the
producer's cache, which already holds the current tokens because the producer ran earlier in the
same forward (identical positions, so post-RoPE keys are reused as they are). This applies in
prefill and decode; per-layer lengths are tracked by counters, not by how many layers are stored
(the released dict cache's decode bug).

This module holds the data (:class:`SharingStrategy`, the search options), the cache layers and the
method; the search itself, its calibration and its disk cache are in :mod:`crosskv.methods.kvsharer_search`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin

from crosskv.cache.eviction import evict_plain
from crosskv.cache.layer import HeldLayer
from crosskv.cache.storage import layer_tensors
from crosskv.core.capture import attention_modules, kv_shape
from crosskv.methods.base import MethodConfig, Runner, module_bytes, register, state_bytes

FORMAT = "crosskv.kvsharer/1"
METRICS = ("euclidean", "cosine")
ORDERS = ("dissimilar", "similar", "random")
CRITERIA = ("cosine", "kl")  # accept a candidate on final-hidden cosine > threshold, or next-token KL ≤ max_kl


# ----------------------------------------------------------------------------- the strategy (data)

@dataclass(frozen=True)
class SharingStrategy:
    """Which layer reuses which: ``mapping`` ``{consumer: producer}`` over ``num_layers`` layers.

    Valid when every consumer maps to an earlier producer that is not itself a consumer and every
    index lies in ``[0, num_layers)``. ``search`` holds the search config; ``search_seconds``,
    ``candidates_tried`` and ``trace`` (one dict per evaluated candidate: consumer, producer,
    distance, cosine, accepted) record how it was found.
    """

    mapping: dict[int, int]
    num_layers: int
    model: str | None = None
    search: dict[str, Any] | None = None
    search_seconds: float | None = None
    candidates_tried: int | None = None
    trace: tuple[dict[str, Any], ...] = ()

    def __post_init__(self):
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"num_layers={self.num_layers!r} must be a positive integer")
        mapping = {}
        for consumer, producer in dict(self.mapping).items():
            for role, index in (("consumer", consumer), ("producer", producer)):
                if isinstance(index, bool) or not isinstance(index, int):
                    raise ValueError(f"{role} index {index!r} (entry {consumer!r} → {producer!r}) is not an integer")
                if not 0 <= index < self.num_layers:
                    raise ValueError(f"{role} {index} (entry {consumer} → {producer}) is out of range "
                                     f"[0, {self.num_layers})")
            if producer >= consumer:
                raise ValueError(f"consumer {consumer} maps to layer {producer}, which is not an earlier layer")
            mapping[consumer] = producer
        for consumer, producer in mapping.items():
            if producer in mapping:
                raise ValueError(f"consumer {consumer} maps to layer {producer}, which is itself a consumer "
                                 f"(of layer {mapping[producer]}); chains must be resolved")
        object.__setattr__(self, "mapping", dict(sorted(mapping.items())))
        object.__setattr__(self, "trace", tuple(dict(t) for t in self.trace))

    @property
    def consumers(self) -> list[int]:
        return list(self.mapping)

    @property
    def producers(self) -> list[int]:
        """Layers that keep a cache (every non-consumer), ascending."""
        return [i for i in range(self.num_layers) if i not in self.mapping]

    @property
    def first_consumer(self) -> int:
        """The lowest consumer layer (``num_layers`` when there is none): every layer below it runs as in the
        unmodified model."""
        return min(self.mapping, default=self.num_layers)

    @property
    def layers_kept(self) -> float:
        """Fraction of layers that store K/V: ``(L - C) / L`` (not the glossary's byte ``kept``)."""
        return len(self.producers) / self.num_layers

    def check_model(self, model) -> "SharingStrategy":
        """Raise ``ValueError`` unless the strategy's layer count matches ``model``'s; return self."""
        layers = kv_shape(model).layers
        if layers != self.num_layers:
            raise ValueError(f"strategy was made for {self.num_layers} layers ({self.model or 'unknown model'}), "
                             f"the model has {layers}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "num_layers": self.num_layers, "model": self.model,
                "mapping": {str(c): p for c, p in self.mapping.items()}, "search": self.search,
                "search_seconds": self.search_seconds, "candidates_tried": self.candidates_tried,
                "trace": list(self.trace)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: Any) -> "SharingStrategy":
        if not isinstance(data, dict):
            raise ValueError(f"a strategy must be a JSON object, got {type(data).__name__}")
        if data.get("format", FORMAT) != FORMAT:
            raise ValueError(f"strategy format {data.get('format')!r} is not {FORMAT!r}")
        for key in ("mapping", "num_layers"):
            if key not in data:
                raise ValueError(f"strategy lacks the required key {key!r}")
        if not isinstance(data["mapping"], dict):
            raise ValueError(f"strategy 'mapping' must be an object {{consumer: producer}}, got {data['mapping']!r}")
        mapping = {}
        for consumer, producer in data["mapping"].items():
            try:
                mapping[int(consumer)] = producer if isinstance(producer, int) else int(str(producer))
            except ValueError:
                raise ValueError(f"strategy entry {consumer!r} → {producer!r} is not a pair of layer indices") from None
        return cls(mapping=mapping, num_layers=data["num_layers"], model=data.get("model"),
                   search=data.get("search"), search_seconds=data.get("search_seconds"),
                   candidates_tried=data.get("candidates_tried"), trace=tuple(data.get("trace") or ()))

    @classmethod
    def from_json(cls, text: str) -> "SharingStrategy":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"malformed strategy JSON: {err}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        """Write atomically to ``path`` (parents created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, model=None) -> "SharingStrategy":
        """Read and validate a strategy; with ``model``, also check its layer count."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no strategy file at {path}")
        try:
            strategy = cls.from_json(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        return strategy.check_model(model) if model is not None else strategy


# ----------------------------------------------------------------------------- the sharing cache

class SharedLayer(HeldLayer):
    """Cache layer of a consumer: stores nothing and returns what its producer layer attends with.

    The producer runs earlier in the same forward, so on :meth:`update` it already holds the current
    tokens. The layer counts the tokens it has seen and checks that the producer saw exactly as many;
    it holds the producer's rows (:meth:`held`, so the mask sizes are the producer's), and crop, reset and
    batch reorder touch only its counter (the producer, an earlier layer of the same cache, does the data).
    A compressed, evicted or quantized producer (any :class:`~crosskv.cache.layer.HeldLayer`) is read through
    its :meth:`~crosskv.cache.layer.HeldLayer.attend_kv`.
    """

    def __init__(self, producer: CacheLayerMixin, producer_idx: int):
        super().__init__()
        self.producer = producer
        self.producer_idx = producer_idx

    def __repr__(self):
        return f"SharedLayer(producer={self.producer_idx})"

    @property
    def is_sliding(self) -> bool:
        return getattr(self.producer, "is_sliding", False)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate."""
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Discard this layer's own K/V ``(B, H_kv, t, d)``; return the producer's ``(B, H_kv, S, d)``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        seen = self.producer.get_seq_length()
        if seen != self.seen:
            raise RuntimeError(f"producer layer {self.producer_idx} has seen {seen} tokens but its consumer has "
                               f"seen {self.seen}: the producer must run before its consumer in every forward")
        if isinstance(self.producer, HeldLayer):
            return self.producer.attend_kv()
        return self.producer.keys, self.producer.values

    def held(self) -> int:
        """The producer's held tokens (the rows this layer attends to)."""
        if isinstance(self.producer, HeldLayer):
            return self.producer.held()
        return self.producer.get_seq_length()

    def croppable(self) -> int:
        """Every token: the producer (cropped first, as an earlier layer) refuses what it cannot cut."""
        return self.seen

    def drop_newest(self, count: int) -> None:
        """Nothing held: only the counter moves."""

    def offload(self):
        """The producer owns the data."""

    def prefetch(self):
        """The producer owns the data."""


class SharingCache(DynamicCache):
    """A ``DynamicCache`` whose consumer layers are :class:`SharedLayer` views of their producers."""

    def __init__(self, config, mapping: dict[int, int]):
        super().__init__(config=config)
        layers = len(self.layers)
        for consumer, producer in mapping.items():
            if not (0 <= producer < consumer < layers):
                raise ValueError(f"sharing entry {consumer} → {producer} is invalid for {layers} layers")
            if isinstance(self.layers[producer], SharedLayer):
                raise ValueError(f"sharing entry {consumer} → {producer}: layer {producer} is itself a consumer")
            if getattr(self.layers[producer], "is_sliding", False) != getattr(self.layers[consumer], "is_sliding", False):
                raise ValueError(f"sharing entry {consumer} → {producer} mixes a sliding-window and a full layer")
            self.layers[consumer] = SharedLayer(self.layers[producer], producer)
        self.mapping = dict(mapping)

    def evict_tokens(self, positions: dict[int, torch.Tensor]) -> None:
        """Evict prompt rows of producer layers (``positions[layer]``: the absolute positions to keep ``(n,)``);
        each consumer is re-pointed to its producer's evicted layer, so it reads the same rows and no stale copy
        stays alive."""
        consumers = sorted(set(positions) & set(self.mapping))
        if consumers:
            raise ValueError(f"layers {consumers} are KVSharer consumers: they read their producer's tokens and "
                             "cannot be evicted on their own")
        for idx, index in positions.items():
            self.layers[idx] = evict_plain(self.layers[idx], index)
        for consumer, producer in self.mapping.items():
            self.layers[consumer].producer = self.layers[producer]

    def stored_tensors(self) -> Iterator[torch.Tensor]:
        """K and V (or codes) of the producer layers (consumers hold nothing)."""
        for layer in self.layers:
            if isinstance(layer, SharedLayer) or not layer.is_initialized:
                continue
            yield from layer_tensors(layer)


# ----------------------------------------------------------------------------- the search options (data)

def _option(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class SearchOptions:
    """The options of KVSharer's greedy search, defined once: :class:`SearchConfig` validates them, the
    ``kvsharer`` and ``kvsharer_xkv`` methods take them as parameters and ``crosskv search`` as flags
    (``metadata["help"]`` is the flag's help). Give exactly one of ``shared_layers`` (C) or ``rate`` (C/L)."""

    shared_layers: int | None = _option(None, "C, the number of consumer layers")
    rate: float | None = _option(None, "C / L")
    metric: str = _option("euclidean", "distance of sample-averaged K/V that orders the candidate pairs")
    order: str = _option("dissimilar", "visit the candidate pairs most dissimilar first, most similar first, or seeded random")
    threshold: float = _option(0.5, "minimum final-hidden-state cosine (criterion cosine)")
    calibration_samples: int = _option(30, "calibration rows")
    calibration_length: int = _option(64, "tokens per calibration row")
    seed: int = _option(0, "calibration rows and the random order")
    corpus: str = _option("essays", "calibration corpus")
    criterion: str = _option("cosine", "acceptance test: final-hidden cosine > threshold, or next-token KL <= max_kl")
    max_kl: float = _option(0.1, "nats per token (criterion kl)")
    max_candidates: int | None = _option(None, "stop after evaluating this many candidates (none: every pair)")

    def search_options(self) -> dict[str, Any]:
        """These options by name (those of a subclass that adds its own fields left out)."""
        return {f.name: getattr(self, f.name) for f in fields(SearchOptions)}

    def search_config(self) -> "SearchConfig":
        """These options as a validated :class:`SearchConfig`."""
        return SearchConfig(**self.search_options())


@dataclass(frozen=True)
class SearchConfig(SearchOptions):
    """Validated :class:`SearchOptions`: the identity of one search (its disk-cache key)."""

    def __post_init__(self):
        if (self.shared_layers is None) == (self.rate is None):
            raise ValueError(f"give exactly one of shared_layers or rate, got shared_layers={self.shared_layers}, "
                             f"rate={self.rate}")
        if self.shared_layers is not None and self.shared_layers < 0:
            raise ValueError(f"shared_layers={self.shared_layers} must be >= 0")
        if self.rate is not None and not 0.0 <= self.rate < 1.0:
            raise ValueError(f"rate={self.rate} must lie in [0, 1)")
        for name, allowed in (("metric", METRICS), ("order", ORDERS), ("criterion", CRITERIA)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose from {', '.join(allowed)}")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold} must lie in [-1, 1] (a cosine)")
        if not self.max_kl > 0:
            raise ValueError(f"max_kl={self.max_kl} must be positive (nats per token)")
        if self.max_candidates is not None and self.max_candidates < 1:
            raise ValueError(f"max_candidates={self.max_candidates} must be >= 1 (or None for every pair)")
        for name, low in (("calibration_samples", 1), ("calibration_length", 2), ("seed", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}={getattr(self, name)} must be >= {low}")

    def consumers(self, num_layers: int) -> int:
        """C for a model of ``num_layers`` layers (``round(rate · L)`` when given as a rate)."""
        count = self.shared_layers if self.shared_layers is not None else round(self.rate * num_layers)
        if count > num_layers - 1:
            raise ValueError(f"shared_layers={count} exceeds the {num_layers - 1} layers that can reuse an earlier one")
        return count

    def with_consumers(self, count: int) -> "SearchConfig":
        """The same search for exactly ``count`` consumers."""
        return dataclasses.replace(self, shared_layers=count, rate=None)

# ----------------------------------------------------------------------------- the method

class SkippedProjection(nn.Module):
    """Stands in for a consumer layer's ``k_proj``/``v_proj`` while a :class:`KVSharerRunner` is applied.

    Returns an empty ``(…, 0)`` tensor instead of ``(…, H_kv·d)``: the projection is not computed, the
    attention reshapes it to zero KV heads, so RoPE (and Qwen3's k_norm) run on an empty tensor, and the
    consumer's :class:`SharedLayer` ignores it and returns the producer's K/V.
    """

    def __init__(self, original: nn.Linear):
        super().__init__()
        self.out_features = original.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], 0)


def consumer_projection_bytes(model, consumers) -> int:
    """Bytes of the ``k_proj``/``v_proj`` parameters of the ``consumers`` layers (from shapes)."""
    attns = attention_modules(model)
    return module_bytes(getattr(attns[layer], name) for layer in consumers for name in ("k_proj", "v_proj"))


class KVSharerRunner(Runner):
    """Runs the model with a :class:`SharingCache` built from a fixed strategy; while applied, consumer
    layers skip their key/value projections and RoPE (:class:`SkippedProjection`)."""

    def __init__(self, config: "KVSharer", model, tokenizer, strategy: SharingStrategy):
        super().__init__(config, model, tokenizer)
        self.strategy = strategy
        self.dropped_bytes = consumer_projection_bytes(model, strategy.mapping)

    def method_bytes(self) -> int:
        """Nothing added; minus the consumers' ``k_proj``/``v_proj`` weights, which a deployment can drop
        (their outputs are never used)."""
        return state_bytes(self) - self.dropped_bytes

    @contextlib.contextmanager
    def applied(self) -> Iterator["KVSharerRunner"]:
        """Replace every consumer's ``k_proj``/``v_proj`` with a :class:`SkippedProjection` (restored on exit)."""
        attns = attention_modules(self.model)
        replaced = []
        try:
            for layer in sorted(self.strategy.mapping):
                for name in ("k_proj", "v_proj"):
                    original = getattr(attns[layer], name)
                    replaced.append((attns[layer], name, original))
                    setattr(attns[layer], name, SkippedProjection(original))
            yield self
        finally:
            for attn, name, original in reversed(replaced):
                setattr(attn, name, original)

    def plain_layers(self) -> int:
        """The layers below the first consumer: the sharing changes nothing before it."""
        return self.strategy.first_consumer

    def new_cache(self) -> SharingCache:
        return SharingCache(self.model.config, self.strategy.mapping)


@register
@dataclass(frozen=True)
class KVSharer(MethodConfig, SearchOptions):
    """KVSharer: give ``strategy`` (a JSON file) or ``shared_layers``/``rate`` plus search options."""

    name = "kvsharer"
    description = "layer-wise dissimilar KV sharing: C consumer layers reuse an earlier layer's cache"

    strategy: str | None = None

    def __post_init__(self):
        if self.strategy is not None:
            if self.shared_layers is not None or self.rate is not None:
                raise ValueError(f"strategy={self.strategy!r} is a fixed strategy; do not also give "
                                 f"shared_layers={self.shared_layers} / rate={self.rate}")
            if not Path(self.strategy).is_file():  # checked when the config is made, before any model loads
                raise ValueError(f"strategy={self.strategy!r}: no such file")
            return
        self.search_config()  # validates the search options

    def resolve(self, model, tokenizer) -> SharingStrategy:
        """The strategy: loaded from ``strategy`` or searched (cached on disk)."""
        if self.strategy is not None:
            return SharingStrategy.load(self.strategy, model)
        from crosskv.methods.kvsharer_search import cached_search

        return cached_search(model, tokenizer, self.search_config())

    def bind(self, model, tokenizer=None) -> KVSharerRunner:
        return KVSharerRunner(self, model, tokenizer, self.resolve(model, tokenizer))
