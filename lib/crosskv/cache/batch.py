"""Batches a cache cannot split into rows: :func:`check_one_sequence` refuses a batch whose rows differ.

A method that keeps one token set, merge or basis statistic for the whole batch (eviction's kept tokens,
xKV's SVD, MiniCache's angle range, CommonKV's positions) would mix the rows of a batch of different (or
left-padded) sequences, so it refuses them by name. Identical rows (the bench's batches) give each row the
one-sequence result and pass.
"""
from __future__ import annotations

import torch


def check_one_sequence(rows: torch.Tensor, name: str, reason: str) -> None:
    """Raise ``ValueError`` naming ``name`` (a method or press) and ``reason`` (what it shares over the batch)
    when the rows of ``rows`` ``(B, …)`` (a layer's keys or latents) differ; ``B = 1`` or identical rows pass."""
    if rows.shape[0] > 1 and not torch.equal(rows, rows[:1].expand_as(rows)):
        raise ValueError(f"{name}: a batch of {rows.shape[0]} different sequences is refused ({reason}); "
                         "run one sequence per cache")
