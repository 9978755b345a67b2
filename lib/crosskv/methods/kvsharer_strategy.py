"""KVSharer's data: the sharing strategy (which consumer layer reuses which producer's cache) and the
options of the search that finds it.

:class:`SharingStrategy` is validated on construction and round-trips through JSON (``FORMAT``);
:class:`SearchOptions` defines the search's options once (the method's parameters, the command line's
flags) and :class:`SearchConfig` validates them. The search is :mod:`crosskv.methods.kvsharer_search`,
the cache :mod:`crosskv.methods.kvsharer_cache`, the method :mod:`crosskv.methods.kvsharer`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from crosskv.core.capture import kv_shape

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
