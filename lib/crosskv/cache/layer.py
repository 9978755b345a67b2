"""The one cache-layer base: seen/held token bookkeeping, crop, reset, batch reorder and mask sizes.

Every crosskv cache layer (prefix layers of xKV/SVD/MiniCache, evicted and quantized plain layers,
CommonKV's latent layers, KVSharer's consumers) is a :class:`HeldLayer`. Its words, used the same way everywhere:

- **seen** tokens: every token the layer was given (``get_seq_length``; positions stay absolute);
- **held** tokens: rows attention reads, ``prefix_len`` held in the layer's own form (factors,
  merged directions, codes) plus ``tail_len`` exact rows in ``keys``/``values`` ``(B, H_kv, t, d)``;
  ``seen − held`` were evicted (the mask's offset);
- **fixed**: tokens seen when the layer last did something irreversible (eviction, compression,
  quantization); :meth:`crop` drops only exact tail rows seen after it.

A subclass sets ``prefix_len`` when it moves tail rows into its own form (and calls :meth:`fix`),
overrides :meth:`attend_kv` (what ``update`` hands attention; :mod:`crosskv.cache.attention`), and,
if it can, :meth:`map_prefix` (apply a batch-first tensor map to what it holds beyond the tail, for
beam reorder / repeat / select) and :meth:`release_prefix` (for :meth:`reset`). The defaults refuse
with a message naming the layer kind. A layer whose newest rows live elsewhere than the exact tail (CommonKV's
float latents; a KVSharer consumer, which holds nothing) says how many :meth:`crop` may cut
(:meth:`croppable`) and cuts them (:meth:`drop_newest`); one that can cut elsewhere too (a KIVI layer drops its
whole appended stream) says where in :meth:`check_crop`.

**The cache contract** every layer kind and every cache keeps (the glossary of :mod:`crosskv`; proven over the method
registry and the composition matrix by ``tests/test_contract.py``): a block appended after the compressed context
gives the logits of its one-token steps; what is appended after the context can be cropped back exactly, any number
of times (the context itself never changes once compressed: :attr:`fixed`); ``reset()`` forgets everything or raises
naming the method; batch rows are independent or a batch of different rows is refused by name; every tensor kept is
on the layer's device and owns its storage (slices are copied); ``kv_bytes`` equals the census at every moment.
"""
from __future__ import annotations

from typing import Callable

import torch
from transformers.cache_utils import DynamicLayer

from crosskv.cache.static import as_prefix


class ReleasesRopePerForward:
    """Cache mixin for a cache whose layers share ``self.rope`` (:class:`crosskv.core.rotary.RopeTables`): the
    forward's tables (and whatever else :meth:`forward_done` drops) are released after the model's last layer,
    whichever layers read them (a KVSharer consumer after the last group reads its producer's), so nothing made
    for one forward outlives it."""

    def update(self, key_states, value_states, layer_idx: int, cache_kwargs=None):
        try:
            return super().update(key_states, value_states, layer_idx, cache_kwargs)
        finally:
            if layer_idx == len(self.layers) - 1:
                self.forward_done()

    def forward_done(self) -> None:
        """Release what this forward made for its layers: the RoPE tables."""
        self.rope.release()


class HeldLayer(DynamicLayer):
    """Exact tail ``keys``/``values`` ``(B, H_kv, t, d)`` + ``prefix_len`` rows in a subclass's own form."""

    def __init__(self):
        super().__init__()
        self.seen = 0        # tokens given to the layer (absolute)
        self.prefix_len = 0  # held rows in the layer's own form
        self.fixed = 0       # tokens seen at the last irreversible step; crop stops here
        self.layer_idx: int | None = None  # set by the container; named in errors

    # --- what the layer holds ------------------------------------------------------------------
    def tail_len(self) -> int:
        return 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[-2]

    def held(self) -> int:
        """Tokens attention reads: ``prefix_len`` + the exact tail."""
        return self.prefix_len + self.tail_len()

    def fix(self) -> None:
        """Mark the tokens seen so far as gone through an irreversible step (crop cannot cut into them)."""
        self.fixed = self.seen

    # --- the forward -----------------------------------------------------------------------------
    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Count and store new tokens ``(B, H_kv, q, d)`` exactly at the end of the tail."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)

    def attend_kv(self):
        """What attention reads: the exact tail by default (a compressed layer returns its channel pair)."""
        return self.keys, self.values

    def update(self, key_states, value_states, cache_kwargs=None):
        self.append(key_states, value_states)
        return self.attend_kv()

    def frozen_prefix(self, capacity: int):
        """The layer's held tokens as one read-only prefix for the static layout (:func:`crosskv.cache.static.freeze`,
        room for ``capacity`` decode tokens): what attention reads now. A kind without an exact static layout
        raises :class:`~crosskv.cache.static.StaticRefused` naming itself."""
        return as_prefix(*self.attend_kv())

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        """``(held + q, seen − held)``: attention spans the held rows; evicted tokens offset the mask."""
        held = self.held()
        return held + cache_position.shape[0], self.seen - held

    # --- editing -----------------------------------------------------------------------------------
    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens seen (negative: drop that many) where :meth:`check_crop` allows
        (by default only the newest :meth:`croppable` rows seen after :attr:`fixed`), by :meth:`drop_newest`."""
        max_length = self.seen + max_length if max_length < 0 else max_length
        if max_length >= self.seen:
            return
        self.check_crop(max_length)
        self.drop_newest(self.seen - max_length)
        self.seen = max_length

    def check_crop(self, max_length: int) -> None:
        """Raise ``ValueError`` unless :meth:`drop_newest` can cut back to ``max_length`` tokens (``< seen``):
        only the newest :meth:`croppable` rows seen after :attr:`fixed` by default."""
        floor = max(self.fixed, self.seen - self.croppable())
        if max_length < floor:
            raise ValueError(f"cannot crop a {type(self).__name__} to {max_length} tokens: the first {floor} "
                             f"were evicted, compressed or quantized (layer {self.layer_idx}, {self.seen} seen)")

    def croppable(self) -> int:
        """How many of the newest tokens :meth:`drop_newest` can cut: the exact tail rows."""
        return self.tail_len()

    def drop_newest(self, count: int) -> None:
        """Cut the newest ``count`` exact tail rows; the kept rows are copied so no view pins the longer storage."""
        keep = self.tail_len() - count
        self.keys, self.values = self.keys[..., :keep, :].clone(), self.values[..., :keep, :].clone()

    def release_prefix(self) -> None:
        """Drop what the layer holds in its own form (for :meth:`reset`); refused by default."""
        if self.prefix_len:
            raise NotImplementedError(f"a {type(self).__name__} cannot be reset once compressed; "
                                      "build a new cache (runner.new_cache())")

    def reset(self) -> None:
        """Forget every token, as a new layer: nothing held, counters at zero, and the tail's batch size and dtype
        forgotten too (the next prompt may have any batch size)."""
        self.release_prefix()
        self.keys = self.values = None
        self.is_initialized = False
        self.seen = self.prefix_len = self.fixed = 0

    def map_prefix(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` to every batch-first tensor held beyond the tail; refused by default."""
        if self.prefix_len:
            raise NotImplementedError(f"a {type(self).__name__} cannot reorder its compressed prefix over the "
                                      "batch (beam search, contrastive search)")

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` to the batch axis of everything held (prefix first, so a refusal changes nothing)."""
        self.map_prefix(fn)
        if self.keys is not None:
            self.keys, self.values = fn(self.keys), fn(self.values)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.map_batch(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.map_batch(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.map_batch(lambda x: x[indices.to(x.device)])
