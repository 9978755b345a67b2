"""One KVSharer search serves a whole sweep over the number of shared layers C.

The greedy search (:func:`crosskv.methods.kvsharer.search`) for C consumers visits the same
candidates in the same order, with the same accept/reject decisions, as the search for any C' > C —
it only stops earlier. So the C-consumer strategy is a prefix of the C'-search's trace, and a sweep
needs one search at the largest C. :func:`search_sweep` runs (or loads) that search and writes each
prefix to the search cache under its own config, so ``make_method("kvsharer", shared_layers=C, …)``
resolves to exactly the strategy its own search would have found, without searching.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Iterable

from crosskv.methods.kvsharer import KVSharer, SharingStrategy, cache_path, cached_search, with_pair

log = logging.getLogger(__name__)


def prefix_strategy(strategy: SharingStrategy, consumers: int) -> SharingStrategy:
    """The strategy a search for ``consumers`` consumers finds, replayed from a larger search's trace.

    ``search_seconds`` is ``None`` (it was not measured on its own); ``candidates_tried`` and ``trace``
    are those of the prefix.
    """
    if consumers > len(strategy.mapping):
        raise ValueError(f"consumers={consumers} exceeds the {len(strategy.mapping)} consumers of the searched strategy")
    mapping: dict[int, int] = {}
    tried = 0
    for step in strategy.trace:
        if len(mapping) == consumers:
            break
        tried += 1
        if step["accepted"]:
            mapping = with_pair(mapping, step["consumer"], step["producer"])
    search = dict(strategy.search or {}, shared_layers=consumers, rate=None)
    return SharingStrategy(mapping=mapping, num_layers=strategy.num_layers, model=strategy.model, search=search,
                           search_seconds=None, candidates_tried=tried, trace=tuple(strategy.trace[:tried]))


def search_sweep(model, tokenizer, method: KVSharer, counts: Iterable[int]) -> dict[int, SharingStrategy]:
    """Strategies of ``method`` (its search options) for every C in ``counts`` from one search at ``max(counts)``."""
    counts = sorted({int(c) for c in counts})
    if not counts or counts[0] < 1:
        raise ValueError(f"counts={counts} must be positive consumer counts")
    base = method.search_config()
    top = cached_search(model, tokenizer, dataclasses.replace(base, shared_layers=counts[-1], rate=None))
    out = {}
    for count in counts:
        path = cache_path(model, dataclasses.replace(base, shared_layers=count, rate=None))
        if path.is_file():
            out[count] = SharingStrategy.load(path, model)
            continue
        out[count] = prefix_strategy(top, count)
        out[count].save(path)
        log.info("kvsharer C=%d: prefix of the C=%d search, saved %s", count, counts[-1], path)
    return out
