"""The method protocol: a config dataclass → a :class:`Runner` bound to a model → a ``Cache`` per run.

A method is a frozen dataclass whose fields are its hyperparameters (validated in
``__post_init__`` with a message naming the bad value) and whose :meth:`MethodConfig.bind`
returns a :class:`Runner` for one model. The harness drives every method the same way::

    runner = config.bind(model, tokenizer)          # expensive, once per model (search, weight SVD)
    with runner.applied():                          # module replacements / hooks, undone on exit
        cache = runner.new_cache()                  # a transformers Cache for this run
        with runner.prefill(cache):                 # active while the compressible context runs
            model(context_ids, past_key_values=cache)
        runner.compress(cache)                      # post-prefill compression (exact prefill attention)
        model(question_ids, past_key_values=cache)  # appended exactly, like decoded tokens
        ...greedy decoding...

Bytes are measured from what the cache holds (:mod:`crosskv.cache.storage`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

from transformers import Cache

from crosskv.cache.plain import PlainCache
from crosskv.core.params import coerce


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's hyperparameters. Subclasses set ``name`` and implement :meth:`bind`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    note: ClassVar[str] = ""  # a caveat `crosskv list` prints under the method
    # True when the method compresses a plain prefill: no hooks, module replacement or work inside the context
    # forward, so the prefill equals the unmodified model's and crosskv.run.harness.evaluate_grid may share it
    plain_prefill: ClassVar[bool] = False

    def bind(self, model, tokenizer) -> "Runner":
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """The hyperparameters as a plain dict (the method's identity in result keys)."""
        return dataclasses.asdict(self)


class Runner:
    """A method bound to one model. The defaults are the plain-cache behaviour of ``full``."""

    def __init__(self, config: MethodConfig, model, tokenizer=None):
        self.config = config
        self.model = model
        self.tokenizer = tokenizer

    @contextlib.contextmanager
    def applied(self) -> Iterator["Runner"]:
        """Install model transforms (module replacement, hooks) for a run; always undone on exit."""
        yield self

    def new_cache(self) -> Cache:
        """A new cache for one run: a plain one (:class:`crosskv.cache.plain.PlainCache`) by default."""
        return PlainCache(self.model.config)

    @contextlib.contextmanager
    def prefill(self, cache: Cache) -> Iterator[None]:
        """Context active while the compressible prompt part runs through the model."""
        yield

    def plain_layers(self) -> int:
        """How many leading decoder layers run in this method's prefill exactly as in the unmodified model (their
        inputs, K/V and outputs equal a plain prefill's), for a method whose prefill is not plain
        (``config.plain_prefill`` false): :func:`crosskv.run.harness.evaluate_grid` then replays those layers from
        the grid's shared plain prefill (:mod:`crosskv.run.prefix_replay`). 0 (the default): none."""
        return 0

    def record_fields(self) -> dict[str, Any]:
        """Facts about the bound configuration that every run's record carries (e.g. CommonKV's
        ``latent_wider_than_kv``); none by default."""
        return {}

    def compress(self, cache: Cache) -> None:
        """Compress ``cache`` after the context prefill (no-op for methods that act online)."""

    def method_bytes(self) -> int:
        """Bytes of parameters and buffers the method adds to the model while installed (factors,
        replacement modules, codebooks), minus the model bytes it lets a deployment drop.

        By default: every tensor storage the runner itself holds (:func:`state_bytes`; 0 for a runner that
        precomputes nothing). Methods that drop or replace model weights override it.
        """
        return state_bytes(self)


def state_bytes(runner: Runner) -> int:
    """Bytes of every tensor storage reachable from ``runner`` (the memory census of
    :mod:`crosskv.cache.census`), model weights excluded. Tensors on the meta device hold no storage and
    count 0: a runner whose precomputation is shaped by the model must count it from shapes itself."""
    from crosskv.cache.census import held_bytes

    return held_bytes(runner, exclude=[runner.model])


def module_bytes(modules) -> int:
    """Bytes of the parameters and buffers of ``modules`` (from shapes: valid on the meta device)."""
    seen, total = set(), 0
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


REGISTRY: dict[str, type[MethodConfig]] = {}


def register(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Class decorator adding a method config to :data:`REGISTRY` under ``cls.name``."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or already registered")
    REGISTRY[cls.name] = cls
    return cls


def method_fields(cls: type[MethodConfig]) -> dict[str, tuple[Any, Any]]:
    """``{field: (type, default)}`` of a method config class."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.default if f.default is not dataclasses.MISSING else None)
            for f in dataclasses.fields(cls)}


def make_method(name: str, **params: Any) -> MethodConfig:
    """Build a method config by registered name; unknown names/parameters raise ``ValueError``. :data:`REGISTRY`
    holds every method: importing this module runs the ``crosskv.methods`` package first, which imports each."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    fields = method_fields(cls)
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for method {name!r}; "
                         f"it takes: {', '.join(fields) or 'none'}")
    return cls(**{k: coerce(v, fields[k][0], k) for k, v in params.items()})
