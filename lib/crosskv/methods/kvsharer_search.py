"""KVSharer's offline strategy search (the paper's Algorithm 1), its calibration distances and its disk cache.

Layer pairs are ranked by the distance of their sample-averaged K and V on a calibration set
(:func:`layer_distances`, :func:`candidate_pairs`); a pair is accepted while the sharing model's final
hidden states stay close to the original's (:func:`accept`). The search for C consumers visits the
same candidates in the same order, with the same decisions, as the search for any C' > C — it only
stops earlier — so :func:`first_consumers` replays a smaller strategy from a larger search's trace and
:func:`search_sweep` serves a whole sweep over C with one search. Results are cached on disk under
:func:`crosskv.core.assets.cache_dir` keyed by :func:`crosskv.core.fingerprint.digest` of the model,
its weights, the search options and the library code.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from crosskv.core import fingerprint
from crosskv.core.assets import cache_dir
from crosskv.core.capture import capture, decoder, kv_shape
from crosskv.core.data import calibration_set
from crosskv.core.models import model_name
from crosskv.core.progress import bar as progress_bar
from crosskv.core.similarity import cosine_matrix, euclidean_matrix
from crosskv.methods.kvsharer_cache import SharingCache
from crosskv.methods.kvsharer_strategy import FORMAT, SearchConfig, SearchOptions, SharingStrategy

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- calibration distances

def layer_distances(model, calibration: torch.Tensor, metric: str = "euclidean", batch_size: int = 10) -> torch.Tensor:
    """Distance of every layer pair's sample-averaged K and V, averaged over K and V → ``(L, L)``.

    ``calibration`` ``(N, T)``; ``euclidean`` is the L2 distance of the flattened averages,
    ``cosine`` is ``1 - cosine similarity`` (so larger always means more dissimilar).
    """
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


# ----------------------------------------------------------------------------- the acceptance test

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


# ----------------------------------------------------------------------------- the search, its replay and its disk cache

def search(model, tokenizer, config: SearchConfig, progress: bool = False) -> SharingStrategy:
    """KVSharer's greedy search (Algorithm 1) on ``model`` → a :class:`SharingStrategy` with C consumers.

    Candidates are visited in ``config.order``; a candidate whose consumer already is one is skipped
    without evaluation; otherwise the tentative strategy is accepted when the mean per-token cosine of
    the final hidden states (sharing vs original, on the calibration set) exceeds ``config.threshold``
    (the paper's test) or, with ``criterion="kl"``, when the mean next-token KL divergence of the
    original model's distribution from the sharing model's is at most ``config.max_kl`` nats.
    Stops at C accepted consumers (fewer, with a warning, if the candidates run out).
    """
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


def cache_path(model, config: SearchConfig, folder: str | Path | None = None) -> Path:
    """Where the search result for ``model`` (name, dtype, weights fingerprint), ``config`` and the library
    code (:func:`crosskv.core.fingerprint.code_fingerprint`) is cached: any of them changing means a new search."""
    key = {"model": model_name(model), "dtype": str(next(model.parameters()).dtype),
           "search": dataclasses.asdict(config), "format": FORMAT,
           "model_fingerprint": fingerprint.model_fingerprint(model), "code": fingerprint.code_fingerprint()}
    return Path(folder or cache_dir("kvsharer")) / f"{fingerprint.digest(key)}.json"


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


def search_sweep(model, tokenizer, options: SearchOptions, counts: Iterable[int]) -> dict[int, SharingStrategy]:
    """Strategies for every C in ``counts`` under ``options`` (a method or a :class:`SearchConfig`; its
    ``shared_layers``/``rate`` are replaced): one search at ``max(counts)``, each smaller C replayed from its
    trace (:func:`first_consumers`) and written to the disk cache under its own config, so
    ``make_method("kvsharer", shared_layers=C, …)`` resolves to it without searching."""
    counts = sorted({int(c) for c in counts})
    if not counts or counts[0] < 1:
        raise ValueError(f"counts={counts} must be positive consumer counts")
    base = options.search_config().with_consumers(counts[-1])
    top = cached_search(model, tokenizer, base)
    out = {}
    for count in counts:
        path = cache_path(model, base.with_consumers(count))
        if path.is_file():
            out[count] = SharingStrategy.load(path, model)
            continue
        out[count] = first_consumers(top, count)
        out[count].save(path)
        log.info("kvsharer C=%d: prefix of the C=%d search, saved %s", count, counts[-1], path)
    return out
