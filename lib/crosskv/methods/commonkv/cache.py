"""CommonKV's latent cache: one latent per layer and token (pre-RoPE), group stores of merged entries, the merge.

The cache stores **one** latent per layer and token with its absolute position. After the prefill, per
(group, token) the cosine between the group's first and last layer latents is scored; over all groups
the ``unmerged_ratio`` least similar entries stay per-layer (the first ``sink_tokens`` and last
``recent_tokens`` prompt tokens never merge) and every other entry is replaced by one group latent, the
sensitivity-weighted average of the group's latents, stored once in the group's :class:`GroupStore`
(on the device of the group's first layer).

Attention reads a layer's held tokens in held order (merged entries, then own latents), keys rebuilt
once per step with RoPE from the cache's :class:`~crosskv.core.rotary.RopeTables` (one table of positions
0…N−1 per forward and device, shared by every layer, released after the forward), values
left latent for decode steps (:mod:`crosskv.methods.commonkv.attention`).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from transformers import Cache

from crosskv.cache.attention import ExactPrefix, compressed_kv
from crosskv.cache.layer import HeldLayer, ReleasesRopePerForward
from crosskv.cache.quant import QTensor, QuantSpec, quantize, split_residual
from crosskv.core import budget
from crosskv.core import rotary
from crosskv.core.capture import KVShape
from crosskv.methods.commonkv.attention import LatentPrefix, LatentSteps, latent_values_cheaper
from crosskv.methods.commonkv.weights import LatentSlot, LayerProjections


class GroupStore:
    """A group's merged entries: latents ``(B, M, r)`` (float or quantized) and their positions ``(M,)`` int32."""

    def __init__(self, device: torch.device | None = None):
        self.pos = torch.zeros(0, dtype=torch.int32, device=device)
        self.lat: torch.Tensor | None = None
        self.qlat: QTensor | None = None

    def __len__(self) -> int:
        return self.pos.numel()

    def latents(self) -> torch.Tensor | None:
        return self.qlat.dequantize() if self.qlat is not None else self.lat

    def release(self) -> None:
        """Drop every merged entry (for :meth:`CommonKVCache.reset`)."""
        self.pos = self.pos[:0].clone()
        self.lat = self.qlat = None

    def tensors(self) -> Iterator[torch.Tensor]:
        if not len(self):
            return
        yield self.pos
        yield from (self.qlat.tensors() if self.qlat is not None else (self.lat,))


class CommonKVLayer(HeldLayer):
    """One layer's latents ``(B, n, r)`` with absolute positions ``(n,)``; K/V rebuilt with the layer's R_k, R_v.

    Own latents are ``qlat`` (quantized, oldest) followed by ``lat`` (float), in position order; the group's
    merged entries live in ``store``. ``seen`` counts every token that arrived (absolute positions;
    evicted/merged ones included). Attention sees the held tokens in *held order* — the group's merged
    entries, then the own latents — with each key rotated at its own position: past tokens are all visible
    to every new query, so their order does not matter and is never re-sorted.

    A :class:`~crosskv.cache.layer.HeldLayer` with no exact tail: every held token is a latent. Eviction,
    merging and quantization :meth:`~crosskv.cache.layer.HeldLayer.fix` the tokens seen so far; :meth:`crop`
    cuts only float latents appended after that.
    """

    is_compileable = False

    def __init__(self, slot: LatentSlot, proj: LayerProjections, store: GroupStore, rope: rotary.RopeTables,
                 shape: KVShape, attend: str, k_norm: nn.Module | None = None, device: torch.device | None = None,
                 layer_idx: int | None = None):
        super().__init__()
        self.slot, self.proj, self.store, self.rope, self.shape = slot, proj, store, rope, shape
        self.attend, self.k_norm, self.layer_idx = attend, k_norm, layer_idx
        self.lat: torch.Tensor | None = None
        self.qlat: QTensor | None = None
        self.pos = torch.zeros(0, dtype=torch.int32, device=device)
        self.buffer: tuple[torch.Tensor, torch.Tensor] | None = None

    def frozen_prefix(self, capacity: int):
        """The held tokens for the static layout: the latents (merged entries, codes, float) as :class:`LatentSteps`
        (keys rebuilt every step, as here), or the rebuilt buffer with ``attend="buffer"``. Decoded tokens then go to
        the static buffer as the exact K/V the latent projections give (R_k·c, R_v·c)."""
        if self.attend == "buffer":
            return ExactPrefix(*self.buffer)
        pieces = []
        if len(self.store):
            latents = self.store.qlat if self.store.qlat is not None else self.store.lat
            pieces.append((latents, self.store.pos.to(self.device)))
        n_q = 0 if self.qlat is None else self.qlat.length
        if n_q:
            pieces.append((self.qlat, self.pos[:n_q]))
        if self.lat is not None and self.lat.shape[-2]:
            pieces.append((self.lat, self.pos[n_q:]))
        return LatentSteps(tuple(pieces), self.proj.up_k, self.k_norm, self.rope.rotary, self.proj.up_v.weight,
                           self.proj.up_v.bias, self.shape, self.dtype)

    def buffer_template(self) -> torch.Tensor:
        """An empty ``(B, H_kv, 0, d)`` tensor of the keys' dtype and device (the static buffer's template)."""
        batch = (self.lat if self.lat is not None else self.qlat.codes).shape[0]
        return torch.empty(batch, self.shape.kv_heads, 0, self.shape.head_dim, dtype=self.dtype, device=self.device)

    # --- transformers protocol
    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.pos = self.pos.to(self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs=None):
        """Store the new tokens' latents; return what attention reads for every held token.

        ``key_states``/``value_states`` ``(B, H_kv, q, d)``: the new tokens' exact K (post-RoPE) and V. With
        ``attend="rebuild"`` and no earlier token, they are returned as they are. Otherwise the earlier
        tokens' keys are rebuilt once (R_k·c, RoPE at their positions) and, when cheaper (q·Hq < H_kv·d, e.g.
        decoding), their values stay latent: a :class:`~crosskv.methods.commonkv.attention.LatentPrefix` goes
        through :func:`crosskv.cache.attention.compressed_kv` to the ``crosskv`` attention, which applies the
        weights to the latents and R_v once per head. Else (long chunks) V is rebuilt too: plain tensors.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        latent = self.slot.latent
        self.slot.x = self.slot.latent = None  # the slot must not keep this step's activations alive
        q = key_states.shape[-2]
        if latent is None or latent.shape[-2] != q:
            raise RuntimeError("CommonKV cache used without its latent projections (run inside Runner.applied())")
        prefix = self.segments()
        self.lat = latent if self.lat is None else torch.cat([self.lat, latent], dim=-2)
        new_pos = torch.arange(self.seen, self.seen + q, dtype=torch.int32, device=self.pos.device)
        self.pos = torch.cat([self.pos, new_pos])
        upto, self.seen = self.seen, self.seen + q
        if self.attend == "buffer":
            return self.buffered(key_states, value_states)
        if not prefix:
            return key_states, value_states
        keys = self.rebuild_keys(prefix, upto)
        if latent_values_cheaper(q, self.shape):
            values = LatentPrefix(tuple(keys), tuple(lat for lat, _ in prefix), self.proj.up_v.weight,
                                  self.proj.up_v.bias, self.shape.kv_heads)
            return compressed_kv(values, key_states, value_states, self.layer_idx)
        return (torch.cat([*keys, key_states], dim=-2),
                torch.cat([self.rebuild_values(prefix), value_states], dim=-2))

    def buffered(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``attend="buffer"``: append the exact new K/V to the rebuilt K/V kept across steps."""
        if self.buffer is None:
            self.buffer = (key_states, value_states)
        else:
            self.buffer = (torch.cat([self.buffer[0], key_states], dim=-2),
                           torch.cat([self.buffer[1], value_states], dim=-2))
        return self.buffer

    def held(self) -> int:
        """Tokens attended to: own latents + the group's merged entries."""
        return self.pos.numel() + len(self.store)

    def croppable(self) -> int:
        """The float latents (the newest own tokens; quantized ones are older and fixed)."""
        return 0 if self.lat is None else self.lat.shape[-2]

    def drop_newest(self, count: int) -> None:
        """Cut the newest ``count`` float latents (and rebuilt buffer rows), copying the rest (no pinning views)."""
        rows = self.lat.shape[-2] - count
        self.lat, self.pos = self.lat[:, :rows].clone(), self.pos[:self.pos.numel() - count].clone()
        if self.buffer is not None:
            rows = self.buffer[0].shape[-2] - count
            self.buffer = (self.buffer[0][..., :rows, :].clone(), self.buffer[1][..., :rows, :].clone())

    def release_prefix(self) -> None:
        """Drop every latent and the rebuilt buffer (for :meth:`reset`; the group's store is the cache's)."""
        self.lat, self.qlat, self.buffer = None, None, None
        self.pos = torch.zeros(0, dtype=torch.int32, device=self.pos.device)

    def map_prefix(self, fn) -> None:
        """Refused once anything is held: the latents, codes and the group store would have to move together."""
        if self.held():
            raise NotImplementedError("a CommonKVLayer cannot reorder its latents over the batch (beam search, "
                                      "contrastive search)")

    # --- latents
    def own_latents(self) -> torch.Tensor:
        """Own latents ``(B, n, r)`` in position order."""
        parts = ([self.qlat.dequantize()] if self.qlat is not None else []) + ([self.lat] if self.lat is not None else [])
        return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]

    def latents_at(self, positions: torch.Tensor) -> torch.Tensor:
        """Own latents ``(B, m, r)`` at ``positions`` ``(m,)`` (which must be held by this layer)."""
        index = torch.searchsorted(self.pos, positions.to(self.pos.dtype))
        return self.own_latents().index_select(-2, index.long())

    def segments(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The held tokens in held order as ``(latents (B, n, r), positions (n,) int32)`` pieces: the group's merged
        entries (moved to this layer's device if the group spans devices), quantized own, float own."""
        out = []
        if len(self.store):
            out.append((self.store.latents().to(self.device, self.dtype), self.store.pos.to(self.device)))
        n_q = 0
        if self.qlat is not None:
            own_q = self.qlat.dequantize()
            n_q = own_q.shape[-2]
            out.append((own_q, self.pos[:n_q]))
        if self.lat is not None and self.lat.shape[-2]:
            out.append((self.lat, self.pos[n_q:]))
        return out

    def keep(self, positions: torch.Tensor) -> None:
        """Keep only own latents at ``positions`` (eviction or removal of merged tokens); float storage only."""
        if self.qlat is not None:
            raise RuntimeError("cannot drop tokens from a quantized CommonKV layer (quantize last)")
        mask = torch.isin(self.pos, positions.to(self.pos.dtype))
        self.lat, self.pos = self.lat[:, mask], self.pos[mask]
        self.fix()

    def rebuild_keys(self, segments: list[tuple[torch.Tensor, torch.Tensor]], upto: int) -> list[torch.Tensor]:
        """Post-RoPE keys ``(B, H_kv, n_i, d)`` per piece of ``segments``: one R_k GEMM each, RoPE in the model's
        dtype from the cached tables (positions < ``upto``)."""
        out = []
        for lat, pos in segments:
            keys = self.proj.up_k(lat)                                       # (B, n, H_kv·d)
            keys = keys.view(*keys.shape[:2], self.shape.kv_heads, self.shape.head_dim)
            if self.k_norm is not None:
                keys = self.k_norm(keys)
            cos, sin = (t[0, 0].index_select(0, pos) for t in self.rope.at(range(upto), keys.device, keys.dtype))
            out.append(rotary.apply(keys, cos[:, None], sin[:, None]).transpose(1, 2))  # cos, sin (n, d)
        return out

    def rebuild_values(self, segments: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """V ``(B, H_kv, S, d)`` of ``segments`` (held order)."""
        values = [self.proj.up_v(lat) for lat, _ in segments]
        values = torch.cat(values, dim=-2) if len(values) > 1 else values[0]
        b, s, _ = values.shape
        return values.view(b, s, self.shape.kv_heads, self.shape.head_dim).transpose(1, 2)

    def rebuild(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K (post-RoPE) and V ``(B, H_kv, S, d)`` of every held token, in held order."""
        segments = self.segments()
        return torch.cat(self.rebuild_keys(segments, self.seen), dim=-2), self.rebuild_values(segments)

    def current_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The K/V attention currently sees (for eviction scorers)."""
        return self.buffer if self.attend == "buffer" and self.buffer is not None else self.rebuild()

    def refresh(self) -> None:
        """Rebuild the working buffer after the stored latents changed (merge, eviction, quantization)."""
        if self.attend == "buffer":
            self.buffer = self.rebuild()

    def quantize_(self, spec: QuantSpec) -> None:
        """Quantize own latents per token, all but the ``spec.residual`` most recent."""
        if self.qlat is not None or self.lat is None:
            return
        n_q = split_residual(self.lat, spec.residual, axis=-2)
        if n_q:
            self.qlat = quantize(self.lat[:, :n_q], spec.bits, spec.group_size, axis=-1)
            self.lat = self.lat[:, n_q:].clone()
            self.fix()

    def stored(self) -> Iterator[torch.Tensor]:
        if self.qlat is not None:
            yield from self.qlat.tensors()
        if self.lat is not None and self.lat.numel():
            yield self.lat
        if self.pos.numel():
            yield self.pos


class CommonKVCache(ReleasesRopePerForward, Cache):
    """Container of :class:`CommonKVLayer` s, one :class:`GroupStore` per layer group and the RoPE tables of the
    forward in progress (none between forwards)."""

    def __init__(self, layers: list[CommonKVLayer], groups: list[list[int]], stores: list[GroupStore],
                 rope: rotary.RopeTables):
        super().__init__(layers=layers)
        self.groups, self.stores, self.rope = groups, stores, rope

    def stored_tensors(self) -> Iterator[torch.Tensor]:
        for layer in self.layers:
            yield from layer.stored()
        for store in self.stores:
            yield from store.tensors()
        yield from self.rope.tensors()
        for layer in self.layers:  # attend="buffer": the rebuilt K/V kept across steps
            if layer.buffer is not None:
                yield from layer.buffer

    def reset(self) -> None:
        """Forget every token, as a new cache: each layer's latents (:meth:`CommonKVLayer.release_prefix`), the
        groups' merged entries and the RoPE tables."""
        super().reset()
        for store in self.stores:
            store.release()
        self.rope.release()

    def evict_tokens(self, positions: dict[int, torch.Tensor]) -> None:
        """Keep, per layer index, only the latents at the given absolute positions ``(n,)``."""
        for idx, kept_positions in positions.items():
            self.layers[idx].keep(kept_positions)
        self.refresh()

    def quantize_(self, spec: QuantSpec) -> None:
        for layer in self.layers:
            layer.quantize_(spec)
        for store in self.stores:
            if len(store) and store.qlat is None:
                store.qlat, store.lat = quantize(store.lat, spec.bits, spec.group_size, axis=-1), None
        self.refresh()

    def refresh(self) -> None:
        for layer in self.layers:
            layer.refresh()
        self.rope.release()  # tables of the rebuilds above (outside a forward)


# ----------------------------------------------------------------------------- the adaptive merge

def candidate_positions(layers: list[CommonKVLayer], prompt_len: int, sinks: int, recent: int) -> torch.Tensor:
    """Positions held by every layer of a group, outside the first ``sinks`` and last ``recent`` prompt tokens."""
    pos = layers[0].pos
    for layer in layers[1:]:
        pos = pos[torch.isin(pos, layer.pos)]
    return pos[(pos >= sinks) & (pos < prompt_len - recent)]


def group_similarity(layers: list[CommonKVLayer], positions: torch.Tensor) -> torch.Tensor:
    """Cosine of the first and last layer's latents per position ``(m,)`` (averaged over the batch)."""
    first = layers[0].latents_at(positions).float()
    last = layers[-1].latents_at(positions).float()
    return torch.nn.functional.cosine_similarity(first, last, dim=-1).mean(0)


def merge_groups(cache: CommonKVCache, weights: list[float], unmerged_ratio: float, sinks: int, recent: int,
                 mode: str = "global") -> list[int]:
    """Merge the most similar (group, token) entries into one weighted group latent; returns merged counts per group."""
    prompt_len = cache.layers[0].seen
    groups = [[cache.layers[i] for i in g] for g in cache.groups]
    cands = [candidate_positions(ls, prompt_len, sinks, recent) if len(ls) > 1 else ls[0].pos[:0] for ls in groups]
    scores = [group_similarity(ls, c) if c.numel() else c.new_zeros(0, dtype=torch.float32) for ls, c in zip(groups, cands)]
    select = budget.global_bottom_k if mode == "global" else budget.per_group_bottom_k
    unmerged = select(scores, unmerged_ratio)
    counts = []
    for g, (layers, pos, keep) in enumerate(zip(groups, cands, unmerged)):
        chosen = pos[~keep.to(pos.device)]
        counts.append(int(chosen.numel()))
        if not chosen.numel():
            continue
        w = [weights[i] for i in cache.groups[g]]
        merged = sum(wi * layer.latents_at(chosen).float() for wi, layer in zip(w, layers))
        store = cache.stores[g]
        store.pos, store.lat = chosen.clone(), merged.to(layers[0].lat.dtype)
        for layer in layers:
            layer.keep(layer.pos[~torch.isin(layer.pos, chosen)])
    cache.refresh()
    return counts

