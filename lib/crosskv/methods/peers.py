"""Peers: NVIDIA kvpress's eviction presses as crosskv methods (``kvpress:snapkv`` …) and as compose's scorers.

:data:`PRESSES` is the one description of the presses crosskv runs (kvpress class, chart label, what it
keeps): the methods here, compose's ``evict`` names (:mod:`crosskv.methods.compose`) and the frontier's
families (:mod:`crosskv.evidence.frontier`) all read it.

A press prunes a ``compression_ratio`` fraction of each layer's context tokens during the context
prefill (its forward hooks act at the end of each attention layer), so the prefill attention is
exact and the question and decoded tokens are appended after compression — the same prompt split
as crosskv's methods (see :mod:`crosskv.run.harness`). The cache is the runner's plain cache
(:class:`crosskv.cache.plain.PlainCache`, a ``DynamicCache``) holding the kept rows, so measured bytes are honest
without a custom ``stored_tensors``, a drop copies the rows it keeps and ``reset`` forgets every token.

Importing kvpress patches transformers' attention functions process-wide, so it is imported only
inside :meth:`PressConfig.make_press`, never at module import; that is also where crosskv's attention is
reclaimed from kvpress's wrapper (:func:`crosskv.cache.attention.reclaim`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Iterator, Sequence

import torch

from crosskv.cache.attention import reclaim
from crosskv.cache.batch import check_one_sequence
from crosskv.cache.eviction import layer_kv
from crosskv.cache.masks import fitted_masks
from crosskv.core import capture
from crosskv.methods.base import REGISTRY, MethodConfig, Runner, register


@dataclass(frozen=True)
class Press:
    """One kvpress scorer press: method ``kvpress:<key>``, compose's ``evict=<key>``, chart family ``label``."""

    key: str
    press_class: str  # the class of that name in kvpress
    label: str
    keeps: str  # which context tokens it keeps
    uneven: bool = False  # per-layer budgets: layers keep different token counts (blocks need each layer's mask)

    @property
    def method(self) -> str:
        return f"kvpress:{self.key}"


PRESSES: dict[str, Press] = {p.key: p for p in (
    Press("snapkv", "SnapKVPress", "SnapKV", "the tokens most attended by the context's last window"),
    Press("pyramidkv", "PyramidKVPress", "PyramidKV", "SnapKV's choice under pyramid-shaped per-layer budgets",
          uneven=True),
    Press("knorm", "KnormPress", "KNorm", "the tokens with the smallest key norms"),
    Press("streaming_llm", "StreamingLLMPress", "StreamingLLM", "the first n_sink and the most recent tokens"),
    Press("expected_attention", "ExpectedAttentionPress", "ExpectedAttention",
          "the tokens with the highest attention expected from future queries"),
)}


@dataclass(frozen=True)
class PressConfig(MethodConfig):
    """A kvpress press; every field is passed to the press class of the same name in kvpress.

    A subclass sets ``press`` (its :data:`PRESSES` entry); its name and description follow from it.
    """

    compression_ratio: float = 0.5
    press: ClassVar[Press]
    plain_prefill = True  # the hooks act after each layer's exact attention: replayable on a plain prefill
    MINIMUMS: ClassVar[dict[str, float]] = {"window_size": 1, "kernel_size": 1, "beta": 1, "n_sink": 0,
                                            "n_future_positions": 1, "epsilon": 0.0}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.name = cls.press.method
        cls.description = f"kvpress {cls.press.press_class}: keeps {cls.press.keeps}"

    def __post_init__(self):
        if not 0.0 <= self.compression_ratio < 1.0:
            raise ValueError(f"compression_ratio={self.compression_ratio} must be in [0, 1)")
        for field, low in self.MINIMUMS.items():
            value = getattr(self, field, None)
            if value is not None and not (math.isfinite(value) and value >= low):
                raise ValueError(f"{field}={value} must be a finite number >= {low}")

    def bind(self, model, tokenizer=None) -> "PressRunner":
        return PressRunner(self, model, tokenizer)

    def make_press(self):
        """The kvpress press; imports kvpress (first time: it wraps every registered attention function, so
        crosskv's is reclaimed at once: a run already inside ``installed()`` keeps reading compressed prefixes)."""
        import kvpress

        reclaim()
        return getattr(kvpress, self.press.press_class)(**dataclasses.asdict(self))


class PressRunner(Runner):
    """Installs the press's hooks while the context is prefilled (compression happens inside them).

    A batch of different rows is refused by name before the press compresses (:meth:`press`); a press with
    per-layer budgets (``Press.uneven``) gives each layer its own attention mask while applied
    (:func:`crosskv.cache.masks.fitted_masks`), so a block after the context scores as its one-token forwards.
    """

    @contextlib.contextmanager
    def applied(self) -> Iterator["PressRunner"]:
        with fitted_masks(self.model) if self.config.press.uneven else contextlib.nullcontext():
            yield self

    def press(self):
        """The kvpress press, its compressing hook preceded by :func:`check_one_sequence` on the layer's keys."""
        press = self.config.make_press()
        compress = press.forward_hook

        def checked(module, args, kwargs, output):
            keys = kwargs["past_key_values"].layers[module.layer_idx].keys  # (B, H_kv, T, d)
            check_one_sequence(keys, self.config.name, "the press scores each row's tokens, padding included, and "
                               "keeps the same count in every row")
            return compress(module, args, kwargs, output)

        press.forward_hook = checked
        return press

    @contextlib.contextmanager
    def prefill(self, cache) -> Iterator[None]:
        press = self.press()
        with capture.rotary_aliases(self.model), press(self.model):
            yield

    def replay(self, cache, attention: Sequence[dict]) -> None:
        """Compress ``cache`` holding a plain prefill as the press's hooks would have during it: layer by layer,
        with each attention layer's captured forward keyword arguments and attention weights
        (``attention[i] = {"kwargs": …, "weights": …}``; see :func:`crosskv.run.harness.plain_prefill`)."""
        press = self.press()
        press.post_init_from_model(self.model)
        with capture.rotary_aliases(self.model):  # what kvpress's press(model) sets up
            for layer, seen in zip(capture.decoder(self.model).layers, attention, strict=True):
                press.forward_hook(layer.self_attn, [], {**seen["kwargs"], "past_key_values": cache},
                                   (None, seen["weights"]))


@register
@dataclass(frozen=True)
class SnapKV(PressConfig):
    """Keeps the tokens most attended by the last ``window_size`` context queries (pooled over ``kernel_size``)."""

    press = PRESSES["snapkv"]
    window_size: int = 64
    kernel_size: int = 5


@register
@dataclass(frozen=True)
class PyramidKV(PressConfig):
    """SnapKV scores with a per-layer budget decreasing with depth (``beta`` sets the slope)."""

    press = PRESSES["pyramidkv"]
    window_size: int = 64
    kernel_size: int = 5
    beta: int = 20


@register
@dataclass(frozen=True)
class KNorm(PressConfig):
    """Keeps the tokens whose keys have the smallest L2 norm."""

    press = PRESSES["knorm"]


@register
@dataclass(frozen=True)
class StreamingLLM(PressConfig):
    """Keeps ``n_sink`` initial tokens and the most recent context tokens."""

    press = PRESSES["streaming_llm"]
    n_sink: int = 4


@register
@dataclass(frozen=True)
class ExpectedAttention(PressConfig):
    """Scores tokens by the attention expected from future queries (Gaussian query statistics)."""

    press = PRESSES["expected_attention"]
    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0


def eviction_press(evict: str, ratio: float, window_size: int):
    """The press compose's ``evict`` scores with: method ``kvpress:<evict>`` at ``compression_ratio=ratio``,
    ``window_size`` where it takes one, its other fields at their defaults (kvpress's)."""
    config = REGISTRY[PRESSES[evict].method]
    windowed = any(f.name == "window_size" for f in dataclasses.fields(config))
    return config(compression_ratio=ratio, **({"window_size": window_size} if windowed else {})).make_press()


class EvictionScorer:
    """Records, per layer, a press's token scores ``(T,)`` and budget during the context prefill (compose's
    ``evict`` stage; :func:`crosskv.cache.eviction.token_sets` turns them into kept tokens)."""

    def __init__(self, model, evict: str, ratio: float, window_size: int = 64):
        self.press = eviction_press(evict, ratio, window_size)
        self.model, self.evict, self.ratio = model, evict, ratio
        self.scores: dict[int, torch.Tensor] = {}
        self.budgets: dict[int, int] = {}

    def budget(self, module, tokens: int) -> int:
        from kvpress.utils import compute_n_kept

        if hasattr(self.press, "get_layer_budget"):
            return max(1, min(tokens, self.press.get_layer_budget(module, tokens)))
        return compute_n_kept(tokens, self.ratio)

    def hook(self, module, args, kwargs, output):
        cache = kwargs["past_key_values"]
        keys, values = layer_kv(cache.layers[module.layer_idx])
        if keys is None:  # a layer that stores nothing (a KVSharer consumer)
            return output
        if module.layer_idx in self.scores:
            raise ValueError("eviction scores the whole context in one prefill forward; this prefill ran in chunks")
        check_one_sequence(keys, f"evict={self.evict!r}", "eviction keeps one token set for the whole batch and "
                           "its mask offset assumes every row kept the same tokens")
        scores = self.press.score(module, kwargs["hidden_states"], keys, values, None, kwargs)  # (B, H_kv, T)
        self.scores[module.layer_idx] = scores.float().mean(dim=(0, 1))  # (T,)
        self.budgets[module.layer_idx] = self.budget(module, keys.shape[-2])
        return output

    @contextlib.contextmanager
    def hooks(self) -> Iterator["EvictionScorer"]:
        """The press's own context (its model set-up, e.g. ``rotary_emb`` for expected attention) with
        :meth:`hook` registered on every attention layer in place of the press's compressing hook."""
        self.press.forward_hook = self.hook
        with capture.rotary_aliases(self.model), self.press(self.model):
            yield self

