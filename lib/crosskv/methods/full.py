"""``full``: the uncompressed baseline, a plain cache (:class:`crosskv.cache.plain.PlainCache`, a ``DynamicCache``
whose reset forgets every token and whose crop copies the kept rows)."""
from __future__ import annotations

from dataclasses import dataclass

from crosskv.methods.base import MethodConfig, Runner, register


@register
@dataclass(frozen=True)
class Full(MethodConfig):
    """No compression: every layer stores every token's K and V."""

    name = "full"
    description = "plain cache (the reference every kept fraction is measured against)"
    plain_prefill = True

    def bind(self, model, tokenizer=None) -> Runner:
        return Runner(self, model, tokenizer)
