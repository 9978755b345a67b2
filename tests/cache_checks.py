"""Checks of the cache contract shared by the method test files (random:tiny, float32), for one bound runner.

:func:`check_reset_forgets` — ``cache.reset()`` after a first prompt holds nothing (census and ``kv_bytes``: 0)
and a second prompt then scores as on a fresh cache; :func:`check_batch_refused` — a batch of two different
contexts is refused at compression by the method's name, and two identical rows each give the row alone.
"""
from __future__ import annotations

import re

import pytest
import torch

from conftest import drive_cache
from crosskv.cache.census import RunCensus
from crosskv.cache.storage import kv_bytes

QUESTION = 6  # question tokens after each context


def prompts(seed: int, batch: int, *lengths: int) -> list[torch.Tensor]:
    """Seeded random token ids ``(batch, n + QUESTION)`` for each context length ``n`` of ``lengths``."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 20000, (batch, n + QUESTION), generator=generator) for n in lengths]


def drive_prompt(model, runner, cache, ids: torch.Tensor) -> list[torch.Tensor]:
    """``ids`` ``(B, T + QUESTION)`` as context then question, two tokens decoded (:func:`conftest.drive_cache`)."""
    return drive_cache(model, runner, cache, ids[:, :-QUESTION], ids[:, -QUESTION:])


def check_reset_forgets(model, runner, first: int = 48, second: int = 30) -> tuple:
    """A ``first``-token prompt, ``cache.reset()``: nothing held; a ``second``-token prompt then gives a fresh
    cache's logits (≤ 1e-5) and bytes. Returns ``(cache after the second prompt, fresh cache)``."""
    old, new = prompts(0, 1, first, second)
    with runner.applied(), torch.no_grad():
        census = RunCensus(runner)
        cache = runner.new_cache()
        drive_prompt(model, runner, cache, old)
        reported = kv_bytes(cache)
        cache.reset()
        assert cache.get_seq_length() == 0 and census.held(cache) == kv_bytes(cache) == 0 < reported
        again = drive_prompt(model, runner, cache, new)
        fresh_cache = runner.new_cache()
        fresh = drive_prompt(model, runner, fresh_cache, new)
        assert census.held(cache) == kv_bytes(cache) == kv_bytes(fresh_cache) > 0
    for step, (got, want) in enumerate(zip(again, fresh)):
        diff = float((got - want).abs().max())
        assert diff <= 1e-5, f"step {step} after reset differs from a fresh cache by {diff:.3g}"
    return cache, fresh_cache


def check_batch_refused(model, runner, name: str, context: int = 40) -> None:
    """Two different ``context``-token rows are refused at compression with a ``ValueError`` naming ``name``;
    two identical rows each give the logits of the row alone (≤ 1e-4)."""
    (rows,) = prompts(1, 2, context)
    with runner.applied(), torch.no_grad():
        with pytest.raises(ValueError, match=rf"^{re.escape(name)}: a batch of 2 different sequences is refused"):
            drive_prompt(model, runner, runner.new_cache(), rows)
        twice = drive_prompt(model, runner, runner.new_cache(), rows[:1].expand(2, -1))
        once = drive_prompt(model, runner, runner.new_cache(), rows[:1])
    for step, (pair, alone) in enumerate(zip(twice, once)):
        diff = float((pair - alone.expand_as(pair)).abs().max())
        assert diff <= 1e-4, f"step {step}: a row of an identical pair differs from the row alone by {diff:.3g}"
