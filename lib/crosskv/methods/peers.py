"""Peers: NVIDIA kvpress's eviction presses as crosskv methods (``kvpress:snapkv`` …).

A press prunes a ``compression_ratio`` fraction of each layer's context tokens during the context
prefill (its forward hooks act at the end of each attention layer), so the prefill attention is
exact and the question and decoded tokens are appended after compression — the same prompt split
as crosskv's methods (see :mod:`crosskv.run.harness`). The cache is a plain ``DynamicCache`` holding the
kept rows, so measured bytes are honest without a custom ``stored_tensors``.

Importing kvpress patches transformers' attention functions process-wide, so it is imported only
inside :meth:`PressRunner.prefill`, never at module import.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Iterator, Sequence

from crosskv.core import capture

from crosskv.methods.base import MethodConfig, Runner, register


@dataclass(frozen=True)
class PressConfig(MethodConfig):
    """A kvpress press; every field is passed to the press class of the same name in kvpress."""

    compression_ratio: float = 0.5
    press_class: ClassVar[str] = ""
    plain_prefill = True  # the hooks act after each layer's exact attention: replayable on a plain prefill
    MINIMUMS: ClassVar[dict[str, float]] = {"window_size": 1, "kernel_size": 1, "beta": 1, "n_sink": 0,
                                            "n_future_positions": 1, "epsilon": 0.0}

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
        import kvpress  # lazy: patches transformers' attention functions on import

        return getattr(kvpress, self.press_class)(**dataclasses.asdict(self))


class PressRunner(Runner):
    """Installs the press's hooks while the context is prefilled (compression happens inside them)."""

    @contextlib.contextmanager
    def prefill(self, cache) -> Iterator[None]:
        press = self.config.make_press()
        with capture.rotary_aliases(self.model), press(self.model):
            yield

    def replay(self, cache, attention: Sequence[dict]) -> None:
        """Compress ``cache`` holding a plain prefill as the press's hooks would have during it: layer by layer,
        with each attention layer's captured forward keyword arguments and attention weights
        (``attention[i] = {"kwargs": …, "weights": …}``; see :func:`crosskv.run.harness.plain_prefill`)."""
        press = self.config.make_press()
        press.post_init_from_model(self.model)
        with capture.rotary_aliases(self.model):  # what kvpress's press(model) sets up
            for layer, seen in zip(capture.decoder(self.model).layers, attention, strict=True):
                press.forward_hook(layer.self_attn, [], {**seen["kwargs"], "past_key_values": cache},
                                   (None, seen["weights"]))


@register
@dataclass(frozen=True)
class SnapKV(PressConfig):
    """Keeps the tokens most attended by the last ``window_size`` context queries (pooled over ``kernel_size``)."""

    name = "kvpress:snapkv"
    description = "kvpress SnapKVPress: evict context tokens least attended by the context's last window"
    press_class = "SnapKVPress"
    window_size: int = 64
    kernel_size: int = 5


@register
@dataclass(frozen=True)
class PyramidKV(PressConfig):
    """SnapKV scores with a per-layer budget decreasing with depth (``beta`` sets the slope)."""

    name = "kvpress:pyramidkv"
    description = "kvpress PyramidKVPress: SnapKV scores, pyramid-shaped per-layer budgets"
    press_class = "PyramidKVPress"
    window_size: int = 64
    kernel_size: int = 5
    beta: int = 20


@register
@dataclass(frozen=True)
class KNorm(PressConfig):
    """Keeps the tokens whose keys have the smallest L2 norm."""

    name = "kvpress:knorm"
    description = "kvpress KnormPress: evict the context tokens with the largest key norms"
    press_class = "KnormPress"


@register
@dataclass(frozen=True)
class StreamingLLM(PressConfig):
    """Keeps ``n_sink`` initial tokens and the most recent context tokens."""

    name = "kvpress:streaming_llm"
    description = "kvpress StreamingLLMPress: keep the first n_sink and the most recent context tokens"
    press_class = "StreamingLLMPress"
    n_sink: int = 4


@register
@dataclass(frozen=True)
class ExpectedAttention(PressConfig):
    """Scores tokens by the attention expected from future queries (Gaussian query statistics)."""

    name = "kvpress:expected_attention"
    description = "kvpress ExpectedAttentionPress: evict tokens with the lowest expected future attention"
    press_class = "ExpectedAttentionPress"
    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0
