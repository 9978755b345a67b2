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
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin

from crosskv.core.assets import PROJECT_ROOT
from crosskv.core.capture import attention_modules, capture, decoder, kv_shape
from crosskv.cache.storage import layer_tensors
from crosskv.methods.base import MethodConfig, Runner, register
from crosskv.cache.eviction import evict_plain
from crosskv.cache.layer import HeldLayer
from crosskv.core.progress import bar as progress_bar

log = logging.getLogger(__name__)

FORMAT = "crosskv.kvsharer/1"
CACHE_DIR = PROJECT_ROOT / "data" / "cache" / "kvsharer"
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
    def kept(self) -> float:
        """Nominal fraction of layers that store K/V: ``(L - C) / L``."""
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

class SharedLayer(CacheLayerMixin):
    """Cache layer of a consumer: stores nothing and returns its producer layer's keys/values.

    The producer runs earlier in the same forward, so on :meth:`update` it already holds the current
    tokens. The layer counts the tokens it has seen (its sequence length) and checks that the
    producer holds exactly as many.
    """

    is_compileable = False

    def __init__(self, producer: CacheLayerMixin, producer_idx: int):
        self.producer = producer
        self.producer_idx = producer_idx
        self.keys = None
        self.values = None
        self.seen = 0

    def __repr__(self):
        return f"SharedLayer(producer={self.producer_idx})"

    @property
    def is_initialized(self) -> bool:
        return self.producer.is_initialized

    @property
    def is_sliding(self) -> bool:
        return getattr(self.producer, "is_sliding", False)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Discard this layer's own K/V ``(B, H_kv, t, d)``; return the producer's ``(B, H_kv, S, d)``."""
        self.seen += key_states.shape[-2]
        held = self.producer.get_seq_length()
        if held != self.seen:
            raise RuntimeError(f"producer layer {self.producer_idx} holds {held} tokens but its consumer has seen "
                               f"{self.seen}: the producer must run before its consumer in every forward")
        if isinstance(self.producer, HeldLayer):  # an evicted or quantized producer: what it attends with
            return self.producer.attend_kv()
        return self.producer.keys, self.producer.values

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        """The producer's: this layer attends to exactly what the producer holds (fewer rows after eviction)."""
        return self.producer.get_mask_sizes(cache_position)

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_cache_shape(self) -> int:
        return -1

    def offload(self):
        """The producer owns the data."""

    def prefetch(self):
        """The producer owns the data."""

    def reset(self) -> None:
        self.seen = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """The producer reorders the data."""

    def crop(self, max_length: int) -> None:
        self.seen = max(self.seen + max_length, 0) if max_length < 0 else min(self.seen, max_length)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """The producer repeats the data."""

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """The producer selects the data."""


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

    def evict_tokens(self, kept: dict[int, torch.Tensor]) -> None:
        """Evict prompt rows of producer layers (``kept[layer]``: absolute positions ``(kept,)``); each consumer
        is re-pointed to its producer's evicted layer, so it reads the same rows and no stale copy stays alive."""
        consumers = sorted(set(kept) & set(self.mapping))
        if consumers:
            raise ValueError(f"layers {consumers} are KVSharer consumers: they read their producer's tokens and "
                             "cannot be evicted on their own")
        for idx, index in kept.items():
            self.layers[idx] = evict_plain(self.layers[idx], index)
        for consumer, producer in self.mapping.items():
            seen = self.layers[consumer].seen
            self.layers[consumer] = SharedLayer(self.layers[producer], producer)
            self.layers[consumer].seen = seen

    def stored_tensors(self) -> Iterator[torch.Tensor]:
        """K and V (or codes) of the producer layers (consumers hold nothing)."""
        for layer in self.layers:
            if isinstance(layer, SharedLayer) or not layer.is_initialized:
                continue
            yield from layer_tensors(layer)


# ----------------------------------------------------------------------------- the search

@dataclass(frozen=True)
class SearchConfig:
    """Options of the greedy search. Give exactly one of ``shared_layers`` (C) or ``rate`` (C/L)."""

    shared_layers: int | None = None
    rate: float | None = None
    metric: str = "euclidean"
    order: str = "dissimilar"
    threshold: float = 0.5
    calibration_samples: int = 30
    calibration_length: int = 64
    seed: int = 0
    corpus: str = "essays"
    criterion: str = "cosine"
    max_kl: float = 0.1
    max_candidates: int | None = None  # stop after evaluating this many candidates (None: all pairs)

    def __post_init__(self):
        if (self.shared_layers is None) == (self.rate is None):
            raise ValueError(f"give exactly one of shared_layers or rate, got shared_layers={self.shared_layers}, "
                             f"rate={self.rate}")
        if self.shared_layers is not None and self.shared_layers < 0:
            raise ValueError(f"shared_layers={self.shared_layers} must be >= 0")
        if self.rate is not None and not 0.0 <= self.rate < 1.0:
            raise ValueError(f"rate={self.rate} must lie in [0, 1)")
        if self.metric not in METRICS:
            raise ValueError(f"metric={self.metric!r}; choose from {', '.join(METRICS)}")
        if self.order not in ORDERS:
            raise ValueError(f"order={self.order!r}; choose from {', '.join(ORDERS)}")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold} must lie in [-1, 1] (a cosine)")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion={self.criterion!r}; choose from {', '.join(CRITERIA)}")
        if not self.max_kl > 0:
            raise ValueError(f"max_kl={self.max_kl} must be positive (nats per token)")
        if self.max_candidates is not None and self.max_candidates < 1:
            raise ValueError(f"max_candidates={self.max_candidates} must be >= 1 (or None for every pair)")
        if self.calibration_samples < 1:
            raise ValueError(f"calibration_samples={self.calibration_samples} must be >= 1")
        if self.calibration_length < 2:
            raise ValueError(f"calibration_length={self.calibration_length} must be >= 2")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0")

    def consumers(self, num_layers: int) -> int:
        """C for a model of ``num_layers`` layers (``round(rate · L)`` when given as a rate)."""
        count = self.shared_layers if self.shared_layers is not None else round(self.rate * num_layers)
        if count > num_layers - 1:
            raise ValueError(f"shared_layers={count} exceeds the {num_layers - 1} layers that can reuse an earlier one")
        return count


def layer_distances(model, calibration: torch.Tensor, metric: str = "euclidean", batch_size: int = 10) -> torch.Tensor:
    """Distance of every layer pair's sample-averaged K and V, averaged over K and V → ``(L, L)``.

    ``calibration`` ``(N, T)``; ``euclidean`` is the L2 distance of the flattened averages,
    ``cosine`` is ``1 - cosine similarity`` (so larger always means more dissimilar).
    """
    from crosskv.core.similarity import cosine_matrix, euclidean_matrix

    cap = capture(model, calibration.split(batch_size), average=True, fields=("keys", "values"))
    if metric == "euclidean":
        return (euclidean_matrix(cap.keys) + euclidean_matrix(cap.values)) / 2
    return 1.0 - (cosine_matrix(cap.keys) + cosine_matrix(cap.values)) / 2


def candidate_pairs(distances: torch.Tensor, order: str, seed: int = 0) -> list[tuple[int, int, float]]:
    """Pairs ``(i, j, distance)`` with ``i > j`` ordered as ``order`` says (``random`` is seeded)."""
    n = distances.shape[0]
    pairs = [(i, j, float(distances[i, j])) for i in range(n) for j in range(i)]
    if order == "random":
        perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed), device="cpu").tolist()
        return [pairs[k] for k in perm]
    return sorted(pairs, key=lambda p: (-p[2] if order == "dissimilar" else p[2], p[0], p[1]))


def with_pair(mapping: dict[int, int], consumer: int, producer: int) -> dict[int, int]:
    """``mapping`` plus ``consumer`` reusing ``producer``'s cache, chains resolved both ways.

    If ``producer`` is a consumer its own producer is used; layers that reused ``consumer`` now reuse
    the resolved producer.
    """
    source = mapping.get(producer, producer)
    out = {c: (source if p == consumer else p) for c, p in mapping.items()}
    out[consumer] = source
    return out


def first_consumers(strategy: SharingStrategy, count: int) -> SharingStrategy:
    """The strategy the same search would return with C = ``count``: its first ``count`` accepted pairs.

    The greedy search visits candidates in a fixed order, so a search for C = k stops exactly after
    the first k acceptances of a search for C > k; replaying them from ``strategy.trace`` gives the
    smaller strategy without searching again.
    """
    accepted = [t for t in strategy.trace if t["accepted"]]
    if not 0 <= count <= len(accepted):
        raise ValueError(f"count={count}: the strategy's trace has {len(accepted)} accepted consumers")
    mapping: dict[int, int] = {}
    for step in accepted[:count]:
        mapping = with_pair(mapping, step["consumer"], step["producer"])
    last = strategy.trace.index(accepted[count - 1]) + 1 if count else 0
    search_ = dict(strategy.search or {}, shared_layers=count, rate=None)
    return SharingStrategy(mapping=mapping, num_layers=strategy.num_layers, model=strategy.model, search=search_,
                           candidates_tried=last, trace=strategy.trace[:last])


@torch.no_grad()
def final_hidden(model, ids: torch.Tensor, mapping: dict[int, int], batch_size: int = 10) -> torch.Tensor:
    """Final (normed) hidden states with layer sharing ``mapping``: ``ids`` ``(N, T)`` → ``(N, T, D)`` float32."""
    body = decoder(model)
    outs = []
    for chunk in ids.split(batch_size):
        cache = SharingCache(model.config, mapping)
        out = body(input_ids=chunk.to(model.device), past_key_values=cache, use_cache=True)
        outs.append(out.last_hidden_state.float().cpu())
    return torch.cat(outs)


def hidden_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-token cosine similarity of two hidden-state tensors ``(N, T, D)``."""
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


@torch.no_grad()
def next_token_kl(model, hidden: torch.Tensor, reference: torch.Tensor, chunk: int = 512) -> float:
    """Mean per-token KL(original ‖ sharing) of the next-token distributions, in nats.

    ``hidden``/``reference`` ``(N, T, D)`` final normed hidden states of the sharing and original model;
    logits come from the model's output head, ``chunk`` tokens at a time (never all ``N·T·vocab`` at once).
    """
    head = model.get_output_embeddings()
    weight = head.weight
    h, r = hidden.reshape(-1, hidden.shape[-1]), reference.reshape(-1, reference.shape[-1])
    total = 0.0
    for start in range(0, h.shape[0], chunk):
        log_q = head(h[start:start + chunk].to(weight.device, weight.dtype)).float().log_softmax(-1)
        log_p = head(r[start:start + chunk].to(weight.device, weight.dtype)).float().log_softmax(-1)
        total += float((log_p.exp() * (log_p - log_q)).sum())
    return total / h.shape[0]


def accept(model, config: SearchConfig, hidden: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    """The acceptance test of one candidate: ``{"cosine", ["kl",] "accepted"}`` (see :class:`SearchConfig`)."""
    cosine = hidden_cosine(hidden, reference)
    if config.criterion == "cosine":
        return {"cosine": cosine, "accepted": cosine > config.threshold}
    kl = next_token_kl(model, hidden, reference)
    return {"cosine": cosine, "kl": kl, "accepted": kl <= config.max_kl}


def search(model, tokenizer, config: SearchConfig, progress: bool = False) -> SharingStrategy:
    """KVSharer's greedy search (Algorithm 1) on ``model`` → a :class:`SharingStrategy` with C consumers.

    Candidates are visited in ``config.order``; a candidate whose consumer already is one is skipped
    without evaluation; otherwise the tentative strategy is accepted when the mean per-token cosine of
    the final hidden states (sharing vs original, on the calibration set) exceeds ``config.threshold``
    (the paper's test) or, with ``criterion="kl"``, when the mean next-token KL divergence of the
    original model's distribution from the sharing model's is at most ``config.max_kl`` nats.
    Stops at C accepted consumers (fewer, with a warning, if the candidates run out).
    """
    from crosskv.core.data import calibration_set
    from crosskv.core.models import model_name

    start = time.perf_counter()
    num_layers = kv_shape(model).layers
    target = config.consumers(num_layers)
    mapping: dict[int, int] = {}
    trace: list[dict[str, Any]] = []
    if target:
        calibration = calibration_set(tokenizer, n=config.calibration_samples, length=config.calibration_length,
                                      seed=config.seed, corpus=config.corpus)
        reference = final_hidden(model, calibration, {})
        candidates = candidate_pairs(layer_distances(model, calibration, config.metric), config.order, config.seed)
        bar = progress_bar(total=target, enabled=progress, desc="kvsharer search")
        for consumer, producer, distance in candidates:
            if consumer in mapping:
                continue
            if config.max_candidates is not None and len(trace) >= config.max_candidates:
                break
            tentative = with_pair(mapping, consumer, producer)
            verdict = accept(model, config, final_hidden(model, calibration, tentative), reference)
            trace.append({"consumer": consumer, "producer": producer, "distance": distance, **verdict})
            if verdict["accepted"]:
                mapping = tentative
                bar.update(1)
                log.info("layer %d reuses layer %d (%s)", consumer, mapping[consumer], verdict)
                if len(mapping) == target:
                    break
        bar.close()
        if len(mapping) < target:
            log.warning("kvsharer search found only %d of %d consumers passing its %s test",
                        len(mapping), target, config.criterion)
    return SharingStrategy(mapping=mapping, num_layers=num_layers, model=model_name(model),
                           search=dataclasses.asdict(config), search_seconds=time.perf_counter() - start,
                           candidates_tried=len(trace), trace=tuple(trace))


def cache_path(model, config: SearchConfig, cache_dir: str | Path | None = None) -> Path:
    """Where the search result for ``model`` (name, dtype, weights fingerprint), ``config`` and the library
    code (:func:`crosskv.core.fingerprint.code_fingerprint`) is cached: any of them changing means a new search."""
    from crosskv.core import fingerprint
    from crosskv.core.models import model_name

    key = {"model": model_name(model), "dtype": str(next(model.parameters()).dtype),
           "search": dataclasses.asdict(config), "format": FORMAT,
           "model_fingerprint": fingerprint.model_fingerprint(model), "code": fingerprint.code_fingerprint()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir or CACHE_DIR) / f"{digest}.json"


def cached_search(model, tokenizer, config: SearchConfig, force: bool = False, progress: bool = False) -> SharingStrategy:
    """:func:`search`, reusing a previous result for the same model and config from the disk cache."""
    path = cache_path(model, config)
    if path.is_file() and not force:
        log.info("kvsharer strategy from cache %s", path)
        try:
            return SharingStrategy.load(path, model)
        except (OSError, ValueError) as err:
            log.warning("kvsharer: unreadable cached strategy %s (%s); searching again", path, err)
    strategy = search(model, tokenizer, config, progress=progress)
    strategy.save(path)
    log.info("kvsharer search took %.1f s (%d candidates); saved %s",
             strategy.search_seconds, strategy.candidates_tried, path)
    return strategy


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


class KVSharerRunner(Runner):
    """Runs the model with a :class:`SharingCache` built from a fixed strategy; while applied, consumer
    layers skip their key/value projections and RoPE (:class:`SkippedProjection`)."""

    def __init__(self, config: "KVSharer", model, tokenizer, strategy: SharingStrategy):
        super().__init__(config, model, tokenizer)
        self.strategy = strategy

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

    def new_cache(self) -> SharingCache:
        return SharingCache(self.model.config, self.strategy.mapping)


@register
@dataclass(frozen=True)
class KVSharer(MethodConfig):
    """KVSharer: give ``strategy`` (a JSON file) or ``shared_layers``/``rate`` plus search options."""

    name = "kvsharer"
    description = "layer-wise dissimilar KV sharing: C consumer layers reuse an earlier layer's cache"

    strategy: str | None = None
    shared_layers: int | None = None
    rate: float | None = None
    metric: str = "euclidean"
    order: str = "dissimilar"
    threshold: float = 0.5
    calibration_samples: int = 30
    calibration_length: int = 64
    seed: int = 0
    criterion: str = "cosine"
    max_kl: float = 0.1

    def __post_init__(self):
        if self.strategy is not None:
            if self.shared_layers is not None or self.rate is not None:
                raise ValueError(f"strategy={self.strategy!r} is a fixed strategy; do not also give "
                                 f"shared_layers={self.shared_layers} / rate={self.rate}")
            return
        self.search_config()  # validates the search options

    def search_config(self) -> SearchConfig:
        shared = {f.name for f in dataclasses.fields(SearchConfig)} & {f.name for f in dataclasses.fields(self)}
        return SearchConfig(**{name: getattr(self, name) for name in shared})

    def resolve(self, model, tokenizer) -> SharingStrategy:
        """The strategy: loaded from ``strategy`` or searched (cached on disk)."""
        if self.strategy is not None:
            return SharingStrategy.load(self.strategy, model)
        return cached_search(model, tokenizer, self.search_config())

    def bind(self, model, tokenizer=None) -> KVSharerRunner:
        return KVSharerRunner(self, model, tokenizer, self.resolve(model, tokenizer))
