"""Replay the first layers of a plain prefill into a method whose prefill departs from the model's only higher up.

KVSharer (and the KVSharer + xKV hybrid) change the prefill from their first consumer layer ``f`` on: layers
``0 … f−1`` run exactly as in the unmodified model (same inputs, same weights, same K/V). When a plain prefill
of the same context is at hand (:class:`crosskv.run.harness.Prefill`), those layers need not run again:
:func:`replayed_layers` swaps each of them, for one forward, for a :class:`ReplayedLayer` that appends the plain
prefill's K/V of its layer to the cache (as the layer's attention would) and passes the plain prefill's output
of layer ``f−1`` on to layer ``f``. Everything from layer ``f`` on runs as the method's own prefill would, so
the cache and the outputs equal the method's own prefill's.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from crosskv.core.capture import decoder


class ReplayedLayer(nn.Module):
    """Stands in for decoder layer ``index`` for one forward.

    ``keys``/``values`` ``(B, H_kv, T, d)``: that layer's cache entries from a plain prefill (a copy of each is
    appended to the cache). ``output``: the plain prefill's output of this layer — given for the last replayed
    layer, whose output the first running layer reads; ``None`` for the others, which pass their input on
    (nothing reads it).
    """

    def __init__(self, original: nn.Module, index: int, keys: torch.Tensor, values: torch.Tensor,
                 output: torch.Tensor | None):
        super().__init__()
        if hasattr(original, "attention_type"):  # decoders that pick a mask per layer type read it
            self.attention_type = original.attention_type
        self.index, self.keys, self.values, self.output = index, keys, values, output

    def forward(self, hidden_states: torch.Tensor, *args, past_key_values=None, **kwargs) -> torch.Tensor:
        if past_key_values is None:
            raise ValueError(f"replayed layer {self.index} needs the cache the forward fills (past_key_values)")
        past_key_values.update(self.keys.clone(), self.values.clone(), self.index)
        return hidden_states if self.output is None else self.output


@contextlib.contextmanager
def replayed_layers(model, count: int, keys: list[torch.Tensor], values: list[torch.Tensor],
                    output: torch.Tensor) -> Iterator[None]:
    """Inside: the model's first ``count`` decoder layers are :class:`ReplayedLayer` s of ``keys[i]``/``values[i]``
    (per layer ``(B, H_kv, T, d)``), the last one returning ``output`` ``(B, T, D)`` (the plain output of layer
    ``count − 1``); restored on exit."""
    layers = decoder(model).layers
    if not 0 < count <= len(layers):
        raise ValueError(f"cannot replay {count} layers of a {len(layers)}-layer decoder")
    originals = [layers[i] for i in range(count)]
    try:
        for i, original in enumerate(originals):
            layers[i] = ReplayedLayer(original, i, keys[i], values[i], output if i == count - 1 else None)
        yield
    finally:
        for i, original in enumerate(originals):
            layers[i] = original
