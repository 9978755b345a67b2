"""The static decode layout (crosskv.cache.static): every method's decode compiles once and gives eager's logits.

Per registered method (the contract's :data:`TINY_PARAMS` on random:tiny, float32) and the composition rows that
add eviction and KIVI codes: the context is prefilled and compressed, a question appended, the cache frozen with
room for 64 decode tokens, and 64 one-token steps run through ``torch.compile(fullgraph=True, dynamic=False)``
with dynamo's compile counter as the backend: one graph for the 64 steps (no recompile), and every step's logits
within 1e-4 of the same tokens fed one by one to the dynamic cache (eager). A KIVI stream that the decode would
quantize is refused by name.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from crosskv.cache.attention import installed
from crosskv.cache.census import RunCensus
from crosskv.cache.static import StaticRefused, freeze
from test_contract import TINY_PARAMS, block, compressed, max_diff, runners, steps, strategy, tokens

CONTEXT, QUESTION, STEPS = 96, 8, 64
STEP_TOL = 1e-4
KIVI = {"window_size": 8, "group_size": 8, "residual": 72}  # the context's codes: 96 − 72 → 24 rows coded; room 71
COMPOSITIONS = [  # (base, evict, bits): eviction alone, codes alone, and both on a low-rank base
    ("full", "snapkv", 0), ("full", "none", 4), ("xkv", "snapkv", 4), ("kvsharer", "none", 2)]


def _configurations() -> list[tuple[str, str, dict]]:
    specs = [(name, name, params) for name, params in sorted(TINY_PARAMS.items()) if name != "compose"]
    for base, evict, bits in COMPOSITIONS:
        base_params = ";".join(f"{k}={v}" for k, v in TINY_PARAMS[base].items() if k != "base_params")
        params = {**KIVI, "base": base, "evict": evict, "bits": bits, "base_params": base_params,
                  "evict_ratio": 0.5 if evict != "none" else 0.0}
        specs.append((f"compose[{base},{evict},{bits}]", "compose", params))
    return specs


__all__ = ["runners", "strategy"]  # fixtures shared with the contract's module
EACH = pytest.mark.parametrize("configuration", [pytest.param(s, id=s[0]) for s in _configurations()])


def static_steps(forward, static, ids: torch.Tensor, start: int) -> torch.Tensor:
    """``ids`` ``(1, n)`` one token per step through ``forward`` on the static cache → logits ``(n, vocab)``."""
    out = []
    for i in range(ids.shape[1]):
        position = torch.tensor([start + i])
        logits = forward(input_ids=ids[:, i:i + 1], past_key_values=static, cache_position=position,
                         position_ids=position[None], use_cache=True).logits
        out.append(logits[0, -1:])
    return torch.cat(out)


def frozen(runner, configuration, seed: int = 0):
    """Context compressed and a question appended (eager) → ``(cache, static or None, decode ids)``."""
    ctx, question, decoded = tokens(seed, CONTEXT, QUESTION, STEPS)
    cache = compressed(runner, ctx)
    block(runner.model, cache, question, CONTEXT)
    return cache, freeze(cache, STEPS, CONTEXT + QUESTION), decoded


@EACH
def test_static_decode_compiles_once_and_gives_the_eager_logits(configuration, runners):
    runner = runners(configuration)
    torch._dynamo.reset()
    counter = CompileCounter()
    forward = torch.compile(runner.model, backend=counter, fullgraph=True, dynamic=False)
    with torch.no_grad(), runner.applied():
        cache, static, decoded = frozen(runner, configuration)
        start = CONTEXT + QUESTION
        with installed(runner.model):
            got = static_steps(forward, static, decoded, start)
        want = steps(runner.model, cache, decoded, start)
    assert counter.frame_count == 1, f"{configuration[0]}: {counter.frame_count} graphs for {STEPS} static steps"
    diff = max_diff(got, want)
    assert diff <= STEP_TOL, f"{configuration[0]}: static decode differs from eager by {diff:.3g} (max abs logit)"


def test_static_census_counts_the_buffers_and_the_source_is_untouched(runners):
    configuration = ("xkv", "xkv", TINY_PARAMS["xkv"])
    runner = runners(configuration)
    with torch.no_grad(), runner.applied():
        census = RunCensus(runner)
        cache, static, decoded = frozen(runner, configuration)
        before = census.held(cache)
        with installed(runner.model):
            static_steps(runner.model, static, decoded[:, :4], CONTEXT + QUESTION)
        assert census.held(cache) == before and cache.get_seq_length() == CONTEXT + QUESTION
    shape = static.layers[0].keys.shape
    buffers = 2 * len(static.layers) * shape.numel() * static.layers[0].keys.element_size()
    assert census.held(static) >= buffers, "the census of the static cache must count its preallocated buffers"
    assert static.get_seq_length() == CONTEXT + QUESTION + 4


def test_a_kivi_stream_that_decode_would_quantize_is_refused(runners):
    configuration = ("compose[full,none,4]", "compose", {**KIVI, "base": "full", "evict": "none", "bits": 4,
                                                         "base_params": "", "evict_ratio": 0.0})
    runner = runners(configuration)
    ctx, question = tokens(1, CONTEXT, QUESTION)
    with torch.no_grad(), runner.applied():
        cache = compressed(runner, ctx)
        block(runner.model, cache, question, CONTEXT)
        room = KIVI["residual"] + KIVI["group_size"] - 1 - QUESTION
        assert freeze(cache, room, CONTEXT + QUESTION) is not None
        with pytest.raises(StaticRefused, match=rf"KiviLayer of layer 0 would quantize .* at most {room} fit"):
            freeze(cache, room + 1, CONTEXT + QUESTION)


def test_static_room_is_checked_by_name(runners):
    configuration = ("full", "full", {})
    runner = runners(configuration)
    with torch.no_grad(), runner.applied():
        _, static, _ = frozen(runner, configuration)
    with pytest.raises(ValueError, match=f"holds {STEPS} decode tokens after position {CONTEXT + QUESTION}"):
        static.check_room(STEPS + 1)
    with pytest.raises(ValueError, match="capacity=0"):
        freeze(static, 0, CONTEXT + QUESTION)
    with pytest.raises(ValueError, match="start=3"):
        freeze(static, 1, 3)
